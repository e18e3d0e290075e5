"""Calls that arrive together go to the queue together.

A busy fleet sends many claims and completions at once; each would cost the coordinator a thread
hop and the database a transaction and a commit. ``Batcher`` gathers the calls that wait while
earlier ones are at the database and hands them to a ``*_many`` queue method as one call: one
transaction for a whole batch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Generic, Hashable, Sequence, TypeVar

log = logging.getLogger("cio_worker.coordinator")

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """``await submit(item)`` as if alone. ``run_many(items)`` answers a batch in order; an answer
    that is an exception is raised to that item's caller only. Items of one batch share their
    ``key``; at most ``max_inflight`` batches of at most ``max_batch`` items are at the database at
    once. An answer whose caller has gone (its request was cancelled while the batch ran) is handed
    to ``orphaned``, e.g. to give a claimed task back."""

    def __init__(self, run_many: Callable[[Sequence[Item]], Awaitable[Sequence[Any]]], *,
                 key: Callable[[Item], Hashable] = lambda item: None,
                 orphaned: Callable[[Any], Awaitable[None]] | None = None,
                 max_batch: int = 64, max_inflight: int = 2) -> None:
        if max_batch < 1 or max_inflight < 1:
            raise ValueError("a batch and the batches in flight are at least 1")
        self._run_many, self._key, self._orphaned = run_many, key, orphaned
        self.max_batch, self.max_inflight = max_batch, max_inflight
        self._waiting: list[tuple[Item, asyncio.Future]] = []
        self._inflight = 0
        self._drains: set[asyncio.Task] = set()  # the loop holds tasks weakly: keep them until done
        self.batches = 0  # calls made to run_many, for tests and figures
        self.items = 0

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._waiting.append((item, future))
        if self._inflight < self.max_inflight:
            self._inflight += 1
            drain = loop.create_task(self._drain())
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                key = self._key(self._waiting[0][0])
                batch, rest = [], []
                for entry in self._waiting:
                    (batch if len(batch) < self.max_batch and self._key(entry[0]) == key else rest).append(entry)
                self._waiting = rest
                self.batches += 1
                self.items += len(batch)
                try:
                    answers = await self._run_many([item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - each caller gets the error as its own
                    answers = [exc] * len(batch)
                for (_, future), answer in zip(batch, answers):
                    if future.done():
                        await self._give_back(answer)
                    elif isinstance(answer, BaseException):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self._inflight -= 1

    async def _give_back(self, answer: Any) -> None:
        if self._orphaned is None or answer is None or isinstance(answer, BaseException):
            return
        try:
            await self._orphaned(answer)
        except Exception:  # noqa: BLE001 - e.g. a lease expires and the reaper returns its task
            log.exception("handing back %r, answered to a request that went away", answer)
