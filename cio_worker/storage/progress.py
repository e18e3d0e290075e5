"""Progress displays for transfers (the storage Progress protocol), thread-safe.

``TerminalProgress``: a bar for people. On a terminal it redraws one line in place (``\\r``) at
most every ``interval`` seconds; elsewhere (a pipe, a file) it writes a plain line every
``plain_interval`` seconds. ``LoggingProgress``: a log line every ``every`` seconds, for the agent.
Both end with a final line when the last file is done (or on ``finish()``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO

Clock = Callable[[], float]


@dataclass(frozen=True)
class Snapshot:
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    elapsed: float

    @property
    def complete(self) -> bool:
        return self.files_done >= self.files_total

    @property
    def rate(self) -> float:
        """Bytes per second since the start."""
        return self.bytes_done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left, from bytes when the total is known, else from files; None if unknown."""
        if self.complete:
            return 0.0
        if self.bytes_total > 0 and self.bytes_done > 0:
            return max(0, self.bytes_total - self.bytes_done) / self.rate
        if self.files_done > 0:
            return (self.files_total - self.files_done) * self.elapsed / self.files_done
        return None

    @property
    def fraction(self) -> float | None:
        if self.bytes_total > 0:
            return min(1.0, self.bytes_done / self.bytes_total)
        if self.files_total > 0:
            return self.files_done / self.files_total
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describe(s: Snapshot) -> str:
    """``12/500 files  3.4 MiB/120.0 MiB  5.2 MiB/s  ETA 0:23``"""
    parts = [f"{s.files_done}/{s.files_total} files"]
    parts.append(f"{format_bytes(s.bytes_done)}/{format_bytes(s.bytes_total)}" if s.bytes_total else format_bytes(s.bytes_done))
    parts.append(f"{format_bytes(s.rate)}/s")
    if s.complete:
        parts.append(f"done in {format_duration(s.elapsed)}")
    else:
        eta = s.eta
        parts.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA --:--")
    return "  ".join(parts)


class _Tally:
    """Counters behind a lock; callers hold ``lock`` while reading a snapshot and drawing."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.files_total = self.files_done = self.bytes_total = self.bytes_done = 0
        self.started = clock()
        self.finished = False

    def reset(self, files: int, total_bytes: int) -> None:
        self.files_total, self.bytes_total = files, total_bytes
        self.files_done = self.bytes_done = 0
        self.started = self.clock()
        self.finished = False

    def snapshot(self) -> Snapshot:
        return Snapshot(self.files_done, self.files_total, self.bytes_done, self.bytes_total, self.clock() - self.started)


class _Display:
    """The bookkeeping both displays share: counters under a lock, throttled redraws, one end.

    A subclass writes one state in ``_draw(snapshot)`` and may end its output in ``_close()``;
    ``_draw`` runs at ``start``, at most every ``interval`` seconds after, and once at the end.
    """

    def __init__(self, clock: Clock, interval: float) -> None:
        self.interval = interval
        self._tally = _Tally(clock)
        self._last_draw: float | None = None

    def start(self, files: int, total_bytes: int) -> None:
        with self._tally.lock:
            self._tally.reset(files, total_bytes)
            self._last_draw = None
            self._update(force=True)

    def advance(self, nbytes: int) -> None:
        with self._tally.lock:
            self._tally.bytes_done += nbytes
            self._update()

    def file_done(self, key: str) -> None:
        with self._tally.lock:
            self._tally.files_done += 1
            if self._tally.files_done >= self._tally.files_total:
                self._end()
            else:
                self._update()

    def finish(self) -> None:
        """Draw the final state (e.g. after a failed batch) and end the output."""
        with self._tally.lock:
            self._end()

    def _end(self) -> None:
        if self._tally.finished:
            return
        self._update(force=True)
        self._close()
        self._tally.finished = True

    def _update(self, force: bool = False) -> None:
        if self._tally.finished:
            return
        now = self._tally.clock()
        if not force and self._last_draw is not None and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        self._draw(self._tally.snapshot())

    def _draw(self, snapshot: Snapshot) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        pass


class TerminalProgress(_Display):
    def __init__(
        self,
        stream: TextIO | None = None,
        label: str = "",
        *,
        interval: float = 0.1,
        plain_interval: float = 5.0,
        width: int = 24,
        clock: Clock = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        super().__init__(clock, interval if self.tty else plain_interval)
        self.label = label
        self.width = width
        self._drawn = 0  # length of the line on screen, to blank leftovers

    def line(self) -> str:
        with self._tally.lock:
            return self._line(self._tally.snapshot())

    def _line(self, s: Snapshot) -> str:
        text = describe(s)
        fraction = s.fraction
        if fraction is not None:
            filled = int(fraction * self.width)
            text = f"[{'#' * filled}{'.' * (self.width - filled)}] {fraction * 100:3.0f}%  {text}"
        return f"{self.label}: {text}" if self.label else text

    def _draw(self, snapshot: Snapshot) -> None:
        text = self._line(snapshot)
        if self.tty:
            self.stream.write("\r" + text.ljust(self._drawn))
            self._drawn = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class LoggingProgress(_Display):
    """Logs ``label: 12/500 files ...`` at the start, every ``every`` seconds, and at the end."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        label: str = "transfer",
        *,
        every: float = 10.0,
        level: int = logging.INFO,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(clock, every)
        self.logger = logger or logging.getLogger("cio_worker.storage.progress")
        self.label = label
        self.every = every
        self.level = level

    def _draw(self, snapshot: Snapshot) -> None:
        self.logger.log(self.level, "%s: %s", self.label, describe(snapshot))
