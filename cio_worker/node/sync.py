"""Sync inputs (design.md, step 3): every input placed at its node path with its MD5 and mode.

Order of work:

1. Plan: map every destination (PathMap.local) and check it, before anything is written. A
   relative or climbing destination, two entries for one place with different contents, a place
   that is both a file and a directory, an existing directory, or a symbolic link that leads
   outside the destination's root fails the whole sync with an error naming the destination.
   Each destination is lstat'ed once here (none in a directory that does not exist); the rest
   of the sync reuses that stat. Fields are checked over the whole manifest at once, paths
   mapped and directories checked once per directory.
2. Skip destinations that already hold the right content: a regular file of the right size and
   mode whose Md5Cache record is exactly its stat and the manifest's MD5 is confirmed in the plan
   (``Md5Cache.unchanged``: the database compares, a batch of rows a statement); the others'
   stats against the records (``lookup_many``), hashing (in parallel) only when the stat
   changed. A sync with nothing to do costs one lstat per entry, no hashing and no request.
3. Fetch each missing content once, however many destinations share it. Contents the
   ContentCache holds are copied out (hashed as they are copied: a damaged cached copy is
   removed, counted in ``cache_damaged`` and fetched again). The others come in one batch,
   each written once and placed as soon as it arrives (while the rest are still coming): where
   the backend and the destination's filesystem can (``storage.download_unnamed``,
   ``UnnamedFiles``, checked once per filesystem), as a file without a name in its first
   destination's directory that gets its names only once whole and verified (a hard link into
   the cache, then one into place: no temporary name, no rename, nothing left if the process
   dies); elsewhere (``storage.download``) to a temporary name beside its first destination,
   which the cache links and which is renamed into place. The other destinations of that
   content copy it. A download of ``split_from`` contents or more from a store whose cost is per
   file on this machine (``file://``) is split over a process a core (``node/sync_worker.py``),
   each placing its share with this same code; their MD5 records come back to be written here.
4. Place: temporary sibling, size checked, chmod to the mode's permission bits, ``os.replace``
   into place (a download without a name: its mode set, then linked into place; a link to a
   temporary sibling and a rename only when something is already there). The MD5 records of
   every placed file are written in one batch at the end.

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
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_any
from operator import attrgetter
from pathlib import Path
from typing import Callable, Sequence

from cio_worker.errors import ChecksumError, CioError, DocumentError, PathError, StorageError
from cio_worker.job.document import UploadFile
from cio_worker.job.hashing import all_canonical_md5_b64, check_md5_b64, hashstore_key, md5_b64_of_file
from cio_worker.job.paths import PathMap, node_path
from cio_worker.node.cache import ContentCache, DamagedObject, copy_fd
from cio_worker.storage.base import DownloadItem, NullProgress, Progress, Storage, TransferError
from cio_worker.storage.common import UnnamedFiles, create_unnamed, remove_quietly, temp_sibling_str
from cio_worker.storage.md5cache import FileStamp, Md5Cache, Md5CacheError

log = logging.getLogger(__name__)
_SHOWN = 3  # failures spelled out in one error message
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
_REGULAR = stat.S_IFREG
_NOT_PLAIN = frozenset(("", ".", ".."))  # last components that are not a file's own name
_MD5, _SIZE, _MODE = attrgetter("md5"), attrgetter("size"), attrgetter("mode")


@dataclass
class SyncResult:
    placed: int = 0  # destinations written by this sync
    already_present: int = 0  # destinations that already held the right content
    from_cache: int = 0  # of ``placed``: copied from content the cache already held
    downloaded: int = 0  # contents fetched from storage (each once)
    bytes_downloaded: int = 0
    cache_damaged: int = 0  # cached copies that failed their MD5 check (removed, fetched again)
    seconds: float = 0.0


@dataclass(slots=True)
class _Target:
    destination: str  # as the artist wrote it, for messages
    path: str  # mapped local path
    md5: str
    size: int
    mode: int  # permission bits only
    root: str  # where the path map sends it; it must stay inside (see module doc)


_Record = tuple[str, int, int, int, int, int, str]  # (path, *FileStamp.row_of(its stat once placed), md5)


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
class _Placed:
    """What placing one content's destinations did (built on any thread, summed on the caller's)."""

    placed: int = 0
    from_cache: int = 0
    downloaded: int = 0  # contents that came from storage
    downloaded_bytes: int = 0
    damaged: int = 0  # cached copies found damaged
    again: list[_Target] = field(default_factory=list)  # to fetch from storage (cache lost it)
    failures: list[_Failure] = field(default_factory=list)

    def add(self, other: _Placed) -> None:
        """Sum ``other`` into this one (a sync worker sends one sum, not one per content)."""
        self.placed += other.placed
        self.from_cache += other.from_cache
        self.downloaded += other.downloaded
        self.downloaded_bytes += other.downloaded_bytes
        self.damaged += other.damaged
        self.again += other.again
        self.failures += other.failures


class _Vanished(Exception):
    """The cache lost the content (or held a damaged copy); fetch it from storage instead."""


class _PlaceOnArrival:
    """The Progress handed to ``storage.download``: relays to the sync's own progress, and places
    each content as soon as the backend reports it done (verified)."""

    def __init__(self, outer: Progress, arrived: Callable[[str], None]) -> None:
        self.outer = outer
        self.arrived = arrived

    def start(self, files: int, total_bytes: int) -> None:
        self.outer.start(files, total_bytes)

    def advance(self, nbytes: int) -> None:
        self.outer.advance(nbytes)

    def file_done(self, key: str) -> None:
        self.outer.file_done(key)
        self.arrived(key)


class _DownloadItems(Sequence[DownloadItem]):
    """The download batch, each item made when the backend gets to it (not one per item of a
    batch of tens of thousands held at once)."""

    def __init__(self, keys: list[tuple[str, str]], dests: dict[str, str], groups: dict[str, list[_Target]]) -> None:
        self.keys = keys  # (hashstore key, md5)
        self.dests = dests
        self.groups = groups

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> DownloadItem:  # type: ignore[override]
        key, md5 = self.keys[index]
        return DownloadItem(key, self.dests[md5], md5, self.groups[md5][0].size)


class InputSync:
    WORKER_GRACE = 10.0  # seconds a sync worker process has to end once its parent stops listening
    # More processes than this by default would mostly wait on the same directories' locks, each
    # holding its share in memory and a Python of its own (about 25 MB).
    MAX_PROCESSES = 4

    def __init__(
        self,
        storage: Storage,
        cache: ContentCache | None,
        md5cache: Md5Cache | None,
        path_map: PathMap,
        progress: Progress | None = None,
        concurrency: int = 0,
        clock: Callable[[], float] = time.monotonic,
        unnamed: Callable[[], UnnamedFiles | None] = UnnamedFiles.open,
        processes: int = 0,
        split_from: int = 5000,
    ) -> None:
        self.storage = storage
        self.cache = cache
        self.md5cache = md5cache
        self.path_map = path_map
        self.progress = progress
        # Local copies and hashing: a thread a core (more only contend for the GIL and directory locks).
        self.workers = concurrency if concurrency > 0 else max(2, os.cpu_count() or 2)
        self.clock = clock
        self.unnamed = unnamed  # None from it: every download goes through a temporary name
        # A download of ``split_from`` contents or more from a store that ``splits_over_processes``
        # is split over this many processes (0: a process a core, at most ``MAX_PROCESSES``; 1:
        # never split).
        self.processes = processes if processes > 0 else min(self.MAX_PROCESSES, os.cpu_count() or 1)
        self.split_from = split_from

    def sync(self, files: Sequence[UploadFile]) -> SyncResult:
        started = self.clock()
        targets, stats, present = self._plan(files)
        result = SyncResult()
        records: list[_Record] = []  # files placed or fixed, stat'ed after their last change: one batch at the end
        failures: list[_Failure] = []
        names: UnnamedFiles | None = None  # files made without a name, where the filesystem can
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sync") as pool:
            try:
                todo = self._not_present(targets, stats, pool, records)
                del stats
                result.already_present = present + len(targets) - len(todo)
                groups: dict[str, list[_Target]] = {}
                for target in todo:
                    groups.setdefault(target.md5, []).append(target)
                del todo
                directories = {os.path.dirname(t.path) for group in groups.values() for t in group}
                for directory in directories:
                    os.makedirs(directory, exist_ok=True)
                names = self.unnamed() if groups else None
                if names is not None:  # decided before any copy starts: never a probe's name beside one
                    for directory in directories:
                        names.usable_in(directory)
                del directories
                if groups and self.cache is not None:
                    with self.cache.pinned(groups):
                        again = self._round(groups, True, result, pool, records, failures, names)
                        self._round(again, False, result, pool, records, failures, names)
                elif groups:
                    self._round(groups, False, result, pool, records, failures, names)
            finally:
                if names is not None:
                    names.close()
                self._record(records)
                if result.downloaded and self.cache is not None:
                    self._evict()
        if failures:
            raise _error(failures)
        result.seconds = self.clock() - started
        return result

    # -- 1. plan ------------------------------------------------------------------------------

    def _plan(self, files: Sequence[UploadFile]) -> tuple[list[_Target], dict[str, os.stat_result], int]:
        """Map and check every destination (module doc, 1), lstat'ing each once. Returns the
        targets still to look at with their lstats (none: nothing there), and how many others
        are confirmed as they are: a regular file of the manifest's size and mode whose MD5
        record matches its stat and the manifest's MD5 (``Md5Cache.unchanged``)."""
        by_path, places = self._map(files)
        self._check_nesting(by_path, places)
        roots: dict[str, str] = {}  # placement root -> its real path
        dirs: dict[str, bool] = {}  # destination directory, checked -> whether it exists
        rows: list[_Record] = []  # each as the MD5 cache holds it if the file is as recorded
        rest: list[tuple[str, UploadFile, str, os.stat_result | None]] = []
        lstat = os.lstat
        for (path, entry), (_, root, parent) in zip(by_path.items(), places):
            there = dirs.get(parent)
            if there is None:
                there = dirs[parent] = self._check_directory(entry, parent, root, roots)
            st = None
            if there:  # else nothing can be there: no lstat (a cold sync into a new directory)
                try:
                    st = lstat(path)
                except FileNotFoundError:
                    pass
                else:
                    if st.st_mode == _REGULAR | (entry.mode & 0o777) and st.st_size == entry.size:
                        rows.append((path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, entry.md5))
                        continue
                    _check_file(entry, path, st, _real_root(root, roots))
            rest.append((path, entry, root, st))
        confirmed = self.md5cache.unchanged(rows) if self.md5cache is not None and rows else set()
        if len(confirmed) < len(rows):  # changed since recorded, or not recorded: a fresh look
            where = {path: root for (path, _), (_, root, _) in zip(by_path.items(), places)}
            for path, *_ in rows:
                if path not in confirmed:
                    entry, root = by_path[path], where[path]
                    rest.append((path, entry, root, _lstat_checked(entry, path, _real_root(root, roots))))
        targets: list[_Target] = []
        stats: dict[str, os.stat_result] = {}
        for path, entry, root, st in rest:
            targets.append(_Target(entry.destination, path, entry.md5, entry.size, entry.mode & 0o777, root))
            if st is not None:
                stats[path] = st
        return targets, stats, len(by_path) - len(targets)

    def _map(self, files: Sequence[UploadFile]) -> tuple[dict[str, UploadFile], list[tuple[str, str, str]]]:
        """Every destination's mapped path -> its entry, in manifest order, and beside each (a
        list in the same order) its directory's (mapped directory + "/", placement root, mapped
        directory), shared by the directory's entries. The entries' fields are checked over the
        whole manifest at once, and one by one (to name the first that is wrong) only if that
        finds one."""
        if not _fields_fine(files):
            mapper = _Mapper(self.path_map)
            for entry in files:
                self._target(entry, mapper)  # raises at the first entry that is wrong
        mapper = _Mapper(self.path_map)
        dirs = mapper.dirs
        by_path: dict[str, UploadFile] = {}
        places: list[tuple[str, str, str]] = []
        for entry in files:
            destination = entry.destination
            head, _, name = destination.rpartition("/")
            known = dirs.get(head)
            if known is not None and name not in _NOT_PLAIN and "\\" not in name and "\x00" not in name:
                path = known[0] + name
            else:
                path, root, parent = mapper(destination)
                known = ("", root, parent)
            other = by_path.get(path)
            if other is None:
                by_path[path] = entry
                places.append(known)
            else:
                _same_place(entry, other, path)
        return by_path, places

    def _target(self, entry: UploadFile, mapper: _Mapper) -> _Target:
        path, root, _ = mapper(entry.destination)
        try:
            md5 = check_md5_b64(entry.md5, "md5")
        except DocumentError as exc:
            raise DocumentError(f"destination {entry.destination!r}", exc.problem) from None
        size, mode = entry.size, entry.mode
        if size.__class__ is not int or size < 0 or mode.__class__ is not int or mode >> 12 not in (0, 8):
            _refuse_size_or_mode(entry)
        return _Target(entry.destination, path, md5, size, mode & 0o777, root)

    @staticmethod
    def _check_nesting(by_path: dict[str, UploadFile], places: list[tuple[str, str, str]]) -> None:
        """No destination may be a directory of another: walk each distinct directory up once."""
        seen: set[str] = set()
        for directory in {parent for _, _, parent in places}:
            while directory not in seen and directory != "/":
                seen.add(directory)
                inner = by_path.get(directory)
                if inner is not None:
                    entry = next(e for p, e in by_path.items() if p.startswith(directory + "/"))
                    raise PathError(
                        f"destination {entry.destination!r} is inside {inner.destination!r}, "
                        "which is also an input file"
                    )
                directory = directory.rpartition("/")[0] or "/"

    @staticmethod
    def _check_directory(entry: UploadFile, parent: str, root: str, roots: dict[str, str]) -> bool:
        """Refuse a destination directory that leads outside its root or cannot be a directory;
        return whether it exists. ``roots`` memoises the roots' real paths."""
        real_root = _real_root(root, roots)
        real_parent = os.path.realpath(parent)
        if not _within(real_parent, real_root):
            raise PathError(
                f"destination {entry.destination!r}: its directory {parent} leads outside {real_root} through a "
                f"symbolic link (to {real_parent}); refusing to write there"
            )
        existing = real_parent
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise PathError(f"destination {entry.destination!r}: {existing} is a file, so {parent} cannot be a directory")
        return existing == real_parent

    # -- 2. what is already there -------------------------------------------------------------

    def _not_present(
        self, targets: list[_Target], stats: dict[str, os.stat_result], pool: ThreadPoolExecutor,
        records: list[_Record],
    ) -> list[_Target]:  # fmt: skip
        todo: list[_Target] = []
        candidates: list[_Target] = []
        for target in targets:
            st = stats.get(target.path)
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != target.size:
                todo.append(target)
            else:
                candidates.append(target)
        known: dict[str, str] = {}
        if self.md5cache is not None and candidates:
            known = self.md5cache.lookup_many((t.path, stats[t.path]) for t in candidates)
        to_hash: list[_Target] = []
        for target in candidates:
            md5 = known.get(target.path)
            if md5 is None:
                to_hash.append(target)
            elif not (md5 == target.md5 and self._fix_mode(target, stats[target.path], records)):
                todo.append(target)
        hashed = partial(self._holds, records=records)
        for target, ok in zip(to_hash, pool.map(hashed, to_hash)):
            if not ok:
                todo.append(target)
        return todo

    def _holds(self, target: _Target, records: list[_Record]) -> bool:
        try:
            md5 = self.md5cache.md5_of(target.path) if self.md5cache else md5_b64_of_file(target.path)
            return md5 == target.md5 and self._fix_mode(target, os.lstat(target.path), records)
        except OSError:
            return False

    def _fix_mode(self, target: _Target, st: os.stat_result, records: list[_Record]) -> bool:
        if stat.S_IMODE(st.st_mode) == target.mode:
            return True
        try:
            os.chmod(target.path, target.mode)
        except OSError:
            return False  # not ours to chmod: replace it instead
        _note(records, target)  # chmod changed ctime
        return True

    def _record(self, records: list[_Record]) -> None:
        """The MD5 records of what this sync placed or fixed, in one batch; a failure only costs
        hashing next time, it never fails the sync."""
        if self.md5cache is None or not records:
            return
        try:
            self.md5cache.record_rows(records)
        except Md5CacheError as exc:
            log.warning("%s", exc)

    # -- 3 and 4. fetch and place -------------------------------------------------------------

    def _round(
        self, groups: dict[str, list[_Target]], via_cache: bool, result: SyncResult, pool: ThreadPoolExecutor,
        records: list[_Record], failures: list[_Failure], names: UnnamedFiles | None,
    ) -> dict[str, list[_Target]]:  # fmt: skip
        """Place every group, from the cache (``via_cache``) or from storage; return the groups to
        fetch again from storage (the cache lost or held a damaged copy)."""
        if not groups:
            return {}
        cache = self.cache if via_cache else None
        held = cache.held(groups) if cache is not None else set()
        cached = [md5 for md5 in groups if md5 in held]
        outcomes: list[_Placed] = []  # appended from several threads (list.append is atomic)
        chunk = max(1, -(-len(cached) // (self.workers * 4)))
        jobs = [pool.submit(self._place_cached, [(md5, groups[md5]) for md5 in cached[i : i + chunk]], outcomes.append,
                            records, names) for i in range(0, len(cached), chunk)]  # fmt: skip
        fetch = {md5: targets for md5, targets in groups.items() if md5 not in held} if held else groups
        self._download(fetch, outcomes, records, failures, names)
        for job in jobs:
            job.result()
        total = _Placed()
        for outcome in outcomes:
            total.add(outcome)
        result.placed += total.placed
        result.from_cache += total.from_cache
        result.cache_damaged += total.damaged
        result.downloaded += total.downloaded
        result.bytes_downloaded += total.downloaded_bytes
        failures.extend(total.failures)
        again: dict[str, list[_Target]] = {}
        for target in total.again:
            again.setdefault(target.md5, []).append(target)
        return again

    def _download(
        self, groups: dict[str, list[_Target]], outcomes: list[_Placed], records: list[_Record],
        failures: list[_Failure], names: UnnamedFiles | None,
    ) -> None:  # fmt: skip
        """Fetch every group's content once, each placed as soon as it arrives (while the rest
        still come): as a file without a name where the destination's filesystem and the backend
        can (``_download_unnamed``), else under a temporary name beside its first destination.
        A large one from a local store is split over processes (``_download_in_processes``)."""
        if self.processes > 1 and len(groups) >= max(2, self.split_from) and self.storage.splits_over_processes:
            groups = self._download_in_processes(groups, min(self.processes, len(groups)), outcomes, records,
                                                 failures, None if names is None else names.decided())
        if names is not None and groups:
            groups = self._download_unnamed(groups, names, outcomes, records, failures)
        self._download_named(groups, outcomes, records, failures, names)

    def _download_in_processes(
        self, groups: dict[str, list[_Target]], count: int, outcomes: list[_Placed], records: list[_Record],
        failures: list[_Failure], unnamed: dict[int, bool] | None,
    ) -> dict[str, list[_Target]]:  # fmt: skip
        """Fetch and place ``groups`` in ``count`` worker processes (``node/sync_worker.py``), a
        share of the contents each, as this process would (the same code, the same cache; files
        without a name where this process found they can be: ``unnamed``, None for never); their
        progress comes back as they go, then their outcomes and MD5 records. A worker that ends
        without an answer fails its share (the node's fault, not the task's). Anything raised here
        (a stop requested through the progress) ends every worker first: each fails its next
        report, cleans up as a failed download does, and ends (killed after ``WORKER_GRACE``
        seconds). Returns the groups left to do here: all of them when no worker could start."""
        progress = self.progress or NullProgress()
        shares: list[dict[str, list[_Target]]] = [{} for _ in range(count)]
        for i, (md5, targets) in enumerate(groups.items()):
            shares[i % count][md5] = targets
        workers: dict[Connection, tuple[subprocess.Popen, dict[str, list[_Target]]]] = {}
        try:
            try:
                for share in shares:
                    conn, process = _start_worker()
                    workers[conn] = (process, share)
            except OSError as exc:  # no process to be had (limits, memory): this one does it all
                log.warning("input sync: cannot start worker processes (%s); syncing in this one", exc)
                return groups  # (those started get no share: they end at once)
            progress.start(len(groups), sum(targets[0].size for targets in groups.values()))
            for conn, (_, share) in workers.items():
                try:
                    conn.send((self.storage, self.cache, share, unnamed))
                except OSError:
                    pass  # it is gone already: its answer below is the end of the pipe
            pending = dict(workers)
            while pending:
                for conn in wait_for_any(list(pending)):
                    process, share = pending[conn]
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):  # it died (killed, out of memory) before it answered
                        code = process.wait()
                        how = f"was killed by signal {-code}" if code < 0 else f"ended with exit code {code}"
                        message = ("lost", CioError(f"an input sync worker process {how} before it finished (out of "
                                                    "memory?); its inputs were not all placed", code="sync_worker_died"))
                    except Exception as exc:  # noqa: BLE001  (an answer that does not unpickle here)
                        message = ("lost", CioError(f"an input sync worker's answer could not be read "
                                                    f"({type(exc).__name__}: {exc}); its inputs were not all placed",
                                                    code="place_failed"))  # fmt: skip
                    if message[0] == "moved":
                        progress.advance(message[1])
                        for key in message[2]:
                            progress.file_done(key)
                        continue
                    del pending[conn]
                    if message[0] == "done":
                        outcomes.extend(message[1])
                        records.extend(message[2])
                        failures.extend(message[3])
                    elif message[0] == "lost":  # the node's doing, none of the store's
                        failures.extend(_Failure(targets, None, message[1]) for targets in share.values())
                    else:  # the whole share failed (its store or cache would not open)
                        failures.extend(_Failure(targets, hashstore_key(md5), message[1]) for md5, targets in share.items())
        finally:
            for conn in workers:
                conn.close()  # a worker still at work fails its next report, cleans up and ends
            for process, _ in workers.values():
                try:
                    process.wait(self.WORKER_GRACE)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        return {}

    def _download_unnamed(
        self, groups: dict[str, list[_Target]], names: UnnamedFiles, outcomes: list[_Placed], records: list[_Record],
        failures: list[_Failure],
    ) -> dict[str, list[_Target]]:  # fmt: skip
        """Each content written to a file without a name in its first destination's directory and
        linked into the cache and into place once verified: no temporary name, no rename. Returns
        the groups left for ``_download_named`` (filesystems that cannot, or a backend that cannot)."""
        unnamed: dict[str, list[_Target]] = {}
        rest: dict[str, list[_Target]] = {}
        for md5, targets in groups.items():
            (unnamed if names.usable_in(targets[0].path.rpartition("/")[0] or "/") else rest)[md5] = targets
        if not unnamed:
            return rest
        by_key = {hashstore_key(md5): md5 for md5 in unnamed}
        pending = set(unnamed)
        lock = threading.Lock()

        def place(item: DownloadItem, fd: int) -> None:
            md5 = by_key[item.key]
            with lock:
                if md5 not in pending:
                    return
                pending.discard(md5)
            outcomes.append(self._place_download(unnamed[md5], records, names, fd=fd))

        items = _DownloadItems(list(by_key.items()), {md5: targets[0].path for md5, targets in unnamed.items()}, unnamed)
        errors: dict[str, BaseException] = {}
        try:
            if not self.storage.download_unnamed(items, place, self.progress or NullProgress()):
                return groups
        except TransferError as exc:
            errors = {f.key: f.error for f in exc.failures}
        except Exception as exc:  # the whole batch failed (credentials, bucket, network)
            errors = {key: exc for key in by_key}
        with lock:
            for key, md5 in by_key.items():
                if md5 in pending:
                    pending.discard(md5)
                    error = errors.get(key) or StorageError("the store reported it fetched but never handed it over")
                    failures.append(_Failure(unnamed[md5], key, error))
        return rest

    def _download_named(
        self, groups: dict[str, list[_Target]], outcomes: list[_Placed], records: list[_Record],
        failures: list[_Failure], names: UnnamedFiles | None,
    ) -> None:  # fmt: skip
        """Fetch every group's content in one batch, each to a temporary name beside its first
        destination, placing each as soon as the backend reports it (the rest after the batch,
        for a backend that did not say)."""
        if not groups:
            return
        by_key = {hashstore_key(md5): md5 for md5 in groups}
        temps = {md5: temp_sibling_str(targets[0].path) for md5, targets in groups.items()}
        pending = set(groups)
        lock = threading.Lock()

        def arrived(key: str) -> None:
            md5 = by_key.get(key)
            with lock:
                if md5 not in pending:
                    return
                pending.discard(md5)
            try:
                outcomes.append(self._place_download(groups[md5], records, names, temps[md5]))
            except BaseException as exc:  # never into the backend's batch: it would count as its failure
                remove_quietly(temps[md5])
                outcomes.append(_Placed(failures=[_Failure(groups[md5], None, exc)]))

        items = _DownloadItems(list(by_key.items()), temps, groups)
        errors: dict[str, BaseException] = {}
        try:
            self.storage.download(items, _PlaceOnArrival(self.progress or NullProgress(), arrived))
        except TransferError as exc:
            errors = {f.key: f.error for f in exc.failures}
        except Exception as exc:  # the whole batch failed (credentials, bucket, network)
            errors = {key: exc for key in by_key}
        for key, md5 in by_key.items():
            if md5 not in pending:
                continue
            error = errors.get(key)
            if error is None:
                arrived(key)
            else:
                pending.discard(md5)
                remove_quietly(temps[md5])
                failures.append(_Failure(groups[md5], key, error))

    def _place_download(
        self, targets: list[_Target], records: list[_Record], names: UnnamedFiles | None, temp: str = "", fd: int = -1
    ) -> _Placed:
        """A verified download becomes the first destination (the cache links it first); the
        other destinations of the same content copy it. The download is at ``temp``, renamed into
        place, or (``fd``) a file without a name, linked into place by ``names``."""
        outcome = _Placed()
        first = targets[0]
        try:
            st = os.stat(temp) if fd < 0 else os.fstat(fd)
            outcome.downloaded, outcome.downloaded_bytes = 1, st.st_size
            _check_size(first, st.st_size)
            if stat.S_IMODE(st.st_mode) != first.mode:
                os.chmod(temp, first.mode) if fd < 0 else os.fchmod(fd, first.mode)
            if self.cache is not None:
                shareable = first.mode & 0o444 == 0o444
                try:  # linked before placing: the placed file needs no further change, nor stat after it
                    if fd < 0 or names is None:
                        self.cache.adopt_link(first.md5, temp, shareable=shareable)
                    else:
                        self.cache.adopt_link(first.md5, names.path_of(fd), shareable=shareable, link=partial(names.link, fd))
                except OSError as exc:  # the input is placed all the same; only the cache misses it
                    log.warning("content cache: cannot adopt %s: %s", first.path, exc)
            if fd < 0 or names is None:
                os.replace(temp, first.path)
                _note(records, first)
            else:
                _link_into_place(names, fd, first.path)
                records.append((first.path, *FileStamp.row_of(os.fstat(fd)), first.md5))
        except Exception as exc:
            if fd < 0:
                remove_quietly(temp)
            outcome.failures.append(_Failure(targets, hashstore_key(first.md5) if _is_storage(exc) else None, exc))
            return outcome
        outcome.placed += 1
        self._place_rest(targets, first.path, outcome, records, names)
        return outcome

    def _place_cached(
        self, groups: list[tuple[str, list[_Target]]], done: Callable[[_Placed], None], records: list[_Record],
        names: UnnamedFiles | None,
    ) -> None:  # fmt: skip
        assert self.cache is not None
        for md5, targets in groups:
            outcome = _Placed()
            first = targets[0]
            try:
                self._place(first, partial(self.cache.copy_out_fd, md5), records, names)
                outcome.placed = 1
                self._place_rest(targets, first.path, outcome, records, names)
            except DamagedObject:
                outcome.damaged = 1
                outcome.again = list(targets)
            except _Vanished:
                outcome.again = list(targets)
            except Exception as exc:
                outcome.failures.append(_Failure(targets, hashstore_key(md5) if _is_storage(exc) else None, exc))
            outcome.from_cache = outcome.placed
            done(outcome)

    def _place_rest(
        self, targets: list[_Target], source: str, outcome: _Placed, records: list[_Record], names: UnnamedFiles | None
    ) -> None:
        """Copy the placed first destination ``source`` to the others of its content."""
        for target in targets[1:]:
            try:
                self._place(target, partial(_copy_into, source), records, names)
                outcome.placed += 1
            except Exception as exc:
                outcome.failures.append(_Failure([target], hashstore_key(target.md5) if _is_storage(exc) else None, exc))

    def _place(self, target: _Target, fill: Callable[[int], bool], records: list[_Record], names: UnnamedFiles | None) -> None:
        """``fill`` an empty file (False: nothing to fill it with) and put it at ``target``: a
        file without a name linked into place where the filesystem can, else a temporary name
        renamed into place."""
        directory = target.path.rpartition("/")[0] or "/"
        temp = None if names is not None and names.usable_in(directory) else temp_sibling_str(target.path)
        out = create_unnamed(directory) if temp is None else os.open(temp, _NEW_FILE, 0o666)
        try:
            if not fill(out):
                raise _Vanished()
            st = os.fstat(out)
            _check_size(target, st.st_size)
            if stat.S_IMODE(st.st_mode) != target.mode:
                os.fchmod(out, target.mode)
            if temp is None:
                assert names is not None
                _link_into_place(names, out, target.path)
            else:
                os.replace(temp, target.path)
            records.append((target.path, *FileStamp.row_of(os.fstat(out)), target.md5))
        except BaseException:
            if temp is not None:
                remove_quietly(temp)
            raise
        finally:
            os.close(out)

    def _evict(self) -> None:
        assert self.cache is not None
        try:
            self.cache.evict_to_budget()
        except OSError as exc:
            log.warning("content cache eviction failed: %s", exc)


def _refuse_size_or_mode(entry: UploadFile) -> None:
    name = f"destination {entry.destination!r}"
    size, mode = entry.size, entry.mode
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise DocumentError(name, f"size {size!r} is not a whole number of bytes")
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o177777:
        raise DocumentError(name, f"mode {mode!r} is not a file mode")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        raise DocumentError(name, f"mode {oct(mode)} is not a regular file's mode")
    raise AssertionError(f"{name}: size {size!r} and mode {mode!r} are fine")


def _fields_fine(files: Sequence[UploadFile]) -> bool:
    """Whether every entry's MD5 text, size and mode would pass ``InputSync._target``'s checks,
    over the whole manifest at once (loops in C: one regular expression, sets of types)."""
    sizes = list(map(_SIZE, files))
    modes = list(map(_MODE, files))
    return (
        all_canonical_md5_b64(list(map(_MD5, files)))
        and set(map(type, sizes)) <= {int}
        and (not sizes or min(sizes) >= 0)
        and set(map(type, modes)) <= {int}
        and {mode >> 12 for mode in set(modes)} <= {0, 8}
    )


def _same_place(entry: UploadFile, other: UploadFile, path: str) -> None:
    """Two entries for one place must agree on everything."""
    for what, mine, theirs in (("MD5", entry.md5, other.md5), ("size", entry.size, other.size),
                               ("mode", oct(entry.mode & 0o777), oct(other.mode & 0o777))):  # fmt: skip
        if mine != theirs:
            raise DocumentError(
                f"destination {entry.destination!r}",
                f"goes to {path} like {other.destination!r} but with a different {what} ({mine} vs {theirs})",
            )


def _check_file(entry: UploadFile, path: str, st: os.stat_result, real_root: str) -> None:
    """Refuse what is at a destination if we must not replace it: a directory, or a symbolic
    link that leads outside the root."""
    if stat.S_ISDIR(st.st_mode):
        raise PathError(f"destination {entry.destination!r}: {path} is a directory; refusing to replace it with a file")
    if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(path)
        if not _within(real, real_root):
            raise PathError(
                f"destination {entry.destination!r}: {path} is a symbolic link to {real}, outside {real_root}; "
                "refusing to replace it"
            )


def _lstat_checked(entry: UploadFile, path: str, real_root: str) -> os.stat_result | None:
    """``path``'s lstat (None: nothing there), refused by ``_check_file`` if we must not replace it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    _check_file(entry, path, st, real_root)
    return st


def _real_root(root: str, roots: dict[str, str]) -> str:
    real = roots.get(root)
    if real is None:
        real = roots[root] = os.path.realpath(root)
    return real


def _check_size(target: _Target, size: int) -> None:
    if size != target.size:
        raise StorageError(f"the content has {size} bytes but the manifest says {target.size}", code="size_mismatch")


class _Mapper:
    """A destination's mapped path, placement root and mapped directory (``node_path``,
    ``PathMap.apply``, ``_placement_root``), worked out once per directory of the manifest:
    ``dir/name``, where ``name`` is one plain component, maps to the mapped form of ``dir`` plus
    ``/name``, unless a rule's source lies below ``dir`` (it could name that very file): then
    each is worked out. ``InputSync._map`` reads ``dirs`` itself for the common case."""

    def __init__(self, path_map: PathMap) -> None:
        self.path_map = path_map
        self.sources = [source.rstrip("/") for source, _ in path_map.rules]
        # artist directory -> (mapped directory + "/", root, mapped directory), or None: each entry worked out
        self.dirs: dict[str, tuple[str, str, str] | None] = {}

    def __call__(self, destination: str) -> tuple[str, str, str]:
        head, _, name = destination.rpartition("/")
        plain = name not in _NOT_PLAIN and "\\" not in name and "\x00" not in name
        known = self.dirs.get(head) if plain else None
        if known is not None:
            return known[0] + name, known[1], known[2]
        node = node_path(destination, what="destination")
        path, root = self.path_map.apply(node), _placement_root(self.path_map, node)
        mapped_dir, _, mapped_name = path.rpartition("/")
        if plain and head not in self.dirs:
            node_dir = node.rpartition("/")[0]
            below = node_dir + "/"
            same = mapped_name == name and node.endswith("/" + name) and not any(s.startswith(below) for s in self.sources)
            self.dirs[head] = (mapped_dir + "/", root, mapped_dir or "/") if same and node_dir else None
        return path, root, mapped_dir or "/"


def _placement_root(path_map: PathMap, node: str) -> str:
    """The directory a node path's mapped form must stay inside: the target of the rule that
    maps it (same matching as PathMap.apply), else the map's root, else ``/``."""
    for source, target in path_map.rules:  # none for a rooted map
        if node == source or node.startswith(source.rstrip("/") + "/"):
            return posixpath.normpath(target)
    return path_map.root or "/"


