"""A persistent MD5 cache: a file whose stat has not changed is not hashed again.

An entry is keyed on the absolute path and trusted only while the file's size, mtime_ns,
ctime_ns, inode and device are all what they were when it was recorded. ctime cannot be set by
``touch`` or ``utime`` and changes on every write, chmod and rename, so any later change to the
file invalidates the entry; the one blind spot is a same-size rewrite within one timestamp tick
of the recording. ``md5_of`` therefore does not record a file modified less than
``racy_seconds`` ago (it is hashed again next time), nor one that changed while being hashed.
``record`` trusts its caller: it is for a file we have just placed with verified content.
``lookup_many``, ``unchanged``, ``record_many`` and ``record_rows`` serve many files in a few statements (a sync of 50,000 inputs).

The database is sqlite in WAL mode with a busy timeout, so several processes on one machine
can share it. It must live on a local disk (WAL does not work over network filesystems).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from itertools import chain
from operator import itemgetter
from typing import Callable, Iterable

from cio_worker.errors import CioError
from cio_worker.job.hashing import md5_b64_of_file
from cio_worker.sqlite_wal import busy, use_wal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS md5 (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    device INTEGER NOT NULL,
    md5 TEXT NOT NULL
) WITHOUT ROWID
"""


_BATCH = 900  # paths per batched read (SQLite allows at least 999 parameters per statement)
# A row of VALUES (path, *FileStamp.row(), md5) that is exactly the record of its path.
_SAME_ROW = " AND ".join(
    f"md5.{column} = v.column{i}"
    for i, column in enumerate(("path", "size", "mtime_ns", "ctime_ns", "inode", "device", "md5"), 1)
)


class Md5CacheError(CioError):
    code = "md5_cache"


@dataclass(frozen=True)
class FileStamp:
    """What must not change for a recorded MD5 to still be true."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileStamp":
        return cls(*cls.row_of(st))

    def row(self) -> tuple[int, int, int, int, int]:
        return (self.size, self.mtime_ns, self.ctime_ns, self.inode, self.device)

    @staticmethod
    def row_of(st: os.stat_result) -> tuple[int, int, int, int, int]:
        """``FileStamp.of(st).row()`` without the object; an inode or device number of 2**63 or
        more (unsigned 64 bits, which SQLite's integers cannot hold) as its signed 64-bit twin."""
        ino, dev = st.st_ino, st.st_dev
        if ino >= _INT64 or dev >= _INT64:
            ino, dev = _signed(ino), _signed(dev)
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, ino, dev)


_INT64 = 1 << 63


def _signed(number: int) -> int:
    """An unsigned 64-bit number as the signed one with the same bits (others as they are)."""
    return number - (1 << 64) if number >= _INT64 else number


def _as_stored(row: tuple[str, int, int, int, int, int, str]) -> tuple[str, int, int, int, int, int, str]:
    path, size, mtime_ns, ctime_ns, ino, dev, md5 = row
    return (path, size, mtime_ns, ctime_ns, _signed(ino), _signed(dev), md5)


