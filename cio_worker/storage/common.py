"""Pieces every backend shares: key checks, batch execution with a stall detector and progress,
streaming MD5 writes, verify-then-refetch-once, and reading HTTP bodies (s3:// and gs://)."""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import os
import threading
import time
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

from cio_worker.errors import ChecksumError, StorageError
from cio_worker.job.hashing import b64_from_digest
from cio_worker.storage.base import DownloadItem, ItemFailure, NullProgress, Progress, TransferError, UploadItem

T = TypeVar("T")
D = TypeVar("D", str, Path)
Item = TypeVar("Item", DownloadItem, UploadItem)
COPY_BLOCK = 1024 * 1024


def clean_key(key: str) -> list[str]:
    """The parts of a relative object key; StorageError for an absolute one or one with empty or '..' parts."""
    parts = key.split("/")
    if key.startswith("/") or ".." in parts or "" in parts:
        raise StorageError(f"object key {key!r} is not a clean relative key", code="bad_key")
    return parts


@dataclass
class Activity:
    """Thread-safe 'last time something moved' for the stall detector, and a progress relay.
    ``last`` is only ever replaced whole (one attribute store, atomic): no lock per block or file."""

    progress: Progress = field(default_factory=NullProgress)
    clock: Callable[[], float] = time.monotonic
    last: float = 0.0

    def __post_init__(self) -> None:
        self.last = self.clock()

    def bytes_moved(self, nbytes: int) -> None:
        self.last = self.clock()
        self.progress.advance(nbytes)

    def file_done(self, key: str) -> None:
        self.last = self.clock()
        self.progress.file_done(key)

    def idle_for(self) -> float:
        return self.clock() - self.last


class StallError(StorageError):
    code = "stalled"


