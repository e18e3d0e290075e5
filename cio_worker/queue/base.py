"""The queue interface: where tasks come from and where their results go.

A task is in one state: ``holding`` (waits for its job's scouts to be judged and the job released),
``pending`` (claimable), ``leased`` (an agent holds it, kept alive by heartbeats), ``done``,
``failed``. An agent that claims a task gets a ``Lease``; every later report names that lease, and a
lease that is no longer current raises ``LeaseLost``, so a task whose lease was lost is never
reported by the agent that lost it.

Attempts are counted per cause:

- ``failed``: the task ran and failed; retried while the job's ``failed`` budget allows.
- ``preempted``: the instance was preempted, or the lease expired (the agent vanished); retried while
  the ``preempted`` budget allows.
- ``released``: an agent shutting down cleanly gave the task back. It is counted (it shows in the
  history and raises the next ``attempt`` number) but spends no budget: a clean shutdown is not the
  task's fault.

``max_retries = N`` allows N retries, so the N+1th attempt of a cause that ends that way is final.

Reports (``complete``, ``fail``, ``release``) may carry an operation id: a report whose id the queue
has already applied is answered with the first answer and changes nothing, so a client may resend a
report whose answer it never got. Workers register (``register_worker``) with what they run on, and
their heartbeats and ``worker_report`` keep their state (``WORKER_STATES``) and progress current.

A lease holds until its expiry has passed *and* the queue has reaped it (every ``claim`` reaps
first); a late heartbeat before that renews it. A killed job asks its leased tasks to stop
(``HeartbeatReply.cancel``); whatever the agent reports next except ``complete`` ends the task
failed with "killed by owner", never back to pending.
"""

from __future__ import annotations

import abc
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from cio_worker.job.document import JobInfo, TaskDocument, parse_job, parse_task
from cio_worker.job.document import _Reader  # the document module's field-path-aware reader
from cio_worker.errors import DocumentError
from cio_worker.job.hashing import check_md5_b64

STATES = ("holding", "pending", "leased", "done", "failed")
ACTIVE_STATES = ("holding", "pending", "leased")
ATTEMPT_CAUSES = ("preempted", "failed", "released")
RELEASE_CAUSES = ("preempted", "released")
DOWNLOAD_STATES = ("pending", "downloaded")
# What a worker says it is doing; "gone" is what a reader sees of one silent for too long.
WORKER_STATES = ("idle", "syncing", "rendering", "uploading", "draining", "stopped")
GONE = "gone"
KILLED_REASON = "killed by owner"
# Stands in for the job id while a job spec is validated, before the queue allocates the real one.
PLACEHOLDER_JOB_ID = "00000"


@dataclass(frozen=True)
class NewTask:
    """One task of a job being created; its id is its position ("000", "001", ...)."""

    frames: str
    command: str
    tile: int = 1
    tiles: int = 1
    scout: bool = False

    @classmethod
    def coerce(cls, value: "NewTask | Sequence[Any] | Mapping[str, Any]", where: str) -> "NewTask":
        if isinstance(value, NewTask):
            return value
        try:
            if isinstance(value, Mapping):
                return cls(**value)
            return cls(*value)
        except TypeError as exc:
            raise DocumentError(where, f"is not (frames, command, tile, tiles, scout): {exc}") from None


@dataclass(frozen=True)
class DownloadFile:
    """One output: where it goes under the record's output_dir, its identity, its storage key."""

    relative_path: str
    md5: str  # base64 of the 16 digest bytes
    size: int
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {"relative_path": self.relative_path, "md5": self.md5, "size": self.size, "key": self.key}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DownloadFile":
        return cls(data["relative_path"], data["md5"], int(data["size"]), data["key"])