class Md5Cache:
    """``md5_of(path)`` hashes only on a miss; ``record(path, md5)`` after placing verified content.

    Thread-safe (one connection behind a lock; hashing runs outside it) and process-safe.
    ``hits`` and ``computed`` count lookups answered from the database and files hashed;
    ``queries`` counts round trips to the database.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        *,
        hasher: Callable[[Path], str] = md5_b64_of_file,
        racy_seconds: float = 2.0,
        busy_timeout_seconds: float = 30.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.db_path = Path(db_path)
        self._hasher = hasher
        self._racy_ns = int(racy_seconds * 1e9)
        self._busy_timeout = busy_timeout_seconds
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self.hits = 0
        self.computed = 0
        self.queries = 0
        with self._lock:
            self._connection()

    # -- public -------------------------------------------------------------------------------

    def md5_of(self, path: str | os.PathLike[str]) -> str:
        """The base64 MD5 of ``path``: from the database when its stat is unchanged, else hashed."""
        key = _key(path)
        before = FileStamp.of(os.stat(key))
        known = self._lookup(key, before)
        if known is not None:
            return known
        md5 = self._hasher(Path(key))
        with self._lock:
            self.computed += 1
        after = FileStamp.of(os.stat(key))
        fresh = after.mtime_ns > int(self._wall_clock() * 1e9) - self._racy_ns
        if after == before and not fresh:
            self._store([(key, *after.row(), md5)])
        return md5

    def lookup(self, path: str | os.PathLike[str]) -> str | None:
        """The recorded MD5 if the file's stat still matches; never hashes."""
        key = _key(path)
        try:
            stamp = FileStamp.of(os.stat(key))
        except FileNotFoundError:
            return None
        return self._lookup(key, stamp)

    def lookup_many(self, stats: Iterable[tuple[str, os.stat_result]]) -> dict[str, str]:
        """The recorded MD5s of files already stat'ed by the caller, ``{path: md5}`` for those whose
        stat still matches their record; a few batched reads, never hashing, no stat of its own.
        Paths are keys as ``record`` stores them: absolute and normalised (others are made so)."""
        wanted = {_key(path): FileStamp.row_of(st) for path, st in stats}
        found: dict[str, str] = {}
        keys = list(wanted)
        for start in range(0, len(keys), _BATCH):
            chunk = keys[start : start + _BATCH]
            query = f"SELECT path, size, mtime_ns, ctime_ns, inode, device, md5 FROM md5 WHERE path IN ({','.join('?' * len(chunk))})"
            with self._lock:
                rows = self._run(lambda c: c.execute(query, chunk).fetchall())
            for path, *stamp, md5 in rows:
                if wanted.get(path) == tuple(stamp):
                    found[path] = str(md5)
        with self._lock:
            self.hits += len(found)
        return found

    def unchanged(self, rows: list[tuple[str, int, int, int, int, int, str]]) -> set[str]:
        """Of rows (path, *FileStamp.row_of(stat), md5), one a path, for files the caller stat'ed
        (raw lstat numbers do too: an inode of 2**63 or more is then compared as ``row_of`` has
        it), the paths recorded with exactly that stamp and that MD5. The database compares, a batch
        of rows a statement, and answers with a count (the matching paths only for a batch where
        some differ): nothing per row in Python. Paths must be keys as ``record`` stores them
        (absolute and normal); another never matches (``lookup_many`` is the slower way)."""
        rows = sorted(rows)  # neighbours in the table's index: fewer pages to read
        found: set[str] = set()
        with self._lock:
            per = max(1, min(_BATCH, self._connection().getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 7))
        for start in range(0, len(rows), per):
            chunk = rows[start : start + per]
            values = list(chain.from_iterable(chunk))
            join = f"FROM (VALUES {','.join(['(?,?,?,?,?,?,?)'] * len(chunk))}) AS v JOIN md5 ON {_SAME_ROW}"
            with self._lock:
                try:
                    (count,) = self._run(lambda c: c.execute(f"SELECT count(*) {join}", values).fetchone())
                except OverflowError:  # raw stat numbers of 2**63 or more: as row_of (and the records) have them
                    values = list(chain.from_iterable(map(_as_stored, chunk)))
                    (count,) = self._run(lambda c: c.execute(f"SELECT count(*) {join}", values).fetchone())
                if count == len(chunk):
                    found.update(map(itemgetter(0), chunk))
                elif count:
                    same = self._run(lambda c: c.execute(f"SELECT v.column1 {join}", values).fetchall())
                    found.update(path for (path,) in same)
        with self._lock:
            self.hits += len(found)
        return found

    def record(self, path: str | os.PathLike[str], md5: str) -> None:
        """Remember that ``path``, as it is now, has ``md5`` (the caller verified the content)."""
        self.record_many([(path, md5)])

    def record_many(self, entries: Iterable[tuple[str | os.PathLike[str], str]]) -> None:
        """``record`` for many files, in one transaction."""
        rows = []
        for path, md5 in entries:
            key = _key(path)
            rows.append((key, *FileStamp.row_of(os.stat(key)), md5))
        self._store(rows)

    def record_rows(self, rows: Iterable[tuple[str, int, int, int, int, int, str]]) -> None:
        """``record_many`` of files the caller stat'ed after its last change to them, as rows of
        (path, *FileStamp.row_of(stat), md5): one transaction, no stat of its own."""
        self._store([(_key(path), *rest) for path, *rest in rows])

    def forget(self, path: str | os.PathLike[str]) -> None:
        with self._lock:
            self._run(lambda c: c.execute("DELETE FROM md5 WHERE path = ?", (_key(path),)))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> "Md5Cache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _lookup(self, key: str, stamp: FileStamp) -> str | None:
        with self._lock:
            row = self._run(
                lambda c: c.execute(
                    "SELECT md5 FROM md5 WHERE path = ? AND size = ? AND mtime_ns = ? AND ctime_ns = ?"
                    " AND inode = ? AND device = ?",
                    (key, *stamp.row()),
                ).fetchone()
            )
            if row is not None:
                self.hits += 1
        return None if row is None else str(row[0])

    def _store(self, values: list[tuple[str, int, int, int, int, int, str]]) -> None:
        """Rows of (path, *FileStamp.row(), md5)."""
        if not values:
            return

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR REPLACE INTO md5 VALUES (?, ?, ?, ?, ?, ?, ?)", values)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        with self._lock:
            self._run(write)

    def _run(self, action: Callable[[sqlite3.Connection], object]):  # type: ignore[no-untyped-def]
        self.queries += 1  # under self._lock
        try:
            return action(self._connection())
        except sqlite3.Error as exc:
            raise Md5CacheError(f"MD5 cache {self.db_path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork: a child process opens its own.
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.db_path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            use_wal(conn, wait_seconds=self._busy_timeout)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            advice = (f"another process held it for {self._busy_timeout:g} s; try again" if busy(exc)
                      else "delete the file to start an empty cache")
            raise Md5CacheError(f"cannot open the MD5 cache {self.db_path}: {exc} ({advice})") from exc
        self._conn, self._pid = conn, os.getpid()
        return conn


def _key(path: str | os.PathLike[str]) -> str:
    if path.__class__ is str and path[:1] == "/" and "/." not in path and "//" not in path and path[-1:] != "/":
        return path  # type: ignore[return-value]  # already absolute and normal: no new string
    return os.path.abspath(os.fspath(path))
