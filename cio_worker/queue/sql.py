"""The queue contract in SQL, written once for every engine (SQLite, PostgreSQL).

A backend supplies a transaction (``_transaction``) whose ``execute`` takes ``?`` placeholders and
returns rows addressable by column name, the time (``_now``: the agent's clock for the embedded
file, the database's for a shared server), and the row-locking clauses of its engine: SQLite
serialises writers for the whole transaction (``BEGIN IMMEDIATE``) and needs none; PostgreSQL
locks the rows a change reads (``FOR UPDATE``), and claimers skip the rows another claimer holds
(``FOR UPDATE SKIP LOCKED``), so claims never queue behind each other.
"""

from __future__ import annotations

import abc
import functools
import json
import secrets
import string
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Protocol, Sequence

from cio_worker.errors import CioError, DocumentError, LeaseLost, QueueError
from cio_worker.job.document import JobInfo, RetryPolicy, TaskDocument, TaskInfo, _Reader, job_id_text, parse_task, task_id_text
from cio_worker.job.frames import FrameSet
from cio_worker.queue import credentials
from cio_worker.queue.base import (
    LOG_SHIPMENT_CAP,
    LOG_TAIL_CAP,
    AttemptFigures,
    AttemptRow,
    TaskLogChunk,
    ACTIVE_STATES,
    GONE,
    LIVE_WORKER_SECONDS,
    ATTEMPT_CAUSES,
    DOWNLOAD_STATES,
    KILLED_REASON,
    RELEASE_CAUSES,
    STATES,
    WORKER_STATES,
    DownloadFile,
    DownloadRecord,
    Event,
    HeartbeatReply,
    JobSummary,
    Lease,
    NewDownload,
    NewTask,
    Queue,
    TaskRow,
    WorkerBlock,
    WorkerRow,
    WorkerStatus,
    check_lease_seconds,
    coerce_job,
    job_from_stored,
    validate_new_tasks,
)

Row = Mapping[str, Any]

def queue_tables(serial_key: str) -> tuple[str, ...]:
    """Jobs, tasks, events and downloads (schema version 1) in SQL both engines read alike (SQLite
    takes BIGINT and DOUBLE PRECISION as its integer and real); ``serial_key`` is the engine's
    auto-numbered primary key. Each engine adds the indexes its claims need."""
    return (
        f"""CREATE TABLE jobs (
            number {serial_key},
            title TEXT NOT NULL,
            document TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            scout INTEGER NOT NULL,
            killed INTEGER NOT NULL DEFAULT 0,
            retry_preempted INTEGER NOT NULL,
            retry_failed INTEGER NOT NULL)""",
        f"""CREATE TABLE tasks (
            job_number BIGINT NOT NULL REFERENCES jobs(number),
            number BIGINT NOT NULL,
            frames TEXT NOT NULL,
            command TEXT NOT NULL,
            tile INTEGER NOT NULL,
            tiles INTEGER NOT NULL,
            scout INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
            attempts_preempted INTEGER NOT NULL DEFAULT 0,
            attempts_failed INTEGER NOT NULL DEFAULT 0,
            attempts_released INTEGER NOT NULL DEFAULT 0,
            lease_expiries INTEGER NOT NULL DEFAULT 0,
            frames_done TEXT NOT NULL DEFAULT '',
            worker TEXT NOT NULL DEFAULT '',
            lease_token TEXT,
            lease_expires DOUBLE PRECISION,
            reason TEXT NOT NULL DEFAULT '',
            cancel INTEGER NOT NULL DEFAULT 0,
            updated DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (job_number, number))""",
        f"""CREATE TABLE events (
            seq {serial_key},
            job_number BIGINT NOT NULL,
            task_number BIGINT,
            time DOUBLE PRECISION NOT NULL,
            kind TEXT NOT NULL,
            worker TEXT NOT NULL DEFAULT '',
            detail TEXT NOT NULL DEFAULT '')""",
        """CREATE TABLE downloads (
            id TEXT PRIMARY KEY,
            job_number BIGINT NOT NULL,
            task_number BIGINT NOT NULL,
            output_dir TEXT NOT NULL,
            size BIGINT NOT NULL,
            files TEXT NOT NULL,
            state TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            updated DOUBLE PRECISION NOT NULL)""",
    )


# Tables both engines spell the same way: schema version 2 of each (workers, tokens, operations).
WORKERS_TOKENS_OPERATIONS: tuple[str, ...] = (
    """CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        info TEXT NOT NULL,
        state TEXT NOT NULL,
        job_number BIGINT,
        task_number BIGINT,
        progress DOUBLE PRECISION,
        detail TEXT NOT NULL DEFAULT '',
        registered DOUBLE PRECISION NOT NULL,
        last_contact DOUBLE PRECISION NOT NULL,
        tasks_done INTEGER NOT NULL DEFAULT 0,
        tasks_failed INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        scopes TEXT NOT NULL,
        digest TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        revoked DOUBLE PRECISION,
        last_used DOUBLE PRECISION)""",
    """CREATE TABLE operations (
        id TEXT PRIMARY KEY,
        worker TEXT NOT NULL,
        kind TEXT NOT NULL,
        result TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX operations_by_age ON operations (created)",
)
# Schema version 3 of both engines: which workers failed which of a job's tasks, and the blocks that
# follow (RetryPolicy.distinct_workers, block_worker_after). A row with task_number -1 is the worker's
# tally for the whole job: ``failures`` counts the job's tasks it failed, ``since`` is when it was
# blocked from the job (NULL: not blocked). A row with a task number counts the worker's failed
# attempts of that task; ``since`` is when the task was kept from it (NULL: it may still take it).
# A claim skips a task when a row of its worker with a ``since`` names the task or the job (-1),
# unless it finds nothing else and no other live worker may take that task (_claim_despite_blocks).
JOB_BLOCKS: tuple[str, ...] = (
    """CREATE TABLE job_blocks (
        job_number BIGINT NOT NULL,
        worker TEXT NOT NULL,
        task_number BIGINT NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        since DOUBLE PRECISION,
        PRIMARY KEY (job_number, worker, task_number))""",
    "CREATE INDEX job_blocks_by_task ON job_blocks (job_number, task_number)",
    "CREATE INDEX job_blocks_active ON job_blocks (worker) WHERE since IS NOT NULL",
)
WHOLE_JOB = -1  # job_blocks.task_number of a worker's row for the whole job
# A worker ``w`` other than the first parameter that is there to take tasks: heard from since the
# second parameter (LIVE_WORKER_SECONDS ago), not stopping.
_LIVE_OTHER = "w.id <> ? AND w.state NOT IN ('stopped', 'draining') AND w.last_contact >= ?"
# No such worker may claim task ``t`` (it is blocked from t's job or kept from t).
_NO_OTHER_MAY_TAKE = (
    f"NOT EXISTS (SELECT 1 FROM workers w WHERE {_LIVE_OTHER} AND NOT EXISTS (SELECT 1 FROM job_blocks o"
    f" WHERE o.job_number = t.job_number AND o.worker = w.id AND o.task_number IN ({WHOLE_JOB}, t.number)"
    " AND o.since IS NOT NULL))")


def attempts_tables(serial_key: str) -> tuple[str, ...]:
    """Each ended attempt with its figures, and the live tails of running attempts' logs (one row
    per lease), in SQL both engines read alike; ``serial_key`` as in ``queue_tables``."""
    return (
        f"""CREATE TABLE attempts (
            seq {serial_key},
            job_number BIGINT NOT NULL,
            task_number BIGINT NOT NULL,
            attempt INTEGER NOT NULL,
            worker TEXT NOT NULL,
            outcome TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            started DOUBLE PRECISION,
            ended DOUBLE PRECISION NOT NULL,
            wall_seconds DOUBLE PRECISION,
            cpu_seconds DOUBLE PRECISION,
            peak_rss_bytes BIGINT,
            sync_bytes BIGINT,
            sync_seconds DOUBLE PRECISION,
            upload_bytes BIGINT,
            upload_seconds DOUBLE PRECISION,
            instance_type TEXT NOT NULL DEFAULT '',
            hourly_price DOUBLE PRECISION,
            cost DOUBLE PRECISION,
            currency TEXT NOT NULL DEFAULT '',
            log TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX attempts_by_task ON attempts (job_number, task_number)",
        """CREATE TABLE task_log_chunks (
            job_number BIGINT NOT NULL,
            task_number BIGINT NOT NULL,
            token TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            worker TEXT NOT NULL,
            start_offset BIGINT NOT NULL,
            end_offset BIGINT NOT NULL,
            text TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (job_number, task_number, token, start_offset))""",
        "CREATE INDEX task_log_chunks_by_age ON task_log_chunks (created)",
    )


