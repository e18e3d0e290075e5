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

Who fails a task matters too (the job's ``RetryPolicy``): a task whose failed budget is spent fails
for real only once its failures span ``distinct_workers`` (K) different workers; until then it goes
back to pending for a worker that has not failed it (``TaskRow.kept_from`` names those that may
not take it), so one bad node cannot fail a task alone. When no other worker that could take it
is there (registered, heard from within ``LIVE_WORKER_SECONDS``, not stopping, not blocked from the
job), it fails at once, as with K = 1: a farm of one never waits for a second worker, and a task
fails after at most max_retries + K failed attempts. A worker that has failed ``block_worker_after``
(M) of a job's tasks is blocked from the job (a "blocked" event; ``JobSummary.blocked``) and claims
none of its tasks again, unless it is the only worker there or blocking it would leave a pending
task that the others are kept from to nobody. ``retry_tasks`` clears the job's blocks.

A pending task is never left with no live worker allowed to take it while one is there: when the
workers that could take it go away, a claim that finds nothing else it may take takes such a task
despite its worker's block (a "block_overridden" event: "worker X takes task T despite its block:
no other worker may"). That attempt's failure counts like any other, and the task's
max_retries + K-th failed attempt is final whoever is there, so the bound holds.

Reports (``complete``, ``fail``, ``release``) may carry an operation id: a report whose id the queue
has already applied is answered with the first answer and changes nothing, so a client may resend a
report whose answer it never got. Workers register (``register_worker``) with what they run on, and
their heartbeats and ``worker_report`` keep their state (``WORKER_STATES``) and progress current.

Every attempt that ends (a report, or a reaped lease) is recorded once in ``attempts`` with the
figures its final report carried (``AttemptFigures``: wall, CPU, memory, transfers, cost, where its
log was uploaded). While an attempt runs its agent may ship its log's new lines (``append_log``);
the queue keeps the newest ``LOG_TAIL_CAP`` bytes of each, which ``task_log`` reads from anywhere.

A lease holds until its expiry has passed *and* the queue has reaped it (every ``claim`` reaps
first); a late heartbeat before that renews it. A killed job asks its leased tasks to stop
(``HeartbeatReply.cancel``); whatever the agent reports next except ``complete`` ends the task
failed with "killed by owner", never back to pending.

A worker that ends a task done may claim its next one in the same call (``complete``'s
``next_lease_seconds``): over HTTP one request per task instead of two, which is most of what a
coordinator spends on a busy fleet.
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
# A worker heard from within this many seconds counts as there to take a task (RetryPolicy's rules).
LIVE_WORKER_SECONDS = 120.0


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

    def previews(self) -> dict[str, str]:
        """Each file's preview key in the job's storage (``preview_key``), by relative path."""
        return {f.relative_path: preview_key(self.job_id, f.relative_path) for f in self.files}


# Where the agent puts the small sRGB preview of each output it uploads (node/previews.py), in the
# job's storage beside ``_logs/``: found from a download record's files without a field of its own.
# A preview that could not be made is simply absent. Never downloaded as an output.
PREVIEW_PREFIX = "_previews"


def preview_key(job_id: str, relative_path: str) -> str:
    """``_previews/<job>/<relative_path>.jpg``: the preview of one output (frame or tile)."""
    return f"{PREVIEW_PREFIX}/{job_id}/{relative_path}.jpg"


# Live task logs (``append_log``): the queue keeps at most this much of an attempt's log (its
# newest lines), and one shipment carries at most this much; both in bytes of UTF-8.
LOG_TAIL_CAP = 256 * 1024
LOG_SHIPMENT_CAP = 64 * 1024
# What ended an attempt, as the attempts table records it.
ATTEMPT_OUTCOMES = ("done", "failed", "preempted", "released", "lease_expired")
_FIGURE_NUMBERS = ("wall_seconds", "cpu_seconds", "peak_rss_bytes", "sync_bytes", "sync_seconds", "upload_bytes",
                   "upload_seconds", "hourly_price", "cost", "drain_seconds")
_FIGURE_TEXTS = ("instance_type", "currency", "log", "storage_scheme")


@dataclass(frozen=True)
class AttemptFigures:
    """What one attempt took, measured by its agent and carried by its final report (complete,
    fail, release). A figure that was not measured is None (a render that never started has no
    CPU seconds); ``cost`` is None when the price table does not know the instance type."""

    wall_seconds: float | None = None  # the attempt on the agent, sync to upload
    cpu_seconds: float | None = None  # the render's process tree, user + system
    peak_rss_bytes: int | None = None  # the render's process tree, at its highest sample
    sync_bytes: int | None = None  # inputs downloaded from storage
    sync_seconds: float | None = None
    upload_bytes: int | None = None  # outputs uploaded to storage
    upload_seconds: float | None = None
    instance_type: str = ""
    hourly_price: float | None = None
    cost: float | None = None  # wall_seconds x hourly_price
    currency: str = ""
    log: str = ""  # where the attempt's task log was uploaded (a storage URL); "" when it was not
    drain_seconds: float | None = None  # from the stop (notice, signal) to the report, when one came
    storage_scheme: str = ""  # file, s3, gs: for the coordinator's transfer figures

    def validate(self, where: str = "figures") -> None:
        for name in _FIGURE_NUMBERS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise DocumentError(f"{where}.{name}", f"must be a number >= 0 or null, not {value!r}")
        for name in _FIGURE_TEXTS:
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > 2048:
                raise DocumentError(f"{where}.{name}", "must be text of at most 2048 characters")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*_FIGURE_NUMBERS, *_FIGURE_TEXTS)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "figures") -> "AttemptFigures":
        if not isinstance(data, Mapping):
            raise DocumentError(where, f"must be an object, not {type(data).__name__}")
        known = {*_FIGURE_NUMBERS, *_FIGURE_TEXTS}
        extra = sorted(set(data) - known)
        if extra:
            raise DocumentError(f"{where}.{extra[0]}", f"is not a figure (known: {', '.join(sorted(known))})")
        values = {k: v for k, v in data.items() if not (k in _FIGURE_TEXTS and v is None)}
        for name in ("peak_rss_bytes", "sync_bytes", "upload_bytes"):
            value = values.get(name)
            if isinstance(value, float) and value.is_integer():
                values[name] = int(value)
        figures = cls(**values)
        figures.validate(where)
        return figures


