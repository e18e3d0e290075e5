"""The queue as a person reads it: the job list, one job's tasks in a table (each with its last
attempt's figures, and the job's cost), or every attempt of one task."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from typing import Sequence

from cio_worker.job.prices import PriceTable
from cio_worker.queue.base import STATES, AttemptRow, JobSummary, Queue, TaskRow
from cio_worker.storage.progress import format_bytes, format_duration


def format_status(queue: Queue, job_id: str | None = None, task_id: str | None = None,
                  prices: PriceTable | None = None) -> str:
    """``prices``: re-price the recorded attempts with this table (their instance type and wall time)."""
    if job_id is None:
        return _job_list(queue.jobs())
    if task_id is not None:
        return _one_task(queue, job_id, task_id, prices)
    return _one_job(queue, job_id, prices)


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


def _one_job(queue: Queue, job_id: str, prices: PriceTable | None) -> str:
    summary = next((j for j in queue.jobs() if j.id == queue.job(job_id).id), None)
    tasks = queue.tasks(job_id)
    attempts = _priced(queue, job_id, queue.attempts(job_id), prices)
    last = {a.task_id: a for a in attempts}
    pending_downloads = queue.downloads(job_id, state="pending")
    lines = []
    if summary is not None:
        lines.append(f"job {summary.id}  {summary.title}  ({job_condition(summary)}, created {format_time(summary.created)})")
        lines.append("  ".join(f"{s} {summary.counts[s]}" for s in STATES))
    if pending_downloads:
        lines.append(f"{len(pending_downloads)} downloads pending")
    for block in summary.blocked if summary is not None else ():
        lines.append(f"worker {block.worker} blocked from job after {block.failures} failures "
                     f"(since {format_time(block.since)}; `cio-worker retry {summary.id}` clears it)")
    if attempts:
        lines.append(total_cost(attempts))
    if not tasks:
        lines.append("no tasks (an upload-only job)")
        return "\n".join(lines)
    headers = ["TASK", "STATE", "FRAMES", "TILE", "ATTEMPTS", "FRAMES DONE", "WORKER", *FIGURE_HEADERS, "REASON"]
    lines.append("")
    lines.append(_table(headers, [_task_cells(t, last.get(t.id)) for t in tasks]))
    if attempts:
        lines.append(f"(figures: each task's last ended attempt; `cio-worker status {job_id} --task ID` lists them all)")
    return "\n".join(lines)


FIGURE_HEADERS = ("WALL", "CPU", "PEAK RSS", "SYNCED", "UPLOADED", "COST")


def _one_task(queue: Queue, job_id: str, task_id: str, prices: PriceTable | None) -> str:
    task = next((t for t in queue.tasks(job_id) if t.id == task_id or t.id == task_id.zfill(3)), None)
    attempts = _priced(queue, job_id, queue.attempts(job_id, task_id), prices)
    lines = []
    if task is not None:
        lines.append(f"job {task.job_id} task {task.id}  frames {task.frames}  tile {task.tile}/{task.tiles}  "
                     f"{task.state}, attempts {_attempts(task)}")
    if not attempts:
        lines.append("no attempt has ended yet")
        return "\n".join(lines)
    lines.append(total_cost(attempts))
    headers = ["ATTEMPT", "OUTCOME", "WORKER", "INSTANCE", "STARTED", "ENDED", *FIGURE_HEADERS, "LOG", "REASON"]
    rows = [[str(a.attempt), a.outcome, a.worker or "-", a.figures.instance_type or "-",
             format_time(a.started) if a.started is not None else "-", format_time(a.ended), *_figure_cells(a),
             a.figures.log or "-", a.reason or "-"] for a in attempts]
    lines.append("")
    lines.append(_table(headers, rows))
    return "\n".join(lines)


def _priced(queue: Queue, job_id: str, attempts: list[AttemptRow], prices: PriceTable | None) -> list[AttemptRow]:
    if prices is None:
        return attempts
    preemptible = queue.job(job_id).preemptible
    priced = []
    for a in attempts:
        f = a.figures
        hourly = prices.hourly(f.instance_type, preemptible) if f.instance_type else None
        cost = prices.cost(f.instance_type, f.wall_seconds, preemptible) if hourly is not None else None
        currency = prices.currency if hourly is not None else ""
        priced.append(replace(a, figures=replace(f, hourly_price=hourly, cost=cost, currency=currency)))
    return priced


def total_cost(attempts: Sequence[AttemptRow]) -> str:
    """``cost 0.0421 USD over 7 attempts`` (and how many of them are not priced)."""
    by_currency: dict[str, float] = {}
    unknown: set[str] = set()
    unpriced = 0
    for a in attempts:
        if a.figures.cost is None:
            if a.figures.wall_seconds is not None or a.figures.instance_type:
                unpriced += 1
                unknown.add(a.figures.instance_type or "no instance type")
            continue
        by_currency[a.figures.currency or "?"] = by_currency.get(a.figures.currency or "?", 0.0) + a.figures.cost
    spent = " + ".join(f"{total:.4f} {currency}" for currency, total in sorted(by_currency.items())) or "unknown"
    text = f"cost {spent} over {len(attempts)} attempts"
    if unpriced:
        text += (f"; {unpriced} of them unknown (not in the price table: {', '.join(sorted(unknown))}), "
                 "so the total is more")
    silent = sum(1 for a in attempts if a.figures.wall_seconds is None and not a.figures.instance_type)
    if silent:
        text += f"; {silent} without figures (their agent vanished or sent none)"
    return text


def _figure_cells(attempt: AttemptRow | None) -> list[str]:
    if attempt is None:
        return ["-"] * len(FIGURE_HEADERS)
    f = attempt.figures

    def transfer(size: int | None, seconds: float | None) -> str:
        if size is None:
            return "-"
        return format_bytes(size) + (f" in {_seconds(seconds)}" if seconds is not None and size else "")

    return [
        _seconds(f.wall_seconds),
        _seconds(f.cpu_seconds),
        "-" if f.peak_rss_bytes is None else format_bytes(f.peak_rss_bytes),
        transfer(f.sync_bytes, f.sync_seconds),
        transfer(f.upload_bytes, f.upload_seconds),
        "unknown" if f.cost is None else f"{f.cost:.4f} {f.currency}".strip(),
    ]


def _seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 60 else format_duration(seconds)


def _task_cells(task: TaskRow, attempt: AttemptRow | None = None) -> list[str]:
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
        *_figure_cells(attempt),
        _reason(task),
    ]


def _reason(task: TaskRow) -> str:
    if task.state == "failed" or not task.reason:
        return task.reason
    if task.kept_from:  # its failed retries are spent: RetryPolicy.distinct_workers
        return f"waits for a worker that has not failed it (not {', '.join(task.kept_from)}); previous: {task.reason}"
    return f"previous: {task.reason}"


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