@dataclass(frozen=True)
class NewDownload:
    """What a finished (or preempted) attempt offers for download (contract.md 9)."""

    output_dir: str
    files: tuple[DownloadFile, ...] = ()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def validate(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise DocumentError("download.output_dir", "is empty")
        seen: set[str] = set()
        for i, f in enumerate(self.files):
            where = f"download.files[{i}]"
            if not isinstance(f, DownloadFile):
                raise DocumentError(where, f"must be a DownloadFile, not {type(f).__name__}")
            _check_relative_path(f.relative_path, f"{where}.relative_path")
            if f.relative_path in seen:
                raise DocumentError(f"{where}.relative_path", f"{f.relative_path!r} is listed twice")
            seen.add(f.relative_path)
            check_md5_b64(f.md5, f"{where}.md5")
            if isinstance(f.size, bool) or not isinstance(f.size, int) or f.size < 0:
                raise DocumentError(f"{where}.size", f"must be a whole number >= 0, not {f.size!r}")
            if not isinstance(f.key, str) or not f.key.strip():
                raise DocumentError(f"{where}.key", "is empty")


@dataclass(frozen=True)
class DownloadRecord:
    download_id: str
    job_id: str
    task_id: str
    output_dir: str
    size: int
    files: tuple[DownloadFile, ...]
    state: str  # pending | downloaded
    created: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "download_id": self.download_id,
            "job_id": self.job_id,
            "task_id": self.task_id,
            "output_dir": self.output_dir,
            "size": self.size,
            "files": [f.to_dict() for f in self.files],
            "state": self.state,
        }


@dataclass(frozen=True)
class Lease:
    job_id: str
    task_id: str
    token: str
    worker: str
    expires_at: float
    document: TaskDocument

    @property
    def label(self) -> str:
        return f"job {self.job_id} task {self.task_id}"


@dataclass(frozen=True)
class HeartbeatReply:
    cancel: bool  # the owner killed the job: stop, then report with fail() or release()
    expires_at: float


@dataclass(frozen=True)
class WorkerStatus:
    """What a worker is doing, carried by heartbeats and ``worker_report``."""

    state: str  # one of WORKER_STATES
    progress: float | None = None  # percent of the current task
    detail: str = ""

    def validate(self) -> None:
        if self.state not in WORKER_STATES:
            raise DocumentError("status.state", f"{self.state!r} is not one of {', '.join(WORKER_STATES)}")
        if self.progress is not None and (
            isinstance(self.progress, bool) or not isinstance(self.progress, (int, float)) or not 0 <= self.progress <= 100
        ):
            raise DocumentError("status.progress", f"must be a percentage from 0 to 100, not {self.progress!r}")
        if not isinstance(self.detail, str) or len(self.detail) > 500:
            raise DocumentError("status.detail", "must be text of at most 500 characters")


@dataclass(frozen=True)
class WorkerRow:
    id: str
    info: dict[str, Any]  # instance identity: instance_id, provider, zone, machine_type, preemptible, ...
    state: str  # one of WORKER_STATES, or GONE when silent longer than the reader's limit
    job_id: str | None
    task_id: str | None
    progress: float | None
    detail: str
    registered: float
    last_contact: float
    tasks_done: int
    tasks_failed: int


@dataclass(frozen=True)
class JobSummary:
    id: str
    title: str
    counts: dict[str, int]  # every state in STATES, zero included
    created: float
    scout: bool
    killed: bool

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> bool:
        return not any(self.counts[s] for s in ACTIVE_STATES)


@dataclass(frozen=True)
class TaskRow:
    job_id: str
    id: str
    frames: str
    tile: int
    tiles: int
    scout: bool
    state: str
    attempts: dict[str, int]  # every cause in ATTEMPT_CAUSES
    frames_done: str
    worker: str  # the current lease holder, or the last one
    reason: str
    cancel_requested: bool
    lease_expires: float | None
    updated: float

    @property
    def attempt_count(self) -> int:
        return sum(self.attempts.values())


@dataclass(frozen=True)
class Event:
    job_id: str
    task_id: str | None  # None for job-level events
    time: float
    kind: str  # created, held, job_released, claimed, done, failed, retry, preempted, lease_expired,
    #            released, cancel_requested, killed, downloaded, retried
    worker: str
    detail: str


