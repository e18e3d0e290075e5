"""How a job's frames become tasks: chunks × tiles, chunk-major, with scout tasks (contract.md 4, 5).

Every tile of a chunk carries the chunk's frames. A task is a scout task when its chunk intersects
the scout frames (all tiles of that chunk); when some tasks are scouts and some not, the others
hold until the job is released.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from cio_worker.errors import DocumentError
from cio_worker.job.frames import FrameSet

MAX_TILES = 100
TILE_COUNTS = tuple(n * n for n in range(1, math.isqrt(MAX_TILES) + 1))


@dataclass(frozen=True)
class PlannedTask:
    index: int  # 0-based, chunk-major
    chunk_index: int
    frames: FrameSet
    tile: int  # 1-based
    tiles: int
    scout: bool


def validate_tiles(n: object, *, field: str = "tiles") -> int:
    """A tile count: a square grid of 1 to 100 tiles (1, 4, 9, ... 100)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise DocumentError(field, f"must be a whole number of tiles, not {type(n).__name__}")
    if n not in TILE_COUNTS:
        raise DocumentError(
            field,
            f"{n} is not a tile count: tiles form a square grid, so use one of "
            + ", ".join(str(c) for c in TILE_COUNTS),
        )
    return n


def plan_tasks(
    frames: FrameSet,
    chunk_size: int,
    tiles: int,
    scout_frames: FrameSet | None = None,
) -> list[PlannedTask]:
    """The job's tasks in order: for each chunk, its tiles 1..tiles."""
    validate_tiles(tiles)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise DocumentError("chunk_size", f"must be a whole number, not {type(chunk_size).__name__}")
    scouts = scout_frames or FrameSet()
    chunks = frames.chunks(chunk_size)
    if scouts and chunks and not scouts.intersect(frames):
        raise DocumentError(
            "scout_frames",
            f"none of the scout frames {scouts} is among the job's frames {frames}: every task would hold",
        )
    tasks: list[PlannedTask] = []
    for chunk_index, chunk in enumerate(chunks):
        scout = bool(chunk.intersect(scouts))
        for tile in range(1, tiles + 1):
            tasks.append(PlannedTask(len(tasks), chunk_index, chunk, tile, tiles, scout))
    return tasks


def has_holding(tasks: Sequence[PlannedTask]) -> bool:
    """Whether some tasks wait for release: there are scout tasks and also others."""
    return any(t.scout for t in tasks) and not all(t.scout for t in tasks)
