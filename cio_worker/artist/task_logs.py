"""A task's log read from anywhere: an ended attempt's whole log from the job's storage (its
location recorded with the attempt), a running one's newest lines from the queue, or the lines of
a running attempt as they come (``follow``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from cio_worker.errors import CioError
from cio_worker.queue.base import AttemptRow, Queue, TaskRow
from cio_worker.storage import Storage
from cio_worker.storage.base import key_of


class NoLog(CioError):
    code = "no_log"


@dataclass(frozen=True)
class Target:
    """The attempt to read: its number, whether it still runs, its record once it ended."""

    task: TaskRow
    attempt: int
    running: bool
    ended: AttemptRow | None


def target(queue: Queue, job_id: str, task_id: str, attempt: int | None = None) -> Target:
    """The attempt ``attempt`` of the task (None: the running one, else the last that ended)."""
    task = _task(queue, job_id, task_id)
    running_number = task.attempt_count + 1 if task.state == "leased" else None
    ended = queue.attempts(job_id, task.id)
    if attempt is None:
        attempt = running_number or (ended[-1].attempt if ended else None)
        if attempt is None:
            raise NoLog(f"job {task.job_id} task {task.id} has not run yet ({task.state}); "
                        "`logs --follow` waits for it")
    record = next((a for a in reversed(ended) if a.attempt == attempt), None)
    running = attempt == running_number
    if record is None and not running:
        made = f"attempts {', '.join(sorted({str(a.attempt) for a in ended}))}" if ended else "no attempt yet"
        raise NoLog(f"job {task.job_id} task {task.id} has no attempt {attempt} ({made})")
    return Target(task, attempt, running, None if running else record)


def whole_log(queue: Queue, open_storage: Callable[[str], Storage], job_id: str, target: Target) -> str:
    """An ended attempt's log from storage; a running one's newest lines the queue holds."""
    label = f"job {target.task.job_id} task {target.task.id} attempt {target.attempt}"
    location = target.ended.figures.log if target.ended is not None else ""
    if location:
        storage_url = queue.job(job_id).storage
        key = key_of(storage_url, location)
        if key is None:
            raise NoLog(f"{label}: its log {location} is not under the job's storage {storage_url}")
        with open_storage(storage_url) as storage:
            return storage.read_bytes(key).decode("utf-8", "replace")
    chunk = queue.task_log(job_id, target.task.id, target.attempt)
    if chunk.attempt == target.attempt and (chunk.text or chunk.running):
        note = "lines before these are no longer kept\n" if chunk.start > 0 else ""
        return note + chunk.text
    why = "its agent vanished or could not upload it" if target.ended is not None else "no line has come yet"
    raise NoLog(f"{label} left no log ({why})")


def follow(queue: Queue, job_id: str, task_id: str, attempt: int | None, write: Callable[[str], None],
           say: Callable[[str], None], *, poll: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> Target:
    """Write the attempt's lines as the queue receives them until it ends; waits for a task that
    has not started. Returns the attempt as it ended."""
    while True:
        try:
            found = target(queue, job_id, task_id, attempt)
            break
        except NoLog:
            if attempt is not None or _task(queue, job_id, task_id).state not in ("pending", "holding"):
                raise
        sleep(poll)
    after = 0
    while True:
        chunk = queue.task_log(job_id, found.task.id, found.attempt, after)
        if chunk.attempt == found.attempt and chunk.end > after:
            if chunk.skipped:
                say(f"({chunk.start - after} bytes of the log were not kept; going on from there)")
            write(chunk.text)
            after = chunk.end
        if chunk.attempt == found.attempt and chunk.running:
            sleep(poll)
            continue
        task = _task(queue, job_id, task_id)
        if task.state == "leased" and task.attempt_count + 1 == found.attempt:
            sleep(poll)  # running, its first lines not shipped yet
            continue
        last = queue.task_log(job_id, found.task.id, found.attempt, after)  # lines that came meanwhile
        if last.attempt == found.attempt and last.end > after:
            write(last.text)
        return target(queue, job_id, task_id, found.attempt)


def _task(queue: Queue, job_id: str, task_id: str) -> TaskRow:
    for task in queue.tasks(job_id):
        if task.id == task_id or (task_id.isdigit() and task.id == task_id.zfill(3)):
            return task
    raise NoLog(f"job {job_id} has no task {task_id!r}")
