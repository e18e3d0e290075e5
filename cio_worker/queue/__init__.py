"""Queues of tasks, named by URL.

``sqlite:///relative/queue.db`` is relative to the current directory and
``sqlite:////abs/path/queue.db`` is absolute (SQLAlchemy's convention: what follows
``sqlite:///`` is the path as written). The file is created on first open; its directory must exist.
``postgresql://user:password@host:port/database`` is the queue a farm shares (``postgres.py``; its
schema is created by ``cio-worker queue init URL``). ``sql.py`` holds the contract's SQL, once.
``https://host:port`` (or ``http://``) is a coordinator (``cio-worker serve``), reached with a
bearer token (``http.py``).

Shared by every role (the node claims and reports, the artist submits and reads status).
May import: ``errors``, ``job``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from cio_worker.errors import QueueError
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
    WorkerRow,
    WorkerStatus,
)
from cio_worker.queue.sqlite import SqliteQueue

SQLITE_PREFIX = "sqlite:///"

__all__ = [
    "ACTIVE_STATES",
    "ATTEMPT_CAUSES",
    "DOWNLOAD_STATES",
    "KILLED_REASON",
    "RELEASE_CAUSES",
    "STATES",
    "DownloadFile",
    "DownloadRecord",
    "Event",
    "HeartbeatReply",
    "JobSummary",
    "Lease",
    "NewDownload",
    "NewTask",
    "Queue",
    "SqliteQueue",
    "TaskRow",
    "WorkerRow",
    "WorkerStatus",
    "open_queue",
    "sqlite_path",
]


def sqlite_path(url: str) -> Path:
    """The database path a ``sqlite:///`` URL names (not resolved: relative stays relative)."""
    if not url.startswith(SQLITE_PREFIX):
        raise QueueError(
            f"queue URL {url!r} is not sqlite:///relative/path.db or sqlite:////absolute/path.db",
            code="bad_queue_url",
        )
    path = url[len(SQLITE_PREFIX):]
    if not path.strip():
        raise QueueError(f"queue URL {url!r} names no database file (write sqlite:///queue.db)", code="bad_queue_url")
    if "?" in path or "#" in path:
        raise QueueError(f"queue URL {url!r}: the sqlite queue takes no options ('?' or '#')", code="bad_queue_url")
    return Path(path)


def open_queue(url: str, clock: Callable[[], float] = time.time, token: str | None = None) -> Queue:
    """Open the queue a URL names; QueueError says what is wrong with a URL that cannot be opened."""
    if not isinstance(url, str) or not url.strip():
        raise QueueError("the queue URL is empty (for example sqlite:////var/lib/cio/queue.db)", code="bad_queue_url")
    scheme, sep, _ = url.partition(":")
    if not sep:
        raise QueueError(f"queue URL {url!r} has no scheme (for example sqlite:////var/lib/cio/queue.db)", code="bad_queue_url")
    if scheme.lower() == "sqlite":
        return SqliteQueue(sqlite_path(url), clock=clock)
    if scheme.lower() in ("http", "https"):
        from cio_worker.queue.http import HttpQueue

        return HttpQueue(url, token)
    if scheme.lower() in ("postgresql", "postgres"):
        from cio_worker.queue.postgres import PostgresQueue

        # The database's clock, never this machine's: ``clock`` is not passed on.
        return PostgresQueue(url)
    raise QueueError(
        f"queue URL {url.split('@')[-1]!r}: unknown scheme {scheme!r} (this cio_worker knows sqlite:///, postgresql:// and http(s):// for a coordinator)",
        code="bad_queue_url",
    )
