"""Switching an SQLite database to its write-ahead log when other processes open it too.

Changing the journal mode takes an exclusive lock and, when another connection holds the file
(a second agent or a split sync worker opening it at the same moment), SQLite answers
``database is locked`` at once instead of calling the busy handler. So the wait is ours.
"""

from __future__ import annotations

import sqlite3

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random


def busy(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite saying another connection holds the database."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return isinstance(exc, sqlite3.OperationalError) and code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def use_wal(conn: sqlite3.Connection, *, wait_seconds: float) -> str:
    """Put ``conn``'s database in WAL mode, retrying while it is busy for up to ``wait_seconds``;
    returns the journal mode SQLite reports (``wal``, or the old one where the file system
    cannot share memory for a WAL). The last ``sqlite3.OperationalError`` is raised on timeout."""
    for attempt in Retrying(
        retry=retry_if_exception(busy), stop=stop_after_delay(wait_seconds), wait=wait_random(0.005, 0.05), reraise=True
    ):
        with attempt:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