# Schema version 5 of both engines: the web view's sign-in sessions (coordinator/web). Only a digest
# of each session id is stored; a session belongs to an owner token and ends when the token is
# revoked (``web_session`` reads the token with it) or when it expires.
WEB_SESSIONS: tuple[str, ...] = (
    """CREATE TABLE web_sessions (
        digest TEXT PRIMARY KEY,
        token_id TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX web_sessions_by_expiry ON web_sessions (expires)",
)


_EVENT_COLUMNS = ("job_number", "task_number", "time", "kind", "worker", "detail")
_TASK_KEY = ("job_number", "number")
# The columns of an attempt's figures in the attempts table (AttemptFigures' names).
_ATTEMPT_FIGURES = ("wall_seconds", "cpu_seconds", "peak_rss_bytes", "sync_bytes", "sync_seconds", "upload_bytes",
                    "upload_seconds", "instance_type", "hourly_price", "cost", "currency", "log")
# Live log tails are kept this long after their last shipment (the uploaded log stays).
TASK_LOG_TTL = 24 * 3600.0
# Job and task numbers are stored as 64-bit integers; longer digit strings name nothing.
_MAX_NUMBER_DIGITS = 18
# Applied operation ids are kept this long: far longer than any client retries a report.
OPERATION_TTL = 7 * 24 * 3600.0
_MAX_OP_ID = 100


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> list[Row]: ...


class Tx(Protocol):
    """One open transaction: ``?`` placeholders, rows by column name."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Cursor: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> Any: ...


# A complete() call's arguments: (lease, download, op id[, the attempt's figures[, next_lease_seconds]]);
# with next_lease_seconds, the worker's next task is claimed in the completion's transaction
# (``ReportOutcome.next``).
Completion = tuple[Lease, "NewDownload | None", "str | None"] | tuple[Lease, "NewDownload | None", "str | None",
                                                                     "AttemptFigures | None"] | tuple[
    Lease, "NewDownload | None", "str | None", "AttemptFigures | None", "float | None"]


@dataclass(frozen=True)
class _Final:
    """A task's lease ended: its new state, and the event that says so."""

    row: Row
    state: str
    reason: str
    kind: str = "failed"
    detail: str | None = None
    frames_done: str | None = None

    def event_text(self) -> str:
        text = self.reason if self.detail is None else self.detail
        if self.kind != self.state:
            outcome = f"{self.state}: {self.reason}" if self.state == "failed" else self.state
            text = f"{text} -> {outcome}" if text else outcome
        return text


def _row_key(lease: Lease) -> tuple[int, int] | None:
    job, task = _number(lease.job_id), _number(lease.task_id)
    return None if job is None or task is None else (job, task)


class _Applied(Exception):
    """A report whose operation id the queue has applied already; ``answer`` is what it said."""

    def __init__(self, answer: str) -> None:
        super().__init__(answer)
        self.answer = answer


@dataclass(frozen=True)
class ReportOutcome:
    """A final report's answer (complete, fail, release): the task's state after it, and whether
    it was a ``replay``, a copy of a report applied before (its op id, e.g. resent after a lost
    answer), answered alike and changing nothing this time."""

    state: str
    replay: bool = False
    next: Lease | None = None  # the next task a completion claimed for its worker (``Completion``)


class SqlQueue(Queue):
    """The shared logic; subclasses connect, lock and tell the time."""

    # Appended to the claim's SELECT of the next pending task / the reap's SELECT of expired leases.
    CLAIM_LOCK = ""
    REAP_LOCK = ""
    # A claim reaps expired leases first, at most this often (by the queue's clock): many claimers
    # need not all look for the same expired leases.
    REAP_INTERVAL = 0.0
    # Appended to SELECTs of the rows a change is about to update (a report, a kill); the table
    # whose rows it locks is always aliased ``t``.
    ROW_LOCK = ""

    def __init__(self) -> None:
        self._jobs_cache: dict[int, JobInfo] = {}
        self._next_reap = float("-inf")

    # -- what a backend provides ------------------------------------------------------------------

    @abc.abstractmethod
    def _transaction(self, write: bool = True) -> AbstractContextManager[Tx]: ...

    @abc.abstractmethod
    def _now(self, tx: Tx) -> float:
        """Seconds since the epoch, as the queue's clock reads them inside ``tx``."""

    @abc.abstractmethod
    def _where(self) -> str:
        """The queue as a person named it (a path, a URL without its password), for messages."""

    # -- jobs -------------------------------------------------------------------------------------

    def create_job(self, job: JobInfo | Mapping[str, Any], tasks: Sequence[NewTask]) -> str:
        info = coerce_job(job)
        checked = validate_new_tasks(tasks)
        scouts = sum(1 for t in checked if t.scout)
        hold = 0 < scouts < len(checked)
        policy = info.autoretry_policy
        with self._transaction() as tx:
            now = self._now(tx)
            number = tx.execute(
                "INSERT INTO jobs (title, document, created, scout, retry_preempted, retry_failed)"
                " VALUES (?, '', ?, ?, ?, ?) RETURNING number",
                (info.title, now, int(scouts > 0), policy.preempted, policy.failed),
            ).fetchone()["number"]
            job_id = job_id_text(number)
            tx.execute("UPDATE jobs SET document = ? WHERE number = ?", (json.dumps(replace(info, id=job_id).to_dict()), number))
            self._insert_rows(
                tx, "tasks", ("job_number", "number", "frames", "command", "tile", "tiles", "scout", "state", "updated"),
                [(number, i, t.frames, t.command, t.tile, t.tiles, int(t.scout),
                  "holding" if hold and not t.scout else "pending", now) for i, t in enumerate(checked)],
            )
            detail = f"{len(checked)} tasks"
            if hold:
                detail += f"; {len(checked) - scouts} held until the job is released, {scouts} scout tasks pending"
            self._event(tx, number, None, now, "created", "", detail)
        return job_id

    def release_job(self, job_id: str) -> int:
        with self._transaction() as tx:
            number = self._job_number(tx, job_id)
            now = self._now(tx)
            count = tx.execute(
                "UPDATE tasks SET state = 'pending', updated = ? WHERE job_number = ? AND state = 'holding'", (now, number)
            ).rowcount
            self._event(tx, number, None, now, "job_released", "", f"{count} held tasks now pending")
        return count

    def retry_tasks(self, job_id: str, task_ids: Sequence[str] | None = None) -> int:
        if task_ids is not None and (isinstance(task_ids, str) or not all(isinstance(t, str) for t in task_ids)):
            raise DocumentError("tasks", "must be a list of task ids")
        with self._transaction() as tx:
            number = self._job_number(tx, job_id)
            if tx.execute("SELECT killed FROM jobs WHERE number = ?", (number,)).fetchone()["killed"]:
                raise QueueError(f"job {job_id_text(number)} was killed; its tasks cannot be retried",
                                 code="job_killed")
            if task_ids is None:
                rows = tx.execute("SELECT number, state, attempts_preempted, attempts_failed FROM tasks t"
                                  " WHERE job_number = ? AND state = 'failed' ORDER BY number" + self.ROW_LOCK,
                                  (number,)).fetchall()
            else:
                wanted = sorted({self._task_number(tx, number, t) for t in task_ids})
                rows = [tx.execute("SELECT number, state, attempts_preempted, attempts_failed FROM tasks t"
                                   " WHERE job_number = ? AND number = ?" + self.ROW_LOCK, (number, t)).fetchone()
                        for t in wanted]
                for row in rows:
                    if row["state"] != "failed":
                        raise QueueError(f"job {job_id_text(number)} task {task_id_text(row['number'])} is "
                                         f"{row['state']}, not failed; nothing was retried", code="task_not_failed")
            now = self._now(tx)
            for row in rows:
                tx.execute("UPDATE tasks SET state = 'pending', attempts_preempted = 0, attempts_failed = 0,"
                           " lease_expiries = 0, cancel = 0, updated = ? WHERE job_number = ? AND number = ?",
                           (now, number, row["number"]))
                self._event(tx, number, row["number"], now, "retried", "",
                            f"fresh budgets (had failed {row['attempts_failed']}, "
                            f"preempted {row['attempts_preempted']})")
            self._clear_blocks(tx, number, now)
        return len(rows)

    def _clear_blocks(self, tx: Tx, job: int, now: float) -> None:
        """Forget which workers failed the job's tasks and unblock them: a fresh start."""
        blocked = [r["worker"] for r in tx.execute(
            f"SELECT worker FROM job_blocks WHERE job_number = ? AND task_number = {WHOLE_JOB} AND since IS NOT NULL"
            " ORDER BY worker", (job,)).fetchall()]
        tx.execute("DELETE FROM job_blocks WHERE job_number = ?", (job,))
        if blocked:
            self._event(tx, job, None, now, "unblocked", "", f"retry unblocked {', '.join(blocked)}")

    def kill_job(self, job_id: str) -> int:
        with self._transaction() as tx:
            number = self._job_number(tx, job_id)
            now = self._now(tx)
            tx.execute("UPDATE jobs SET killed = 1 WHERE number = ?", (number,))
            active = tx.execute(
                "SELECT number, state, worker FROM tasks t WHERE job_number = ? AND state IN ('holding', 'pending', 'leased')"
                " ORDER BY number" + self.ROW_LOCK,
                (number,),
            ).fetchall()
            waiting = [r["number"] for r in active if r["state"] != "leased"]
            leased = [(r["number"], r["worker"]) for r in active if r["state"] == "leased"]
            tx.execute(
                "UPDATE tasks SET state = 'failed', reason = ?, updated = ? WHERE job_number = ? AND state IN ('holding', 'pending')",
                (KILLED_REASON, now, number),
            )
            # ``updated`` stays the lease's start: the attempt that ends later started then.
            tx.execute("UPDATE tasks SET cancel = 1 WHERE job_number = ? AND state = 'leased'", (number,))
            for task in waiting:
                self._event(tx, number, task, now, "killed", "", KILLED_REASON)
            for task, worker in leased:
                self._event(tx, number, task, now, "cancel_requested", worker, "job killed; the agent stops at its next heartbeat")
            self._event(tx, number, None, now, "killed", "", f"{len(waiting)} tasks failed, {len(leased)} running tasks asked to stop")
        return len(waiting) + len(leased)

    def jobs(self) -> list[JobSummary]:
        with self._transaction(write=False) as tx:
            counts: dict[int, dict[str, int]] = {}
            for r in tx.execute("SELECT job_number, state, COUNT(*) AS n FROM tasks GROUP BY job_number, state").fetchall():
                counts.setdefault(r["job_number"], {})[r["state"]] = r["n"]
            rows = tx.execute("SELECT number, title, created, scout, killed FROM jobs ORDER BY number").fetchall()
            blocked: dict[int, list[WorkerBlock]] = {}
            for b in tx.execute(f"SELECT job_number, worker, failures, since FROM job_blocks WHERE since IS NOT NULL"
                                f" AND task_number = {WHOLE_JOB} ORDER BY since, worker").fetchall():
                blocked.setdefault(b["job_number"], []).append(WorkerBlock(b["worker"], b["failures"], b["since"]))
        return [
            JobSummary(
                id=job_id_text(r["number"]),
                title=r["title"],
                counts={s: counts.get(r["number"], {}).get(s, 0) for s in STATES},
                created=r["created"],
                scout=bool(r["scout"]),
                killed=bool(r["killed"]),
                blocked=tuple(blocked.get(r["number"], ())),
            )
            for r in rows
        ]

    def job(self, job_id: str) -> JobInfo:
        with self._transaction(write=False) as tx:
            return self._job_info(tx, self._job_number(tx, job_id))

    def tasks(self, job_id: str) -> list[TaskRow]:
        return self._task_rows(job_id)

    def task(self, job_id: str, task_id: str) -> TaskRow:
        """One task of the job (``tasks`` reads them all)."""
        return self._task_rows(job_id, task_id)[0]

    def _task_rows(self, job_id: str, task_id: str | None = None) -> list[TaskRow]:
        with self._transaction(write=False) as tx:
            number = self._job_number(tx, job_id)
            one = "" if task_id is None else " AND number = ?"
            args = (number,) if task_id is None else (number, self._task_number(tx, number, task_id))
            rows = tx.execute(f"SELECT * FROM tasks WHERE job_number = ?{one} ORDER BY number", args).fetchall()
            kept: dict[int, list[str]] = {}
            for b in tx.execute("SELECT task_number, worker FROM job_blocks WHERE job_number = ? AND task_number >= 0"
                                f" AND since IS NOT NULL{one.replace('number', 'task_number')}"
                                " ORDER BY task_number, since, worker", args).fetchall():
                kept.setdefault(b["task_number"], []).append(b["worker"])
        return [replace(_task_row(r), kept_from=tuple(kept.get(r["number"], ())))
                if r["state"] == "pending" and r["number"] in kept else _task_row(r) for r in rows]

    def events(self, job_id: str, task_id: str | None = None) -> list[Event]:
        with self._transaction(write=False) as tx:
            number = self._job_number(tx, job_id)
            if task_id is None:
                rows = tx.execute("SELECT * FROM events WHERE job_number = ? ORDER BY seq", (number,)).fetchall()
            else:
                task = self._task_number(tx, number, task_id)
                rows = tx.execute(
                    "SELECT * FROM events WHERE job_number = ? AND task_number = ? ORDER BY seq", (number, task)
                ).fetchall()
        return [
            Event(
                job_id=job_id_text(r["job_number"]),
                task_id=None if r["task_number"] is None else task_id_text(r["task_number"]),
                time=r["time"],
                kind=r["kind"],
                worker=r["worker"],
                detail=r["detail"],
            )
            for r in rows
        ]

    def is_finished(self, job_id: str) -> bool:
        with self._transaction(write=False) as tx:
            number = self._job_number(tx, job_id)
            active = tx.execute(
                f"SELECT COUNT(*) AS n FROM tasks WHERE job_number = ? AND state IN ({_marks(ACTIVE_STATES)})",
                (number, *ACTIVE_STATES),
            ).fetchone()["n"]
        return active == 0

    # -- leases -----------------------------------------------------------------------------------

    def claim(self, worker: str, lease_seconds: float) -> Lease | None:
        return self.claim_many([worker], lease_seconds)[0]

    def claim_many(self, workers: Sequence[str], lease_seconds: float,
                   after: Sequence[str | None] | None = None) -> list[Lease | None]:
        """Lease a task to each of ``workers`` (oldest pending first) in one transaction: what a
        coordinator does with the claims that arrive together. A worker left without one gets None.
        No worker gets a task it is kept from (``job_blocks``): the claimers share one look at the
        pending tasks none of them is kept from; should those run out while some claimer is kept
        from a pending task, each claimer still waiting then looks for itself. A claimer left with
        nothing takes a task it is kept from that no other live worker may take. ``after``: each
        claim's op id (or None), under which its lease is recorded (``claimed_after``), so that a
        copy of the claim resent after a lost answer can get that lease rather than another."""
        for worker in workers:
            _check_worker(worker)
        check_lease_seconds(lease_seconds)
        with self._transaction() as tx:
            now = self._now(tx)
            if now >= self._next_reap:
                self._reap(tx, now)
                self._next_reap = now + self.REAP_INTERVAL
            return self._claim_in(tx, workers, lease_seconds, after, now)

    def _claim_in(self, tx: Tx, workers: Sequence[str], lease_seconds: float, after: Sequence[str | None] | None,
                  now: float) -> list[Lease | None]:
        """``claim_many`` inside ``tx``, without the reap; ``after``: each claim's op id, or that of
        the completion it is made with (or None)."""
        leases: list[Lease | None] = [None] * len(workers)
        waiting = list(range(len(workers)))  # the claimers without a lease yet, in their order
        alone = False
        while waiting:
            group = waiting[:1] if alone else waiting
            names = sorted({workers[i] for i in group})
            rows = self._pending_for(tx, names, len(group))
            claimed: list[tuple[Row, str, str, int]] = []  # (row, worker, token, attempt)
            for row in rows:
                i = group[len(claimed)]
                got = self._lease_of(tx, row, workers[i], now, lease_seconds)
                if got is not None:
                    leases[i], entry = got
                    claimed.append(entry)
            if claimed:
                self._lease_rows(tx, claimed, now, now + lease_seconds)
            served = set(group[:len(claimed)])
            if len(rows) < len(group):  # no more pending tasks this group may take
                served |= set(group) if alone else set()
                if not alone and len(names) > 1 and self._blocked(tx, names):
                    alone = True
                elif not alone:
                    break
            waiting = [i for i in waiting if i not in served]
        idle = [i for i in range(len(workers)) if leases[i] is None]
        if idle:
            self._claim_despite_blocks(tx, workers, idle, leases, now, lease_seconds)
        if after is not None:  # two copies of one claim may both lease: the first record stands
            self._remember_all(tx, [(_next_of(op_id), lease.worker, "claim", f"{lease.job_id}/{lease.task_id}/{lease.token}", now)
                                    for lease, op_id in zip(leases, after) if lease is not None and op_id is not None],
                               or_ignore=True)
        return leases

    def claimed_after(self, op_id: str, worker: str) -> Lease | None:
        """The lease claimed for ``worker`` under ``op_id`` (a claim's own op id, or that of the
        completion it was made with), while it is still that worker's; else None."""
        with self._transaction(write=False) as tx:
            return self._claimed_after(tx, op_id, worker)

    def _claimed_after(self, tx: Tx, op_id: str, worker: str) -> Lease | None:
        """``claimed_after`` inside ``tx``."""
        record = tx.execute("SELECT worker, kind, result FROM operations WHERE id = ?", (_next_of(op_id),)).fetchone()
        # (a report's own op id may end like a claim's record: only a claim's record is read)
        if record is None or record["worker"] != worker or record["kind"] != "claim":
            return None
        job_id, task_id, token = record["result"].split("/")
        row = tx.execute("SELECT * FROM tasks WHERE job_number = ? AND number = ?",
                         (_number(job_id), _number(task_id))).fetchone()
        if row is None or row["state"] != "leased" or row["lease_token"] != token or row["worker"] != worker:
            return None
        return Lease(job_id=job_id, task_id=task_id, token=token, worker=worker, expires_at=row["lease_expires"],
                     document=TaskDocument(job=self._job_info(tx, row["job_number"]),
                                           task=_stored_task(row, _attempts_so_far(row) + 1)))

    def _lease_of(self, tx: Tx, row: Row, worker: str, now: float,
                  lease_seconds: float) -> tuple[Lease, tuple[Row, str, str, int]] | None:
        """The lease of pending ``row`` for ``worker`` and its entry for ``_lease_rows``. A stored
        job or task that no longer reads (another version wrote it, or someone edited the database)
        fails that task with the field and the problem instead (None); claiming goes on."""
        what = "job document"
        try:
            job = self._job_info(tx, row["job_number"])
            what = "task"
            attempt = _attempts_so_far(row) + 1
            task = _stored_task(row, attempt)
        except DocumentError as exc:
            self._set_final(tx, row, now, "failed", f"the stored {what} is invalid: {exc}")
            return None
        token = secrets.token_hex(16)
        lease = Lease(job_id=job.id, task_id=task.id, token=token, worker=worker, expires_at=now + lease_seconds,
                      document=TaskDocument(job=job, task=task))
        return lease, (row, worker, token, attempt)

    def _claim_despite_blocks(self, tx: Tx, workers: Sequence[str], idle: Sequence[int], leases: list[Lease | None],
                              now: float, lease_seconds: float) -> None:
        """Each claimer in ``idle`` (found nothing it may take) that is kept from a pending task no
        other live worker may take takes it anyway, so that no pending task waits while a live
        worker is there (its failure then counts: see ``_judge_failure``)."""
        blocked = self._blocked(tx, sorted({workers[i] for i in idle}))
        for i in idle:
            if workers[i] not in blocked:
                continue
            stranded = self._stranded_task(tx, workers[i], now)
            got = None if stranded is None else self._lease_of(tx, stranded, workers[i], now, lease_seconds)
            if got is None:
                continue
            leases[i], entry = got
            row = entry[0]
            self._event(tx, row["job_number"], row["number"], now, "block_overridden", workers[i],
                        f"worker {workers[i]} takes task {task_id_text(row['number'])} despite its block: "
                        "no other worker may")
            self._lease_rows(tx, [entry], now, now + lease_seconds)

    def _stranded_task(self, tx: Tx, worker: str, now: float) -> Row | None:
        """A pending task ``worker`` is kept from that no other live worker may take (locked by the
        engine's claim lock), or None. Read from the worker's own blocks: a job it is blocked from
        that no other live worker may claim from, then the tasks some worker is kept from."""
        live = now - LIVE_WORKER_SECONDS
        row = tx.execute(
            f"SELECT t.* FROM tasks t WHERE t.state = 'pending' AND t.job_number IN (SELECT x.job_number"
            f" FROM job_blocks x WHERE x.worker = ? AND x.task_number = {WHOLE_JOB} AND x.since IS NOT NULL"
            f" AND NOT EXISTS (SELECT 1 FROM workers w WHERE {_LIVE_OTHER} AND NOT EXISTS (SELECT 1 FROM job_blocks o"
            f" WHERE o.job_number = x.job_number AND o.worker = w.id AND o.task_number = {WHOLE_JOB}"
            " AND o.since IS NOT NULL))) ORDER BY t.job_number, t.number LIMIT 1" + self.CLAIM_LOCK,
            (worker, worker, live),
        ).fetchone()
        if row is not None:
            return row
        return tx.execute(
            "SELECT t.* FROM tasks t WHERE t.state = 'pending' AND (t.job_number, t.number) IN (SELECT k.job_number,"
            " k.task_number FROM job_blocks k WHERE k.task_number >= 0 AND k.since IS NOT NULL AND k.job_number IN"
            " (SELECT x.job_number FROM job_blocks x WHERE x.worker = ? AND x.since IS NOT NULL))"
            " AND EXISTS (SELECT 1 FROM job_blocks x WHERE x.job_number = t.job_number AND x.worker = ?"
            f" AND x.task_number IN ({WHOLE_JOB}, t.number) AND x.since IS NOT NULL) AND {_NO_OTHER_MAY_TAKE}"
            " ORDER BY t.job_number, t.number LIMIT 1" + self.CLAIM_LOCK,
            (worker, worker, worker, live),
        ).fetchone()

    def _pending_for(self, tx: Tx, names: Sequence[str], limit: int) -> list[Row]:
        """Up to ``limit`` pending tasks, oldest first, that none of the workers ``names`` is kept
        from (locked by the engine's claim lock): one probe of job_blocks' key per task read."""
        among, params = self._workers_are("b.worker", names)
        return tx.execute(
            "SELECT t.* FROM tasks t WHERE t.state = 'pending' AND NOT EXISTS (SELECT 1 FROM job_blocks b"
            f" WHERE b.job_number = t.job_number AND {among} AND b.task_number IN ({WHOLE_JOB}, t.number)"
            " AND b.since IS NOT NULL) ORDER BY t.job_number, t.number LIMIT ?" + self.CLAIM_LOCK,
            (*params, limit),
        ).fetchall()

    def _workers_are(self, column: str, names: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
        """``column`` is one of the worker ``names``, spelt plainly for one (a single claim)."""
        return (f"{column} = ?", (names[0],)) if len(names) == 1 else self._one_of(column, names)

    def _blocked(self, tx: Tx, names: Sequence[str]) -> set[str]:
        """Which of the workers ``names`` are blocked from a job or kept from a task."""
        among, params = self._workers_are("worker", names)
        return {r["worker"] for r in tx.execute(
            f"SELECT DISTINCT worker FROM job_blocks WHERE since IS NOT NULL AND {among}", params).fetchall()}

    def _lease_rows(self, tx: Tx, claimed: Sequence[tuple[Row, str, str, int]], now: float, expires: float) -> None:
        """Write the leases of one claim round: the tasks, their events, their workers."""
        self._update_rows(
            tx, "tasks", "state = 'leased', worker = {worker}, lease_token = {lease_token}, lease_expires = {lease_expires},"
            " updated = {updated}", ("worker", "lease_token", "lease_expires", "updated"), _TASK_KEY,
            [(w, token, expires, now, r["job_number"], r["number"]) for r, w, token, _ in claimed],
        )
        self._insert_rows(tx, "events", _EVENT_COLUMNS,
                          [(r["job_number"], r["number"], now, "claimed", w, f"attempt {a}") for r, w, _, a in claimed])
        self._update_rows(
            tx, "workers", "state = 'syncing', job_number = {job_number}, task_number = {task_number}, progress = NULL,"
            " detail = '', last_contact = {last_contact}", ("job_number", "task_number", "last_contact"), ("id",),
            # a worker that took two tasks in this round (an agent of two slots) shows the later one
            [row for _, row in sorted({w: (r["job_number"], r["number"], now, w) for r, w, _, _ in claimed}.items())],
            lock=True,
        )

    def pending(self, limit: int = 1000) -> int:
        """How many tasks are claimable now, counted up to ``limit`` (a cheap look for a dispatcher)."""
        with self._transaction(write=False) as tx:
            return tx.execute(
                "SELECT COUNT(*) AS n FROM (SELECT 1 AS one FROM tasks WHERE state = 'pending' LIMIT ?) p", (int(limit),)
            ).fetchone()["n"]

    def reap(self) -> int:
        with self._transaction() as tx:
            return self._reap(tx, self._now(tx))

    def _reap(self, tx: Tx, now: float) -> int:
        rows = tx.execute(
            "SELECT t.*, j.retry_preempted FROM tasks t JOIN jobs j ON j.number = t.job_number"
            " WHERE t.state = 'leased' AND t.lease_expires <= ? ORDER BY t.job_number, t.number" + self.REAP_LOCK,
            (now,),
        ).fetchall()
        for row in rows:
            preempted = row["attempts_preempted"] + 1
            expiries = row["lease_expiries"] + 1
            tx.execute(
                "UPDATE tasks SET attempts_preempted = ?, lease_expiries = ? WHERE job_number = ? AND number = ?",
                (preempted, expiries, row["job_number"], row["number"]),
            )
            lost = f"the lease of {row['worker']} expired"
            if row["cancel"]:
                self._set_final(tx, row, now, "failed", KILLED_REASON, kind="lease_expired", detail=lost)
            elif preempted > row["retry_preempted"]:
                reason = f"lease expired {_times(expiries)}"
                if expiries != preempted:
                    reason += f", preempted {_times(preempted)} in all"
                reason += f" (the job allows {row['retry_preempted']} preempted retries)"
                self._set_final(tx, row, now, "failed", reason, kind="lease_expired", detail=lost)
            else:
                self._set_final(tx, row, now, "pending", lost, kind="lease_expired", detail=lost)
        self._record_attempts(tx, [_attempt_values(row, row["worker"], "lease_expired", f"the lease of {row['worker']} "
                                                   "expired", now, None) for row in rows])
        if rows or secrets.randbelow(100) == 0:  # now and then is enough to keep the table small
            tx.execute("DELETE FROM operations WHERE created < ?", (now - OPERATION_TTL,))
            tx.execute("DELETE FROM task_log_chunks WHERE created < ?", (now - TASK_LOG_TTL,))
        return len(rows)

    def heartbeat(self, lease: Lease, lease_seconds: float, status: WorkerStatus | None = None) -> HeartbeatReply:
        check_lease_seconds(lease_seconds)
        if status is not None:
            status.validate()
        with self._transaction() as tx:
            now = self._now(tx)
            row = self._held(tx, lease)
            expires = now + lease_seconds
            tx.execute(
                "UPDATE tasks SET lease_expires = ? WHERE job_number = ? AND number = ?",
                (expires, row["job_number"], row["number"]),
            )
            if status is not None:
                tx.execute(
                    "UPDATE workers SET state = ?, job_number = ?, task_number = ?, progress = ?, detail = ?, last_contact = ?"
                    " WHERE id = ?",
                    (status.state, row["job_number"], row["number"], status.progress, status.detail, now, lease.worker),
                )
            else:
                tx.execute("UPDATE workers SET last_contact = ? WHERE id = ?", (now, lease.worker))
            return HeartbeatReply(cancel=bool(row["cancel"]), expires_at=expires)

    def complete(self, lease: Lease, download: NewDownload | None = None, op_id: str | None = None,
                 figures: AttemptFigures | None = None, next_lease_seconds: float | None = None) -> Lease | None:
        answer = self.complete_outcomes([(lease, download, op_id, figures, next_lease_seconds)])[0]
        if isinstance(answer, CioError):
            raise answer
        return answer.next

    def complete_many(self, reports: Sequence[Completion]) -> list[CioError | None]:
        """Several completions in one transaction (one commit, a few statements for them all):
        what a coordinator does with the reports that arrive together. Each answer is None
        (applied, or applied before) or the error that report alone gets; a refused report changes
        nothing. Should the transaction itself fail, each report is tried on its own, so that one
        cannot cost the others."""
        return [a if isinstance(a, CioError) else None for a in self.complete_outcomes(reports)]

    def complete_outcomes(self, reports: Sequence[Completion]) -> list[ReportOutcome | CioError]:
        """``complete_many``, each report applied answered by its ``ReportOutcome`` (which tells a
        report applied now from a replay of one applied before)."""
        answers: list[ReportOutcome | CioError] = [ReportOutcome("done")] * len(reports)
        order = []
        for i, report in enumerate(reports):
            lease, download, op_id, figures = _completion(report)
            try:
                if download is not None:
                    download.validate()
                if figures is not None:
                    figures.validate()
                _check_op_id(op_id)
                if (seconds := _next_lease_seconds(report)) is not None:
                    check_lease_seconds(seconds, "next_lease_seconds")
            except CioError as exc:
                answers[i] = exc
                continue
            order.append(i)
        if not order:
            return answers
        try:
            with self._transaction() as tx:
                ordered = [reports[i] for i in order]
                for i, answer in zip(order, self._claim_next(tx, ordered, self._complete_in(tx, ordered))):
                    answers[i] = answer
        except CioError as exc:  # the database, or one report's stored row: each report alone then
            if len(order) == 1:
                answers[order[0]] = exc
                return answers
            for i in order:
                answers[i] = self.complete_outcomes([reports[i]])[0]
        return answers

    def _claim_next(self, tx: Tx, reports: Sequence[Completion],
                    outcomes: list[ReportOutcome | CioError]) -> list[ReportOutcome | CioError]:
        """The next task of each completion that asked for one, in the completions' transaction
        (one commit for both): claimed for those applied now, one claim round per lease length
        (without the reap, which would lock rows out of the order every writer keeps); for a
        resend, the lease its first copy claimed (``_claimed_after``)."""
        wanted: dict[float, list[int]] = {}
        for i, (report, outcome) in enumerate(zip(reports, outcomes)):
            seconds = _next_lease_seconds(report)
            if seconds is None or not isinstance(outcome, ReportOutcome):
                continue
            lease, _, op_id, _ = _completion(report)
            if not outcome.replay:
                wanted.setdefault(seconds, []).append(i)
            elif op_id is not None:
                outcomes[i] = replace(outcome, next=self._claimed_after(tx, op_id, lease.worker))
        if wanted:
            now = self._now(tx)
            for seconds, group in wanted.items():
                leases = self._claim_in(tx, [reports[i][0].worker for i in group], seconds,
                                        [reports[i][2] for i in group], now)
                for i, lease in zip(group, leases):
                    outcomes[i] = replace(outcomes[i], next=lease)  # type: ignore[arg-type]
        return outcomes

    def _complete_in(self, tx: Tx, reports: Sequence[Completion]) -> list[ReportOutcome | CioError]:
        now = self._now(tx)
        rows = self._rows_for_update(tx, [report[0] for report in reports])
        answers: list[ReportOutcome | CioError] = [ReportOutcome("done")] * len(reports)
        finals, remembered, finished, attempts = [], [], [], []
        applied: dict[tuple[str, str], str | None] = {}  # reports applied in this batch: their op id
        for i, report in enumerate(reports):
            lease, download, op_id, figures = _completion(report)
            key = (lease.job_id, lease.task_id)
            if key in applied:  # a copy of a report in the same batch
                if op_id is not None and applied[key] == op_id:
                    answers[i] = ReportOutcome("done", replay=True)
                    continue
                answers[i] = LeaseLost(f"{lease.label}: the lease of {lease.worker} is gone (the task is now done); "
                                       "drop this attempt's results and do not report it")
                continue
            try:
                row = self._judge(tx, lease, op_id, rows.get(_row_key(lease)))
            except _Applied as replayed:
                answers[i] = ReportOutcome(replayed.answer, replay=True)
                continue
            except (LeaseLost, QueueError) as exc:  # raised before the report wrote anything
                answers[i] = exc
                continue
            applied[key] = op_id
            if download is not None:
                self._add_download(tx, row, download, now)
            files = "" if download is None else f"; {len(download.files)} files for download"
            finals.append(_Final(row, "done", "", "done", f"attempt {_attempts_so_far(row) + 1}{files}",
                                 FrameSet.parse(row["frames"]).canonical()))
            if op_id is not None:
                remembered.append((op_id, lease.worker, "complete", "done", now))
            finished.append(lease.worker)
            attempts.append(_attempt_values(row, lease.worker, "done", "", now, figures))
        self._record_attempts(tx, attempts)
        self._set_finals(tx, finals, now)
        self._remember_all(tx, remembered)
        self._worker_finished(tx, finished, now, "tasks_done")
        return answers

    def fail(self, lease: Lease, reason: str, op_id: str | None = None, figures: AttemptFigures | None = None) -> str:
        return self.fail_outcome(lease, reason, op_id, figures).state

    def fail_outcome(self, lease: Lease, reason: str, op_id: str | None = None,
                     figures: AttemptFigures | None = None) -> ReportOutcome:
        """``fail``, answered with whether this call applied the report or replayed one."""
        if not isinstance(reason, str):
            raise DocumentError("reason", f"must be text, not {type(reason).__name__}")
        if figures is not None:
            figures.validate()
        _check_op_id(op_id)
        reason = reason.strip() or "failed without a reason given"
        with self._transaction() as tx:
            now = self._now(tx)
            try:
                row = self._held(tx, lease, op_id)
            except _Applied as applied:
                return ReportOutcome(applied.answer, replay=True)
            failed = row["attempts_failed"] + 1
            tx.execute(
                "UPDATE tasks SET attempts_failed = ? WHERE job_number = ? AND number = ?",
                (failed, row["job_number"], row["number"]),
            )
            budget = row["retry_failed"]
            if row["cancel"]:
                state = self._set_final(tx, row, now, "failed", KILLED_REASON, kind="failed", detail=f"{reason} (job killed)")
            else:
                state = self._judge_failure(tx, row, lease.worker, reason, failed, budget, now)
            self._worker_finished(tx, lease.worker, now, "tasks_failed")
            self._record_attempts(tx, [_attempt_values(row, lease.worker, "failed", reason, now, figures)])
            self._remember(tx, op_id, lease, "fail", state, now)
            return ReportOutcome(state)

    def _judge_failure(self, tx: Tx, row: Row, worker: str, reason: str, failed: int, budget: int, now: float) -> str:
        """A failed attempt of ``row`` by ``worker`` (its ``failed``th): retried while the budget
        allows; then final once its failures span the job's distinct_workers, else kept for a
        worker that has not failed it, when one is there (the module doc of ``queue.base``); final
        in any case at budget + distinct_workers failures (a worker may take a task despite its
        block, so the same worker may fail it again).
        Blocks ``worker`` from the job at block_worker_after failed tasks. Returns the new state."""
        job, task = row["job_number"], row["number"]
        policy = self._policy(tx, job)
        spread = self._count_failure(tx, job, task, worker)
        if failed <= budget:
            detail = f"{reason} (retry {failed} of {budget})"
            state = self._set_final(tx, row, now, "pending", reason, kind="failed", detail=detail)
        elif len(spread) >= policy.distinct_workers:
            on = f" on {len(spread)} workers" if len(spread) > 1 else ""
            detail = f"{reason} (final: failed {_times(failed)}{on}, the job allows {budget} retries)"
            state = self._set_final(tx, row, now, "failed", reason, kind="failed", detail=detail)
        elif failed >= budget + policy.distinct_workers:  # only after a claim despite a block
            detail = (f"{reason} (final: failed {_times(failed)}, the most the job allows: max_retries {budget}"
                      f" + distinct_workers {policy.distinct_workers})")
            state = self._set_final(tx, row, now, "failed", reason, kind="failed", detail=detail)
        elif self._another_worker(tx, job, task, worker, now):
            tx.execute("UPDATE job_blocks SET since = ? WHERE job_number = ? AND task_number = ? AND since IS NULL",
                       (now, job, task))
            detail = (f"{reason} (retries spent, failed {_times(failed)} on {_count(len(spread), 'worker')} of the "
                      f"{policy.distinct_workers} the job asks for: it waits for a worker that has not failed it)")
            state = self._set_final(tx, row, now, "pending", reason, kind="failed", detail=detail)
        else:
            detail = (f"{reason} (final: failed {_times(failed)}, the job allows {budget} retries; no other "
                      f"worker was there to try it, of the {policy.distinct_workers} the job asks for)")
            state = self._set_final(tx, row, now, "failed", reason, kind="failed", detail=detail)
        self._block_if_due(tx, job, worker, policy.block_worker_after, now)
        return state

    def _policy(self, tx: Tx, job: int) -> RetryPolicy:
        try:
            return self._job_info(tx, job).autoretry_policy
        except DocumentError:  # an unreadable stored job: who failed its tasks decides nothing
            return RetryPolicy(distinct_workers=1, block_worker_after=0)

    @staticmethod
    def _count_failure(tx: Tx, job: int, task: int, worker: str) -> set[str]:
        """Record that ``worker`` failed the task once more (and, the first time, one more of the
        job's tasks); return every worker that has failed the task since the job's last retry."""
        rows = tx.execute("SELECT worker FROM job_blocks WHERE job_number = ? AND task_number = ?",
                          (job, task)).fetchall()
        spread = {r["worker"] for r in rows}
        if worker in spread:
            tx.execute("UPDATE job_blocks SET failures = failures + 1 WHERE job_number = ? AND worker = ?"
                       " AND task_number = ?", (job, worker, task))
            return spread
        tx.execute("INSERT INTO job_blocks (job_number, worker, task_number, failures) VALUES (?, ?, ?, 1)",
                   (job, worker, task))
        tx.execute(f"INSERT INTO job_blocks (job_number, worker, task_number, failures) VALUES (?, ?, {WHOLE_JOB}, 1)"
                   " ON CONFLICT (job_number, worker, task_number) DO UPDATE SET failures = job_blocks.failures + 1",
                   (job, worker))
        return spread | {worker}

    def _another_worker(self, tx: Tx, job: int, task: int | None, worker: str, now: float) -> bool:
        """Whether a worker other than ``worker`` is there to take the job's tasks (or, given
        ``task``, that task): heard from lately, not stopping, not blocked from the job, and not
        one that failed the task."""
        row = tx.execute(
            f"SELECT 1 AS one FROM workers w WHERE {_LIVE_OTHER} AND NOT EXISTS (SELECT 1 FROM job_blocks b"
            f" WHERE b.job_number = ? AND b.worker = w.id AND ((b.task_number = {WHOLE_JOB} AND b.since IS NOT NULL) OR b.task_number = ?))"
            " LIMIT 1",
            (worker, now - LIVE_WORKER_SECONDS, job, WHOLE_JOB - 1 if task is None else task),
        ).fetchone()
        return row is not None

    def _block_if_due(self, tx: Tx, job: int, worker: str, limit: int, now: float) -> None:
        """Block ``worker`` from the job once it has failed ``limit`` of its tasks (0: never), unless
        no other worker is there to take them: none at all, or none that may take one of its
        pending tasks that some worker is kept from."""
        if not limit:
            return
        tally = tx.execute(f"SELECT failures, since FROM job_blocks WHERE job_number = ? AND worker = ?"
                           f" AND task_number = {WHOLE_JOB}", (job, worker)).fetchone()
        if tally is None or tally["since"] is not None or tally["failures"] < limit:
            return
        if not self._another_worker(tx, job, None, worker, now):
            return  # the only worker there: blocking it would leave the job with none
        stranded = tx.execute(
            "SELECT 1 AS one FROM tasks t WHERE t.job_number = ? AND t.state = 'pending' AND t.number IN"
            " (SELECT k.task_number FROM job_blocks k WHERE k.job_number = ? AND k.task_number >= 0"
            f" AND k.since IS NOT NULL) AND {_NO_OTHER_MAY_TAKE} LIMIT 1",
            (job, job, worker, now - LIVE_WORKER_SECONDS),
        ).fetchone()
        if stranded is not None:
            return  # a task the others are kept from: blocking it would leave that task with none
        tx.execute(f"UPDATE job_blocks SET since = ? WHERE job_number = ? AND worker = ? AND task_number = {WHOLE_JOB}",
                   (now, job, worker))
        self._event(tx, job, None, now, "blocked", worker,
                    f"worker {worker} blocked from job after {tally['failures']} failures "
                    f"(it failed {_count(tally['failures'], 'task')} of the job; the job blocks a worker at {limit})")

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
        return self.release_outcome(lease, cause, frames_done, download, reason, op_id, figures).state

    def release_outcome(
        self,
        lease: Lease,
        cause: str = "preempted",
        frames_done: str = "",
        download: NewDownload | None = None,
        reason: str = "",
        op_id: str | None = None,
        figures: AttemptFigures | None = None,
    ) -> ReportOutcome:
        """``release``, answered with whether this call applied the report or replayed one."""
        if cause not in RELEASE_CAUSES:
            raise DocumentError("cause", f"{cause!r} is not a release cause (use {' or '.join(RELEASE_CAUSES)}; fail() for failures)")
        if not isinstance(reason, str):
            raise DocumentError("reason", f"must be text, not {type(reason).__name__}")
        try:
            given = FrameSet.parse_optional(frames_done)
        except CioError as exc:
            raise DocumentError("frames_done", str(exc)) from None
        if download is not None:
            download.validate()
        if figures is not None:
            figures.validate()
        _check_op_id(op_id)
        with self._transaction() as tx:
            now = self._now(tx)
            try:
                row = self._held(tx, lease, op_id)
            except _Applied as applied:
                return ReportOutcome(applied.answer, replay=True)
            task_frames = FrameSet.parse(row["frames"])
            extra = given - task_frames
            if extra:
                raise DocumentError("frames_done", f"names frames {extra} that are not in the task's frames {row['frames']}")
            done = (FrameSet.parse_optional(row["frames_done"]) | given).canonical()
            count = row[f"attempts_{cause}"] + 1
            tx.execute(
                f"UPDATE tasks SET attempts_{cause} = ?, frames_done = ? WHERE job_number = ? AND number = ?",
                (count, done, row["job_number"], row["number"]),
            )
            if download is not None:
                self._add_download(tx, row, download, now)
            detail = ", ".join(p for p in (reason.strip(), f"frames done {done}" if done else "") if p)
            if row["cancel"]:
                state = self._set_final(tx, row, now, "failed", KILLED_REASON, kind=cause, detail=detail)
            elif cause == "preempted" and count > row["retry_preempted"]:
                final = f"preempted {_times(count)} (the job allows {row['retry_preempted']} preempted retries)"
                if reason.strip():
                    final += f"; last: {reason.strip()}"
                state = self._set_final(tx, row, now, "failed", final, kind=cause, detail=detail)
            else:
                state = self._set_final(tx, row, now, "pending", reason.strip() or row["reason"], kind=cause, detail=detail)
            tx.execute(
                "UPDATE workers SET state = 'idle', job_number = NULL, task_number = NULL, progress = NULL, last_contact = ?"
                " WHERE id = ?",
                (now, lease.worker),
            )
            self._record_attempts(tx, [_attempt_values(row, lease.worker, cause, reason.strip(), now, figures)])
            self._remember(tx, op_id, lease, "release", state, now)
            return ReportOutcome(state)

    # A statement naming many rows names them in one parameter, so that its text is the same for
    # any count: the driver parses and caches it once (psycopg's parse of a statement with hundreds
    # of placeholders was most of a grouped write's cost). Each engine spells it its own way.

    def _insert_rows(self, tx: Tx, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                     or_ignore: bool = False) -> None:
        """Insert ``rows`` (values in the order of ``columns``) into ``table``; ``or_ignore``: a
        row whose key is there already is left out, not an error."""
        if rows:
            tx.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({_marks(columns)})"
                           + (" ON CONFLICT DO NOTHING" if or_ignore else ""), rows)

    def _update_rows(self, tx: Tx, table: str, assignments: str, columns: Sequence[str], keys: Sequence[str],
                     rows: Sequence[Sequence[Any]], lock: bool = False) -> None:
        """Update one row of ``table`` for each of ``rows``: its values for ``columns``, then for
        ``keys`` (which name the row; each row once). ``assignments`` is the SET list, ``{column}``
        where a row's value goes. An engine may write the rows in any order: they are locked
        already, or (``lock``, rows given in key order) locked first in key order, the order every
        writer locks them in."""
        if rows:
            sql, order = _update_statement(table, assignments, tuple(columns), tuple(keys))
            tx.executemany(sql, [tuple(row[i] for i in order) for row in rows])

    def _one_of(self, column: str, values: Sequence[Any]) -> tuple[str, tuple[Any, ...]]:
        """``column`` is one of ``values``: (the condition, its parameters)."""
        return f"{column} IN (SELECT value FROM json_each(?))", (json.dumps(list(values)),)

    def _pairs_in(self, first: str, second: str, pairs: Sequence[tuple[int, int]]) -> tuple[str, tuple[Any, ...]]:
        """(``first``, ``second``) is one of the integer ``pairs``: (the condition, its parameters)."""
        return (f"({first}, {second}) IN (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))",
                (json.dumps([list(p) for p in pairs]),))

    def _held(self, tx: Tx, lease: Lease, op_id: str | None = None) -> Row:
        """The task row (with its job's budgets), locked, if ``lease`` still holds it; LeaseLost
        otherwise, or ``_Applied`` when the report ``op_id`` was applied already."""
        return self._judge(tx, lease, op_id, self._rows_for_update(tx, [lease]).get(_row_key(lease)))

    def _rows_for_update(self, tx: Tx, leases: Sequence[Lease]) -> dict[tuple[int, int], Row]:
        """The task rows ``leases`` name (with their jobs' budgets), locked in (job, task) order,
        the order every writer locks task rows in; names that are not numbers find nothing."""
        keys = sorted({key for key in map(_row_key, leases) if key is not None})
        if not keys:
            return {}
        which, params = self._pairs_in("t.job_number", "t.number", keys)
        # The budgets as subqueries, not a join: a join lets a planner without statistics on a new
        # job's tasks (PostgreSQL's, until autovacuum analyses them) scan all of the job's tasks
        # for each key (15 ms for 13 keys among 5,000 tasks, growing with the job) instead of
        # looking each key up in the primary key.
        rows = tx.execute(
            "SELECT t.*, (SELECT j.retry_preempted FROM jobs j WHERE j.number = t.job_number) AS retry_preempted,"
            " (SELECT j.retry_failed FROM jobs j WHERE j.number = t.job_number) AS retry_failed"
            f" FROM tasks t WHERE {which} ORDER BY t.job_number, t.number" + self.ROW_LOCK,
            params,
        ).fetchall()
        return {(r["job_number"], r["number"]): r for r in rows}

    def _judge(self, tx: Tx, lease: Lease, op_id: str | None, row: Row | None) -> Row:
        """``row`` if ``lease`` holds it; else LeaseLost, or ``_Applied`` when the report ``op_id``
        was applied already. The operation is looked up only once the row is locked, so a copy of
        this report that committed while this one waited for the lock (a client's retry) is seen
        and answered alike."""
        if row is None:  # say which of the two does not exist
            self._task_number(tx, self._job_number(tx, lease.job_id), lease.task_id)
            raise AssertionError("unreachable")  # pragma: no cover
        if row["state"] == "leased" and row["lease_token"] == lease.token:
            if row["worker"] != lease.worker:
                raise LeaseLost(f"{lease.label}: the lease belongs to {row['worker']}, not to {lease.worker}")
            return row
        answer = self._replayed(tx, op_id, lease)
        if answer is not None:
            raise _Applied(answer)
        now_held = f"leased by {row['worker']}" if row["state"] == "leased" else row["state"]
        raise LeaseLost(
            f"{lease.label}: the lease of {lease.worker} is gone (the task is now {now_held}); "
            "drop this attempt's results and do not report it"
        )

    def _set_final(
        self, tx: Tx, row: Row, now: float, state: str, reason: str, *, kind: str = "failed", detail: str | None = None,
        frames_done: str | None = None,
    ) -> str:
        """End the current lease (if any) with ``state`` (and, given, the frames now done); record
        an event; return the state."""
        self._set_finals(tx, [_Final(row, state, reason, kind, detail, frames_done)], now)
        return state

    def _set_finals(self, tx: Tx, finals: Sequence[_Final], now: float) -> None:
        if not finals:
            return
        self._update_rows(
            tx, "tasks", "state = {state}, reason = {reason}, lease_token = NULL, lease_expires = NULL, updated = {updated},"
            " frames_done = COALESCE({frames_done}, frames_done)", ("state", "reason", "updated", "frames_done"), _TASK_KEY,
            [(f.state, f.reason, now, f.frames_done, f.row["job_number"], f.row["number"]) for f in finals],
        )
        self._insert_rows(tx, "events", _EVENT_COLUMNS,
                          [(f.row["job_number"], f.row["number"], now, f.kind, f.row["worker"], f.event_text()) for f in finals])

    # -- operations -------------------------------------------------------------------------------

    def _replayed(self, tx: Tx, op_id: str | None, lease: Lease) -> str | None:
        """The answer already given to operation ``op_id``, or None if it was never applied."""
        if op_id is None:
            return None
        row = tx.execute("SELECT worker, result FROM operations WHERE id = ?", (op_id,)).fetchone()
        if row is None:
            return None
        if row["worker"] != lease.worker:
            raise LeaseLost(f"{lease.label}: operation {op_id!r} was applied for another worker")
        return row["result"]

    def _remember(self, tx: Tx, op_id: str | None, lease: Lease, kind: str, result: str, now: float) -> None:
        if op_id is not None:
            self._remember_all(tx, [(op_id, lease.worker, kind, result, now)])

    def _remember_all(self, tx: Tx, operations: Sequence[tuple[str, str, str, str, float]],
                      or_ignore: bool = False) -> None:
        """Record (op id, worker, kind, result, time) of applied reports, to answer their copies."""
        self._insert_rows(tx, "operations", ("id", "worker", "kind", "result", "created"), operations, or_ignore)

    # -- attempts and their logs ------------------------------------------------------------------

    def _record_attempts(self, tx: Tx, values: Sequence[tuple[Any, ...]]) -> None:
        """Insert ended attempts (``_attempt_values``): once each, as their report is applied once."""
        self._insert_rows(tx, "attempts", ("job_number", "task_number", "attempt", "worker", "outcome", "reason",
                                           "started", "ended", *_ATTEMPT_FIGURES), values)

    def attempts(self, job_id: str, task_id: str | None = None) -> list[AttemptRow]:
        with self._transaction(write=False) as tx:
            number = self._job_number(tx, job_id)
            if task_id is None:
                rows = tx.execute("SELECT * FROM attempts WHERE job_number = ? ORDER BY task_number, seq",
                                  (number,)).fetchall()
            else:
                task = self._task_number(tx, number, task_id)
                rows = tx.execute("SELECT * FROM attempts WHERE job_number = ? AND task_number = ? ORDER BY seq",
                                  (number, task)).fetchall()
        return [_attempt_row(r) for r in rows]

    def append_log(self, lease: Lease, offset: int, text: str) -> int:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise DocumentError("offset", f"must be a whole number >= 0, not {offset!r}")
        if not isinstance(text, str):
            raise DocumentError("text", f"must be text, not {type(text).__name__}")
        data = text.encode("utf-8", "replace")
        if len(data) > LOG_SHIPMENT_CAP:
            raise DocumentError("text", f"is {len(data)} bytes; a shipment carries at most {LOG_SHIPMENT_CAP}")
        key = _row_key(lease)
        with self._transaction() as tx:
            now = self._now(tx)
            row = None if key is None else tx.execute(
                "SELECT * FROM tasks WHERE job_number = ? AND number = ?", key).fetchone()
            if row is None or row["state"] != "leased" or row["lease_token"] != lease.token \
                    or row["worker"] != lease.worker:
                if row is None:
                    self._task_number(tx, self._job_number(tx, lease.job_id), lease.task_id)
                raise LeaseLost(f"{lease.label}: the lease of {lease.worker} is gone; its log is not wanted")
            where = "job_number = ? AND task_number = ? AND token = ?"
            ends = (*key, lease.token)
            end = tx.execute(f"SELECT MAX(end_offset) AS e FROM task_log_chunks WHERE {where}", ends).fetchone()["e"]
            end = offset if end is None else end
            if offset + len(data) <= end:
                return end  # a shipment the queue has already (resent after a lost answer)
            # Shipments are whole lines, each kept as it came (one small insert, never a rewrite);
            # one the agent gave up on leaves a gap. The newest LOG_TAIL_CAP bytes are kept.
            begin = max(offset, end)
            new = data[begin - offset:]
            end = begin + len(new)
            tx.execute(
                "INSERT INTO task_log_chunks (job_number, task_number, token, attempt, worker, start_offset,"
                " end_offset, text, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*ends, _attempts_so_far(row) + 1, lease.worker, begin, end, new.decode("utf-8", "ignore"), now),
            )
            tx.execute(f"DELETE FROM task_log_chunks WHERE {where} AND start_offset < ?", (*ends, end - LOG_TAIL_CAP))
        return end

    def task_log(self, job_id: str, task_id: str, attempt: int | None = None, after: int = 0) -> TaskLogChunk:
        if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1):
            raise DocumentError("attempt", f"must be a whole number >= 1, not {attempt!r}")
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise DocumentError("after", f"must be a whole number >= 0, not {after!r}")
        with self._transaction(write=False) as tx:
            job = self._job_number(tx, job_id)
            task = self._task_number(tx, job, task_id)
            which = "" if attempt is None else " AND attempt = ?"
            args = (job, task) if attempt is None else (job, task, attempt)
            latest = tx.execute(f"SELECT token, attempt, worker FROM task_log_chunks WHERE job_number = ? AND"
                                f" task_number = ?{which} ORDER BY created DESC, attempt DESC LIMIT 1", args).fetchone()
            chunks = [] if latest is None else tx.execute(
                "SELECT start_offset, end_offset, text FROM task_log_chunks WHERE job_number = ? AND task_number = ?"
                " AND token = ? ORDER BY start_offset", (job, task, latest["token"])).fetchall()
            if latest is not None:
                attempt = latest["attempt"]
            ended = None if attempt is None else tx.execute(
                "SELECT log FROM attempts WHERE job_number = ? AND task_number = ? AND attempt = ?"
                " ORDER BY seq DESC LIMIT 1", (job, task, attempt)).fetchone()
            row = tx.execute("SELECT state, lease_token FROM tasks WHERE job_number = ? AND number = ?",
                             (job, task)).fetchone()
        ids = (job_id_text(job), task_id_text(task))
        log = ended["log"] if ended else ""
        if latest is None or not chunks:
            return TaskLogChunk(*ids, attempt, "", 0, 0, "", False, False, log)
        start, end = chunks[0]["start_offset"], chunks[-1]["end_offset"]
        pieces, previous = [], start
        for c in chunks:
            if c["end_offset"] > after:
                if c["start_offset"] > max(previous, after):  # shipments the agent gave up on
                    pieces.append(f"[{c['start_offset'] - max(previous, after)} bytes of the log were not "
                                  "shipped]\n".encode())
                pieces.append(c["text"].encode("utf-8")[max(0, after - c["start_offset"]):])
            previous = c["end_offset"]
        running = row["state"] == "leased" and row["lease_token"] == latest["token"]
        return TaskLogChunk(*ids, attempt, latest["worker"], start, end, b"".join(pieces).decode("utf-8", "ignore"),
                            after < start, running, log)

    # -- workers ----------------------------------------------------------------------------------

    def register_worker(self, worker: str, info: Mapping[str, Any]) -> None:
        answer = self.register_many([(worker, info)])[0]
        if answer is not None:
            raise answer

    def register_many(self, workers: Sequence[tuple[str, Mapping[str, Any]]]) -> list[CioError | None]:
        """Record workers (new or back again, now idle) in one transaction; each answer is None or
        the error that worker's registration alone gets (a refused one changes nothing)."""
        answers: list[CioError | None] = [None] * len(workers)
        rows = []
        for i, (worker, info) in enumerate(workers):
            try:
                _check_worker(worker)
                if not isinstance(info, Mapping):
                    raise DocumentError("info", f"must be an object, not {type(info).__name__}")
                text = json.dumps(dict(info), sort_keys=True)
                if len(text) > 10_000:
                    raise DocumentError("info", "is larger than 10,000 characters")
            except CioError as exc:
                answers[i] = exc
                continue
            rows.append((worker, text))
        rows.sort()  # worker rows are locked in id order everywhere
        if rows:
            with self._transaction() as tx:
                now = self._now(tx)
                tx.executemany(
                    "INSERT INTO workers (id, info, state, detail, registered, last_contact) VALUES (?, ?, 'idle', '', ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET info = excluded.info, state = 'idle', job_number = NULL,"
                    " task_number = NULL, progress = NULL, detail = '', last_contact = excluded.last_contact",
                    [(worker, text, now, now) for worker, text in rows],
                )
        return answers

    def worker_report(self, worker: str, status: WorkerStatus) -> None:
        _check_worker(worker)
        status.validate()
        with self._transaction() as tx:
            now = self._now(tx)
            updated = tx.execute(
                "UPDATE workers SET state = ?, progress = ?, detail = ?, last_contact = ?,"
                " job_number = CASE WHEN ? IN ('idle', 'stopped') THEN NULL ELSE job_number END,"
                " task_number = CASE WHEN ? IN ('idle', 'stopped') THEN NULL ELSE task_number END"
                " WHERE id = ?",
                (status.state, status.progress, status.detail, now, status.state, status.state, worker),
            ).rowcount
            if not updated:
                raise QueueError(f"worker {worker!r} is not registered; register it first", code="unknown_worker")

    def workers(self, gone_after: float = 120.0) -> list[WorkerRow]:
        with self._transaction(write=False) as tx:
            now = self._now(tx)
            rows = tx.execute("SELECT * FROM workers ORDER BY registered, id").fetchall()
        result = []
        for r in rows:
            silent = now - r["last_contact"] > gone_after
            result.append(WorkerRow(
                id=r["id"],
                info=json.loads(r["info"]),
                state=GONE if silent and r["state"] != "stopped" else r["state"],
                job_id=None if r["job_number"] is None else job_id_text(r["job_number"]),
                task_id=None if r["task_number"] is None else task_id_text(r["task_number"]),
                progress=r["progress"],
                detail=r["detail"],
                registered=r["registered"],
                last_contact=r["last_contact"],
                tasks_done=r["tasks_done"],
                tasks_failed=r["tasks_failed"],
            ))
        return result

    def touch_workers(self, seen: Sequence[str], statuses: Mapping[str, WorkerStatus]) -> None:
        """Many workers' contact (and latest status) in one transaction: what a coordinator
        gathers between writes, so that idle agents' polls and reports cost no write each."""
        if not seen and not statuses:
            return
        for status in statuses.values():
            status.validate()
        # Workers that said the same (nearly all: "idle") are written by one statement per few
        # hundred, not one each: thousands a second would otherwise hold the coordinator's
        # interpreter for a good part of every second.
        groups: dict[tuple[str, float | None, str] | None, list[str]] = {}
        for worker, st in statuses.items():
            groups.setdefault((st.state, st.progress, st.detail), []).append(worker)
        groups[None] = [w for w in seen if w not in statuses]  # contact only
        with self._transaction() as tx:
            now = self._now(tx)
            for said, workers in groups.items():
                workers.sort()
                for start in range(0, len(workers), 5000):
                    among, names = self._one_of("t.id", workers[start:start + 5000])
                    # Rows are locked in id order, as every writer of worker rows locks them.
                    which = f" WHERE id IN (SELECT t.id FROM workers t WHERE {among} ORDER BY t.id{self.ROW_LOCK})"
                    if said is None:
                        tx.execute("UPDATE workers SET last_contact = ?" + which, (now, *names))
                        continue
                    state, progress, detail = said
                    tx.execute(
                        "UPDATE workers SET state = ?, progress = ?, detail = ?, last_contact = ?,"
                        " job_number = CASE WHEN ? IN ('idle', 'stopped') THEN NULL ELSE job_number END,"
                        " task_number = CASE WHEN ? IN ('idle', 'stopped') THEN NULL ELSE task_number END" + which,
                        (state, progress, detail, now, state, state, *names),
                    )

    def _worker_finished(self, tx: Tx, workers: str | Sequence[str], now: float, counter: str) -> None:
        """Workers whose task ended (a name once per task): idle again, that many more in
        ``counter``; rows locked in id order."""
        ended = Counter([workers] if isinstance(workers, str) else workers)
        self._update_rows(
            tx, "workers", f"{counter} = {counter} + {{{counter}}}, state = 'idle', job_number = NULL, task_number = NULL,"
            " progress = NULL, last_contact = {last_contact}", (counter, "last_contact"), ("id",),
            [(count, now, worker) for worker, count in sorted(ended.items())], lock=True,
        )

    # -- tokens -----------------------------------------------------------------------------------

    def create_token(self, name: str, scopes: object) -> tuple[credentials.TokenRow, str]:
        """A new token; its text is returned once and never stored."""
        name = credentials.check_name(name)
        checked = credentials.check_scopes(scopes)
        token = credentials.new_token()
        with self._transaction() as tx:
            now = self._now(tx)
            tx.execute(
                "INSERT INTO tokens (id, name, scopes, digest, created) VALUES (?, ?, ?, ?, ?)",
                (token.id, name, ",".join(sorted(checked)), token.digest, now),
            )
        return credentials.TokenRow(token.id, name, checked, now, None, None), token.text

    def list_tokens(self) -> list[credentials.TokenRow]:
        with self._transaction(write=False) as tx:
            rows = tx.execute("SELECT * FROM tokens ORDER BY created, id").fetchall()
        return [_token_row(r) for r in rows]

    def revoke_token(self, name_or_id: str) -> int:
        """Revoke the token with this id, or every active token with this name; return how many."""
        with self._transaction() as tx:
            now = self._now(tx)
            return tx.execute(
                "UPDATE tokens SET revoked = ? WHERE revoked IS NULL AND (id = ? OR name = ?)", (now, name_or_id, name_or_id)
            ).rowcount

    def authenticate(self, text: str) -> credentials.TokenRow | None:
        """The active token ``text`` is, or None (malformed, unknown, revoked or wrong secret)."""
        parts = credentials.split(text)
        if parts is None:
            return None
        token_id, secret = parts
        with self._transaction(write=False) as tx:
            row = tx.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
        if row is None or row["revoked"] is not None or not credentials.matches(secret, row["digest"]):
            return None
        return _token_row(row)

    # -- what the web view reads ------------------------------------------------------------------
    # Lean reads of a job for the web view's pages (coordinator/web), which a 10,000-task job must
    # not slow down: only the columns a page shows, sums made by the database.

    def task_states(self, job_id: str) -> list[tuple[str, int, bool, str]]:
        """(frames, tiles, scout, state) of every task of the job, in task order."""
        with self._transaction(write=False) as tx:
            number = self._job_number(tx, job_id)
            rows = tx.execute("SELECT frames, tiles, scout, state FROM tasks WHERE job_number = ? ORDER BY number",
                              (number,)).fetchall()
        return [(r["frames"], r["tiles"], bool(r["scout"]), r["state"]) for r in rows]

    def job_cost(self, job_id: str) -> tuple[float, int, str, float | None]:
        """The job's attempts' cost so far, how many ran on an instance type with no price, their
        currency, and when the last attempt ended (None: none has)."""
        with self._transaction(write=False) as tx:
            number = self._job_number(tx, job_id)
            row = tx.execute(
                "SELECT SUM(cost) AS cost, SUM(CASE WHEN cost IS NULL AND wall_seconds > 0 THEN 1 ELSE 0 END)"
                " AS unpriced, MAX(currency) AS currency, MAX(ended) AS ended FROM attempts WHERE job_number = ?",
                (number,)).fetchone()
        return float(row["cost"] or 0.0), int(row["unpriced"] or 0), row["currency"] or "", row["ended"]

    def downloads_mark(self, job_id: str) -> tuple[int, float]:
        """How many download records the job has and when its newest came: what a reader that keeps
        the records compares to know they are still all there are (records are only ever added)."""
        with self._transaction(write=False) as tx:
            number = self._job_number(tx, job_id)
            row = tx.execute("SELECT COUNT(*) AS n, MAX(created) AS newest FROM downloads WHERE job_number = ?",
                             (number,)).fetchone()
        return int(row["n"]), float(row["newest"] or 0.0)

    def recent_downloads(self, job_id: str, limit: int) -> list[DownloadRecord]:
        """The job's newest ``limit`` download records, newest first."""
        with self._transaction(write=False) as tx:
            number = self._job_number(tx, job_id)
            rows = tx.execute("SELECT * FROM downloads WHERE job_number = ? ORDER BY created DESC, id DESC LIMIT ?",
                              (number, limit)).fetchall()
        return [_download_record(r) for r in rows]

    # -- web sessions -----------------------------------------------------------------------------

    def create_web_session(self, digest: str, token_id: str, lifetime: float) -> float:
        """Store a web session (by the digest of its id) for a token; return when it expires.
        Expired sessions are removed on the way."""
        with self._transaction() as tx:
            now = self._now(tx)
            tx.execute("DELETE FROM web_sessions WHERE expires < ?", (now,))
            tx.execute("INSERT INTO web_sessions (digest, token_id, created, expires) VALUES (?, ?, ?, ?)",
                       (digest, token_id, now, now + lifetime))
        return now + lifetime

    def web_session(self, digest: str) -> credentials.TokenRow | None:
        """The token of the live session with this digest: None when there is none, it expired, or
        its token was revoked."""
        with self._transaction(write=False) as tx:
            row = tx.execute(
                "SELECT t.* FROM web_sessions s JOIN tokens t ON t.id = s.token_id"
                " WHERE s.digest = ? AND s.expires >= ? AND t.revoked IS NULL", (digest, self._now(tx))).fetchone()
        return None if row is None else _token_row(row)

    def end_web_session(self, digest: str) -> None:
        with self._transaction() as tx:
            tx.execute("DELETE FROM web_sessions WHERE digest = ?", (digest,))

    # -- downloads --------------------------------------------------------------------------------

    def _add_download(self, tx: Tx, row: Row, download: NewDownload, now: float) -> str:
        job, task = row["job_number"], row["number"]
        seq = tx.execute(
            "SELECT COUNT(*) AS n FROM downloads WHERE job_number = ? AND task_number = ?", (job, task)
        ).fetchone()["n"]
        download_id = f"{job_id_text(job)}-{task_id_text(task)}-{seq + 1}"
        tx.execute(
            "INSERT INTO downloads (id, job_number, task_number, output_dir, size, files, state, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            (download_id, job, task, download.output_dir, download.size,
             json.dumps([f.to_dict() for f in download.files]), now, now),
        )
        return download_id

    def downloads(self, job_id: str | None = None, state: str | None = "pending") -> list[DownloadRecord]:
        if state is not None and state not in DOWNLOAD_STATES:
            raise QueueError(f"{state!r} is not a download state (use {', '.join(DOWNLOAD_STATES)} or None for all)", code="bad_request")
        where: list[str] = []
        args: list[Any] = []
        with self._transaction(write=False) as tx:
            if job_id is not None:
                where.append("job_number = ?")
                args.append(self._job_number(tx, job_id))
            if state is not None:
                where.append("state = ?")
                args.append(state)
            clause = f" WHERE {' AND '.join(where)}" if where else ""
            rows = tx.execute(f"SELECT * FROM downloads{clause} ORDER BY job_number, task_number, created, id", args).fetchall()
        return [_download_record(r) for r in rows]

    def mark_downloaded(self, download_id: str) -> None:
        if not isinstance(download_id, str):
            raise QueueError(f"download id must be text, not {type(download_id).__name__}", code="bad_request")
        with self._transaction() as tx:
            now = self._now(tx)
            row = tx.execute(
                "SELECT job_number, task_number, state FROM downloads t WHERE id = ?" + self.ROW_LOCK, (download_id,)
            ).fetchone()
            if row is None:
                raise QueueError(f"there is no download {download_id!r} in queue {self._where()}", code="unknown_download")
            if row["state"] == "downloaded":
                return
            tx.execute("UPDATE downloads SET state = 'downloaded', updated = ? WHERE id = ?", (now, download_id))
            self._event(tx, row["job_number"], row["task_number"], now, "downloaded", "", download_id)

    # -- helpers ----------------------------------------------------------------------------------

    def _job_number(self, tx: Tx, job_id: str) -> int:
        number = _number(job_id)
        if number is not None and tx.execute("SELECT 1 AS one FROM jobs WHERE number = ?", (number,)).fetchone():
            return number
        raise QueueError(f"there is no job {job_id!r} in queue {self._where()}; `status` lists the jobs", code="unknown_job")

    def _task_number(self, tx: Tx, job: int, task_id: str) -> int:
        number = _number(task_id)
        if number is not None and tx.execute(
            "SELECT 1 AS one FROM tasks WHERE job_number = ? AND number = ?", (job, number)
        ).fetchone():
            return number
        raise QueueError(f"job {job_id_text(job)} has no task {task_id!r}", code="unknown_task")

    def _job_info(self, tx: Tx, number: int) -> JobInfo:
        cached = self._jobs_cache.get(number)
        if cached is None:
            text = tx.execute("SELECT document FROM jobs WHERE number = ?", (number,)).fetchone()["document"]
            try:
                data = json.loads(text)
            except (TypeError, ValueError, RecursionError) as exc:
                raise DocumentError("job", f"the stored document is not valid JSON ({_short(exc)})") from None
            cached = self._jobs_cache[number] = job_from_stored(data)
        return cached

    def _event(self, tx: Tx, job: int, task: int | None, now: float, kind: str, worker: str, detail: str) -> None:
        self._insert_rows(tx, "events", _EVENT_COLUMNS, [(job, task, now, kind, worker, detail)])

    # -- figures ----------------------------------------------------------------------------------

    def counts(self, gone_after: float = 120.0) -> tuple[dict[str, int], dict[str, int]]:
        """Tasks by state and workers by state (``gone`` when silent longer than ``gone_after``,
        as ``workers()`` says), every state named even at 0, read in one transaction."""
        with self._transaction(write=False) as tx:
            silent_since = self._now(tx) - gone_after
            tasks = tx.execute("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state").fetchall()
            workers = tx.execute(
                f"SELECT CASE WHEN state <> 'stopped' AND last_contact < ? THEN '{GONE}' ELSE state END AS s,"
                " COUNT(*) AS n FROM workers GROUP BY 1", (silent_since,),
            ).fetchall()
        by_task = dict.fromkeys(STATES, 0) | {r["state"]: r["n"] for r in tasks}
        by_worker = dict.fromkeys((*WORKER_STATES, GONE), 0) | {r["s"]: r["n"] for r in workers}
        return by_task, by_worker


