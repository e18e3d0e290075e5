"""The output scan's Hyperscan database: the system library (AVX2 where the CPU has it) and the
wheel find the same matches; a missing library falls back, or is refused when asked for."""

from __future__ import annotations

import gc
import random
import weakref

import pytest

from cio_worker.node.logscan import Found, LineFilter, OutputScanner, _literal
from cio_worker.node.scandb import CASELESS, MULTILINE, ScanEngineError, _system_library, compile_database

try:
    _system_library("libhs.so.5")
    HAVE_SYSTEM = True
except ScanEngineError:
    HAVE_SYSTEM = False

ENGINES = ["wheel", pytest.param("system", marks=pytest.mark.skipif(
    not HAVE_SYSTEM, reason="libhs.so.5 is not installed (Debian: apt-get install libvectorscan5; .ci/run does)"))]

WORDS = [b"error", b"licen", b"out of memory"]
SECRET = b"hunter2-secret"


def database(engine: str):
    expressions = [_literal(SECRET), b"^" + _literal(b"Progress for '")] + [_literal(w) for w in WORDS]
    flags = [0, MULTILINE] + [CASELESS] * len(WORDS)
    return compile_database(expressions, flags, engine)  # type: ignore[arg-type]


def sample(seed: int) -> bytes:
    rng = random.Random(seed)
    pieces = [b"chatter ", b"ERROR ", b"Licence ", b"Progress for 'x' ", b"hunter2-secret", b"\n", b"OUT OF MEMORY",
              b"erro", b"\xff\xfe", b"Progress for ", b"\nProgress for 'y'\n"]
    return b"".join(rng.choice(pieces) for _ in range(4000))


def expected_hits(data: bytes, end: int) -> list[tuple[int, int]]:
    """What the database must report, found the slow way: (id, offset past the match)."""
    hits = []
    block = data[:end]
    for at in range(len(block)):
        if block.startswith(SECRET, at):
            hits.append((0, at + len(SECRET)))
        if (at == 0 or block[at - 1] == ord("\n")) and block.startswith(b"Progress for '", at):
            hits.append((1, at + 14))
        for i, word in enumerate(WORDS):
            if block[at:at + len(word)].lower() == word:
                hits.append((2 + i, at + len(word)))
    return sorted(hits, key=lambda h: (h[1], h[0]))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_each_engine_reports_every_match_and_nothing_past_the_end(engine, kind):
    db = database(engine)
    assert db.engine == "wheel" if engine == "wheel" else db.engine.startswith("system ")
    for seed in range(3):
        data = sample(seed)
        end = len(data) - 500
        assert b"hunter2-secret" in data[end:] or b"ERROR" in data[end:]  # the cut hides some matches
        got = sorted(db.scan(kind(data), end), key=lambda h: (h[1], h[0]))
        assert got == expected_hits(data, end)


@pytest.mark.skipif(not HAVE_SYSTEM, reason="libhs.so.5 is not installed")
def test_auto_takes_the_system_library_where_it_is_installed():
    assert compile_database([b"x"], [0]).engine.startswith("system ")


def test_a_missing_system_library_falls_back_to_the_wheel_or_is_refused_when_asked_for():
    assert compile_database([b"x"], [0], "auto", library="libhs-missing.so.9").engine == "wheel"
    with pytest.raises(ScanEngineError, match="libvectorscan5"):
        compile_database([b"x"], [0], "system", library="libhs-missing.so.9")
    not_hyperscan = "libz.so.1"  # a library that loads but has no Hyperscan in it
    assert compile_database([b"x"], [0], "auto", library=not_hyperscan).engine == "wheel"
    with pytest.raises(ScanEngineError, match="not a Hyperscan"):
        compile_database([b"x"], [0], "system", library=not_hyperscan)
    with pytest.raises(ValueError, match="unknown scan engine"):
        compile_database([b"x"], [0], "fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ENGINES)
def test_selected_lines_are_masked_only_where_a_secret_is_and_decoded(engine):
    scanner = OutputScanner([SECRET], LineFilter(prefixes=("Saved",), words=("error",)), engine)  # type: ignore[arg-type]
    block = (b"ok hunter2-secret\n"            # a secret, not selected
             b"Saved a\r\n"                     # selected, CR dropped
             b"ERROR hunter2-secret x\n"        # selected, masked
             b"fine\n"
             b"error \xff bad byte\n"           # selected, bad UTF-8 replaced
             b"hunter2-secret error\n")         # selected, masked at the start
    data = bytearray(block)
    found = scanner.scan(data, len(data))
    assert isinstance(found, Found) and len(found.secrets) == 3
    with memoryview(data) as view:
        assert OutputScanner.line_texts(view, found) == [
            "Saved a", "ERROR **** x", "error \ufffd bad byte", "**** error"]


@pytest.mark.skipif(not HAVE_SYSTEM, reason="libhs.so.5 is not installed")
def test_a_system_database_is_freed_when_dropped_without_waiting_for_the_collector():
    db = compile_database([b"ab"], [0], "system")
    assert db.scan(b"xxabyyab", 8) == [(0, 4), (0, 8)]
    gone = weakref.ref(db)
    gc.disable()
    try:
        del db  # each task drops its scanner: the library's database and scratch go with it
        assert gone() is None
    finally:
        gc.enable()
