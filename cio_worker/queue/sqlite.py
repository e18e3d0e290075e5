"""The embedded queue: one SQLite file that many agent processes on one machine share.

Every change runs in its own ``BEGIN IMMEDIATE`` transaction (one writer at a time, others wait up
to the busy timeout), the file is in WAL mode so readers never block, and each process opens its
own connections lazily (one per thread), so a queue object survives ``fork``: the child never
touches the parent's connection.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from cio_worker.errors import QueueError
from cio_worker.sqlite_wal import busy, use_wal
from cio_worker.queue.sql import JOB_BLOCKS, WEB_SESSIONS, WORKERS_TOKENS_OPERATIONS, attempts_tables, SqlQueue, queue_tables

_VERSION_1 = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    *queue_tables("INTEGER PRIMARY KEY AUTOINCREMENT"),
    "CREATE INDEX tasks_by_state ON tasks (state, job_number, number)",
    "CREATE INDEX events_by_task ON events (job_number, task_number)",
    "CREATE INDEX downloads_by_state ON downloads (state, job_number, task_number)",
)
# Each migration takes the schema from the version before it to its own. The embedded file is
# migrated when it is opened (one machine, one writer at a time); never edit a released one.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, _VERSION_1),
    (2, WORKERS_TOKENS_OPERATIONS),
    # 3: which workers failed which tasks of a job; the per-job blocklist.
    (3, JOB_BLOCKS),
    # 4: each ended attempt with its figures; the live tails of running attempts' logs.
    (4, attempts_tables("INTEGER PRIMARY KEY AUTOINCREMENT")),
    # 5: the web view's sign-in sessions.
    (5, WEB_SESSIONS),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


class SqliteQueue(SqlQueue):
    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time, busy_timeout: float = 60.0) -> None:
        super().__init__()
        self.path = Path(path)
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._guard = threading.Lock()
        # (pid, connection) for every connection opened; entries of another pid are a parent's,
        # inherited through fork: kept referenced so they are never closed or used from here.
        self._connections: list[tuple[int, sqlite3.Connection]] = []
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
            raise self._read_only(exc) or QueueError(f"cannot open queue database {self.path}: {exc}", code="queue_db") from exc
        conn.row_factory = sqlite3.Row
        try:
            self._check_schema(conn)  # before any write: never convert someone else's database
            use_wal(conn, wait_seconds=self._busy_timeout)
            self._create_schema(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self._read_only(exc) or self._locked_out(exc) or QueueError(
                f"{self.path} is not a cio_worker queue database (sqlite: {exc}); point the queue URL at a new file",
                code="not_a_queue",
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _read_only(self, exc: sqlite3.Error) -> QueueError | None:
        """The error for a queue this process may not write (SQLite also writes the -wal and -shm
        files beside it), or None when ``exc`` is something else."""
        if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
            return None
        blocked = [str(p) for p in (self.path.parent, self.path) if p.exists() and not os.access(p, os.W_OK)]
        if not blocked and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) != sqlite3.SQLITE_READONLY:
            return None
        where = " and ".join(blocked) or "its file system"
        need = (f"{where} must be writable by user {os.geteuid()}, as SQLite writes {self.path.name}-wal and "
                f"{self.path.name}-shm beside it; fix the permissions or the mount")
        if self.path.exists():
            return QueueError(f"queue {self.path} is read-only for this process (sqlite: {exc}): {need}. The queue "
                              "itself is intact: pointing the queue URL at a new file would start an empty one",
                              code="queue_read_only")
        return QueueError(f"cannot create queue {self.path} (sqlite: {exc}): {need}", code="queue_read_only")

    def _locked_out(self, exc: sqlite3.Error) -> QueueError | None:
        """The error for a queue another process kept locked past the wait, or None."""
        if not busy(exc):
            return None
        return QueueError(
            f"queue {self.path} stayed locked by another process for {self._busy_timeout:g} s (sqlite: {exc}); "
            f"nothing was changed: try again, or find the holder with `fuser {self.path}`",
            code="queue_busy",
        )

    def _check_schema(self, conn: sqlite3.Connection) -> int:
        """The file's schema version (0: an empty file); QueueError if it is not ours or too new."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables.discard("sqlite_sequence")
        if not tables:
            return 0
        if "schema_version" not in tables:
            raise QueueError(
                f"{self.path} is an SQLite database but not a cio_worker queue (it has tables "
                f"{', '.join(sorted(tables)[:5])}); point the queue URL at a new file",
                code="not_a_queue",
            )
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None or not 1 <= row[0] <= SCHEMA_VERSION:
            found = "no version" if row is None else f"version {row[0]}"
            raise QueueError(
                f"queue {self.path} has schema {found}; this cio_worker reads versions 1 to {SCHEMA_VERSION}"
                " (a newer cio-worker wrote it: upgrade this one)",
                code="queue_schema",
            )
        return int(row[0])

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = self._check_schema(conn)
            for version, statements in MIGRATIONS:
                if version > found:
                    for statement in statements:
                        conn.execute(statement)
            if found == 0:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif found < SCHEMA_VERSION:
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
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

    def _now(self, tx: Any) -> float:
        return self._clock()

    def _where(self) -> str:
        return str(self.path)

    def close(self) -> None:
        pid = os.getpid()
        with self._guard:
            mine = [c for p, c in self._connections if p == pid]
            self._connections = [(p, c) for p, c in self._connections if p != pid]
            self._closed = True
        for conn in mine:
            conn.close()
        self._local = threading.local()