def _completion(report: Completion) -> tuple[Lease, NewDownload | None, str | None, AttemptFigures | None]:
    lease, download, op_id = report[0], report[1], report[2]
    return lease, download, op_id, report[3] if len(report) > 3 else None  # type: ignore[misc]


def _next_lease_seconds(report: Completion) -> float | None:
    return report[4] if len(report) > 4 else None  # type: ignore[misc]


def _attempt_values(row: Row, worker: str, outcome: str, reason: str, now: float,
                    figures: AttemptFigures | None) -> tuple[Any, ...]:
    """An attempts row for the attempt ``row`` (the task as its lease found it) ended with ``outcome``."""
    figures = figures or AttemptFigures()
    return (row["job_number"], row["number"], _attempts_so_far(row) + 1, worker, outcome, reason,
            row["updated"], now, *(getattr(figures, name) for name in _ATTEMPT_FIGURES))


def _attempt_row(r: Row) -> AttemptRow:
    return AttemptRow(
        job_id=job_id_text(r["job_number"]), task_id=task_id_text(r["task_number"]), attempt=r["attempt"],
        worker=r["worker"], outcome=r["outcome"], reason=r["reason"], started=r["started"], ended=r["ended"],
        figures=AttemptFigures(**{name: r[name] for name in _ATTEMPT_FIGURES}),
    )


