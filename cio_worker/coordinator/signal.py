"""Wake-ups for long-polling claims, one waiter per unit of work, first come first served.

Waking every idle agent when one task arrives would send them all to the database at once; a
``WorkSignal`` wakes as many waiters as there is new work, in the order they began to wait.
Ten thousand idle agents wait here at once, so a wait costs one future and one timer, and one
that ends leaves its place in the line to be dropped later rather than searched for.
"""

from __future__ import annotations

import asyncio
from collections import deque
from functools import partial
from typing import Callable


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(False)


class WorkSignal:
    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[bool]] = deque()  # in arrival order; ended ones linger
        self._live = 0

    @property
    def waiting(self) -> int:
        return self._live

    async def wait(self, timeout: float,
                   on_leave: Callable[[Callable[[], None] | None], None] | None = None) -> bool:
        """True when woken for work, False when ``timeout`` passed first, or when the waiter's
        client left first: ``on_leave(callback)`` is how to be called then (``on_leave(None)``
        when the wait is over)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(future)
        self._live += 1
        timer = loop.call_later(max(0.0, timeout), _expire, future)
        if on_leave is not None:
            on_leave(partial(_expire, future))
        try:
            return await future
        finally:
            self._live -= 1
            timer.cancel()
            if on_leave is not None:
                on_leave(None)
            if not future.done():
                future.cancel()  # the waiter itself was cancelled
            if len(self._waiters) > 2 * self._live + 1024:
                self._waiters = deque(f for f in self._waiters if not f.done())

    def notify(self, n: int = 1) -> int:
        """Wake up to ``n`` waiters; return how many were woken."""
        woken = 0
        while woken < n and self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(True)
                woken += 1
        return woken
