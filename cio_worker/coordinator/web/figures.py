"""What the pages show, computed from the queue's rows: a job's progress (frames and tasks), its
state, elapsed and estimated time left, its cost so far; the task grid; the frame gallery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from cio_worker.job.frames import FrameSet
from cio_worker.job.project import tile_name
from cio_worker.queue.base import DownloadRecord, JobSummary, WorkerRow

# One letter a task state, for the job page's live grid (``states``).
STATE_LETTERS = {"holding": "h", "pending": "p", "leased": "l", "done": "d", "failed": "f"}
# How many frames the gallery shows (the newest); a job's page stays small however long the job.
GALLERY_SIZE = 48
# cnode's tile token in an output's name (``r.tilex4-2.0005.exr`` is tile 2 of 4 of ``r.0005.exr``).


@dataclass(frozen=True)
class JobView:
    id: str
    title: str
    state: str  # held, queued, running, done, failed, killed
    counts: dict[str, int]
    total: int
    frames_total: int
    frames_done: int
    created: float
    elapsed: float
    left: float | None  # seconds, at the rate so far; None before a task is done or once finished
    cost: float
    unpriced: int  # attempts that ran on an instance type the price table did not know
    currency: str
    finished: bool

    @property
    def done(self) -> int:
        return self.counts["done"]

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0

    @property
    def failed_percent(self) -> float:
        return 100.0 * self.counts["failed"] / self.total if self.total else 0.0

    @property
    def frames_percent(self) -> float:
        return 100.0 * self.frames_done / self.frames_total if self.frames_total else 0.0


def job_state(summary: JobSummary) -> str:
    counts = summary.counts
    if summary.killed:
        return "killed"
    if summary.finished:
        return "failed" if counts["failed"] else "done"
    if counts["leased"]:
        return "running"
    if counts["holding"] and not counts["pending"]:
        return "held"
    return "queued"


# What the web view reads of each task (``SqlQueue.task_states``): frames, tiles, scout, state.
TaskState = tuple[str, int, bool, str]
# What it reads of a job's attempts (``SqlQueue.job_cost``): cost, unpriced, currency, last end.
Cost = tuple[float, int, str, "float | None"]


def job_view(summary: JobSummary, tasks: Sequence[TaskState], cost: Cost, now: float) -> JobView:
    frames: dict[int, bool] = {}  # frame -> every task that renders it (each tile) is done
    parsed: dict[str, FrameSet] = {}
    for spec, _, _, state in tasks:
        found = parsed.get(spec)
        if found is None:
            found = parsed[spec] = FrameSet.parse(spec)
        done = state == "done"
        for frame in found:
            frames[frame] = frames.get(frame, True) and done
    finished = summary.finished
    amount, unpriced, currency, last_end = cost
    end = (last_end or summary.created) if finished else now
    elapsed = max(0.0, end - summary.created)
    done = summary.counts["done"]
    remaining = summary.total - done - summary.counts["failed"]
    left = remaining * elapsed / done if done and remaining and not finished else None
    return JobView(summary.id, summary.title, job_state(summary), dict(summary.counts), summary.total, len(frames),
                   sum(frames.values()), summary.created, elapsed, left, amount, unpriced, currency, finished)


@dataclass(frozen=True)
class Cell:
    index: int
    state: str  # a letter of STATE_LETTERS
    scout: bool


@dataclass(frozen=True)
class Chunk:
    frames: str
    side: int  # the tiles' grid is side x side
    cells: tuple[Cell, ...]


def grid(tasks: Sequence[TaskState]) -> list[Chunk]:
    """The tasks as chunks (the tasks that render the same frames) of tiles, in task order."""
    chunks: list[Chunk] = []
    run: list[Cell] = []
    for i, (spec, _, scout, state) in enumerate(tasks):
        if run and tasks[i - 1][0] != spec:
            chunks.append(_chunk(tasks[i - 1], run))
            run = []
        run.append(Cell(i, STATE_LETTERS[state], scout))
    if run:
        chunks.append(_chunk(tasks[-1], run))
    return chunks


def _chunk(task: TaskState, cells: list[Cell]) -> Chunk:
    return Chunk(task[0], max(1, round(task[1] ** 0.5)), tuple(cells))


def states(tasks: Iterable[TaskState]) -> str:
    return "".join(STATE_LETTERS[t[3]] for t in tasks)


@dataclass(frozen=True)
class Frame:
    """A frame of the gallery: its previews, one (a whole frame) or one a tile in grid order."""

    name: str  # the frame's relative path
    side: int
    parts: tuple[str | None, ...]  # preview keys' relative paths, row-major from the top left; None: not yet
    arrived: float

    @property
    def tiled(self) -> bool:
        return len(self.parts) > 1


def frames_of(records: Sequence[DownloadRecord]) -> list[Frame]:
    """Every frame whose outputs arrived (a tiled one's tiles as a grid of their previews), newest first."""
    found: dict[str, tuple[int, dict[int, str], float]] = {}
    for record in records:
        for f in record.files:
            name, count, index = frame_of(f.relative_path)
            _, parts, arrived = found.get(name, (count, {}, record.created))
            parts[index] = f.relative_path
            found[name] = (count, parts, max(arrived, record.created))
    frames = [Frame(name, max(1, round(count ** 0.5)), tuple(parts.get(i) for i in range(1, count + 1)), arrived)
              for name, (count, parts, arrived) in found.items()]
    return sorted(frames, key=lambda f: (-f.arrived, f.name))


def frame_of(relative_path: str) -> tuple[str, int, int]:
    """(the frame's relative path, tiles, this tile's index) of an output; (path, 1, 1) for a frame."""
    tile = tile_name(relative_path)
    return (relative_path, 1, 1) if tile is None else (tile.frame, tile.count, tile.index)


def worker_row(worker: WorkerRow, now: float) -> dict:
    info = worker.info or {}
    preemptible = info.get("preemptible")
    return {
        "id": worker.id, "state": worker.state, "job": worker.job_id, "task": worker.task_id,
        "progress": worker.progress, "detail": worker.detail,
        "instance_type": info.get("machine_type") or "", "provider": info.get("provider") or "",
        "zone": info.get("zone") or "",
        "preemptible": "unknown" if preemptible is None else ("yes" if preemptible else "no"),
        "silent": max(0.0, now - worker.last_contact), "done": worker.tasks_done, "failed": worker.tasks_failed,
    }


# -- formatting (Jinja filters) ---------------------------------------------------------------------

def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def size(count: float | None) -> str:
    if count is None:
        return "—"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def money(amount: float | None, currency: str = "") -> str:
    if amount is None:
        return "unknown"
    return f"{amount:.4f} {currency or 'USD'}"
