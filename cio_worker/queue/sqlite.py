"""The embedded queue: one SQLite file that many agent processes on one machine share.

Every change runs in its own ``BEGIN IMMEDIATE`` transaction (one writer at a time, others wait up
to the busy timeout), the file is in WAL mode so readers never block, and each process opens its
own connections lazily (one per thread), so a queue object survives ``fork``: the child never
touches the parent's connection.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from cio_worker.job.document import JobInfo, TaskDocument, TaskInfo, _Reader, job_id_text, parse_task, task_id_text
from cio_worker.errors import CioError, DocumentError, LeaseLost, QueueError
from cio_worker.job.frames import FrameSet
from cio_worker.queue.base import (
    ACTIVE_STATES,
    ATTEMPT_CAUSES,
    DOWNLOAD_STATES,
    KILLED_REASON,
    RELEASE_CAUSES,
    STATES,
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
    coerce_job,
    job_from_stored,
    validate_new_tasks,
)

SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE jobs (
        number INTEGER PRIMARY KEY AUTOINCREMENT,
        title TEXT NOT NULL,
        document TEXT NOT NULL,
        created REAL NOT NULL,
        scout INTEGER NOT NULL,
        killed INTEGER NOT NULL DEFAULT 0,
        retry_preempted INTEGER NOT NULL,
        retry_failed INTEGER NOT NULL)""",
    f"""CREATE TABLE tasks (
        job_number INTEGER NOT NULL REFERENCES jobs(number),
        number INTEGER NOT NULL,
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
        lease_expires REAL,
        reason TEXT NOT NULL DEFAULT '',
        cancel INTEGER NOT NULL DEFAULT 0,
        updated REAL NOT NULL,
        PRIMARY KEY (job_number, number))""",
    "CREATE INDEX tasks_by_state ON tasks (state, job_number, number)",
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_number INTEGER NOT NULL,
        task_number INTEGER,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        worker TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '')""",
    "CREATE INDEX events_by_task ON events (job_number, task_number)",
    """CREATE TABLE downloads (
        id TEXT PRIMARY KEY,
        job_number INTEGER NOT NULL,
        task_number INTEGER NOT NULL,
        output_dir TEXT NOT NULL,
        size INTEGER NOT NULL,
        files TEXT NOT NULL,
        state TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL)""",
    "CREATE INDEX downloads_by_state ON downloads (state, job_number, task_number)",
)


class SqliteQueue(Queue):
    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time, busy_timeout: float = 60.0) -> None:
        self.path = Path(path)
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._guard = threading.Lock()
        # (pid, connection) for every connection opened; entries of another pid are a parent's,
        # inherited through fork: kept referenced so they are never closed or used from here.
        self._connections: list[tuple[int, sqlite3.Connection]] = []
        self._jobs_cache: dict[int, JobInfo] = {}
        self._closed = False
        if self.path.is_dir():
            raise QueueError(f"queue path {self.path} is a directory; name a database file inside it", code="bad_queue_url")
        if not self.path.parent.is_dir():
            raise QueueError(
                f"cannot create queue {self.path}: directory {self.path.parent} does not exist; create it first",
                code="bad_queue_url",
            )
        self._conn()  # open now, so a file that is not a queue fails here and not at first use

    def __repr__(self) -> str:
        return f"SqliteQueue({str(self.path)!r})"

    # -- connections ------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        pid = os.getpid()
        if getattr(self._local, "pid", None) == pid:
            return self._local.conn
        if self._closed:
            raise QueueError(f"queue {self.path} is closed", code="queue_closed")
        conn = self._open()
        with self._guard:
            self._connections.append((pid, conn))
        self._local.pid, self._local.conn = pid, conn
        return conn

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                str(self.path), timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise QueueError(f"cannot open queue database {self.path}: {exc}", code="queue_db") from exc
        conn.row_factory = sqlite3.Row
        try:
            self._check_schema(conn)  # before any write: never convert someone else's database
            self._with_retry(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone())
            self._create_schema(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise QueueError(
                f"{self.path} is not a cio_worker queue database (sqlite: {exc}); point the queue URL at a new file",
                code="not_a_queue",
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _with_retry(self, action: Callable[[], Any]) -> Any:
        # Changing the journal mode does not wait on the busy handler, so wait here.
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _check_schema(self, conn: sqlite3.Connection) -> bool:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables.discard("sqlite_sequence")
        if not tables:
            return False
        if "schema_version" not in tables:
            raise QueueError(
                f"{self.path} is an SQLite database but not a cio_worker queue (it has tables "
                f"{', '.join(sorted(tables)[:5])}); point the queue URL at a new file",
                code="not_a_queue",
            )
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None or row[0] != SCHEMA_VERSION:
            found = "no version" if row is None else f"version {row[0]}"
            raise QueueError(
                f"queue {self.path} has schema {found}; this cio_worker reads version {SCHEMA_VERSION}",
                code="queue_schema",
            )
        return True

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not self._check_schema(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise QueueError(f"queue database {self.path}: {exc}", code="queue_db") from exc

    def close(self) -> None:
        pid = os.getpid()
        with self._guard:
            mine = [c for p, c in self._connections if p == pid]
            self._connections = [(p, c) for p, c in self._connections if p != pid]
            self._closed = True
        for conn in mine:
            conn.close()
        self._local = threading.local()

    # -- jobs -------------------------------------------------------------------------------------

    def create_job(self, job: JobInfo | Mapping[str, Any], tasks: Sequence[NewTask]) -> str:
        info = coerce_job(job)
        checked = validate_new_tasks(tasks)
        scouts = sum(1 for t in checked if t.scout)
        hold = 0 < scouts < len(checked)
        policy = info.autoretry_policy
        with self._transaction() as conn:
            now = self._clock()
            number = conn.execute(
                "INSERT INTO jobs (title, document, created, scout, retry_preempted, retry_failed) VALUES (?, '', ?, ?, ?, ?)",
                (info.title, now, int(scouts > 0), policy.preempted, policy.failed),
            ).lastrowid
            assert number is not None
            job_id = job_id_text(number)
            conn.execute("UPDATE jobs SET document = ? WHERE number = ?", (json.dumps(replace(info, id=job_id).to_dict()), number))
            conn.executemany(
                "INSERT INTO tasks (job_number, number, frames, command, tile, tiles, scout, state, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (number, i, t.frames, t.command, t.tile, t.tiles, int(t.scout), "holding" if hold and not t.scout else "pending", now)
                    for i, t in enumerate(checked)
                ],
            )
            detail = f"{len(checked)} tasks"
            if hold:
                detail += f"; {len(checked) - scouts} held until the job is released, {scouts} scout tasks pending"
            self._event(conn, number, None, now, "created", "", detail)
        return job_id

    def release_job(self, job_id: str) -> int:
        with self._transaction() as conn:
            number = self._job_number(conn, job_id)
            now = self._clock()
            count = conn.execute(
                "UPDATE tasks SET state = 'pending', updated = ? WHERE job_number = ? AND state = 'holding'", (now, number)
            ).rowcount
            self._event(conn, number, None, now, "job_released", "", f"{count} held tasks now pending")
        return count

    def kill_job(self, job_id: str) -> int:
        with self._transaction() as conn:
            number = self._job_number(conn, job_id)
            now = self._clock()
            conn.execute("UPDATE jobs SET killed = 1 WHERE number = ?", (number,))
            waiting = [r[0] for r in conn.execute(
                "SELECT number FROM tasks WHERE job_number = ? AND state IN ('holding', 'pending') ORDER BY number", (number,)
            )]
            leased = [r for r in conn.execute(
                "SELECT number, worker FROM tasks WHERE job_number = ? AND state = 'leased' ORDER BY number", (number,)
            )]
            conn.execute(
                "UPDATE tasks SET state = 'failed', reason = ?, updated = ? WHERE job_number = ? AND state IN ('holding', 'pending')",
                (KILLED_REASON, now, number),
            )
            conn.execute("UPDATE tasks SET cancel = 1, updated = ? WHERE job_number = ? AND state = 'leased'", (now, number))
            for task in waiting:
                self._event(conn, number, task, now, "killed", "", KILLED_REASON)
            for task, worker in leased:
                self._event(conn, number, task, now, "cancel_requested", worker, "job killed; the agent stops at its next heartbeat")
            self._event(conn, number, None, now, "killed", "", f"{len(waiting)} tasks failed, {len(leased)} running tasks asked to stop")
        return len(waiting) + len(leased)

    def jobs(self) -> list[JobSummary]:
        with self._transaction(write=False) as conn:
            counts: dict[int, dict[str, int]] = {}
            for number, state, count in conn.execute("SELECT job_number, state, COUNT(*) FROM tasks GROUP BY job_number, state"):
                counts.setdefault(number, {})[state] = count
            rows = conn.execute("SELECT number, title, created, scout, killed FROM jobs ORDER BY number").fetchall()
        return [
            JobSummary(
                id=job_id_text(r["number"]),
                title=r["title"],
                counts={s: counts.get(r["number"], {}).get(s, 0) for s in STATES},
                created=r["created"],
                scout=bool(r["scout"]),
                killed=bool(r["killed"]),
            )
            for r in rows
        ]

    def job(self, job_id: str) -> JobInfo:
        with self._transaction(write=False) as conn:
            return self._job_info(conn, self._job_number(conn, job_id))

    def tasks(self, job_id: str) -> list[TaskRow]:
        with self._transaction(write=False) as conn:
            number = self._job_number(conn, job_id)
            rows = conn.execute("SELECT * FROM tasks WHERE job_number = ? ORDER BY number", (number,)).fetchall()
        return [_task_row(r) for r in rows]

    def events(self, job_id: str, task_id: str | None = None) -> list[Event]:
        with self._transaction(write=False) as conn:
            number = self._job_number(conn, job_id)
            if task_id is None:
                rows = conn.execute("SELECT * FROM events WHERE job_number = ? ORDER BY seq", (number,)).fetchall()
            else:
                task = self._task_number(conn, number, task_id)
                rows = conn.execute(
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
        with self._transaction(write=False) as conn:
            number = self._job_number(conn, job_id)
            active = conn.execute(
                f"SELECT COUNT(*) FROM tasks WHERE job_number = ? AND state IN ({_marks(ACTIVE_STATES)})",
                (number, *ACTIVE_STATES),
            ).fetchone()[0]
        return active == 0

    # -- leases -----------------------------------------------------------------------------------

    def claim(self, worker: str, lease_seconds: float) -> Lease | None:
        _check_worker(worker)
        _check_lease_seconds(lease_seconds)
        with self._transaction() as conn:
            now = self._clock()
            self._reap(conn, now)
            while True:
                row = conn.execute(
                    "SELECT * FROM tasks WHERE state = 'pending' ORDER BY job_number, number LIMIT 1"
                ).fetchone()
                if row is None:
                    return None
                # A stored job or task that no longer reads (another version wrote it, or someone
                # edited the file) fails that task with the field and the problem; claiming goes on.
                try:
                    job = self._job_info(conn, row["job_number"])
                except DocumentError as exc:
                    self._set_final(conn, row, now, "failed", f"the stored job document is invalid: {exc}")
                    continue
                attempt = _attempts_so_far(row) + 1
                try:
                    task = _stored_task(row, attempt)
                except DocumentError as exc:
                    self._set_final(conn, row, now, "failed", f"the stored task is invalid: {exc}")
                    continue
                token = secrets.token_hex(16)
                expires = now + lease_seconds
                conn.execute(
                    "UPDATE tasks SET state = 'leased', worker = ?, lease_token = ?, lease_expires = ?, updated = ?"
                    " WHERE job_number = ? AND number = ?",
                    (worker, token, expires, now, row["job_number"], row["number"]),
                )
                self._event(conn, row["job_number"], row["number"], now, "claimed", worker, f"attempt {attempt}")
                return Lease(
                    job_id=job.id,
                    task_id=task.id,
                    token=token,
                    worker=worker,
                    expires_at=expires,
                    document=TaskDocument(job=job, task=task),
                )

    def reap(self) -> int:
        with self._transaction() as conn:
            return self._reap(conn, self._clock())

    def _reap(self, conn: sqlite3.Connection, now: float) -> int:
        rows = conn.execute(
            "SELECT t.*, j.retry_preempted FROM tasks t JOIN jobs j ON j.number = t.job_number"
            " WHERE t.state = 'leased' AND t.lease_expires <= ? ORDER BY t.job_number, t.number",
            (now,),
        ).fetchall()
        for row in rows:
            preempted = row["attempts_preempted"] + 1
            expiries = row["lease_expiries"] + 1
            conn.execute(
                "UPDATE tasks SET attempts_preempted = ?, lease_expiries = ? WHERE job_number = ? AND number = ?",
                (preempted, expiries, row["job_number"], row["number"]),
            )
            lost = f"the lease of {row['worker']} expired"
            if row["cancel"]:
                self._set_final(conn, row, now, "failed", KILLED_REASON, kind="lease_expired", detail=lost)
            elif preempted > row["retry_preempted"]:
                reason = f"lease expired {_times(expiries)}"
                if expiries != preempted:
                    reason += f", preempted {_times(preempted)} in all"
                reason += f" (the job allows {row['retry_preempted']} preempted retries)"
                self._set_final(conn, row, now, "failed", reason, kind="lease_expired", detail=lost)
            else:
                self._set_final(conn, row, now, "pending", lost, kind="lease_expired", detail=lost)
        return len(rows)

    def heartbeat(self, lease: Lease, lease_seconds: float) -> HeartbeatReply:
        _check_lease_seconds(lease_seconds)
        with self._transaction() as conn:
            now = self._clock()
            row = self._held(conn, lease)
            expires = now + lease_seconds
            conn.execute(
                "UPDATE tasks SET lease_expires = ? WHERE job_number = ? AND number = ?",
                (expires, row["job_number"], row["number"]),
            )
            return HeartbeatReply(cancel=bool(row["cancel"]), expires_at=expires)

    def complete(self, lease: Lease, download: NewDownload | None = None) -> None:
        if download is not None:
            download.validate()
        with self._transaction() as conn:
            now = self._clock()
            row = self._held(conn, lease)
            all_frames = FrameSet.parse(row["frames"]).canonical()
            conn.execute(
                "UPDATE tasks SET frames_done = ? WHERE job_number = ? AND number = ?",
                (all_frames, row["job_number"], row["number"]),
            )
            if download is not None:
                self._add_download(conn, row, download, now)
            files = "" if download is None else f"; {len(download.files)} files for download"
            self._set_final(conn, row, now, "done", "", kind="done", detail=f"attempt {_attempts_so_far(row) + 1}{files}")

    def fail(self, lease: Lease, reason: str) -> str:
        if not isinstance(reason, str):
            raise DocumentError("reason", f"must be text, not {type(reason).__name__}")
        reason = reason.strip() or "failed without a reason given"
        with self._transaction() as conn:
            now = self._clock()
            row = self._held(conn, lease, extra=", j.retry_failed")
            failed = row["attempts_failed"] + 1
            conn.execute(
                "UPDATE tasks SET attempts_failed = ? WHERE job_number = ? AND number = ?",
                (failed, row["job_number"], row["number"]),
            )
            budget = row["retry_failed"]
            if row["cancel"]:
                return self._set_final(conn, row, now, "failed", KILLED_REASON, kind="failed", detail=f"{reason} (job killed)")
            if failed > budget:
                detail = f"{reason} (final: failed {_times(failed)}, the job allows {budget} retries)"
                return self._set_final(conn, row, now, "failed", reason, kind="failed", detail=detail)
            detail = f"{reason} (retry {failed} of {budget})"
            return self._set_final(conn, row, now, "pending", reason, kind="failed", detail=detail)

    def release(
        self,
        lease: Lease,
        cause: str = "preempted",
        frames_done: str = "",
        download: NewDownload | None = None,
        reason: str = "",
    ) -> str:
        if cause not in RELEASE_CAUSES:
            raise DocumentError("cause", f"{cause!r} is not a release cause (use {' or '.join(RELEASE_CAUSES)}; fail() for failures)")
        try:
            given = FrameSet.parse_optional(frames_done)
        except CioError as exc:
            raise DocumentError("frames_done", str(exc)) from None
        if download is not None:
            download.validate()
        with self._transaction() as conn:
            now = self._clock()
            row = self._held(conn, lease, extra=", j.retry_preempted")
            task_frames = FrameSet.parse(row["frames"])
            extra = given - task_frames
            if extra:
                raise DocumentError("frames_done", f"names frames {extra} that are not in the task's frames {row['frames']}")
            done = (FrameSet.parse_optional(row["frames_done"]) | given).canonical()
            count = row[f"attempts_{cause}"] + 1
            conn.execute(
                f"UPDATE tasks SET attempts_{cause} = ?, frames_done = ? WHERE job_number = ? AND number = ?",
                (count, done, row["job_number"], row["number"]),
            )
            if download is not None:
                self._add_download(conn, row, download, now)
            detail = ", ".join(p for p in (reason.strip(), f"frames done {done}" if done else "") if p)
            if row["cancel"]:
                return self._set_final(conn, row, now, "failed", KILLED_REASON, kind=cause, detail=detail)
            if cause == "preempted" and count > row["retry_preempted"]:
                final = f"preempted {_times(count)} (the job allows {row['retry_preempted']} preempted retries)"
                if reason.strip():
                    final += f"; last: {reason.strip()}"
                return self._set_final(conn, row, now, "failed", final, kind=cause, detail=detail)
            return self._set_final(conn, row, now, "pending", reason.strip() or row["reason"], kind=cause, detail=detail)

    def _held(self, conn: sqlite3.Connection, lease: Lease, extra: str = "") -> sqlite3.Row:
        """The task row if ``lease`` still holds it; LeaseLost otherwise."""
        number = self._job_number(conn, lease.job_id)
        task = self._task_number(conn, number, lease.task_id)
        row = conn.execute(
            f"SELECT t.*{extra} FROM tasks t JOIN jobs j ON j.number = t.job_number WHERE t.job_number = ? AND t.number = ?",
            (number, task),
        ).fetchone()
        if row["state"] == "leased" and row["lease_token"] == lease.token:
            return row
        now_held = f"leased by {row['worker']}" if row["state"] == "leased" else row["state"]
        raise LeaseLost(
            f"{lease.label}: the lease of {lease.worker} is gone (the task is now {now_held}); "
            "drop this attempt's results and do not report it"
        )

    def _set_final(
        self, conn: sqlite3.Connection, row: sqlite3.Row, now: float, state: str, reason: str, *, kind: str = "failed", detail: str | None = None
    ) -> str:
        """End the current lease (if any) with ``state``; record an event; return the state."""
        conn.execute(
            "UPDATE tasks SET state = ?, reason = ?, lease_token = NULL, lease_expires = NULL, updated = ?"
            " WHERE job_number = ? AND number = ?",
            (state, reason, now, row["job_number"], row["number"]),
        )
        text = reason if detail is None else detail
        if kind != state:
            outcome = f"{state}: {reason}" if state == "failed" else state
            text = f"{text} -> {outcome}" if text else outcome
        self._event(conn, row["job_number"], row["number"], now, kind, row["worker"], text)
        return state

    # -- downloads --------------------------------------------------------------------------------

    def _add_download(self, conn: sqlite3.Connection, row: sqlite3.Row, download: NewDownload, now: float) -> str:
        job, task = row["job_number"], row["number"]
        seq = conn.execute("SELECT COUNT(*) FROM downloads WHERE job_number = ? AND task_number = ?", (job, task)).fetchone()[0]
        download_id = f"{job_id_text(job)}-{task_id_text(task)}-{seq + 1}"
        conn.execute(
            "INSERT INTO downloads (id, job_number, task_number, output_dir, size, files, state, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            (download_id, job, task, download.output_dir, download.size, json.dumps([f.to_dict() for f in download.files]), now, now),
        )
        return download_id

    def downloads(self, job_id: str | None = None, state: str | None = "pending") -> list[DownloadRecord]:
        if state is not None and state not in DOWNLOAD_STATES:
            raise QueueError(f"{state!r} is not a download state (use {', '.join(DOWNLOAD_STATES)} or None for all)", code="bad_request")
        where, args = [], []
        with self._transaction(write=False) as conn:
            if job_id is not None:
                where.append("job_number = ?")
                args.append(self._job_number(conn, job_id))
            if state is not None:
                where.append("state = ?")
                args.append(state)
            clause = f" WHERE {' AND '.join(where)}" if where else ""
            rows = conn.execute(f"SELECT * FROM downloads{clause} ORDER BY job_number, task_number, created, id", args).fetchall()
        return [
            DownloadRecord(
                download_id=r["id"],
                job_id=job_id_text(r["job_number"]),
                task_id=task_id_text(r["task_number"]),
                output_dir=r["output_dir"],
                size=r["size"],
                files=tuple(DownloadFile.from_dict(f) for f in json.loads(r["files"])),
                state=r["state"],
                created=r["created"],
            )
            for r in rows
        ]

    def mark_downloaded(self, download_id: str) -> None:
        with self._transaction() as conn:
            now = self._clock()
            row = conn.execute("SELECT job_number, task_number, state FROM downloads WHERE id = ?", (download_id,)).fetchone()
            if row is None:
                raise QueueError(f"there is no download {download_id!r} in queue {self.path}", code="unknown_download")
            if row["state"] == "downloaded":
                return
            conn.execute("UPDATE downloads SET state = 'downloaded', updated = ? WHERE id = ?", (now, download_id))
            self._event(conn, row["job_number"], row["task_number"], now, "downloaded", "", download_id)

    # -- helpers ----------------------------------------------------------------------------------

    def _job_number(self, conn: sqlite3.Connection, job_id: str) -> int:
        text = str(job_id).strip()
        if text.isdigit() and conn.execute("SELECT 1 FROM jobs WHERE number = ?", (int(text),)).fetchone():
            return int(text)
        raise QueueError(f"there is no job {job_id!r} in queue {self.path}; `status` lists the jobs", code="unknown_job")

    def _task_number(self, conn: sqlite3.Connection, job: int, task_id: str) -> int:
        text = str(task_id).strip()
        if text.isdigit() and conn.execute("SELECT 1 FROM tasks WHERE job_number = ? AND number = ?", (job, int(text))).fetchone():
            return int(text)
        raise QueueError(f"job {job_id_text(job)} has no task {task_id!r}", code="unknown_task")

    def _job_info(self, conn: sqlite3.Connection, number: int) -> JobInfo:
        cached = self._jobs_cache.get(number)
        if cached is None:
            text = conn.execute("SELECT document FROM jobs WHERE number = ?", (number,)).fetchone()[0]
            try:
                data = json.loads(text)
            except (TypeError, ValueError, RecursionError) as exc:
                raise DocumentError("job", f"the stored document is not valid JSON ({_short(exc)})") from None
            cached = self._jobs_cache[number] = job_from_stored(data)
        return cached

    @staticmethod
    def _event(conn: sqlite3.Connection, job: int, task: int | None, now: float, kind: str, worker: str, detail: str) -> None:
        conn.execute(
            "INSERT INTO events (job_number, task_number, time, kind, worker, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (job, task, now, kind, worker, detail),
        )


def _task_row(r: sqlite3.Row) -> TaskRow:
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


def _stored_task(row: sqlite3.Row, attempt: int) -> TaskInfo:
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


def _attempts_so_far(row: sqlite3.Row) -> int:
    return sum(row[f"attempts_{c}"] for c in ATTEMPT_CAUSES)


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" for _ in values)


def _check_worker(worker: str) -> None:
    if not isinstance(worker, str) or not worker.strip():
        raise DocumentError("worker", "is empty; name the agent (host and process) claiming the task")


def _check_lease_seconds(seconds: float) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise DocumentError("lease_seconds", f"must be a number of seconds above 0, not {seconds!r}")
