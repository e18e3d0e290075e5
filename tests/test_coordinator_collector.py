"""The coordinator's garbage collection, paced by the event loop's clock (``PacedCollector``): with
Python's automatic collection off, young cycles are still collected within the period, older ones
at the full collection, and ``serve`` runs it (its pauses are in ``/metrics``)."""

from __future__ import annotations

import asyncio
import gc
import urllib.request
import weakref
from pathlib import Path

import pytest

from cio_worker.coordinator.collector import PacedCollector
from tests.test_coordinator_cli import cli, coordinator
from tests.waiting import wait_for


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def cycle() -> weakref.ref:
    return weakref.ref(Node())


@pytest.fixture
def restore_gc():
    enabled = gc.isenabled()
    yield
    (gc.enable if enabled else gc.disable)()
    gc.unfreeze()


async def settle(collector: PacedCollector, young: int) -> None:
    """Let the loop run until ``collector`` has made ``young`` more young collections."""
    target = collector.young + young
    for _ in range(1000):
        if collector.young >= target:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"only {collector.young} young collections ran")


def test_young_cycles_are_collected_by_the_loop_with_automatic_collection_off(restore_gc) -> None:
    async def main() -> None:
        collector = PacedCollector(young_seconds=0.01, full_seconds=3600)
        collector.start(asyncio.get_running_loop())
        try:
            assert not gc.isenabled()
            gone = cycle()
            await settle(collector, 2)
            assert gone() is None
            assert collector.full == 0
        finally:
            collector.stop()
        assert gc.isenabled()

    gc.enable()
    asyncio.run(main())


def test_a_cycle_that_outlived_young_collections_waits_for_the_full_one(restore_gc) -> None:
    now = [0.0]
    pauses: list[int] = []

    async def main() -> None:
        collector = PacedCollector(young_seconds=0.01, full_seconds=60, clock=lambda: now[0],
                                   on_pause=lambda generation, _: pauses.append(generation))
        collector.start(asyncio.get_running_loop())
        try:
            held = Node()
            gone = weakref.ref(held)
            await settle(collector, 2)  # it survives young collections: now an older object
            del held
            await settle(collector, 3)
            assert gone() is not None, "a young collection walked an older generation"
            now[0] = 60.0
            for _ in range(1000):
                if collector.full:
                    break
                await asyncio.sleep(0.005)
            assert collector.full == 1 and gone() is None
            assert 2 in pauses and 0 in pauses
        finally:
            collector.stop()

    asyncio.run(main())


def test_a_stopped_collector_leaves_collection_as_it_found_it(restore_gc) -> None:
    async def main() -> None:
        collector = PacedCollector(young_seconds=0.01)
        collector.start(asyncio.get_running_loop())
        with pytest.raises(RuntimeError):
            collector.start(asyncio.get_running_loop())
        collector.stop()
        made = collector.young
        await asyncio.sleep(0.05)
        assert collector.young == made  # no collection after stop
        assert not gc.isenabled()  # it was off before start: still off

    gc.disable()
    asyncio.run(main())


@pytest.mark.parametrize("young, full", [(0, 10), (-1, 10), (1, 0.5)])
def test_periods_that_cannot_work_are_refused(young: float, full: float) -> None:
    with pytest.raises(ValueError):
        PacedCollector(young_seconds=young, full_seconds=full)


def test_serve_paces_the_collector_and_shows_its_pauses(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'queue.db'}"
    assert cli("queue", "init", db).returncode == 0
    with coordinator(db, tmp_path / "serve.log") as url:
        def young_collections() -> float:
            text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
            counts = [line.split()[-1] for line in text.splitlines()
                      if line.startswith('cio_gc_pause_seconds_count{generation="0"}')]
            return float(counts[0]) if counts else 0.0

        wait_for(lambda: young_collections() >= 2, 30, "young collections in the coordinator's /metrics")
