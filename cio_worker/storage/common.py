"""Pieces every backend shares: batch execution with a stall detector, streaming MD5 writes,
and verify-then-refetch-once."""

from __future__ import annotations

import bisect
import hashlib
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence, TypeVar

from ..errors import ChecksumError, StorageError
from ..hashing import b64_from_digest
from .base import ItemFailure, NullProgress, Progress, TransferError

T = TypeVar("T")
COPY_BLOCK = 1024 * 1024


@dataclass
class Activity:
    """Thread-safe 'last time something moved' for the stall detector, and a progress relay."""

    progress: Progress = field(default_factory=NullProgress)
    clock: Callable[[], float] = time.monotonic
    last: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.last = self.clock()

    def bytes_moved(self, nbytes: int) -> None:
        with self._lock:
            self.last = self.clock()
        self.progress.advance(nbytes)

    def file_done(self, key: str) -> None:
        with self._lock:
            self.last = self.clock()
        self.progress.file_done(key)

    def idle_for(self) -> float:
        with self._lock:
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

    If nothing moves (no byte, no file finished) for ``stall_seconds``, the batch fails with a
    StallError for the items still outstanding; the stuck threads are left to their own socket
    timeouts, which the backends set.
    """
    failures: list[ItemFailure] = []
    if not items:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(items))), thread_name_prefix=action)
    try:
        futures: dict[Future[None], T] = {pool.submit(work, item): item for item in items}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=min(1.0, stall_seconds), return_when=FIRST_COMPLETED)
            for future in done:
                error = future.exception()
                if error is not None:
                    failures.append(ItemFailure(key_of(futures[future]), error))
            if pending and not done and activity.idle_for() >= stall_seconds:
                for future in pending:
                    future.cancel()
                    failures.append(
                        ItemFailure(
                            key_of(futures[future]),
                            StallError(f"no progress for {stall_seconds:.0f} s; the store stopped answering"),
                        )
                    )
                break
    finally:
        pool.shutdown(wait=not failures, cancel_futures=True)
    if failures:
        failures.sort(key=lambda f: f.key)
        raise TransferError(action, failures)


def copy_stream(source: BinaryIO, target: BinaryIO, activity: Activity | None = None, block: int = COPY_BLOCK) -> str:
    """Copy a stream, returning the base64 MD5 of what was written."""
    digest = hashlib.md5()
    while chunk := source.read(block):
        digest.update(chunk)
        target.write(chunk)
        if activity is not None:
            activity.bytes_moved(len(chunk))
    return b64_from_digest(digest.digest())


def fetch_verified(key: str, dest: Path, expected_md5: str | None, fetch: Callable[[Path], str]) -> None:
    """Call ``fetch(dest) -> md5`` and check it; re-fetch once on a mismatch, then fail.

    Whatever fails leaves nothing at ``dest``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    got = None
    for _ in range(2):
        try:
            got = fetch(dest)
        except BaseException:
            remove_quietly(dest)
            raise
        if expected_md5 is None or got == expected_md5:
            return
    remove_quietly(dest)
    raise ChecksumError(
        f"content has MD5 {got} but the manifest says {expected_md5} (fetched twice); "
        "the stored object is corrupt or the manifest is stale"
    )


def remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def temp_sibling(path: Path) -> Path:
    """A hidden temporary name beside ``path`` for write-then-rename."""
    return path.with_name(f".{path.name}.part-{os.getpid()}-{threading.get_ident()}")


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


class OffsetWriter:
    """A ``write``-only file object that puts what it is given at ``offset`` onward in ``fd``."""

    def __init__(self, fd: int, offset: int, activity: Activity, cancelled: threading.Event) -> None:
        self.fd = fd
        self.offset = offset
        self.written = 0
        self.activity = activity
        self.cancelled = cancelled

    def write(self, data: bytes) -> int:
        if self.cancelled.is_set():
            raise StorageError("another part of this object failed", code="cancelled")
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, self.offset + self.written)
            view = view[n:]
            self.written += n
        self.activity.bytes_moved(len(data))
        return len(data)


def fetch_parts(
    dest: Path,
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
    each part is retried on its own with ``retry(fn, what=...)``. The MD5 of the whole is computed
    by reading the parts back in order as they complete, so hashing overlaps the download and
    memory stays bounded. Returns the base64 MD5.
    """
    ranges = [(start, min(start + part_size, size) - 1) for start in range(0, size, part_size)]
    cancelled = threading.Event()
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def part(first: int, last: int) -> None:
        def attempt() -> None:
            writer = OffsetWriter(fd, first, activity, cancelled)
            fetch_part(first, last, writer)
            if writer.written != last - first + 1:
                raise ShortRead(f"bytes {first}-{last}: got {writer.written} of {last - first + 1} bytes")

        retry(attempt, what=f"bytes {first}-{last} of {dest.name}")

    try:
        os.ftruncate(fd, size)
        futures = [executor.submit(part, first, last) for first, last in ranges]
        digest = hashlib.md5()
        try:
            for (first, last), future in zip(ranges, futures):
                future.result()
                offset = first
                while offset <= last:
                    block = os.pread(fd, min(COPY_BLOCK, last + 1 - offset), offset)
                    if not block:
                        raise ShortRead(f"{dest} ended at byte {offset}")
                    digest.update(block)
                    offset += len(block)
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