def run_batch(
    action: str,
    items: Sequence[T],
    key_of: Callable[[T], str],
    work: Callable[[T], None],
    *,
    concurrency: int,
    activity: Activity,
    stall_seconds: float,
) -> None:
    """Run ``work`` on every item with up to ``concurrency`` threads; collect failures.

    Each thread takes the next item from the batch itself: no future, queue or hand-off per item,
    and the calling thread sleeps until the end (a batch of 50,000 small files would otherwise
    wake it, and trade the GIL, for every one). If nothing moves (no byte, no file finished) for
    ``stall_seconds``, the batch fails with a StallError for the items in flight and those not
    started; the stuck threads are left to their own socket timeouts, which the backends set.
    """
    if not items:
        return
    workers = max(1, min(concurrency, len(items)))
    lock = threading.Lock()
    waiting = iter(items)
    failures: list[ItemFailure] = []
    in_flight: dict[int, T] = {}  # thread ident -> its item
    stopped = False  # under lock: stall or interruption, take no more items
    left = threading.Semaphore(0)  # released by each thread as it ends

    def worker() -> None:
        me = threading.get_ident()
        try:
            while True:
                with lock:
                    if stopped:
                        return
                    item = next(waiting, _END)
                    if item is _END:
                        return
                    in_flight[me] = item
                try:
                    work(item)
                except BaseException as exc:  # noqa: BLE001 - every failure belongs to its item
                    with lock:
                        if in_flight.pop(me, _END) is not _END:
                            failures.append(ItemFailure(key_of(item), exc if isinstance(exc, Exception) else StorageError(repr(exc))))
                    continue
                with lock:
                    in_flight.pop(me, None)
        finally:
            left.release()

    threads = [threading.Thread(target=worker, name=f"{action}_{i}", daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    ended = 0
    try:
        while ended < workers:
            if left.acquire(timeout=min(1.0, stall_seconds)):
                ended += 1
                continue
            if activity.idle_for() < stall_seconds:
                continue
            stalled = f"no progress for {stall_seconds:.0f} s; the store stopped answering"
            with lock:
                stopped = True
                failures.extend(ItemFailure(key_of(item), StallError(stalled)) for item in in_flight.values())
                in_flight.clear()  # a stuck thread that ends later adds nothing
                failures.extend(ItemFailure(key_of(item), StallError(f"not started: {stalled}")) for item in waiting)
            break
    except BaseException:  # interrupted: the items in flight finish, no other starts
        with lock:
            stopped = True
        for thread in threads:
            thread.join()
        raise
    if failures:
        failures.sort(key=lambda f: f.key)
        raise TransferError(action, failures)


_END: object = object()


def transfer(
    action: str,
    items: Sequence[Item],
    work: Callable[[Item], None],
    *,
    activity: Activity,
    concurrency: int,
    stall_seconds: float,
) -> None:
    """One download or upload batch: tell the progress what is coming, run ``work`` on every item
    (``run_batch``), and report each item done once its work returned."""
    activity.progress.start(len(items), sum(item.size or 0 for item in items))

    def one(item: Item) -> None:
        work(item)
        activity.file_done(item.key)

    run_batch(action, items, lambda item: item.key, one, concurrency=concurrency, activity=activity,
              stall_seconds=stall_seconds)  # fmt: skip


_buffers = threading.local()


def _buffer(size: int) -> bytearray:
    """This thread's reusable copy buffer (no allocation, no zeroing per file or block)."""
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None or len(buffer) != size:
        buffer = _buffers.buffer = bytearray(size)
    return buffer


def copy_fd_hashed(source: int, target: int, activity: Activity | None = None, size: int | None = None) -> str:
    """Copy from descriptor ``source`` to ``target`` (current offsets, to the end of the source,
    or ``size`` bytes at most: no read to find the end) through this thread's buffer, hashing in
    the same pass; the base64 MD5 of what was written. Raw descriptors: no file object, no extra
    fstat, lseek or ioctl per file."""
    digest = hashlib.md5()
    buffer = _buffer(COPY_BLOCK)
    view = memoryview(buffer)
    left = size  # None: to the end of the source
    try:
        while left != 0:
            n = os.readv(source, (buffer if left is None or left >= COPY_BLOCK else view[:left],))
            if not n:
                break
            if left is not None:
                left -= n
            chunk = view[:n]
            digest.update(chunk)
            while chunk:
                chunk = chunk[os.write(target, chunk) :]
            if activity is not None:
                activity.bytes_moved(n)
    finally:
        view.release()
    return b64_from_digest(digest.digest())


def copy_to_new_file(source: int, dest: str | os.PathLike[str], activity: Activity | None = None) -> str:
    """``copy_fd_hashed`` from ``source`` into ``dest``, created (or truncated) with mode
    0o666 & ~umask; the base64 MD5 of what was written."""
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        return copy_fd_hashed(source, out, activity)
    finally:
        os.close(out)


def copy_stream(source: BinaryIO, target: BinaryIO, activity: Activity | None = None, block: int = COPY_BLOCK) -> str:
    """Copy a stream, returning the base64 MD5 of what was written."""
    digest = hashlib.md5()
    readinto = getattr(source, "readinto", None)
    if readinto is not None and isinstance(source, io.BufferedIOBase | io.RawIOBase):
        buffer = _buffer(block)
        view = memoryview(buffer)
        try:
            while n := readinto(buffer):
                chunk = view[:n]
                digest.update(chunk)
                target.write(chunk)
                if activity is not None:
                    activity.bytes_moved(n)
        finally:
            view.release()
        return b64_from_digest(digest.digest())
    while data := source.read(block):
        digest.update(data)
        target.write(data)
        if activity is not None:
            activity.bytes_moved(len(data))
    return b64_from_digest(digest.digest())


class HashingSink:
    """Where a whole-object download writes: the file, the MD5 and the activity, as bytes arrive."""

    def __init__(self, out: BinaryIO, activity: Activity) -> None:
        self.out = out
        self.digest = hashlib.md5()
        self.activity = activity

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.digest.update(data)
        self.activity.bytes_moved(len(data))
        return len(data)

    def md5(self) -> str:
        return b64_from_digest(self.digest.digest())


def fetch_verified(key: str, dest: D, expected_md5: str | None, fetch: Callable[[D], str]) -> None:
    """Call ``fetch(dest) -> md5`` and check it; re-fetch once on a mismatch, then fail.

    ``dest``'s directory is made when the fetch finds it missing (no stat per file when it is
    there). Whatever fails leaves nothing at ``dest``.
    """
    got = None
    for _ in range(2):
        try:
            try:
                got = fetch(dest)
            except FileNotFoundError:  # its directory is missing (or was, until another thread made it)
                os.makedirs(os.path.dirname(os.fspath(dest)), exist_ok=True)
                got = fetch(dest)
        except BaseException:
            remove_quietly(dest)
            raise
        if expected_md5 is None or got == expected_md5:
            return
    remove_quietly(dest)
    raise corrupt_object(got, expected_md5)


def corrupt_object(got: str | None, expected_md5: str | None) -> ChecksumError:
    return ChecksumError(
        f"content has MD5 {got} but the manifest says {expected_md5} (fetched twice); "
        "the stored object is corrupt or the manifest is stale"
    )


def create_unnamed(directory: str) -> int:
    """A new, empty, read-write file without a name in ``directory`` (``O_TMPFILE``; mode 0o666
    & ~umask): it gets a name only through ``UnnamedFiles.link`` and vanishes if it gets none."""
    return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)


class UnnamedFiles:
    """Naming files made by ``create_unnamed`` once they are whole (``linkat`` through
    ``/proc/self/fd``; Python's ``os.link`` only follows that link given a directory descriptor).
    ``usable_in`` tells, per filesystem, whether the kernel and the filesystem can (tried once
    each: make one, name it, remove the name). ``open()`` is None where /proc is not mounted.
    Only in the process that opened it (the descriptor names this process's /proc entry).
    ``devices``: what another process found (``decided``), so that it is not probed again."""

    def __init__(self, fds: int, devices: dict[int, bool] | None = None) -> None:
        self._fds = fds
        self._pid = os.getpid()
        self._devices: dict[int, bool] = dict(devices or {})
        self._dirs: dict[str, bool] = {}

    @classmethod
    def open(cls, devices: dict[int, bool] | None = None) -> UnnamedFiles | None:
        try:
            return cls(os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), devices)
        except OSError:
            return None

    def decided(self) -> dict[int, bool]:
        """Each filesystem (device number) probed so far, and whether it can."""
        return dict(self._devices)

    def close(self) -> None:
        if self._fds >= 0:
            os.close(self._fds)
            self._fds = -1

    def link(self, fd: int, path: str) -> None:
        """Give the open unnamed (or named) file ``fd`` the name ``path``; FileExistsError if taken."""
        os.link(str(fd), path, src_dir_fd=self._fds, follow_symlinks=True)

    def path_of(self, fd: int) -> str:
        """A path that opens ``fd``'s file (for copying it by name)."""
        return f"/proc/self/fd/{fd}"

    def usable_in(self, directory: str) -> bool:
        """Whether files made by ``create_unnamed`` in ``directory`` can be named (False where it
        cannot be stat'ed); remembered per directory and per filesystem."""
        if os.getpid() != self._pid:  # a forked child: the descriptor names the parent's /proc entry
            return False
        known = self._dirs.get(directory)
        if known is not None:
            return known
        try:
            device = os.stat(directory).st_dev
        except OSError:
            return False
        known = self._devices.get(device)
        if known is None:
            known = self._devices[device] = self._probe(directory)
        self._dirs[directory] = known
        return known

    def _probe(self, directory: str) -> bool:
        try:
            fd = create_unnamed(directory)
        except OSError:  # EOPNOTSUPP (filesystem), EISDIR (kernel before 3.11), EACCES, ...
            return False
        try:
            name = temp_sibling_str(f"{directory.rstrip('/')}/unnamed-probe")
            self.link(fd, name)
            os.unlink(name)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


