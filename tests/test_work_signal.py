"""WorkSignal: long-polling claims woken one per unit of work, in the order they began to wait."""

from __future__ import annotations

import asyncio

from cio_worker.coordinator.signal import WorkSignal


def test_waiters_are_woken_one_per_unit_of_work_first_come_first_served() -> None:
    async def main():
        signal = WorkSignal()
        order: list[int] = []

        async def waiter(i: int) -> bool:
            woken = await signal.wait(5)
            order.append(i)
            return woken

        tasks = [asyncio.ensure_future(waiter(i)) for i in range(4)]
        await asyncio.sleep(0)
        assert signal.waiting == 4
        assert signal.notify(2) == 2
        await asyncio.sleep(0)
        assert order == [0, 1] and signal.waiting == 2
        assert signal.notify(10) == 2
        results = await asyncio.gather(*tasks)
        return results, order, signal.waiting

    results, order, waiting = asyncio.run(main())
    assert results == [True] * 4 and order == [0, 1, 2, 3] and waiting == 0


def test_a_wait_that_times_out_says_so_and_is_not_woken_later() -> None:
    async def main():
        signal = WorkSignal()
        first = await signal.wait(0.01)
        late = asyncio.ensure_future(signal.wait(5))
        await asyncio.sleep(0)
        woken = signal.notify(1)  # goes to the live waiter, not to the one that timed out
        return first, await late, woken

    assert asyncio.run(main()) == (False, True, 1)


def test_ended_waits_do_not_pile_up() -> None:
    async def main():
        signal = WorkSignal()
        for _ in range(30):
            await asyncio.gather(*(signal.wait(0) for _ in range(200)))
        cancelled = asyncio.ensure_future(signal.wait(5))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        return signal.waiting, len(signal._waiters)

    waiting, kept = asyncio.run(main())
    assert waiting == 0 and kept <= 1024 + 200
