"""Sync inputs (design.md, step 3): every input placed at its node path with its MD5 and mode.

Order of work:

1. Plan: map every destination (PathMap.local) and check it, before anything is written. A
   relative or climbing destination, two entries for one place with different contents, a place
   that is both a file and a directory, an existing directory, or a symbolic link that leads
   outside the destination's root fails the whole sync with an error naming the destination.
2. Skip destinations that already hold the right content: a stat and an Md5Cache lookup;
   hashing (in parallel) only when the stat changed.
3. Fetch each missing content once, however many destinations share it: from the ContentCache
   when it has it, otherwise in one ``storage.download`` batch into the cache's tmp directory
   (beside the destination when there is no cache), verified by the backend, then adopted.
4. Place: copy to a temporary sibling of the destination, check the size, chmod to the mode's
   permission bits, ``os.replace`` into place, record the MD5. A content that vanished from the
   cache meanwhile (evicted by another process) is fetched again, straight from storage.

Symbolic links: the *root* of a destination is where the path map sends it (its rule's target,
or its root), ``/`` when no map applies. A destination that is itself a link is replaced by a
regular file (the link, never what it points to) when the link points inside the root, and
refused when it points outside. A destination whose directory resolves outside the root is
refused. Failures leave nothing at the destination and no temporary file behind.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from cio_worker.node.cache import ContentCache, copy_fd
from cio_worker.job.document import UploadFile
from cio_worker.errors import ChecksumError, CioError, DocumentError, PathError, StorageError
from cio_worker.job.hashing import check_md5_b64, hashstore_key, md5_b64_of_file
from cio_worker.storage.md5cache import Md5Cache
from cio_worker.job.paths import PathMap, node_path
from cio_worker.storage.base import DownloadItem, Progress, Storage, TransferError
from cio_worker.storage.common import remove_quietly, temp_sibling

log = logging.getLogger(__name__)
_SHOWN = 3  # failures spelled out in one error message


@dataclass
class SyncResult:
    placed: int = 0  # destinations written by this sync
    already_present: int = 0  # destinations that already held the right content
    from_cache: int = 0  # of ``placed``: copied from content the cache already held
    downloaded: int = 0  # contents fetched from storage (each once)
    bytes_downloaded: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Target:
    destination: str  # as the artist wrote it, for messages
    path: Path  # mapped local path
    md5: str
    size: int
    mode: int  # permission bits only
    root: str  # where the path map sends it; it must stay inside (see module doc)


@dataclass
class _Failure:
    targets: list[_Target]
    key: str | None  # the hashstore key, for storage failures
    error: BaseException

    def __str__(self) -> str:
        names = ", ".join(t.destination for t in self.targets)
        where = f" ({self.key})" if self.key else ""
        return f"{names}{where}: {self.error}"


@dataclass
class _Round:
    """What one pass over missing contents left: contents to fetch again, and failures."""

    again: dict[str, list[_Target]] = field(default_factory=dict)
    failures: list[_Failure] = field(default_factory=list)
    adopted: int = 0


class _Vanished(Exception):
    """The cache lost the content (or holds a damaged copy); fetch it from storage instead."""


class InputSync:
    def __init__(
        self,
        storage: Storage,
        cache: ContentCache | None,
        md5cache: Md5Cache | None,
        path_map: PathMap,
        progress: Progress | None = None,
        concurrency: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self.cache = cache
        self.md5cache = md5cache
        self.path_map = path_map
        self.progress = progress
        self.workers = concurrency if concurrency > 0 else min(32, (os.cpu_count() or 2) * 4)
        self.clock = clock

    def sync(self, files: Sequence[UploadFile]) -> SyncResult:
        started = self.clock()
        targets = self._plan(files)
        result = SyncResult()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sync") as pool:
            todo = self._not_present(targets, pool)
            result.already_present = len(targets) - len(todo)
            groups: dict[str, list[_Target]] = {}
            for target in todo:
                groups.setdefault(target.md5, []).append(target)
            failures: list[_Failure] = []
            adopted = 0
            try:
                if groups and self.cache is not None:
                    with self.cache.pinned(groups):
                        first = self._round(groups, True, result, pool)
                        second = self._round(first.again, False, result, pool)
                    failures, adopted = first.failures + second.failures, first.adopted
                elif groups:
                    failures = self._round(groups, False, result, pool).failures
            finally:
                if adopted and self.cache is not None:
                    self._evict()
        if failures:
            raise _error(failures)
        result.seconds = self.clock() - started
        return result

    # -- 1. plan ------------------------------------------------------------------------------

    def _plan(self, files: Sequence[UploadFile]) -> list[_Target]:
        by_path: dict[str, _Target] = {}
        for entry in files:
            target = self._target(entry)
            key = str(target.path)
            other = by_path.get(key)
            if other is None:
                by_path[key] = target
                continue
            for what, mine, theirs in (("MD5", target.md5, other.md5), ("size", target.size, other.size),
                                       ("mode", oct(target.mode), oct(other.mode))):
                if mine != theirs:
                    raise DocumentError(
                        f"destination {target.destination!r}",
                        f"goes to {key} like {other.destination!r} but with a different {what} ({mine} vs {theirs})",
                    )
        for key, target in by_path.items():
            for parent in PurePosixPath(key).parents:
                inner = by_path.get(str(parent))
                if inner is not None:
                    raise PathError(
                        f"destination {target.destination!r} is inside {inner.destination!r}, "
                        "which is also an input file"
                    )
        checked: dict[str, str] = {}
        for target in by_path.values():
            self._check_place(target, checked)
        return list(by_path.values())

    def _target(self, entry: UploadFile) -> _Target:
        node = node_path(entry.destination, what="destination")
        local = self.path_map.apply(node)
        name = f"destination {entry.destination!r}"
        try:
            md5 = check_md5_b64(entry.md5, "md5")
        except DocumentError as exc:
            raise DocumentError(name, exc.problem) from None
        if isinstance(entry.size, bool) or not isinstance(entry.size, int) or entry.size < 0:
            raise DocumentError(name, f"size {entry.size!r} is not a whole number of bytes")
        mode = entry.mode
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o177777:
            raise DocumentError(name, f"mode {mode!r} is not a file mode")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise DocumentError(name, f"mode {oct(mode)} is not a regular file's mode")
        return _Target(entry.destination, Path(local), md5, entry.size, mode & 0o777, _placement_root(self.path_map, node))

    def _check_place(self, target: _Target, checked: dict[str, str]) -> None:
        """Refuse places we must not write; ``checked`` memoises directories already resolved."""
        name = f"destination {target.destination!r}"
        root = os.path.realpath(target.root)
        parent = str(target.path.parent)
        real_parent = checked.get(parent)
        if real_parent is None:
            real_parent = os.path.realpath(parent)
            if not _within(real_parent, root):
                raise PathError(
                    f"{name}: its directory {parent} leads outside {root} through a symbolic link "
                    f"(to {real_parent}); refusing to write there"
                )
            existing = real_parent
            while not os.path.lexists(existing):
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing):
                raise PathError(f"{name}: {existing} is a file, so {parent} cannot be a directory")
            checked[parent] = real_parent
        try:
            st = os.lstat(target.path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise PathError(f"{name}: {target.path} is a directory; refusing to replace it with a file")
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(target.path)
            if not _within(real, root):
                raise PathError(
                    f"{name}: {target.path} is a symbolic link to {real}, outside {root}; refusing to replace it"
                )

    # -- 2. what is already there -------------------------------------------------------------

    def _not_present(self, targets: list[_Target], pool: ThreadPoolExecutor) -> list[_Target]:
        todo: list[_Target] = []
        to_hash: list[_Target] = []
        for target in targets:
            try:
                st = os.lstat(target.path)
            except FileNotFoundError:
                todo.append(target)
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size != target.size:
                todo.append(target)
                continue
            known = self.md5cache.lookup(target.path) if self.md5cache is not None else None
            if known is None:
                to_hash.append(target)
            elif not (known == target.md5 and self._fix_mode(target, st)):
                todo.append(target)
        for target, ok in zip(to_hash, pool.map(self._holds, to_hash)):
            if not ok:
                todo.append(target)
        return todo

    def _holds(self, target: _Target) -> bool:
        try:
            md5 = self.md5cache.md5_of(target.path) if self.md5cache else md5_b64_of_file(target.path)
            return md5 == target.md5 and self._fix_mode(target, os.lstat(target.path))
        except OSError:
            return False

    def _fix_mode(self, target: _Target, st: os.stat_result) -> bool:
        if stat.S_IMODE(st.st_mode) == target.mode:
            return True
        try:
            os.chmod(target.path, target.mode)
        except OSError:
            return False  # not ours to chmod: replace it instead
        if self.md5cache is not None:
            self.md5cache.record(target.path, target.md5)  # chmod changed ctime
        return True

    # -- 3 and 4. fetch and place -------------------------------------------------------------

    def _round(
        self, groups: dict[str, list[_Target]], via_cache: bool, result: SyncResult, pool: ThreadPoolExecutor
    ) -> _Round:
        outcome = _Round()
        if not groups:
            return outcome
        cache = self.cache if via_cache else None
        cached = {md5 for md5 in groups if cache is not None and cache.has(md5)}
        temps = {
            md5: cache.temp_path(md5) if cache is not None else temp_sibling(targets[0].path)
            for md5, targets in groups.items()
            if md5 not in cached
        }
        try:
            fetched = self._download(groups, temps, outcome)
            for md5 in fetched:
                result.downloaded += 1
                result.bytes_downloaded += os.stat(temps[md5]).st_size
                if cache is not None:
                    cache.adopt(md5, temps.pop(md5))
                    outcome.adopted += 1
            ready = sorted(cached | set(fetched))
            jobs = [pool.submit(self._place_group, groups[md5], cache, temps.get(md5)) for md5 in ready]
            for md5, job in zip(ready, jobs):
                placed, again, failures = job.result()
                result.placed += placed
                if md5 in cached:
                    result.from_cache += placed
                if again:
                    outcome.again[md5] = again
                outcome.failures.extend(failures)
        finally:
            for temp in temps.values():
                remove_quietly(temp)
        return outcome

    def _download(self, groups: dict[str, list[_Target]], temps: dict[str, Path], outcome: _Round) -> list[str]:
        """Fetch every content in ``temps`` in one batch; return those that arrived."""
        if not temps:
            return []
        keys = {md5: hashstore_key(md5) for md5 in temps}
        items = [DownloadItem(keys[md5], temp, md5, groups[md5][0].size) for md5, temp in temps.items()]
        try:
            self.storage.download(items, self.progress)
            return list(temps)
        except TransferError as exc:
            errors = {f.key: f.error for f in exc.failures}
        except Exception as exc:  # the whole batch failed (credentials, bucket, network)
            errors = {key: exc for key in keys.values()}
        fetched = []
        for md5 in temps:
            error = errors.get(keys[md5])
            if error is None:
                fetched.append(md5)
            else:
                outcome.failures.append(_Failure(groups[md5], keys[md5], error))
        return fetched

    def _place_group(
        self, targets: list[_Target], cache: ContentCache | None, download: Path | None
    ) -> tuple[int, list[_Target], list[_Failure]]:
        """Place every target of one content; return (placed, to fetch again, failures)."""
        placed, again, failures = 0, [], []
        # Without a cache the download itself becomes the last target; the others copy it first.
        order = targets if download is None else targets[1:] + targets[:1]
        for i, target in enumerate(order):
            fill: Callable[[Path], bool]
            if download is None:
                assert cache is not None
                fill = partial(cache.copy_out, target.md5)
            elif i < len(order) - 1:
                fill = partial(_copy_file, download)
            else:
                fill = partial(_rename, download)
            try:
                self._place(target, fill, from_cache=download is None)
                placed += 1
            except _Vanished:
                again.append(target)
            except Exception as exc:
                failures.append(_Failure([target], hashstore_key(target.md5) if _is_storage(exc) else None, exc))
        return placed, again, failures

    def _place(self, target: _Target, fill: Callable[[Path], bool], from_cache: bool) -> None:
        target.path.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_sibling(target.path)
        try:
            if not fill(temp):
                raise _Vanished()
            size = os.stat(temp).st_size
            if size != target.size:
                if from_cache:
                    assert self.cache is not None
                    self.cache.discard(target.md5)
                    raise _Vanished()
                raise StorageError(
                    f"the content has {size} bytes but the manifest says {target.size}", code="size_mismatch"
                )
            os.chmod(temp, target.mode)
            os.replace(temp, target.path)
        finally:
            remove_quietly(temp)
        if self.md5cache is not None:
            self.md5cache.record(target.path, target.md5)

    def _evict(self) -> None:
        assert self.cache is not None
        try:
            self.cache.evict_to_budget()
        except OSError as exc:
            log.warning("content cache eviction failed: %s", exc)


def _placement_root(path_map: PathMap, node: str) -> str:
    """The directory a node path's mapped form must stay inside: the target of the rule that
    maps it (same matching as PathMap.apply), else the map's root, else ``/``."""
    for source, target in path_map.rules:
        if node == source or node.startswith(source.rstrip("/") + "/"):
            return posixpath.normpath(target)
    return path_map.root or "/"


