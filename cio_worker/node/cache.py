"""The instance's local content cache: file contents by MD5, within a size budget (LRU).

Layout under ``root``::

    objects/ab/<32 hex>   one file per content, named by its MD5
    tmp/                  downloads in progress (same filesystem, so adoption is a rename)
    evict.lock            fcntl lock held while evicting

Several agent processes may share one directory. Objects only ever appear by an atomic rename
or hard link of a verified file, and an object's mtime is its last use (set on adoption and every
use). Eviction runs under an exclusive file lock, removes least recently used objects until the
total is within budget, and never removes an object pinned by this process (``pinned``) or used
by any process within the last ``grace_seconds``; the budget is therefore soft by what was used
in that window. A copy that loses a race with eviction in another process gets ``False`` from
``copy_out`` and fetches the content again.

Trust: the cache is never believed blindly. ``copy_out`` hashes what it copies (in the same pass)
and an object whose bytes no longer match its name (a disk fault, or a write through a hard link,
see ``adopt_link``) is removed, counted in ``damaged`` and reported as ``DamagedObject``; nothing
of it is left at the destination. ``verify=False`` turns the check off (for measuring its cost).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, NamedTuple

from cio_worker.errors import CioError
from cio_worker.job.hashing import check_md5_b64, md5_hex
from cio_worker.storage.common import copy_fd_hashed, remove_quietly

log = logging.getLogger(__name__)

COPY_BLOCK = 1024 * 1024
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.ETXTBSY}
_NO_COPY_RANGE.add(getattr(errno, "ENOTSUP", errno.EOPNOTSUPP))
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.EACCES}


class CacheError(CioError):
    code = "cache"


class DamagedObject(CacheError):
    """The cache held a copy whose bytes do not match its MD5; it has been removed."""

    code = "cache_damaged"


class _Entry(NamedTuple):  # a tuple: one per object of a cache of tens of thousands, made fast
    mtime_ns: int
    size: int
    path: str
    hex: str
    nlink: int = 1

    @property
    def held(self) -> int:
        """Bytes that removing the object frees: none while it is also hard-linked elsewhere
        (``adopt_link``: a task's placed input holds the same blocks)."""
        return self.size if self.nlink <= 1 else 0


class ContentCache:
    def __init__(
        self,
        root: str | os.PathLike[str],
        budget_bytes: int,
        *,
        grace_seconds: float = 600.0,
        stale_temp_seconds: float = 3600.0,
        verify: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise CacheError(f"cache budget {budget_bytes!r} must be a whole number of bytes, zero or more")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.grace_seconds = grace_seconds
        self.stale_temp_seconds = stale_temp_seconds
        self.verify = verify
        self.damaged = 0  # objects found damaged and removed by this instance
        self._clock = clock
        self._objects = self.root / "objects"
        self._objects_str = str(self._objects)
        self._tmp = self.root / "tmp"
        self._lock_path = self.root / "evict.lock"
        self._pins: Counter[str] = Counter()
        self._pins_lock = threading.Lock()
        try:
            self._objects.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the content cache at {self.root}: {exc}") from exc

    def __reduce__(self) -> tuple:
        """Pickled (for a sync worker process): a cache over the same directory with the same
        settings, on the real clock (the worker only copies out and adopts; it never evicts)."""
        return (partial(ContentCache, grace_seconds=self.grace_seconds, stale_temp_seconds=self.stale_temp_seconds,
                        verify=self.verify), (str(self.root), self.budget_bytes))

    # -- lookups ------------------------------------------------------------------------------

    def object_path(self, md5: str) -> Path:
        """Where the content with ``md5`` lives (whether or not it is there)."""
        return Path(self._object(md5))

    def _object(self, md5: str) -> str:
        """``object_path`` as a string (no Path per object of a large batch)."""
        hex_digest = md5_hex(check_md5_b64(md5))
        return f"{self._objects_str}/{hex_digest[:2]}/{hex_digest}"

    def has(self, md5: str) -> bool:
        return os.path.isfile(self._object(md5))

    def held(self, md5s: Collection[str], *, list_from: int = 4096) -> set[str]:
        """Which of ``md5s`` the cache holds: a stat each for a few, for ``list_from`` or more a
        listing of the shard directories (names only: 256 directory reads, not 50,000 stats)."""
        if len(md5s) < list_from:
            return {md5 for md5 in md5s if self.has(md5)}
        names: set[str] = set()
        try:
            shards = [entry.path for entry in os.scandir(self._objects_str) if entry.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return set()
        for shard in shards:
            try:
                names.update(os.listdir(shard))
            except FileNotFoundError:
                pass
        return {md5 for md5 in md5s if md5_hex(check_md5_b64(md5)) in names}

    def path(self, md5: str) -> Path | None:
        """The object's path, marked as used; None when the cache does not hold it."""
        target = self.object_path(md5)
        if not self._touch(target):
            return None
        return target

    # -- writing ------------------------------------------------------------------------------

    def temp_path(self, md5: str) -> Path:
        """A fresh name in the cache's tmp directory for downloading ``md5`` before ``adopt``."""
        return self._tmp / f"{md5_hex(check_md5_b64(md5))}.{os.getpid()}.{uuid.uuid4().hex[:12]}"

    def adopt(self, md5: str, file: str | os.PathLike[str]) -> Path:
        """Move ``file`` (whose content the caller verified to be ``md5``) into the cache."""
        target = self.object_path(md5)
        source = Path(file)
        target.parent.mkdir(exist_ok=True)
        os.chmod(source, 0o444)
        try:
            os.replace(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            staged = self.temp_path(md5)
            try:
                shutil.copyfile(source, staged)
                os.chmod(staged, 0o444)
                os.replace(staged, target)
            finally:
                remove_quietly(staged)
            remove_quietly(source)
        self._touch(target)
        return target

    def adopt_link(
        self, md5: str, file: str | os.PathLike[str], *, shareable: bool = True, link: Callable[[str], None] | None = None
    ) -> None:
        """Make the cache hold ``file``'s content (verified by the caller) without writing it again:
        a hard link to it, so the object shares ``file``'s mode and times, and ``copy_out``'s check
        catches a later write through ``file``. A copy instead where no link can be made, or when
        not ``shareable`` (``file``'s mode does not let every agent sharing the cache read it).
        ``link(target)`` makes the link when ``file`` has no name of its own (``UnnamedFiles``)."""
        target = self._object(md5)
        make_link = link or partial(os.link, file)
        if shareable:
            try:
                try:
                    make_link(target)
                except FileNotFoundError:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    make_link(target)
                return
            except FileExistsError:
                self._touch(target)
                return
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
        staged = self.temp_path(md5)
        try:
            shutil.copyfile(file, staged)
            self.adopt(md5, staged)
        finally:
            remove_quietly(staged)

    def copy_out(self, md5: str, dest: str | os.PathLike[str]) -> bool:
        """Copy the content to ``dest`` (a temporary name; the caller renames it into place).

        A real copy, never a link: a renderer that writes to its input cannot reach the cache,
        and the destination's mode is its own. False when the cache does not hold ``md5``.
        The bytes are hashed as they are copied: a damaged object raises ``DamagedObject``
        (removed from the cache, nothing left at ``dest``).
        """
        out = -1

        def write(src: int) -> str:
            nonlocal out
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            return self._copy(src, out, md5)

        try:
            if self._copy_out(md5, write):
                return True
        except BaseException:
            remove_quietly(dest)
            raise
        finally:
            if out >= 0:
                os.close(out)
        return False

    def copy_out_fd(self, md5: str, out: int) -> bool:
        """``copy_out`` into ``out``, an open empty file (one without a name, say, that the
        caller names once this returned True). A damaged object: ``DamagedObject``, as there."""
        return self._copy_out(md5, lambda src: self._copy(src, out, md5))

    def _copy(self, src: int, out: int, md5: str) -> str:
        """Copy ``src`` to ``out``; the MD5 of what was copied (``md5`` itself when not verifying)."""
        if self.verify:
            return copy_fd_hashed(src, out)
        copy_fd(src, out, os.fstat(src).st_size)
        return md5

    def _copy_out(self, md5: str, write: Callable[[int], str]) -> bool:
        source = self._object(md5)
        try:
            src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            self._touch(source)
            got = write(src)
            if got == md5:
                return True
            self._discard_damaged(md5, source, os.fstat(src), got)
        finally:
            os.close(src)
        raise DamagedObject(f"the cached copy of {md5} at {source} has MD5 {got}; removed from the cache")

    def _discard_damaged(self, md5: str, source: str, read: os.stat_result, got: str) -> None:
        log.warning("content cache: %s holds MD5 %s, not %s (disk fault or tampering); removing it", source, got, md5)
        with self._pins_lock:
            self.damaged += 1
        try:
            now = os.stat(source)
        except FileNotFoundError:
            return
        if (now.st_dev, now.st_ino) == (read.st_dev, read.st_ino):  # not already replaced by another process
            remove_quietly(source)

    def discard(self, md5: str) -> None:
        """Remove an object found to be damaged."""
        remove_quietly(self.object_path(md5))

    @contextmanager
    def pinned(self, md5s: Iterable[str]) -> Iterator[None]:
        """While inside, this process's ``evict_to_budget`` leaves these contents alone."""
        keys = [md5_hex(check_md5_b64(m)) for m in set(md5s)]
        with self._pins_lock:
            self._pins.update(keys)
        try:
            yield
        finally:
            with self._pins_lock:
                self._pins.subtract(keys)
                self._pins += Counter()  # drop zero counts

    # -- budget -------------------------------------------------------------------------------

    def usage(self) -> int:
        """Bytes held by the cache's objects alone (what the budget limits): an object also
        hard-linked elsewhere costs the disk nothing more and counts once the other link goes."""
        return sum(e.held for e in self._scan())

    def evict_to_budget(self) -> int:
        """Remove least recently used objects until within budget; return how many were removed."""
        with self._evict_lock():
            self._remove_stale_temps()
            if self._disk_used() <= self.budget_bytes:
                return 0  # the whole filesystem holds less than the budget: no object to add up
            entries = self._scan()
            total = sum(e.held for e in entries)
            if total <= self.budget_bytes:
                return 0
            with self._pins_lock:
                pinned = set(self._pins)
            protected_from = int((self._clock() - self.grace_seconds) * 1e9)
            removed = 0
            for entry in sorted(entries, key=lambda e: (e.mtime_ns, e.hex)):
                if total <= self.budget_bytes:
                    break
                if entry.hex in pinned or entry.mtime_ns >= protected_from or not entry.held:
                    continue  # (removing one that is linked elsewhere would free nothing)
                try:
                    if os.stat(entry.path).st_mtime_ns != entry.mtime_ns:
                        continue  # used since the scan
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
                total -= entry.held
            return removed

    # -- internals ----------------------------------------------------------------------------

    def _touch(self, target: str | Path) -> bool:
        now = int(self._clock() * 1e9)
        try:
            os.utime(target, ns=(now, now))
        except FileNotFoundError:
            return False
        except PermissionError:  # another user's object: usable, just not re-dated
            return os.path.isfile(target)
        return True

    def _disk_used(self) -> int:
        """Bytes in use on the cache's filesystem (all of it, not only the cache's)."""
        try:
            vfs = os.statvfs(self._objects_str)
        except OSError:
            return 1 << 62
        return (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize

    def _scan(self) -> list[_Entry]:
        entries = []
        try:
            shards = list(os.scandir(self._objects))
        except FileNotFoundError:
            return []
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            try:
                files = list(os.scandir(shard.path))
            except FileNotFoundError:
                continue
            for item in files:
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if item.is_file(follow_symlinks=False):
                    entries.append(_Entry(st.st_mtime_ns, st.st_size, item.path, item.name, st.st_nlink))
        return entries

    def _remove_stale_temps(self) -> None:
        """Downloads left behind by a process that died (nothing written for a long time)."""
        cutoff = self._clock() - self.stale_temp_seconds
        try:
            items = list(os.scandir(self._tmp))
        except FileNotFoundError:
            return
        for item in items:
            try:
                if item.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(item.path)
            except FileNotFoundError:
                pass

    @contextmanager
    def _evict_lock(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def copy_fd(src: int, dst: int, size: int) -> int:
    """Copy ``size`` bytes from the current offsets; in-kernel (reflink where the filesystem
    can) when possible, else read/write. Returns the bytes copied (fewer if the source is short)."""
    copied = 0
    if hasattr(os, "copy_file_range"):
        try:
            while copied < size:
                n = os.copy_file_range(src, dst, size - copied)
                if n == 0:
                    return copied
                copied += n
            return copied
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            os.lseek(src, copied, os.SEEK_SET)
            os.lseek(dst, copied, os.SEEK_SET)
    while copied < size:
        block = os.read(src, min(COPY_BLOCK, size - copied))
        if not block:
            break
        view = memoryview(block)
        while view:
            view = view[os.write(dst, view) :]
        copied += len(block)
    return copied

