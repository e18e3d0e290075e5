"""What ``s3://`` and ``gs://`` storage share: a bucket and prefix, tuning, retries, error messages,
existence checks, and the batch download and upload loops. The backends (s3.py, gcs.py) supply the
requests through small hooks and decide what an SDK error means; this module imports no cloud SDK.

Downloads: each object is one GET streamed to disk while hashing; objects of a known size at least
``large_threshold`` come as parallel ranged GETs written at their offsets, split (unless
``part_size`` is configured) only as far as it takes to keep ``part_workers`` requests busy across
the batch, parts never under 8 MiB (see ``part_size_for``). Every request is retried on its own
(a part from where it stopped); once the batch is over, nothing retries any more.
"""

from __future__ import annotations

import abc
import hashlib
import os
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal, Sequence, TypeVar
from urllib.parse import urlparse

from cio_worker.errors import ChecksumError, CioError, StorageError
from cio_worker.job.hashing import b64_from_digest, md5_b64_of_file
from cio_worker.storage.base import DownloadItem, NullProgress, Progress, Storage, StorageOptions, UploadItem
from cio_worker.storage.common import (
    Activity,
    HashingSink,
    Item,
    OffsetWriter,
    clean_key,
    default_concurrency,
    fetch_parts,
    fetch_verified,
    part_size_for,
    present_keys,
    transfer,
)
from cio_worker.storage.retry import Retrier, RetryPolicy

T = TypeVar("T")
MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
MAX_POOL = 64  # the most parallel objects default_concurrency ever picks


@dataclass(frozen=True)
class CloudTuning:
    """Sizes, limits and timeouts resolved from StorageOptions."""

    concurrency: int  # 0: per batch, from the object sizes
    part_size: int  # the smallest ranged part; every part when ``fixed_parts``
    fixed_parts: bool  # part_size was configured: use it as it is
    large_threshold: int
    part_workers: int
    connect_timeout: float
    read_timeout: float

    @classmethod
    def from_options(cls, options: StorageOptions) -> "CloudTuning":
        extra = options.extra
        part_size = options.part_size or DEFAULT_PART_SIZE
        cpus = os.cpu_count() or 2
        return cls(
            concurrency=options.concurrency,
            part_size=part_size,
            fixed_parts=bool(options.part_size),
            large_threshold=options.large_threshold or 2 * part_size,
            part_workers=int(extra.get("part_concurrency") or options.concurrency or max(4, min(16, 4 * cpus))),
            # A read stuck longer than the stall window has failed the batch anyway: end the thread.
            connect_timeout=float(extra.get("connect_timeout") or min(10.0, options.stall_seconds)),
            read_timeout=float(extra.get("read_timeout") or options.stall_seconds),
        )

    @property
    def pool_size(self) -> int:
        """HTTP connections: every parallel object plus every parallel part."""
        return (self.concurrency or MAX_POOL) + self.part_workers

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)


@dataclass(frozen=True)
class Batch:
    """What the items of one download or upload batch share."""

    activity: Activity
    retry: Retrier  # stops retrying once the batch is over
    parts: Executor  # ranged parts and multipart parts, ``part_workers`` threads (started on first use)
    slots: threading.BoundedSemaphore  # bounds the upload parts held in memory across the batch
    concurrency: int
    large_objects: int  # objects at least large_threshold (downloads: in ranged parts)


Kind = Literal["no_bucket", "not_found", "denied", "checksum", "unavailable", "no_credentials", "failed"]


@dataclass(frozen=True)
class Diagnosis:
    """What a backend makes of an SDK or network error: its kind, and what the store said."""

    kind: Kind
    said: str = ""