def _within(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def _copy_file(source: Path, dest: Path) -> bool:
    with open(source, "rb") as src, open(dest, "wb") as out:
        copy_fd(src.fileno(), out.fileno(), os.fstat(src.fileno()).st_size)
    return True


def _rename(source: Path, dest: Path) -> bool:
    os.replace(source, dest)
    return True


def _is_storage(exc: BaseException) -> bool:
    return isinstance(exc, StorageError)


def _error(failures: list[_Failure]) -> CioError:
    """One error for the whole sync, naming the destinations (and keys) that failed."""
    failures = sorted(failures, key=lambda f: (f.key is None, f.targets[0].destination))
    first = failures[0].error
    count = sum(len(f.targets) for f in failures)
    shown = "; ".join(str(f) for f in failures[:_SHOWN])
    more = f"; and {len(failures) - _SHOWN} more" if len(failures) > _SHOWN else ""
    message = f"could not place {count} input file{'s' if count != 1 else ''}: {shown}{more}"
    code = getattr(first, "code", None) or "place_failed"
    if isinstance(first, ChecksumError):
        error: CioError = ChecksumError(message, code=code)
    elif isinstance(first, StorageError):
        error = StorageError(message, code=code)
    elif isinstance(first, CioError):
        error = CioError(message, code=code)
    else:
        error = CioError(message, code="place_failed")
    error.failures = failures  # type: ignore[attr-defined]
    error.destinations = [t.path for f in failures for t in f.targets]  # type: ignore[attr-defined]
    return error
