"""The pieces every backend shares (present_keys, ranged parts, the batch runner, retries) and the
progress displays, without a store. The backends themselves: test_storage_contract.py."""

from __future__ import annotations

import io
import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from cio_worker.errors import StorageError
from cio_worker.job.hashing import md5_b64_of_bytes
from cio_worker.storage.progress import LoggingProgress, TerminalProgress
from cio_worker.storage import TransferError
from cio_worker.storage.common import (Activity, fetch_parts, part_size_for, present_keys, run_batch, temp_sibling,
                                       temp_sibling_str)
from cio_worker.storage.retry import Retrier, RetryPolicy

KiB = 1024
MiB = 1024 * 1024


# --- present_keys: listing versus asking one by one


def _fake_store(names: list[str], page_size: int = 1000):
    stored = sorted(names)
    calls = {"pages": 0, "probed": []}

    def list_pages(prefix: str, first: str) -> Iterator[list[str]]:
        rest = [n for n in stored if n.startswith(prefix) and n >= first[:-1]]
        for i in range(0, len(rest), page_size):
            calls["pages"] += 1
            yield rest[i : i + page_size]
        if not rest:
            calls["pages"] += 1
            yield []

    def probe(asked: list[str]) -> set[str]:
        calls["probed"].extend(asked)
        return {n for n in asked if n in set(stored)}

    return list_pages, probe, calls


def _hex_names(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"pre/hashstore/{rng.getrandbits(128):032x}" for _ in range(count)]


def test_present_keys_lists_when_the_batch_is_a_large_part_of_the_store() -> None:
    stored = _hex_names(3000, 1)
    asked = stored[:500] + _hex_names(100, 2)
    list_pages, probe, calls = _fake_store(stored)
    assert present_keys(asked, list_pages, probe) == set(stored[:500])
    assert calls["probed"] == [] and calls["pages"] <= 3


def test_present_keys_probes_when_the_store_is_much_larger_than_the_batch() -> None:
    stored = _hex_names(20_000, 3)
    asked = stored[:5] + _hex_names(5, 4)
    list_pages, probe, calls = _fake_store(stored)
    assert present_keys(asked, list_pages, probe) == set(stored[:5])
    # Listing stops once pages settle fewer keys than they cost: never much worse than probing all.
    assert calls["pages"] < 20 and len(calls["probed"]) > 0
    assert calls["pages"] + len(calls["probed"]) <= len(asked) + 1


def test_present_keys_probes_a_few_keys_without_listing() -> None:
    stored = _hex_names(50, 5)
    list_pages, probe, calls = _fake_store(stored)
    assert present_keys(stored[:3] + ["pre/hashstore/none"], list_pages, probe) == set(stored[:3])
    assert calls["pages"] == 0 and len(calls["probed"]) == 4


def test_present_keys_on_an_empty_store() -> None:
    list_pages, probe, calls = _fake_store([])
    assert present_keys(_hex_names(40, 6), list_pages, probe) == set()
    assert calls["probed"] == []


# --- ranged parts: how big, and what a failed part fetches again


def test_parts_are_as_few_as_keep_the_streams_busy_and_never_small() -> None:
    # one large object in the batch: as many parts as streams, each at least the minimum
    assert part_size_for(256 * MiB, 1, 8 * MiB, 8) == 32 * MiB
    assert part_size_for(20 * MiB, 1, 8 * MiB, 8) == 8 * MiB
    # four: a quarter as many each; many: one part each (a whole-object GET)
    assert part_size_for(256 * MiB, 4, 8 * MiB, 8) == 128 * MiB
    assert part_size_for(256 * MiB, 100, 8 * MiB, 8) == 256 * MiB
    # sizes round up to whole MiB; a configured part size is used as it is
    assert part_size_for(100 * MiB + 1, 1, 8 * MiB, 8) == 13 * MiB
    assert part_size_for(256 * MiB, 1, 1 * MiB, 8, fixed=True) == 1 * MiB


