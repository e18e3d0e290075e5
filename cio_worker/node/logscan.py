"""One pass over a block of a render's output: where the secrets are, and which lines the monitor
reads.

``OutputScanner`` compiles the secret values and a ``LineFilter`` (line prefixes, words in any
case) into one Hyperscan database (``scandb.py``): a block is scanned once, in C, without the GIL,
at several GB/s; Python only sees the matches (most 1 MiB blocks of a render log hold none or a
few dozen).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

from cio_worker.job.environment import is_secret_name
from cio_worker.node.scandb import CASELESS, MULTILINE, Engine, ScanDatabase, compile_database

MASK = "****"
_MASK_BYTES = MASK.encode()
_MIN_MASKED_LEN = 4  # shorter secret values are masked in the header but not searched in output


class SecretMasker:
    """Replaces every occurrence of the given secret values with ``****``."""

    def __init__(self, values: Iterable[str]) -> None:
        pieces = set()
        for value in values:
            for piece in [value, *value.splitlines()]:
                if len(piece) >= _MIN_MASKED_LEN:
                    pieces.add(piece)
        ordered = sorted(pieces, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(p) for p in ordered)) if ordered else None
        # Output is masked line by line: a value's lines are searched, not the value across lines.
        self.needles: tuple[bytes, ...] = tuple(p.encode("utf-8", "surrogateescape") for p in ordered if "\n" not in p)

    @classmethod
    def for_env(cls, env: Mapping[str, str], secret_names: Iterable[str]) -> "SecretMasker":
        extra = {n.upper() for n in secret_names}
        return cls(v for k, v in env.items() if v and (is_secret_name(k) or k.upper() in extra))

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        return self._pattern.sub(MASK, text) if self._pattern is not None else text


@dataclass(frozen=True)
class LineFilter:
    """Which output lines ``on_line`` wants: those starting with one of ``prefixes`` (exact case)
    or holding one of ``words`` (ASCII, any case)."""

    prefixes: tuple[str, ...] = ()
    words: tuple[str, ...] = ()

    def spans(self, block: bytes | bytearray) -> Iterator[tuple[int, int]]:
        """(start, end) of each selected line of ``block`` (whole lines, ending in a newline), in order."""
        yield from OutputScanner((), self).scan(block).lines


@dataclass
class Found:
    """What one scan found: secret spans (merged, in order) and selected lines (start, end without
    the newline; in order, each once)."""

    secrets: list[tuple[int, int]] = field(default_factory=list)
    lines: list[tuple[int, int]] = field(default_factory=list)


class OutputScanner:
    """Finds secrets and filtered lines in blocks of whole lines. One per reader thread (a
    Hyperscan database has one scratch space)."""

    def __init__(self, secrets: Sequence[bytes], line_filter: LineFilter | None, engine: Engine = "auto") -> None:
        expressions: list[bytes] = []
        flags: list[int] = []
        self._secret_len: dict[int, int] = {}
        for needle in secrets:
            self._secret_len[len(expressions)] = len(needle)
            expressions.append(_literal(needle))
            flags.append(0)
        if line_filter is not None:
            for prefix in line_filter.prefixes:
                expressions.append(b"^" + _literal(prefix.encode()))
                flags.append(MULTILINE)
            for word in line_filter.words:
                expressions.append(_literal(word.encode()))
                flags.append(CASELESS)
        self._db: ScanDatabase | None = compile_database(expressions, flags, engine) if expressions else None

    @property
    def engine(self) -> str:
        """The Hyperscan build that scans (``Hyperscan, system 5.4.9``: the system's libhs; ``Hyperscan,
        wheel``), or why nothing is scanned."""
        return f"Hyperscan, {self._db.engine}" if self._db is not None else "none (no secret to mask, no line to pick)"

    def scan(self, data: bytes | bytearray, end: int | None = None) -> Found:
        """Scan ``data[:end]`` (whole lines)."""
        found = Found()
        end = len(data) if end is None else end
        if self._db is None or not end:
            return found
        hits = self._db.scan(data, end)
        secrets: list[tuple[int, int]] = []
        starts: dict[int, int] = {}
        for id_, to in hits:
            length = self._secret_len.get(id_)
            if length is not None:
                secrets.append((to - length, to))
                continue
            start = data.rfind(b"\n", 0, to) + 1
            if start not in starts:
                line_end = data.find(b"\n", to, end)
                starts[start] = line_end if line_end != -1 else end
        for start, stop in sorted(secrets):
            if found.secrets and start < found.secrets[-1][1]:  # overlapping; adjacent ones stay two
                found.secrets[-1] = (found.secrets[-1][0], max(stop, found.secrets[-1][1]))
            else:
                found.secrets.append((start, stop))
        found.lines = sorted(starts.items())
        return found

    @staticmethod
    def pieces(view: memoryview, secrets: list[tuple[int, int]], start: int, end: int) -> list[memoryview | bytes]:
        """``view[start:end]`` with each secret span (offsets in ``view``, from ``scan``) that
        overlaps it replaced by ``****``, as consecutive pieces (no copy)."""
        pieces: list[memoryview | bytes] = []
        at = start
        for s, e in secrets:
            if e <= start or s >= end:
                continue
            pieces += [view[at:max(s, start)], _MASK_BYTES]
            at = min(e, end)
        pieces.append(view[at:end])
        return pieces

    @staticmethod
    def line_texts(view: memoryview, found: Found) -> list[str]:
        """The selected lines of a scanned block, masked and decoded (bad UTF-8 replaced, a
        trailing CR dropped). Lines without a secret are decoded straight from the buffer."""
        texts: list[str] = []
        secrets, i = found.secrets, 0
        for start, stop in found.lines:
            while i < len(secrets) and secrets[i][1] <= start:
                i += 1
            if i < len(secrets) and secrets[i][0] < stop:
                texts.append(b"".join(OutputScanner.pieces(view, secrets, start, stop)).decode("utf-8", "replace").rstrip("\r"))
            else:
                texts.append(str(view[start:stop], "utf-8", "replace").rstrip("\r"))
        return texts


def _literal(text: bytes) -> bytes:
    """A Hyperscan expression matching exactly ``text`` (every byte escaped)."""
    return b"".join(b"\\x%02x" % byte for byte in text)
