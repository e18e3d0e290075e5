"""Wake-ups for long-polling claims, one waiter per unit of work, first come first served.

Waking every idle agent when one task arrives would send them all to the database at once; a
``WorkSignal`` wakes as many waiters as there is new work, in the order they began to wait.
Ten thousand idle agents wait here at once, so a wait costs one future, and one that ends leaves
its place in the line to be dropped later rather than searched for.

A long wait ends on a grid of ``tick`` seconds, late by less than a tick: the waits that end in
the same tick share one timer and end in one turn of the event loop, and so do the replies and
the agents' next polls that follow. A request that wakes an idle loop costs about twice one that
arrives among others, so an idle fleet's polls are cheaper together than spread out. Short waits
(under ``10 * tick``) keep a timer of their own and end on time.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from functools import partial
from typing import Callable


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(False)


class WorkSignal:
    def __init__(self, tick: float = 0.1) -> None:
        self._waiters: deque[asyncio.Future[bool]] = deque()  # in arrival order; ended ones linger
        self._live = 0
        self._tick = tick
        self._due: dict[int, list[asyncio.Future[bool]]] = {}  # grid slot -> the waits it ends
        self._loop: asyncio.AbstractEventLoop | None = None  # whose timers end the slots above

    @property
    def waiting(self) -> int:
        return self._live

    async def wait(self, timeout: float,
                   on_leave: Callable[[Callable[[], None] | None], None] | None = None) -> bool:
        """True when woken for work, False when ``timeout`` passed first (a long one rounded up
        to the grid), or when the waiter's client left first: ``on_leave(callback)`` is how to be
        called then (``on_leave(None)`` when the wait is over)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(future)
        self._live += 1
        timer = self._end_at(loop, future, max(0.0, timeout))
        if on_leave is not None:
            on_leave(partial(_expire, future))
        try:
            return await future
        finally:
            self._live -= 1
            if timer is not None:
                timer.cancel()
            if on_leave is not None:
                on_leave(None)
            if not future.done():
                future.cancel()  # the waiter itself was cancelled
            if len(self._waiters) > 2 * self._live + 1024:
                self._waiters = deque(f for f in self._waiters if not f.done())

    def _end_at(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future,
                timeout: float) -> asyncio.TimerHandle | None:
        """Arrange for ``future`` to end after ``timeout``: its own timer for a short wait (returned,
        to cancel), else its grid slot's (an ended wait stays in its slot until the slot ends)."""
        if timeout < 10 * self._tick:
            return loop.call_later(timeout, _expire, future)
        if loop is not self._loop:  # slots timed on another loop would never end here
            self._loop, self._due = loop, {}
        slot = math.ceil((loop.time() + timeout) / self._tick)
        due = self._due.get(slot)
        if due is None:
            due = self._due[slot] = []
            loop.call_at(slot * self._tick, self._end_slot, slot)
        due.append(future)
        return None

    def _end_slot(self, slot: int) -> None:
        for future in self._due.pop(slot, ()):
            _expire(future)

    def notify(self, n: int = 1) -> int:
        """Wake up to ``n`` waiters; return how many were woken."""
        woken = 0
        while woken < n and self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(True)
                woken += 1
        return woken