def _download_record(r: Row) -> DownloadRecord:
    return DownloadRecord(
        download_id=r["id"],
        job_id=job_id_text(r["job_number"]),
        task_id=task_id_text(r["task_number"]),
        output_dir=r["output_dir"],
        size=r["size"],
        files=tuple(DownloadFile.from_dict(f) for f in json.loads(r["files"])),
        state=r["state"],
        created=r["created"],
    )


def _token_row(r: Row) -> credentials.TokenRow:
    return credentials.TokenRow(
        id=r["id"], name=r["name"], scopes=frozenset(r["scopes"].split(",")), created=r["created"],
        revoked=r["revoked"], last_used=r["last_used"],
    )


def _number(text: object) -> int | None:
    """A job or task id as its stored number; None for text that names no number we store."""
    text = str(text).strip()
    if text.isascii() and text.isdigit() and len(text) <= _MAX_NUMBER_DIGITS:
        return int(text)
    return None


def _check_op_id(op_id: object) -> None:
    if op_id is not None and (not isinstance(op_id, str) or not op_id.strip() or len(op_id) > _MAX_OP_ID):
        raise DocumentError("op_id", f"must be text of 1 to {_MAX_OP_ID} characters (a fresh id per report, e.g. a UUID)")


def _task_row(r: Row) -> TaskRow:
    return TaskRow(
        job_id=job_id_text(r["job_number"]),
        id=task_id_text(r["number"]),
        frames=r["frames"],
        tile=r["tile"],
        tiles=r["tiles"],
        scout=bool(r["scout"]),
        state=r["state"],
        attempts={c: r[f"attempts_{c}"] for c in ATTEMPT_CAUSES},
        frames_done=r["frames_done"],
        worker=r["worker"],
        reason=r["reason"],
        cancel_requested=bool(r["cancel"]),
        lease_expires=r["lease_expires"],
        updated=r["updated"],
    )