def test_a_part_cut_short_is_resumed_from_where_it_stopped(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(5 * MiB + 123)
    asked: list[tuple[int, int]] = []
    cut = {2 * MiB}  # the first request for the part at 2 MiB stops after 300 KiB

    def fetch_part(first: int, last: int, writer) -> None:
        asked.append((first, last))
        if first in cut:
            cut.discard(first)
            writer.write(data[first : first + 300 * KiB])
            raise ConnectionResetError("cut")
        for start in range(first, last + 1, 64 * KiB):
            writer.write(data[start : min(start + 64 * KiB, last + 1)])

    retry = Retrier(RetryPolicy(attempts=3, initial=0, maximum=0), lambda e: isinstance(e, ConnectionError))
    with ThreadPoolExecutor(3) as pool:
        md5 = fetch_parts(tmp_path / "out", len(data), 1 * MiB, fetch_part, executor=pool, retry=retry,
                          activity=Activity())  # fmt: skip
    assert md5 == md5_b64_of_bytes(data) and (tmp_path / "out").read_bytes() == data
    assert (2 * MiB + 300 * KiB, 3 * MiB - 1) in asked  # only the missing bytes were asked again
    assert len(asked) == 6 + 1


def test_a_store_sending_more_than_the_range_is_refused(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(3 * MiB)

    def fetch_part(first: int, last: int, writer) -> None:
        writer.write(data)  # the whole object, whatever was asked

    retry = Retrier(RetryPolicy(attempts=3, initial=0, maximum=0), lambda e: isinstance(e, ConnectionError))
    with ThreadPoolExecutor(2) as pool, pytest.raises(StorageError) as caught:
        fetch_parts(tmp_path / "out", len(data), 1 * MiB, fetch_part, executor=pool, retry=retry, activity=Activity())
    assert caught.value.code == "no_ranges"


def test_a_batch_of_thousands_reports_every_failure_once() -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        with lock:
            seen.append(n)
        if n % 1000 == 7:
            raise ValueError(f"item {n}")

    with pytest.raises(TransferError) as caught:
        run_batch("test", list(range(5000)), str, work, concurrency=16, activity=Activity(), stall_seconds=30)
    assert sorted(seen) == list(range(5000))
    assert [f.key for f in caught.value.failures] == sorted(str(n) for n in range(5000) if n % 1000 == 7)


# --- retries


def _flaky(failures: list[BaseException]):
    calls = []

    def call() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "ok"

    return call, calls


def test_retrier_retries_transient_errors_with_growing_jittered_waits() -> None:
    waits: list[float] = []
    retry = Retrier(RetryPolicy(attempts=5, initial=1.0, maximum=3.0), lambda e: isinstance(e, ConnectionError), waits.append)
    call, calls = _flaky([ConnectionResetError(), ConnectionResetError(), ConnectionResetError()])
    assert retry(call) == "ok" and len(calls) == 4
    assert len(waits) == 3 and all(0 <= w <= 3.0 for w in waits)


def test_retrier_gives_up_after_its_attempts_and_never_retries_other_errors() -> None:
    retry = Retrier(RetryPolicy(attempts=3), lambda e: isinstance(e, ConnectionError), lambda s: None)
    call, calls = _flaky([ConnectionResetError()] * 5)
    with pytest.raises(ConnectionResetError):
        retry(call)
    assert len(calls) == 3
    call, calls = _flaky([PermissionError("denied")])
    with pytest.raises(PermissionError):
        retry(call)
    assert len(calls) == 1


def test_retrier_stops_once_its_batch_is_over() -> None:
    over = threading.Event()
    retry = Retrier(RetryPolicy(attempts=5), lambda e: True, lambda s: None).until(over)
    call, calls = _flaky([ConnectionResetError()] * 5)
    over.set()
    with pytest.raises(ConnectionResetError):
        retry(call)
    assert len(calls) == 1


# --- progress displays


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_progress_on_a_tty_redraws_one_line_in_place() -> None:
    clock = FakeClock()
    out = Terminal()
    bar = TerminalProgress(out, "download", clock=clock)
    bar.start(4, 4 * MiB)
    clock.now += 1
    bar.advance(MiB)
    bar.file_done("a")
    bar.advance(MiB)  # within 0.1 s of the last draw: not drawn
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") == 2
    assert text.split("\r")[-1].strip() == (
        "download: [######..................]  25%  0/4 files  1.0 MiB/4.0 MiB  1.0 MiB/s  ETA 0:03"
    )
    clock.now += 1
    bar.advance(2 * MiB)
    for key in "bcd":
        bar.file_done(key)
    last = out.getvalue().split("\r")[-1]
    assert last.endswith("\n") and "4/4 files  4.0 MiB/4.0 MiB  2.0 MiB/s  done in 0:02" in last
    assert "[########################] 100%" in last
    bar.finish()  # already ended: nothing more
    assert out.getvalue().endswith(last)


def test_terminal_progress_elsewhere_writes_plain_periodic_lines() -> None:
    clock = FakeClock()
    out = io.StringIO()
    bar = TerminalProgress(out, clock=clock, plain_interval=5.0)
    bar.start(100, 0)
    for i in range(60):
        clock.now += 0.25
        bar.advance(10 * KiB)
        bar.file_done(str(i))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 1 + 3  # the start, then one every 5 s of the 15 s
    assert lines[0].startswith("[........................]   0%  0/100 files  0 B  0 B/s  ETA --:--")
    assert "59/100 files  600.0 KiB  40.0 KiB/s  ETA 0:10" in lines[-1]
    bar.finish()  # e.g. after a failed batch: the state as it is, with an ETA since not complete
    assert out.getvalue().splitlines()[-1].endswith("60/100 files  600.0 KiB  40.0 KiB/s  ETA 0:10")


def test_terminal_progress_is_thread_safe(tmp_path: Path) -> None:
    out = io.StringIO()
    bar = TerminalProgress(out, interval=0.0, plain_interval=0.0)
    bar.start(800, 800 * 10)

    def work() -> None:
        for i in range(100):
            bar.advance(10)
            bar.file_done(str(i))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = "[########################] 100%  800/800 files  7.8 KiB/7.8 KiB"
    assert bar.line().startswith(final)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith(final) and len(lines) == 1 + 1600  # every event drew (interval 0), once each


def test_logging_progress_logs_every_n_seconds(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = logging.getLogger("test.progress")
    progress = LoggingProgress(log, "inputs", every=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        progress.start(10, 10 * MiB)
        for _ in range(10):
            clock.now += 3
            progress.advance(MiB)
            progress.file_done("k")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "inputs: 0/10 files  0 B/10.0 MiB  0 B/s  ETA --:--"
    assert len(messages) == 1 + 2 + 1  # start, at 12 s and 24 s, the end
    assert messages[1] == "inputs: 3/10 files  4.0 MiB/10.0 MiB  341.3 KiB/s  ETA 0:18"
    assert messages[-1] == "inputs: 10/10 files  10.0 MiB/10.0 MiB  341.3 KiB/s  done in 0:30"


def test_a_batch_whose_items_stop_moving_fails_as_stalled_and_starts_no_more() -> None:
    release = threading.Event()
    done: list[int] = []

    def work(n: int) -> None:
        if n == 3:
            release.wait(30)  # a store that stopped answering
            return
        done.append(n)

    activity = Activity()
    try:
        with pytest.raises(TransferError) as caught:
            run_batch("test", list(range(50)), str, work, concurrency=1, activity=activity, stall_seconds=0.5)
    finally:
        release.set()
    assert caught.value.code == "stalled"
    assert [f.key for f in caught.value.failures] == sorted(str(n) for n in range(3, 50))
    assert done == [0, 1, 2]


def test_a_download_makes_the_missing_directory_of_its_destination(tmp_path: Path) -> None:
    from cio_worker.job.hashing import md5_b64_of_bytes
    from cio_worker.storage.base import DownloadItem, StorageOptions
    from cio_worker.storage.file import FileStorage

    (tmp_path / "store" / "hashstore").mkdir(parents=True)
    for i in range(64):
        (tmp_path / "store" / "hashstore" / f"k{i}").write_bytes(b"content %d" % i)
    dest = tmp_path / "not" / "yet" / "there"  # every thread finds it missing at first
    FileStorage(f"file://{tmp_path / 'store'}", StorageOptions(concurrency=8)).download(
        [DownloadItem(f"hashstore/k{i}", str(dest / f"{i}"), md5_b64_of_bytes(b"content %d" % i)) for i in range(64)])
    assert sorted(p.read_bytes() for p in dest.iterdir()) == sorted(b"content %d" % i for i in range(64))


# --- temporary names


def test_a_temporary_name_is_never_made_twice(tmp_path: Path) -> None:
    """A transfer abandoned after a stall keeps its thread (left to its socket's timeout) and may
    still write to, or remove, its temporary file; the next attempt at the same destination, run
    from the same thread, must not get that name (it did when names were per thread: the retry's
    file vanished before its rename)."""
    dest = tmp_path / "renders" / "beauty.0001.exr"
    same_thread = [temp_sibling(dest) for _ in range(3)] + [Path(temp_sibling_str(str(dest))) for _ in range(3)]
    with ThreadPoolExecutor(4) as pool:
        other_threads = list(pool.map(lambda _: temp_sibling(dest), range(40)))
    names = same_thread + other_threads
    assert len(set(names)) == len(names)
    assert all(n.parent == dest.parent and n.name.startswith(".beauty.0001.exr.part-") for n in names)
