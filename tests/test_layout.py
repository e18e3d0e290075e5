"""Tasks from frames: chunks × tiles, chunk-major, and scout tasks (contract.md 4, 5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cio_worker.errors import CioError, DocumentError
from cio_worker.job.frames import FrameSet
from cio_worker.job.layout import PlannedTask, has_holding, plan_tasks, validate_tiles


@pytest.mark.parametrize("n", [1, 4, 9, 16, 25, 36, 49, 64, 81, 100])
def test_square_tile_counts_are_valid(n: int) -> None:
    assert validate_tiles(n) == n


@pytest.mark.parametrize("n", [0, -4, 2, 3, 8, 10, 99, 121, 144])
def test_other_tile_counts_are_rejected(n: int) -> None:
    with pytest.raises(DocumentError, match=f"{n} is not a tile count.*1, 4, 9, 16, 25, 36, 49, 64, 81, 100") as info:
        validate_tiles(n)
    assert info.value.field == "tiles"
    assert isinstance(info.value, CioError)


@pytest.mark.parametrize("n", [4.0, "4", True, None])
def test_non_integer_tile_counts_are_rejected(n: object) -> None:
    with pytest.raises(DocumentError, match="whole number of tiles") as info:
        validate_tiles(n, field="job.tiles")
    assert info.value.field == "job.tiles"


def test_chunks_times_tiles_chunk_major() -> None:
    tasks = plan_tasks(FrameSet.parse("1-10"), 4, 4, None)
    assert len(tasks) == 3 * 4
    assert [t.index for t in tasks] == list(range(12))
    assert [(t.chunk_index, t.tile) for t in tasks[:6]] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    assert [t.frames.canonical() for t in tasks[::4]] == ["1-4", "5-8", "9-10"]
    for task in tasks:
        assert task.tiles == 4
        assert task.frames == tasks[task.chunk_index * 4].frames  # every tile of a chunk: same frames
        assert task.scout is False
    assert tasks[5] == PlannedTask(5, 1, FrameSet.parse("5-8"), 2, 4, False)
    assert not has_holding(tasks)


def test_single_tile_is_one_task_per_chunk() -> None:
    tasks = plan_tasks(FrameSet.parse("1-5"), 1, 1)
    assert [(t.index, t.chunk_index, t.tile, t.tiles, t.frames.canonical()) for t in tasks] == [
        (i, i, 1, 1, str(i + 1)) for i in range(5)
    ]


def test_scout_chunks_are_scouts_in_every_tile() -> None:
    # Scout frame 5 lands in chunk 4-6: all 4 tiles of that chunk are scout tasks.
    tasks = plan_tasks(FrameSet.parse("1-12"), 3, 4, FrameSet.parse("5"))
    scouts = [t for t in tasks if t.scout]
    assert [(t.chunk_index, t.tile) for t in scouts] == [(1, 1), (1, 2), (1, 3), (1, 4)]
    assert all(t.frames.canonical() == "4-6" for t in scouts)  # more frames than the scout frame
    assert has_holding(tasks)


def test_scout_set_spanning_chunks() -> None:
    tasks = plan_tasks(FrameSet.parse("1-20"), 5, 1, FrameSet.parse("3-8x5"))  # frames 3 and 8
    assert [t.chunk_index for t in tasks if t.scout] == [0, 1]
    assert has_holding(tasks)


def test_scout_frames_partly_outside_the_job_are_ignored() -> None:
    tasks = plan_tasks(FrameSet.parse("1-10"), 5, 1, FrameSet.parse("8,50"))
    assert [t.scout for t in tasks] == [False, True]


def test_every_chunk_a_scout_means_nothing_holds() -> None:
    tasks = plan_tasks(FrameSet.parse("1-4"), 2, 1, FrameSet.parse("1,4"))
    assert all(t.scout for t in tasks)
    assert not has_holding(tasks)


def test_no_or_empty_scout_frames_mean_no_scouts() -> None:
    for scouts in (None, FrameSet()):
        tasks = plan_tasks(FrameSet.parse("1-4"), 2, 4, scouts)
        assert not any(t.scout for t in tasks)
        assert not has_holding(tasks)
    assert not has_holding([])


def test_scout_frames_outside_the_job_are_rejected() -> None:
    with pytest.raises(DocumentError, match="none of the scout frames 50-60 is among the job's frames 1-10") as info:
        plan_tasks(FrameSet.parse("1-10"), 2, 1, FrameSet.parse("50-60"))
    assert info.value.field == "scout_frames"


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(DocumentError, match="not a tile count"):
        plan_tasks(FrameSet.parse("1-10"), 2, 6)
    with pytest.raises(DocumentError) as info:
        plan_tasks(FrameSet.parse("1-10"), "2", 1)  # type: ignore[arg-type]
    assert info.value.field == "chunk_size"


def test_chunk_size_is_clamped() -> None:
    assert len(plan_tasks(FrameSet.parse("1-10"), 0, 1)) == 10
    assert len(plan_tasks(FrameSet.parse("1-10"), 99, 9)) == 9


def test_no_frames_no_tasks() -> None:
    assert plan_tasks(FrameSet(), 5, 4, FrameSet.parse("1")) == []


@given(
    st.sets(st.integers(-50, 50), min_size=1, max_size=40).map(FrameSet.of),
    st.integers(1, 12),
    st.sampled_from([1, 4, 9]),
    st.sets(st.integers(-50, 50), max_size=5).map(FrameSet.of),
)
def test_layout_properties(frames: FrameSet, size: int, tiles: int, scouts: FrameSet) -> None:
    if scouts and not scouts.intersect(frames):
        with pytest.raises(DocumentError):
            plan_tasks(frames, size, tiles, scouts)
        return
    tasks = plan_tasks(frames, size, tiles, scouts)
    chunks = frames.chunks(size)
    assert len(tasks) == len(chunks) * tiles
    for task in tasks:
        assert task.index == task.chunk_index * tiles + task.tile - 1
        assert task.frames == chunks[task.chunk_index]
        assert task.scout == bool(task.frames.intersect(scouts))
    assert FrameSet.of(f for t in tasks if t.scout for f in t.frames).intersect(scouts) == scouts.intersect(frames)