@dataclass(frozen=True)
class AttemptRow:
    """One attempt of a task as the queue recorded it when it ended."""

    job_id: str
    task_id: str
    attempt: int  # the attempt number the agent was given (it starts again after ``retry``)
    worker: str
    outcome: str  # one of ATTEMPT_OUTCOMES
    reason: str
    started: float | None  # when the task was leased for it (the queue's clock)
    ended: float
    figures: AttemptFigures


@dataclass(frozen=True)
class TaskLogChunk:
    """What the queue holds of an attempt's live log after byte offset ``after`` (``task_log``).

    Offsets count bytes of the log as shipped (UTF-8); the queue keeps only the newest
    ``LOG_TAIL_CAP`` bytes, so ``start`` is where what it holds begins and ``skipped`` says that
    lines between ``after`` and ``start`` are no longer there (``text`` then starts at ``start``)."""

    job_id: str
    task_id: str
    attempt: int | None  # None: no attempt of the task has shipped a line
    worker: str
    start: int
    end: int
    text: str
    skipped: bool
    running: bool  # the attempt still holds the task: more may come
    log: str  # where the attempt's whole log was uploaded once it ended ("" until then, or if not)


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
class WorkerBlock:
    """A worker blocked from a job: it failed ``failures`` of the job's tasks (RetryPolicy.block_worker_after)."""

    worker: str
    failures: int
    since: float


@dataclass(frozen=True)
class JobSummary:
    id: str
    title: str
    counts: dict[str, int]  # every state in STATES, zero included
    created: float
    scout: bool
    killed: bool
    blocked: tuple[WorkerBlock, ...] = ()  # workers that claim none of its tasks, oldest block first

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
    # The workers that failed it and may not take it again: its failed budget is spent and it waits
    # for a worker that has not failed it (RetryPolicy.distinct_workers); () for any other task.
    kept_from: tuple[str, ...] = ()

    @property
    def attempt_count(self) -> int:
        return sum(self.attempts.values())


@dataclass(frozen=True)
class Event:
    job_id: str
    task_id: str | None  # None for job-level events
    time: float
    kind: str  # created, held, job_released, claimed, done, failed, retry, preempted, lease_expired,
    #            released, cancel_requested, killed, downloaded, retried, blocked (job-level: the
    #            event's worker is blocked from the job), unblocked (job-level: retry cleared them)
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
        "retried" event each); return how many. The job's blocks go too, and which workers failed
        its tasks (a fresh start: any worker may take any of its tasks). A named task that is not
        failed, or a killed job, is an error that changes nothing."""

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
    def complete(self, lease: Lease, download: NewDownload | None = None, op_id: str | None = None,
                 figures: AttemptFigures | None = None, next_lease_seconds: float | None = None) -> Lease | None:
        """End the task done. With ``next_lease_seconds`` the lease's worker then claims its next
        task (a claim without a wait) and gets that lease back, so that a busy worker asks once per
        task; None when there is none. A resend of a report applied before (same op id) claims
        nothing: it gets the lease the first one claimed, while that is still the worker's, so a
        lost answer leaves no task leased to nobody. The engines claim in the completion's own
        transaction: both are applied, or neither."""

    @abc.abstractmethod
    def fail(self, lease: Lease, reason: str, op_id: str | None = None, figures: AttemptFigures | None = None) -> str:
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
        figures: AttemptFigures | None = None,
    ) -> str:
        """Give the task back (see module doc for causes); return the new state."""

    # -- attempts and their logs ------------------------------------------------------------------

    @abc.abstractmethod
    def attempts(self, job_id: str, task_id: str | None = None) -> list[AttemptRow]:
        """Every ended attempt of the job's tasks (or of one task), oldest first, with its figures."""

    @abc.abstractmethod
    def append_log(self, lease: Lease, offset: int, text: str) -> int:
        """Add the next lines of the lease's task log: ``text`` (at most LOG_SHIPMENT_CAP bytes)
        begins at byte ``offset`` of the log. Bytes the queue has already (a resent shipment) are
        skipped; the queue keeps the newest LOG_TAIL_CAP bytes. Returns the offset the queue now
        has up to. LeaseLost when the lease no longer holds the task."""

    @abc.abstractmethod
    def task_log(self, job_id: str, task_id: str, attempt: int | None = None, after: int = 0) -> TaskLogChunk:
        """The live log the queue holds of the task's attempt ``attempt`` (None: the latest one
        that shipped lines) after byte ``after``."""

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


def check_lease_seconds(seconds: float, field: str = "lease_seconds") -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise DocumentError(field, f"must be a number of seconds above 0, not {seconds!r}")


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