def _stored_task(row: Row, attempt: int) -> TaskInfo:
    """The task part of a claimed task's document, checked with the document's own rules."""
    data = {
        "id": task_id_text(row["number"]),
        "frames": row["frames"],
        "command": row["command"],
        "tile": row["tile"],
        "tiles": row["tiles"],
        "attempt": attempt,
        "frames_done": row["frames_done"],
    }
    return parse_task(_Reader(data, "task"))


def _short(exc: BaseException, limit: int = 120) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _next_of(op_id: str) -> str:
    """The operation id under which the lease claimed under ``op_id`` is recorded."""
    return f"{op_id}+next"


def _attempts_so_far(row: Row) -> int:
    return sum(row[f"attempts_{c}"] for c in ATTEMPT_CAUSES)


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


@functools.lru_cache(maxsize=64)
def _update_statement(table: str, assignments: str, columns: tuple[str, ...],
                      keys: tuple[str, ...]) -> tuple[str, tuple[int, ...]]:
    """``_update_rows``' statement with ``?`` placeholders, and the order in which a row's values
    (``columns`` then ``keys``) fill them."""
    named = [name for _, name, _, _ in string.Formatter().parse(assignments) if name]
    at = {name: i for i, name in enumerate((*columns, *keys))}
    where = " AND ".join(f"{key} = ?" for key in keys)
    sql = f"UPDATE {table} SET {assignments.format(**{n: '?' for n in named})} WHERE {where}"
    return sql, tuple(at[name] for name in (*named, *keys))


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" for _ in values)


def _check_worker(worker: str) -> None:
    if not isinstance(worker, str) or not worker.strip():
        raise DocumentError("worker", "is empty; name the agent (host and process) claiming the task")


