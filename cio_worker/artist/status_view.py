"""The queue as a person reads it: the job list, or one job's tasks in a table."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Sequence

from cio_worker.queue.base import STATES, JobSummary, Queue, TaskRow


def format_status(queue: Queue, job_id: str | None = None) -> str:
    if job_id is None:
        return _job_list(queue.jobs())
    return _one_job(queue, job_id)


def format_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def job_condition(job: JobSummary) -> str:
    if job.killed:
        return "killed" if job.finished else "killing"
    if job.finished:
        return "failed" if job.counts["failed"] else "done"
    if job.counts["holding"] and not (job.counts["pending"] or job.counts["leased"]):
        return "waiting for release"
    return "running"


def _job_list(jobs: Sequence[JobSummary]) -> str:
    if not jobs:
        return "no jobs in the queue"
    headers = ["JOB", "TITLE", "STATUS", *(s.upper() for s in STATES), "CREATED"]
    rows = [[j.id, j.title, job_condition(j), *(str(j.counts[s]) for s in STATES), format_time(j.created)] for j in jobs]
    return _table(headers, rows)


def _one_job(queue: Queue, job_id: str) -> str:
    summary = next((j for j in queue.jobs() if j.id == queue.job(job_id).id), None)
    tasks = queue.tasks(job_id)
    pending_downloads = queue.downloads(job_id, state="pending")
    lines = []
    if summary is not None:
        lines.append(f"job {summary.id}  {summary.title}  ({job_condition(summary)}, created {format_time(summary.created)})")
        lines.append("  ".join(f"{s} {summary.counts[s]}" for s in STATES))
    if pending_downloads:
        lines.append(f"{len(pending_downloads)} downloads pending")
    if not tasks:
        lines.append("no tasks (an upload-only job)")
        return "\n".join(lines)
    headers = ["TASK", "STATE", "FRAMES", "TILE", "ATTEMPTS", "FRAMES DONE", "WORKER", "REASON"]
    lines.append("")
    lines.append(_table(headers, [_task_cells(t) for t in tasks]))
    return "\n".join(lines)


def _task_cells(task: TaskRow) -> list[str]:
    state = task.state + (" (cancel requested)" if task.cancel_requested and task.state == "leased" else "")
    if task.scout:
        state += " [scout]"
    return [
        task.id,
        state,
        task.frames,
        f"{task.tile}/{task.tiles}",
        _attempts(task),
        task.frames_done or "-",
        task.worker or "-",
        task.reason if task.state == "failed" or not task.reason else f"previous: {task.reason}",
    ]


def _attempts(task: TaskRow) -> str:
    """Attempts made: those that ended without success (counted per cause by the queue), plus the
    one running (leased) or the one that succeeded (done), which the queue counts under no cause."""
    parts = [f"{cause} {n}" for cause, n in task.attempts.items() if n]
    current = 1 if task.state in ("leased", "done") else 0
    total = task.attempt_count + current
    if not parts:
        return str(total)
    if current:
        parts.append("running 1" if task.state == "leased" else "done 1")
    return f"{total} ({' '.join(parts)})"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [list(headers), *rows]
    )
