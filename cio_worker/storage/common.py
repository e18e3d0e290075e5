"""Pieces every backend shares: batch execution with a stall detector, streaming MD5 writes,
and verify-then-refetch-once."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence, TypeVar

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
