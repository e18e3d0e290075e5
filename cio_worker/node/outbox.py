"""The durable outbox: every report the agent makes is on disk before it is sent.

A report (``complete``, ``fail``, ``release``) is written to ``<work_dir>/outbox/<op_id>.json``
(a temporary file, fsynced, renamed into place, the directory fsynced) *before* it is sent, and
deleted once the queue has answered it. A report the queue could not take because it was
unavailable stays and is sent again later — by the agent in the background, before each claim, at
start (also a new agent on the same work dir) — always with the same operation id, so a report
whose answer was lost on the way is applied once.

A report the queue refuses for good is dropped with one log line naming the job, the task and the
op id: ``LeaseLost`` (the lease is gone: the task runs elsewhere and this result is unwanted), a
document the queue calls invalid, a job or task the queue no longer has. A file that does not read
as a report is moved aside to ``<name>.bad`` with a log line; it never stops the agent.

One delivery at a time: ``send`` holds the outbox's lock while it talks to the queue, and a report
the agent is still sending itself (``sending``) is left alone by ``flush``. Only the agent's own
send of a completion may claim the worker's next task with it (``NextClaim``); a report sent
again from the outbox never does.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from cio_worker.errors import CioError, DocumentError, LeaseLost, QueueError
from cio_worker.queue import Lease, NewDownload, Queue, RELEASE_CAUSES
from cio_worker.queue import wire
from cio_worker.queue.base import AttemptFigures

FORMAT = 1
KINDS = ("complete", "fail", "release")
SUFFIX = ".json"
BAD_SUFFIX = ".bad"
TMP_PREFIX = "."
TMP_SUFFIX = ".tmp"
# Queue refusals that no later attempt can change (the report is dropped, not kept).
FINAL_CODES = frozenset({"unknown_job", "unknown_task", "bad_request", "bad_document"})

logger = logging.getLogger(__name__)


def new_op_id() -> str:
    return uuid.uuid4().hex


@dataclass
class NextClaim:
    """Ask a completion to claim the worker's next task too (``Queue.complete``'s
    ``next_lease_seconds``); the lease it brings, if any, is left in ``lease``."""

    lease_seconds: float
    lease: Lease | None = None


@dataclass(frozen=True)
class Report:
    """One report on one lease, with everything needed to send it again after a restart."""

    op_id: str
    kind: str  # complete | fail | release
    job_id: str
    task_id: str
    token: str
    worker: str
    download: NewDownload | None = None
    frames_done: str = ""
    cause: str = ""  # release: preempted | released
    reason: str = ""
    created: float = field(default_factory=time.time)
    figures: AttemptFigures | None = None  # what the attempt took; the queue records it once

    @classmethod
    def of(cls, kind: str, lease: Lease, **values: Any) -> "Report":
        return cls(op_id=new_op_id(), kind=kind, job_id=lease.job_id, task_id=lease.task_id, token=lease.token,
                   worker=lease.worker, **values)

    @property
    def label(self) -> str:
        return f"job {self.job_id} task {self.task_id}"

    def describe(self) -> str:
        return f"{self.kind} of {self.label} (op id {self.op_id})"

    @property
    def lease(self) -> Lease:
        """The lease the report names: its ids, token and worker (a report never reads the document)."""
        return Lease(job_id=self.job_id, task_id=self.task_id, token=self.token, worker=self.worker,
                     expires_at=0.0, document=None)  # type: ignore[arg-type]

    def send(self, queue: Queue, next_claim: NextClaim | None = None) -> str:
        """Make the report on ``queue`` with this report's op id; the task's state after it.
        ``next_claim`` (a completion only) gets the next task's lease, if the queue gave one."""
        method = getattr(queue, self.kind)
        # A stand-in queue that predates figures (a wrapper in a test or benchmark) gets none.
        extra = {"figures": self.figures} if self.figures is not None and accepts(method, "figures") else {}
        if self.kind == "complete":
            if next_claim is not None and accepts(method, "next_lease_seconds"):
                next_claim.lease = method(self.lease, self.download, op_id=self.op_id,
                                          next_lease_seconds=next_claim.lease_seconds, **extra)
            else:
                method(self.lease, self.download, op_id=self.op_id, **extra)
            return "done"
        if self.kind == "fail":
            return method(self.lease, self.reason, op_id=self.op_id, **extra)
        return method(self.lease, cause=self.cause, frames_done=self.frames_done, download=self.download,
                      reason=self.reason, op_id=self.op_id, **extra)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "op_id": self.op_id,
            "kind": self.kind,
            "lease": {"job_id": self.job_id, "task_id": self.task_id, "token": self.token, "worker": self.worker},
            "download": None if self.download is None else wire.new_download_to_dict(self.download),
            "frames_done": self.frames_done,
            "cause": self.cause,
            "reason": self.reason,
            "created": self.created,
            "figures": wire.figures_to_dict(self.figures),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Report":
        """A report read back; DocumentError naming the field when it is not one."""
        if not isinstance(data, Mapping):
            raise DocumentError("report", f"must be an object, not {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise DocumentError("report.format", f"must be {FORMAT}, not {data.get('format')!r}")
        lease = data.get("lease")
        if not isinstance(lease, Mapping):
            raise DocumentError("report.lease", "must be an object")
        texts = {}
        for where, source, name in (("report", data, "op_id"), ("report", data, "kind"),
                                    ("report.lease", lease, "job_id"), ("report.lease", lease, "task_id"),
                                    ("report.lease", lease, "token"), ("report.lease", lease, "worker")):
            value = source.get(name)
            if not isinstance(value, str) or not value.strip():
                raise DocumentError(f"{where}.{name}", "must be non-empty text")
            texts[name] = value
        if texts["kind"] not in KINDS:
            raise DocumentError("report.kind", f"{texts['kind']!r} is not one of {', '.join(KINDS)}")
        optional = {}
        for name in ("frames_done", "cause", "reason"):
            value = data.get(name, "")
            if not isinstance(value, str):
                raise DocumentError(f"report.{name}", "must be text")
            optional[name] = value
        if texts["kind"] == "release" and optional["cause"] not in RELEASE_CAUSES:
            raise DocumentError("report.cause", f"{optional['cause']!r} is not one of {', '.join(RELEASE_CAUSES)}")
        created = data.get("created", 0.0)
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            raise DocumentError("report.created", "must be a number")
        raw = data.get("download")
        download = None
        if raw is not None:
            download = wire.new_download_from_dict(raw, "report.download")
            download.validate()
        figures = wire.figures_from_dict(data.get("figures"), "report.figures")
        return cls(op_id=texts["op_id"], kind=texts["kind"], job_id=texts["job_id"], task_id=texts["task_id"],
                   token=texts["token"], worker=texts["worker"], download=download, created=float(created),
                   figures=figures, **optional)


@dataclass
class FlushResult:
    delivered: list[tuple[Report, str]] = field(default_factory=list)  # (report, the task's state after it)
    dropped: list[tuple[Report, str]] = field(default_factory=list)  # (report, why)
    kept: int = 0  # still in the outbox (the queue is unavailable)
    error: CioError | None = None  # why the flush stopped early

    @property
    def unavailable(self) -> bool:
        return self.error is not None


class Outbox:
    """Reports on disk until the queue has them; thread-safe."""

    def __init__(self, directory: Path, *, log: logging.Logger | None = None) -> None:
        self.directory = Path(directory)
        self.log = log or logger
        self._lock = threading.RLock()  # one delivery at a time
        self._state = threading.Lock()
        self._sending: set[str] = set()

    # -- files ----------------------------------------------------------------------------------

    def path_of(self, op_id: str) -> Path:
        return self.directory / f"{op_id}{SUFFIX}"

    def put(self, report: Report) -> Path:
        """Write ``report`` durably (temp file, fsync, rename, fsync of the directory)."""
        if not report.op_id or "/" in report.op_id or report.op_id.startswith("."):
            raise DocumentError("report.op_id", f"{report.op_id!r} cannot name a file")
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path_of(report.op_id)
        tmp = self.directory / f"{TMP_PREFIX}{report.op_id}{SUFFIX}{TMP_SUFFIX}"
        data = json.dumps(report.to_dict(), sort_keys=True).encode("utf-8")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        return final

    def discard(self, op_id: str) -> None:
        try:
            self.path_of(op_id).unlink()
        except FileNotFoundError:
            pass

    def recover(self) -> int:
        """Remove half-written temporary files a killed agent left (their reports were never sent:
        a report is sent only once its file is in place); return how many."""
        removed = 0
        if not self.directory.is_dir():
            return 0
        for path in self.directory.iterdir():
            if path.name.startswith(TMP_PREFIX) and path.name.endswith(TMP_SUFFIX):
                try:
                    path.unlink()
                    removed += 1
                except OSError as exc:
                    self.log.warning("outbox: cannot remove the leftover %s: %s", path, exc)
        return removed

    def entries(self) -> list[Report]:
        """The reports waiting, oldest first; a file that is not a report is moved aside."""
        if not self.directory.is_dir():
            return []
        found: list[Report] = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path.name.startswith(TMP_PREFIX):
                continue
            try:
                report = Report.from_dict(json.loads(path.read_text(encoding="utf-8")))
                if report.op_id != path.name[: -len(SUFFIX)]:
                    raise DocumentError("report.op_id", f"{report.op_id!r} does not match the file name")
            except FileNotFoundError:
                continue  # delivered meanwhile
            except (OSError, UnicodeDecodeError, ValueError, DocumentError) as exc:
                self._set_aside(path, exc)
                continue
            found.append(report)
        found.sort(key=lambda r: (r.created, r.op_id))
        return found

    def __len__(self) -> int:
        if not self.directory.is_dir():
            return 0
        return sum(1 for p in self.directory.glob(f"*{SUFFIX}") if not p.name.startswith(TMP_PREFIX))

    def _set_aside(self, path: Path, why: object) -> None:
        bad = path.with_name(path.name + BAD_SUFFIX)
        try:
            os.replace(path, bad)
        except OSError as exc:
            self.log.error("outbox: %s is not a report (%s) and cannot be moved aside: %s", path, why, exc)
            return
        self.log.error("outbox: %s is not a report (%s); moved aside to %s", path, why, bad.name)

    # -- delivery -------------------------------------------------------------------------------

    @contextmanager
    def sending(self, op_id: str) -> Iterator[None]:
        """The agent is sending this report itself: ``flush`` leaves it alone meanwhile. Enter it
        before ``put``, or a flush between the two sends the report as well."""
        with self._state:
            self._sending.add(op_id)
        try:
            yield
        finally:
            with self._state:
                self._sending.discard(op_id)

    def send(self, queue: Queue, report: Report, next_claim: NextClaim | None = None) -> str:
        """Send once. Answered, or refused for good: the file goes. Unavailable (QueueError other
        than LeaseLost): the file stays. Every exception reaches the caller."""
        with self._lock:
            try:
                state = report.send(queue, next_claim)
            except CioError as exc:
                if is_final(exc):
                    self.discard(report.op_id)
                raise
            self.discard(report.op_id)
            return state

    def flush(self, queue: Queue) -> FlushResult:
        """Send every waiting report, oldest first, until the queue proves unavailable."""
        result = FlushResult()
        with self._lock:
            waiting = self.entries()
            with self._state:
                busy = set(self._sending)
            waiting = [r for r in waiting if r.op_id not in busy]
            for index, report in enumerate(waiting):
                if not self.path_of(report.op_id).exists():
                    continue  # delivered by the agent meanwhile
                try:
                    state = self.send(queue, report)
                except LeaseLost as exc:
                    self.log.warning("outbox: %s dropped: the lease is gone (%s)", report.describe(), exc)
                    result.dropped.append((report, "lease lost"))
                except CioError as exc:
                    if is_final(exc):
                        self.log.error("outbox: %s dropped: the queue refused it (%s)", report.describe(), exc)
                        result.dropped.append((report, str(exc)))
                        continue
                    result.error = exc
                    result.kept = len(waiting) - index
                    break
                else:
                    self.log.info("outbox: delivered %s; the task is now %s", report.describe(), state)
                    result.delivered.append((report, state))
        return result


def accepts(method: Any, name: str) -> bool:
    """Whether ``method`` takes the keyword argument ``name``."""
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def is_final(exc: BaseException) -> bool:
    """A refusal no later attempt can change: the report is dropped rather than kept."""
    if isinstance(exc, LeaseLost):
        return True
    if isinstance(exc, QueueError):
        return exc.code in FINAL_CODES
    return isinstance(exc, CioError)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