class Queue(abc.ABC):
    """Jobs, their tasks, leases on them, and the download records of their outputs."""

    # -- jobs -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def create_job(self, job: JobInfo | Mapping[str, Any], tasks: Sequence[NewTask]) -> str:
        """Store a job and its tasks; return the allocated job id ("00001", ...)."""

    @abc.abstractmethod
    def release_job(self, job_id: str) -> int:
        """Holding tasks become pending; return how many."""

    @abc.abstractmethod
    def retry_tasks(self, job_id: str, task_ids: Sequence[str] | None = None) -> int:
        """Failed tasks (all of the job's, or those named) go back to pending with fresh budgets
        (their preempted and failed attempts start again at 0; the events keep the history, with a
        "retried" event each); return how many. A named task that is not failed, or a killed job,
        is an error that changes nothing."""

    @abc.abstractmethod
    def kill_job(self, job_id: str) -> int:
        """Holding/pending tasks fail "killed by owner", leased ones are asked to stop; return how many."""

    @abc.abstractmethod
    def jobs(self) -> list[JobSummary]: ...

    @abc.abstractmethod
    def job(self, job_id: str) -> JobInfo: ...

    @abc.abstractmethod
    def tasks(self, job_id: str) -> list[TaskRow]: ...

    @abc.abstractmethod
    def events(self, job_id: str, task_id: str | None = None) -> list[Event]: ...

    @abc.abstractmethod
    def is_finished(self, job_id: str) -> bool:
        """No task of the job is holding, pending or leased."""

    # -- leases ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def claim(self, worker: str, lease_seconds: float) -> Lease | None:
        """Reap expired leases, then lease the oldest pending task; None when there is none."""

    @abc.abstractmethod
    def reap(self) -> int:
        """Return tasks whose lease expired to pending (or failed); return how many."""

    @abc.abstractmethod
    def heartbeat(self, lease: Lease, lease_seconds: float, status: WorkerStatus | None = None) -> HeartbeatReply: ...

    @abc.abstractmethod
    def complete(self, lease: Lease, download: NewDownload | None = None, op_id: str | None = None) -> None: ...

    @abc.abstractmethod
    def fail(self, lease: Lease, reason: str, op_id: str | None = None) -> str:
        """Count a failed attempt; return the new state (pending or failed)."""

    @abc.abstractmethod
    def release(
        self,
        lease: Lease,
        cause: str = "preempted",
        frames_done: str = "",
        download: NewDownload | None = None,
        reason: str = "",
        op_id: str | None = None,
    ) -> str:
        """Give the task back (see module doc for causes); return the new state."""

    # -- workers --------------------------------------------------------------------------------

    @abc.abstractmethod
    def register_worker(self, worker: str, info: Mapping[str, Any]) -> None:
        """Record (or refresh) a worker and what it runs on; it starts idle."""

    @abc.abstractmethod
    def worker_report(self, worker: str, status: WorkerStatus) -> None:
        """A worker's state between tasks (idle, stopped); heartbeats carry it during a task."""

    @abc.abstractmethod
    def workers(self, gone_after: float = 120.0) -> list[WorkerRow]:
        """Every registered worker; one not heard from for ``gone_after`` seconds shows as gone."""

    # -- downloads ------------------------------------------------------------------------------

    @abc.abstractmethod
    def downloads(self, job_id: str | None = None, state: str | None = "pending") -> list[DownloadRecord]: ...

    @abc.abstractmethod
    def mark_downloaded(self, download_id: str) -> None: ...

    # -- lifetime -------------------------------------------------------------------------------

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def coerce_job(job: JobInfo | Mapping[str, Any]) -> JobInfo:
    """A validated JobInfo from a JobInfo or the job part of a document; the id may be absent."""
    if isinstance(job, JobInfo):
        data: Any = job.to_dict()
    elif isinstance(job, Mapping):
        data = dict(job)
    else:
        raise DocumentError("job", f"must be a JobInfo or an object, not {type(job).__name__}")
    if not data.get("id"):
        data["id"] = PLACEHOLDER_JOB_ID
    return parse_job(_Reader(data, "job"))


def job_from_stored(data: Mapping[str, Any]) -> JobInfo:
    return parse_job(_Reader(data, "job"))


def validate_new_tasks(tasks: Iterable[Any]) -> list[NewTask]:
    """Each task checked with the task document's own rules; errors name ``tasks[i].field``."""
    checked: list[NewTask] = []
    for i, raw in enumerate(tasks):
        where = f"tasks[{i}]"
        task = NewTask.coerce(raw, where)
        if not isinstance(task.scout, bool):
            raise DocumentError(f"{where}.scout", f"must be true or false, not {task.scout!r}")
        parse_task(
            _Reader(
                {"id": "000", "frames": task.frames, "command": task.command, "tile": task.tile, "tiles": task.tiles},
                where,
            )
        )
        checked.append(task)
    return checked


def _check_relative_path(path: object, where: str) -> None:
    if not isinstance(path, str) or not path.strip():
        raise DocumentError(where, "is empty")
    if "\x00" in path or "\\" in path:
        raise DocumentError(where, f"{path!r} must use '/' separators and no NUL")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise DocumentError(where, f"{path!r} is absolute; it must be relative to output_dir")
    if ".." in path.split("/") or posixpath.normpath(path).startswith(".."):
        raise DocumentError(where, f"{path!r} climbs out of output_dir with '..'")
