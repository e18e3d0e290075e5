"""Processes that open one new SQLite database at the same instant all get it in WAL mode.

Switching the journal mode answers "database is locked" at once, without the busy handler, when
another process is opening the file too (CI met it with three processes on the MD5 cache; here
it happened in about one round in five with six). The harness forks from a single-threaded
interpreter, so forking is safe, and releases its children together each round.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from cio_worker.errors import QueueError
from cio_worker.queue.sqlite import SqliteQueue
from cio_worker.storage.md5cache import Md5Cache, Md5CacheError

REPO = Path(__file__).resolve().parents[1]

_HARNESS = """
import os, sys, time
kind, top, rounds, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "md5":
    from cio_worker.storage.md5cache import Md5Cache as opener
else:
    from cio_worker.queue.sqlite import SqliteQueue as opener
failures = []
for r in range(rounds):
    db = os.path.join(top, f"r{r}", "x.db")
    os.makedirs(os.path.dirname(db))
    start = time.time() + 0.05
    children = []
    for _ in range(width):
        pid = os.fork()
        if pid == 0:
            while time.time() < start:
                pass
            try:
                opener(db).close()
            except Exception as exc:
                sys.stderr.write(f"round {r}: {exc}\\n")
                os._exit(1)
            os._exit(0)
        children.append(pid)
    failures += [pid for pid in children if os.waitpid(pid, 0)[1] != 0]
    mode = __import__("sqlite3").connect(db).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal", (r, mode)
sys.exit(1 if failures else 0)
"""


@pytest.mark.parametrize("kind", ["md5", "queue"])
def test_processes_opening_one_new_database_together_all_succeed(tmp_path, kind):
    done = subprocess.run(
        [sys.executable, "-c", _HARNESS, kind, str(tmp_path), "40", "6"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@contextmanager
def held(db: Path) -> Iterator[None]:
    """Another connection holds ``db`` in an exclusive transaction meanwhile."""
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_queue_held_past_the_wait_says_so_and_is_left_as_it_was(tmp_path):
    db = tmp_path / "queue.db"
    SqliteQueue(db).close()
    before = db.read_bytes()
    with held(db), pytest.raises(QueueError) as info:
        SqliteQueue(db, busy_timeout=0.3)
    assert info.value.code == "queue_busy"
    message = str(info.value)
    assert "locked by another process for 0.3 s" in message and str(db) in message
    assert "not a cio_worker queue" not in message and "new file" not in message
    assert db.read_bytes() == before
    SqliteQueue(db).close()  # free again: it opens


def test_an_md5_cache_held_past_the_wait_is_not_called_damaged(tmp_path):
    db = tmp_path / "md5.db"  # a new file, still in rollback mode, that another process is writing
    with held(db), pytest.raises(Md5CacheError) as info:
        Md5Cache(db, busy_timeout_seconds=0.3)
    assert "another process held it for 0.3 s; try again" in str(info.value)
    assert "delete the file" not in str(info.value)
