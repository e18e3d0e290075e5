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


def test_long_waits_end_together_on_the_grid_never_early_and_short_ones_on_time() -> None:
    async def main():
        loop = asyncio.get_running_loop()
        signal = WorkSignal(tick=0.05)
        began = loop.time()
        timeouts = [0.5 + i * 0.001 for i in range(20)]  # 20 ms apart: without the grid, 20 timers
        waits = [asyncio.ensure_future(signal.wait(t)) for t in timeouts]
        await asyncio.sleep(0)
        slots = len(signal._due)
        short = await signal.wait(0.01)  # under ten ticks: a timer of its own, not a slot
        short_slots = len(signal._due)
        ended = []
        for wait in asyncio.as_completed(waits):
            ended.append((await wait, loop.time() - began))
        return slots, short, short_slots, ended, timeouts

    slots, short, short_slots, ended, timeouts = asyncio.run(main())
    assert slots <= 2 and short is False and short_slots == slots
    assert [woken for woken, _ in ended] == [False] * 20
    assert min(elapsed for _, elapsed in ended) >= timeouts[0]  # rounded up, never down


def test_a_signal_moved_to_another_event_loop_still_ends_its_long_waits() -> None:
    signal = WorkSignal(tick=0.05)

    async def left_behind():
        cancelled = asyncio.ensure_future(signal.wait(0.5))
        await asyncio.sleep(0)
        cancelled.cancel()  # its slot stays, timed on this loop, which then closes

    async def once():
        return await asyncio.wait_for(signal.wait(0.5), 5)

    asyncio.run(left_behind())
    assert asyncio.run(once()) is False  # most often the same slot: its timer is on the closed loop
    assert asyncio.run(once()) is False