class CloudStorage(Storage):
    """A bucket and prefix in an object store; the backend implements the ``_`` hooks below."""

    SCHEME: ClassVar[str]  # "s3"
    NAME: ClassVar[str]  # "S3", in messages
    URL_FORM: ClassVar[str]  # "an s3://bucket/prefix URL"
    DENIED_HINT: ClassVar[str]  # which credentials and permissions to check
    BUCKET_HINT: ClassVar[str] = ""  # more to check for a missing bucket, e.g. ", the region"

    client: Any  # the SDK client

    def __init__(
        self,
        url: str,
        options: StorageOptions | None,
        *,
        retry: RetryPolicy | None,
        is_transient: Callable[[BaseException], bool],
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != self.SCHEME or not parsed.netloc:
            raise StorageError(f"{url!r} is not {self.URL_FORM}", code="bad_storage_url")
        self.url = url
        self.bucket_name = parsed.netloc
        prefix = parsed.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.options = options or StorageOptions()
        self.tuning = CloudTuning.from_options(self.options)
        self.retry = Retrier(retry or self.options.extra.get("retry") or RetryPolicy(), is_transient)
        self._bucket_exists: bool | None = None  # None: not known (yet)

    # --- the hooks

    @abc.abstractmethod
    def _endpoint(self) -> str:
        """The API endpoint, for messages."""

    @abc.abstractmethod
    def _diagnose(self, exc: BaseException) -> Diagnosis | None:
        """What an SDK or network error means (after retries); None: not the store's error."""

    @abc.abstractmethod
    def _bucket_found(self) -> bool | None:
        """Ask whether the bucket exists (None: cannot tell, e.g. denied); with retries."""

    @abc.abstractmethod
    def _list_page(self, prefix: str, first: str, token: str | None) -> tuple[list[str], str | None]:
        """One page of names under ``prefix`` from ``first`` on (or after ``token``), and the next token."""

    @abc.abstractmethod
    def _head(self, name: str) -> bool:
        """Whether the object exists (one request)."""

    @abc.abstractmethod
    def _get(self, name: str, sink: HashingSink | OffsetWriter, first: int | None = None, last: int | None = None,
             *, verified: bool = True) -> None:  # fmt: skip
        """One GET of the object, or of its bytes ``first..last``, written to ``sink.write``.
        ``verified``: the caller checks the MD5 of the whole (else the backend may check a checksum)."""

    @abc.abstractmethod
    def _put(self, name: str, source: Path, size: int, md5: str, batch: Batch, *, checked: bool) -> None:
        """Store the file as the object, whole or not at all, with its own retries; report the bytes
        sent to ``batch.activity``. ``checked``: ``md5`` came from the caller (the file may have changed)."""

    @abc.abstractmethod
    def _read(self, name: str) -> bytes:
        """A small object whole (one request)."""

    @abc.abstractmethod
    def _write(self, name: str, data: bytes, md5: str) -> None:
        """A small object, whole (one request)."""

    # --- names and errors

    def _name(self, key: str) -> str:
        clean_key(key)
        return self.prefix + key

    def _where(self, name: str | None = None) -> str:
        return f"{self.SCHEME}://{self.bucket_name}/{name}" if name else f"{self.SCHEME}://{self.bucket_name}"

    def _no_bucket(self, action: str, name: str | None) -> StorageError:
        return StorageError(
            f"{self.NAME} bucket {self.bucket_name!r} does not exist (while trying to {action} {self._where(name)}); "
            f"check the bucket name in {self.url}{self.BUCKET_HINT} and the endpoint ({self._endpoint()})",
            code="no_bucket",
        )

    def _bucket_missing(self) -> bool:
        """Once per instance, only on the error path: is it the bucket that is missing?"""
        if self._bucket_exists is None:
            self._bucket_exists = self._bucket_found()
        return self._bucket_exists is False

    def _error(self, exc: BaseException, action: str, name: str | None = None) -> BaseException:
        """A StorageError a person can act on, for an SDK or network failure."""
        if isinstance(exc, CioError):
            return exc
        found = self._diagnose(exc)
        if found is None:
            return exc
        where, said = self._where(name), found.said
        match found.kind:
            case "no_bucket":
                return self._no_bucket(action, name)
            case "not_found":
                return StorageError(
                    f"{where} does not exist (while trying to {action}); was the job's content uploaded?", code="not_found"
                )
            case "denied":
                return StorageError(
                    f"access denied to {where} (while trying to {action}: {said}); {self.DENIED_HINT}", code="denied"
                )
            case "checksum":
                return ChecksumError(f"{where}: {said}")
            case "unavailable":
                attempts = self.retry.policy.attempts
                return StorageError(f"{action} {where} still failed after {attempts} attempts: {said}", code="unavailable")
            case "no_credentials":
                return StorageError(f"cannot authenticate to {action} {where}: {said}", code="no_credentials")
            case _:
                return StorageError(f"{action} {where} failed: {said}".rstrip())

    def _call(self, action: str, name: str | None, fn: Callable[[], T]) -> T:
        """Run one request with retries; SDK errors come out as StorageError."""
        try:
            return self.retry(fn, what=f"{action} {self._where(name)}")
        except Exception as exc:
            raise self._error(exc, action, name) from exc

    # --- exists

    def exists(self, keys: Iterable[str]) -> set[str]:
        by_name = {self._name(key): key for key in keys}
        present = present_keys(by_name, self._list_pages, self._probe)
        return {by_name[name] for name in present}

    def _list_pages(self, prefix: str, first: str) -> Iterator[list[str]]:
        token: str | None = None
        while True:
            names, token = self._call("list", prefix, lambda token=token: self._list_page(prefix, first, token))
            self._bucket_exists = True
            yield names
            if not token:
                return

    def _probe(self, names: list[str]) -> set[str]:
        def head(name: str) -> bool:
            return self._call("check", name, lambda: self._head(name))

        workers = max(1, min(len(names), self.tuning.concurrency or MAX_POOL))
        with ThreadPoolExecutor(workers, thread_name_prefix=f"{self.NAME.lower()}-head") as pool:
            found = dict(zip(names, pool.map(head, names)))
        if all(found.values()):
            self._bucket_exists = True
        elif self._bucket_missing():
            raise self._no_bucket("check keys in", None)
        return {name for name, here in found.items() if here}

    # --- batches

    def _concurrency(self, sizes: Iterable[int | None]) -> int:
        return self.tuning.concurrency or default_concurrency(sizes)

    def _large(self, size: int | None) -> bool:
        return size is not None and size >= self.tuning.large_threshold

    def _run(self, action: str, items: Sequence[Item], progress: Progress | None,
             work: Callable[[Item, str, Batch], None]) -> None:  # fmt: skip
        """Run ``work(item, object name, batch)`` on every item of a batch; errors become StorageErrors."""
        over = threading.Event()
        parts = ThreadPoolExecutor(self.tuning.part_workers, thread_name_prefix=f"{self.NAME.lower()}-part")
        batch = Batch(
            activity=Activity(progress or NullProgress()),
            retry=self.retry.until(over),
            parts=parts,
            slots=threading.BoundedSemaphore(self.tuning.part_workers),
            concurrency=self._concurrency(item.size for item in items),
            large_objects=sum(1 for item in items if self._large(item.size)),
        )

        def one(item: Item) -> None:
            name = self._name(item.key)
            try:
                work(item, name, batch)
            except CioError:
                raise
            except Exception as exc:
                raise self._error(exc, action, name) from exc

        try:
            transfer(action, items, one, activity=batch.activity, concurrency=batch.concurrency,
                     stall_seconds=self.options.stall_seconds)  # fmt: skip
        finally:
            over.set()
            parts.shutdown(wait=False, cancel_futures=True)

    # --- download

    def download(self, items: Sequence[DownloadItem], progress: Progress | None = None) -> None:
        self._run("download", items, progress, self._download_one)

    def _download_one(self, item: DownloadItem, name: str, batch: Batch) -> None:
        def fetch(dest: Path | str) -> str:
            if item.size is not None and self._large(item.size):
                part_size = part_size_for(item.size, batch.large_objects, self.tuning.part_size,
                                          self.tuning.part_workers, fixed=self.tuning.fixed_parts)  # fmt: skip
                return fetch_parts(dest, item.size, part_size, lambda first, last, writer: self._get(name, writer, first, last),
                                   executor=batch.parts, retry=batch.retry, activity=batch.activity)  # fmt: skip
            return batch.retry(lambda: self._get_whole(name, dest, batch.activity, verified=item.md5 is not None),
                               what=f"download {self._where(name)}")  # fmt: skip

        try:
            fetch_verified(item.key, item.dest, item.md5, fetch)
        except ChecksumError as err:
            raise ChecksumError(f"{self._where(name)}: {err}") from None

    def _get_whole(self, name: str, dest: Path | str, activity: Activity, *, verified: bool) -> str:
        with open(dest, "wb") as out:
            sink = HashingSink(out, activity)
            self._get(name, sink, verified=verified)
        return sink.md5()

    # --- upload

    def upload(self, items: Sequence[UploadItem], progress: Progress | None = None) -> None:
        self._run("upload", items, progress, self._upload_one)

    def _upload_one(self, item: UploadItem, name: str, batch: Batch) -> None:
        try:
            size = os.path.getsize(item.source)
            md5 = item.md5 or md5_b64_of_file(item.source)
            self._put(name, item.source, size, md5, batch, checked=item.md5 is not None)
        except FileNotFoundError:
            raise StorageError(f"{item.source}: no such file to upload to {self._where(name)}", code="missing_source") from None

    # --- small whole objects

    def read_bytes(self, key: str) -> bytes:
        name = self._name(key)
        return self._call("read", name, lambda: self._read(name))

    def write_bytes(self, key: str, data: bytes) -> None:
        name = self._name(key)
        md5 = b64_from_digest(hashlib.md5(data).digest())
        self._call("write", name, lambda: self._write(name, data, md5))

    def close(self) -> None:
        self.client.close()
