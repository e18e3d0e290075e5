"""Python's garbage collector paced by the clock, for a process that holds thousands of long polls.

CPython starts a young collection when its count of tracked objects allocated minus deallocated
passes a threshold. A coordinator with 10,000 agents waiting frees old objects (the polls that
end) about as fast as it makes new ones (the polls that begin), so the count hovers under the
threshold while the young generation grows to a few hundred thousand objects; the collection
that finally runs walks them all with the event loop stopped. Measured with 10,000 idle agents:
young collections of 100,000-300,000 objects taking 0.1-0.8 s, finding no garbage, every few
seconds: the agents' heartbeat latency (benchmarks/README.md, Fleet, "Third round").

``PacedCollector`` turns automatic collection off and runs a young collection from the event loop
every ``young_seconds`` (it walks only what was made since the last one and still lives: a few
milliseconds), and a full collection every ``full_seconds``, for cycles among older objects
(a pause of 1-1.5 s with 10,000 agents connected, once in that period).
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class PacedCollector:
    young_seconds: float = 0.1
    full_seconds: float = 600.0
    collect: Callable[[int], int] = gc.collect  # generation -> objects found unreachable
    clock: Callable[[], float] = time.monotonic
    on_pause: Callable[[int, float], None] | None = None  # (generation, seconds) after each collection
    young: int = field(default=0, init=False)  # collections run, for tests and figures
    full: int = field(default=0, init=False)
    _handle: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)
    _was_enabled: bool = field(default=True, init=False, repr=False)
    _last_full: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.young_seconds > 0 and self.full_seconds >= self.young_seconds):
            raise ValueError("young_seconds is above 0 and full_seconds at least young_seconds")

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Freeze what exists now (start-up: modules, the app) out of every later walk, turn
        automatic collection off and begin collecting from ``loop``."""
        if self._handle is not None:
            raise RuntimeError("the collector is already running")
        self._was_enabled = gc.isenabled()
        gc.collect()
        gc.freeze()
        gc.disable()
        self._last_full = self.clock()
        self._handle = loop.call_later(self.young_seconds, self._tick, loop)

    def stop(self) -> None:
        """Stop collecting here and give collection back to Python as it was before ``start``."""
        if self._handle is None:
            return
        self._handle.cancel()
        self._handle = None
        if self._was_enabled:
            gc.enable()

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        began = self.clock()
        generation = 2 if began - self._last_full >= self.full_seconds else 0
        try:
            self.collect(generation)
        finally:
            if generation == 2:
                self.full += 1
                self._last_full = self.clock()
            else:
                self.young += 1
            if self.on_pause is not None:
                self.on_pause(generation, self.clock() - began)
            if self._handle is not None:  # not stopped meanwhile (a finalizer may stop it)
                self._handle = loop.call_later(self.young_seconds, self._tick, loop)