def remove_quietly(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# Numbers the temporary names this process makes: a name is never made twice, so a transfer
# abandoned after a stall (its thread left to its socket's timeout) cannot write to or remove the
# temporary file of a later attempt at the same destination. (A name per thread could: the next
# attempt, run from the same thread, made the same name.)
_temp_serial = itertools.count()


def temp_sibling(path: Path) -> Path:
    """A hidden temporary name beside ``path`` for write-then-rename, new at every call."""
    return path.with_name(f".{path.name}.part-{os.getpid()}-{next(_temp_serial)}")


def temp_sibling_str(path: str) -> str:
    """``temp_sibling`` of a path held as a string (no Path object per file)."""
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.part-{os.getpid()}-{next(_temp_serial)}"


def default_concurrency(sizes: Iterable[int | None], cpu_count: int | None = None) -> int:
    """Many small objects: many parallel requests (latency bound); large ones: fewer streams."""
    sizes = [s or 0 for s in sizes]
    if not sizes:
        return 1
    cpus = cpu_count or os.cpu_count() or 2
    average = sum(sizes) / len(sizes)
    if average < 1024 * 1024:
        return min(64, max(8, cpus * 16))
    if average < 64 * 1024 * 1024:
        return min(32, max(4, cpus * 4))
    return max(4, cpus * 2)


# --- Ranged parts of one large object, and "which of these keys exist" (shared by s3:// and gs://)


class ShortRead(ConnectionError):
    """A response body that ended before the bytes it promised: transient, worth a retry."""


def content_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def drain(
    read: Callable[[int], bytes],
    write: Callable[[bytes], object],
    expected: int | None,
    *,
    close: Callable[[], None],
    release: Callable[[], None],
) -> int:
    """Copy an HTTP response body, ``read`` in 1 MiB blocks, to ``write``; check it against the
    ``expected`` length. A body that fails or ends short is ``close``d (a half-read connection never
    goes back to the pool); a whole one is ``release``d to it. Returns the bytes copied."""
    got = 0
    try:
        while chunk := read(COPY_BLOCK):
            write(chunk)
            got += len(chunk)
    except BaseException:
        close()
        raise
    if expected is not None and got != expected:
        close()
        raise ShortRead(f"the body ended after {got} of {expected} bytes")
    release()
    return got


def check_range_answer(status: int, first: int | None, last: int | None, length: int | None, close: Callable[[], None]) -> None:
    """A ranged GET answered with the whole object (200 and more than the range): ``close`` the
    response and fail with ``no_ranges`` (not worth a retry)."""
    if first is None or last is None or status == 206 or (first == 0 and length == last + 1):
        return
    close()
    raise StorageError(
        f"the store answered a GET of bytes {first}-{last} with the whole object (status {status}): "
        "it does not support ranged GETs; set a large_threshold above the object sizes",
        code="no_ranges",
    )


MIN_AUTO_PART = 8 * 1024 * 1024
PART_ROUNDING = 1024 * 1024


def part_size_for(size: int, large_objects: int, part_size: int, streams: int, *, fixed: bool = False) -> int:
    """Bytes per ranged part of one of ``large_objects`` large objects fetched in one batch.

    ``fixed``: ``part_size`` as configured. Otherwise each object is split only as far as it takes
    to keep ``streams`` parallel requests busy across the batch, and no part is smaller than
    ``part_size``: the same parallelism with the fewest requests (each request has a price, and
    some servers' cost per ranged GET grows with the object's size).
    """
    if fixed or size <= 0:
        return part_size
    parts = max(1, -(-max(1, streams) // max(1, large_objects)))
    each = -(-size // parts)
    each = -(-each // PART_ROUNDING) * PART_ROUNDING
    return max(part_size, each)


class OffsetWriter:
    """A ``write``-only file object that puts what it is given at ``offset`` onward in ``fd``,
    never past ``limit`` (the last byte of its part, when given)."""

    def __init__(
        self,
        fd: int,
        offset: int,
        activity: Activity,
        cancelled: threading.Event,
        limit: int | None = None,
        on_write: Callable[[int], None] | None = None,
    ) -> None:
        self.fd = fd
        self.offset = offset
        self.written = 0
        self.activity = activity
        self.cancelled = cancelled
        self.limit = limit
        self.on_write = on_write

    def write(self, data: bytes) -> int:
        if self.cancelled.is_set():
            raise StorageError("another part of this object failed", code="cancelled")
        if self.limit is not None and self.offset + self.written + len(data) > self.limit + 1:
            raise StorageError(
                f"the store sent more than the bytes asked for (up to byte {self.limit}): it ignored the Range",
                code="no_ranges",
            )
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, self.offset + self.written)
            view = view[n:]
            self.written += n
            if self.on_write is not None:
                self.on_write(n)
        self.activity.bytes_moved(len(data))
        return len(data)


def fetch_parts(
    dest: str | Path,
    size: int,
    part_size: int,
    fetch_part: Callable[[int, int, OffsetWriter], None],
    *,
    executor: Executor,
    retry: Callable[..., object],
    activity: Activity,
) -> str:
    """Fetch ``size`` bytes in ranged parts on ``executor``, each written at its offset in ``dest``.

    ``fetch_part(first, last, writer)`` writes bytes ``first..last`` (inclusive) to ``writer``;
    each part is retried on its own with ``retry(fn, what=...)``, and a retry asks only for the
    bytes the failed attempt did not write (bytes once written are final). The MD5 of the whole is
    computed by the calling thread while the parts arrive: it reads back and hashes the file's
    longest fully written prefix as it grows, so hashing overlaps the download, ends moments after
    the last byte, and memory stays bounded. Returns the base64 MD5.
    """
    ranges = [(start, min(start + part_size, size) - 1) for start in range(0, size, part_size)]
    written = [0] * len(ranges)  # bytes of each part on disk, only ever growing
    moved = threading.Condition()
    cancelled = threading.Event()
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def advance(index: int, nbytes: int) -> None:
        with moved:
            written[index] += nbytes
            moved.notify_all()

    def part(index: int, first: int, last: int) -> None:
        def attempt() -> None:
            if first + written[index] <= last:
                writer = OffsetWriter(fd, first + written[index], activity, cancelled, limit=last,
                                      on_write=lambda n: advance(index, n))  # fmt: skip
                fetch_part(first + written[index], last, writer)
            if written[index] != last - first + 1:
                raise ShortRead(f"bytes {first}-{last}: got {written[index]} of {last - first + 1} bytes")

        retry(attempt, what=f"bytes {first}-{last} of {os.path.basename(dest)}")

    def wake(_: Future[None]) -> None:
        with moved:
            moved.notify_all()

    def frontier(index: int) -> tuple[int, int]:
        """(first part not yet complete, end of the contiguous written prefix); under ``moved``."""
        while index < len(ranges) and written[index] == ranges[index][1] - ranges[index][0] + 1:
            index += 1
        return index, (size if index == len(ranges) else ranges[index][0] + written[index])

    def failure(futures: list[Future[None]]) -> BaseException | None:
        for future in futures:
            if future.cancelled():
                return StorageError("the transfer was cancelled", code="cancelled")
            if future.done() and future.exception() is not None:
                return future.exception()
        return None

    try:
        os.ftruncate(fd, size)
        futures = [executor.submit(part, i, first, last) for i, (first, last) in enumerate(ranges)]
        for future in futures:
            future.add_done_callback(wake)
        digest = hashlib.md5()
        try:
            hashed, index = 0, 0
            while hashed < size:
                with moved:
                    while True:
                        index, end = frontier(index)
                        if end > hashed:
                            break
                        error = failure(futures)
                        if error is not None:
                            raise error
                        moved.wait(1.0)
                while hashed < end:
                    block = os.pread(fd, min(COPY_BLOCK, end - hashed), hashed)
                    if not block:
                        raise ShortRead(f"{dest} ended at byte {hashed}")
                    digest.update(block)
                    hashed += len(block)
            for future in futures:
                future.result()
        except BaseException:
            cancelled.set()
            for future in futures:
                future.cancel()
            wait(futures)  # running parts stop at their next write; keep fd open until they have
            raise
        return b64_from_digest(digest.digest())
    finally:
        os.close(fd)


def present_keys(
    names: Iterable[str],
    list_pages: Callable[[str, str], Iterator[list[str]]],
    probe: Callable[[list[str]], set[str]],
    *,
    list_min: int = 8,
) -> set[str]:
    """Which of ``names`` the store holds, listing where that is cheaper than asking one by one.

    ``list_pages(prefix, first)`` yields pages of stored names under ``prefix``, in lexicographic
    order, starting at or shortly before ``first``; ``probe(names)`` asks about each (in parallel).
    A page costs about what one probe costs, so listing goes on while every page settles at least
    one asked-for name on average (many keys, or a store not much bigger than the batch); the names
    beyond the last listed one are probed.
    """
    wanted = sorted(set(names))
    if len(wanted) < list_min:
        return probe(wanted) if wanted else set()
    wanted_set = set(wanted)
    found: set[str] = set()
    settled = 0
    pages = 0
    for page in list_pages(os.path.commonprefix(wanted), wanted[0]):
        pages += 1
        if not page:
            continue
        found.update(name for name in page if name in wanted_set)
        settled = bisect.bisect_right(wanted, page[-1])
        if settled == len(wanted) or pages > settled:
            break
    else:
        settled = len(wanted)  # listed to the end: the rest are absent
    rest = wanted[settled:]
    return found | (probe(rest) if rest else set())