def _within(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def _note(records: list[_Record], target: _Target) -> None:
    """Record ``target``, just placed or fixed, with its stat (one gone already is hashed next time)."""
    try:
        records.append((target.path, *FileStamp.row_of(os.stat(target.path)), target.md5))
    except OSError:
        pass


def _start_worker() -> tuple[Connection, subprocess.Popen]:
    """A sync worker process (``node/sync_worker.py``) running this very code, and our end of its
    socket pair."""
    if not sys.executable:
        raise OSError("no Python executable to start a sync worker with (an embedded interpreter)")
    ours, theirs = socket.socketpair()
    try:
        here = str(Path(__file__).resolve().parents[2])  # the directory that holds cio_worker
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": here + (os.pathsep + path if path else "")}
        process = subprocess.Popen([sys.executable, "-m", "cio_worker.node.sync_worker", str(theirs.fileno())],
                                   pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env, close_fds=True)  # fmt: skip
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return Connection(ours.detach()), process


def _link_into_place(names: UnnamedFiles, fd: int, path: str) -> None:
    """Name the unnamed file ``fd`` ``path``: a link where nothing is there, else a link to a
    temporary sibling renamed over what is there (a file, or a link we replace, never follow)."""
    try:
        names.link(fd, path)
        return
    except FileExistsError:
        pass
    temp = temp_sibling_str(path)
    remove_quietly(temp)  # left by a process that died with this pid and thread
    names.link(fd, temp)
    try:
        os.replace(temp, path)
    except BaseException:
        remove_quietly(temp)
        raise


def _copy_into(source: str, out: int) -> bool:
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        copy_fd(src, out, os.fstat(src).st_size)
    finally:
        os.close(src)
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
