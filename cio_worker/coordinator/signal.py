"""Wake-ups for long-polling claims, one waiter per unit of work, first come first served.

Waking every idle agent when one task arrives would send them all to the database at once; a
``WorkSignal`` wakes as many waiters as there is new work, in the order they began to wait.
"""

from __future__ import annotations

import asyncio
from collections import deque


class WorkSignal:
    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def wait(self, timeout: float) -> bool:
        """True when woken for work, False when ``timeout`` passed first."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            if not future.done():
                future.cancel()
            try:
                self._waiters.remove(future)
            except ValueError:
                pass

    def notify(self, n: int = 1) -> int:
        """Wake up to ``n`` waiters; return how many were woken."""
        woken = 0
        for future in list(self._waiters):
            if woken >= n:
                break
            if not future.done():
                future.set_result(None)
                woken += 1
        return woken
