"""``gs://bucket/prefix`` storage with google-cloud-storage.

Downloads: one media GET per object (``download_to_file`` on a blob made locally, no metadata
reload first), streamed to disk while hashing; objects of a known size at least
``large_threshold`` come as parallel ranged GETs written at their offsets. Uploads: the object's
``md5Hash`` is sent with it (GCS checks it) and the MD5 the server reports is compared afterwards
(for stores that do not check): a mismatch deletes that generation. Objects up to 8 MiB go in
one multipart request, larger ones as a resumable upload in ``part_size`` chunks (memory bounded).
Parallel composite uploads are not used: composed objects carry no ``md5Hash``, and the emulators
lack the XML multipart API. transfer_manager is not used either: it reports no bytes as they
move, which the stall detector and the progress display need.

Credentials the SDK way: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, the
VM's service account, gcloud's ADC). With ``STORAGE_EMULATOR_HOST`` set the client talks to the
emulator anonymously. ``StorageOptions.extra`` may carry ``endpoint`` (an API endpoint URL),
``anonymous`` (bool), ``project``, ``connect_timeout``, ``read_timeout``, ``part_concurrency``,
``retry`` (a RetryPolicy).
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence
from urllib.parse import urlparse

import google.auth
import google.auth.exceptions as gax
import requests.adapters
from google.api_core import exceptions as gex
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import storage

from ..errors import ChecksumError, CioError, StorageError
from ..hashing import b64_from_digest, md5_b64_of_file
from .base import DownloadItem, Progress, Storage, StorageOptions, UploadItem
from .common import Activity, default_concurrency, fetch_parts, fetch_verified, present_keys, run_batch
from .retry import TRANSIENT_STATUS, Retrier, RetryPolicy, describe, is_network_error

try:
    from google.cloud.storage.exceptions import DataCorruption
except ImportError:  # google-cloud-storage 2.x
    from google.resumable_media import DataCorruption  # type: ignore[no-redef]

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
CHUNK_MULTIPLE = 256 * 1024  # resumable upload chunks must be multiples of this
MAX_POOL = 64


def is_transient(exc: BaseException) -> bool:
    """Throttling (429), 5xx, resets, timeouts, bytes corrupted in transit; never 401/403/404."""
    if isinstance(exc, gex.GoogleAPICallError):
        return exc.code in TRANSIENT_STATUS
    if isinstance(exc, (DataCorruption, gax.TransportError)):
        return True
    if isinstance(exc, gax.RefreshError):
        return bool(getattr(exc, "retryable", False))
    return is_network_error(exc)


@dataclass(frozen=True)
class GCSTuning:
    concurrency: int  # 0: per batch, from the object sizes
    part_size: int
    chunk_size: int
    large_threshold: int
    part_workers: int
    connect_timeout: float
    read_timeout: float

    @classmethod
    def from_options(cls, options: StorageOptions) -> "GCSTuning":
        extra = options.extra
        part_size = options.part_size or DEFAULT_PART_SIZE
        cpus = os.cpu_count() or 2
        return cls(
            concurrency=options.concurrency,
            part_size=part_size,
            chunk_size=-(-part_size // CHUNK_MULTIPLE) * CHUNK_MULTIPLE,
            large_threshold=options.large_threshold or 2 * part_size,
            part_workers=int(extra.get("part_concurrency") or options.concurrency or max(4, min(16, 4 * cpus))),
            connect_timeout=float(extra.get("connect_timeout") or min(10.0, options.stall_seconds)),
            read_timeout=float(extra.get("read_timeout") or options.stall_seconds),
        )

    @property
    def pool_size(self) -> int:
        return (self.concurrency or MAX_POOL) + self.part_workers

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)


def make_client(options: StorageOptions, tuning: GCSTuning) -> storage.Client:
    """A client whose HTTP pool fits the concurrency, with ADC or (emulator) anonymous credentials."""
    extra = options.extra
    endpoint = extra.get("endpoint")
    anonymous = bool(extra.get("anonymous", bool(os.environ.get("STORAGE_EMULATOR_HOST"))))
    project = extra.get("project")
    if anonymous:
        credentials = AnonymousCredentials()
    else:
        try:
            credentials, found_project = google.auth.default(scopes=storage.Client.SCOPE)
        except gax.DefaultCredentialsError as exc:
            raise StorageError(
                f"no Google credentials for {endpoint or 'Cloud Storage'}: {exc}; set GOOGLE_APPLICATION_CREDENTIALS, "
                "run on a VM with a service account, or (emulator) set STORAGE_EMULATOR_HOST",
                code="no_credentials",
            ) from None
        project = project or found_project
    session = AuthorizedSession(credentials)
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=tuning.pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return storage.Client(
        project=project,
        credentials=credentials,
        _http=session,
        client_options={"api_endpoint": endpoint} if endpoint else None,
    )


class _HashingSink:
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


class _CountingReader:
    """A file the upload reads from, reporting the bytes it hands over."""

    def __init__(self, source: BinaryIO, activity: Activity) -> None:
        self.source = source
        self.activity = activity

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.activity.bytes_moved(len(data))
        return data

    def tell(self) -> int:
        return self.source.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.source.seek(offset, whence)


class GCSStorage(Storage):
    def __init__(
        self,
        url: str,
        options: StorageOptions | None = None,
        *,
        client: storage.Client | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "gs" or not parsed.netloc:
            raise StorageError(f"{url!r} is not a gs://bucket/prefix URL", code="bad_storage_url")
        self.url = url
        prefix = parsed.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.options = options or StorageOptions()
        self.tuning = GCSTuning.from_options(self.options)
        self.client = client or make_client(self.options, self.tuning)
        self.bucket = self.client.bucket(parsed.netloc)
        self.retry = Retrier(retry or self.options.extra.get("retry") or RetryPolicy(), is_transient)
        self._bucket_exists: bool | None = None

    # --- names and errors

    def _name(self, key: str) -> str:
        parts = key.split("/")
        if key.startswith("/") or ".." in parts or "" in parts:
            raise StorageError(f"object key {key!r} is not a clean relative key", code="bad_key")
        return self.prefix + key

    def _where(self, name: str | None = None) -> str:
        return f"gs://{self.bucket.name}/{name}" if name else f"gs://{self.bucket.name}"

    def _endpoint(self) -> str:
        return str(getattr(self.client._connection, "API_BASE_URL", "Cloud Storage"))

    def _no_bucket(self, action: str, name: str | None) -> StorageError:
        return StorageError(
            f"GCS bucket {self.bucket.name!r} does not exist (while trying to {action} {self._where(name)}); "
            f"check the bucket name in {self.url} and the endpoint ({self._endpoint()})",
            code="no_bucket",
        )

    def _bucket_missing(self) -> bool:
        """Once per instance, only on the error path: is it the bucket that is missing?"""
        if self._bucket_exists is None:
            try:
                self._bucket_exists = self.retry(
                    lambda: self.bucket.exists(retry=None, timeout=self.tuning.timeout), what=f"check {self._where()}"
                )
            except Exception:  # denied (no storage.buckets.get) or unreachable: cannot tell
                return False
        return not self._bucket_exists

    def _error(self, exc: BaseException, action: str, name: str | None = None) -> BaseException:
        """A StorageError a person can act on, for an SDK or network failure."""
        if isinstance(exc, CioError):
            return exc
        where = self._where(name)
        if isinstance(exc, gex.NotFound):
            if self._bucket_missing():
                return self._no_bucket(action, name)
            return StorageError(
                f"{where} does not exist (while trying to {action}); was the job's content uploaded?", code="not_found"
            )
        if isinstance(exc, (gex.Forbidden, gex.Unauthorized)) or (
            isinstance(exc, gax.RefreshError) and not is_transient(exc)
        ):
            return StorageError(
                f"access denied to {where} (while trying to {action}: {getattr(exc, 'code', 'credentials')}); check "
                "the credentials in use (GOOGLE_APPLICATION_CREDENTIALS or the VM's service account) and that "
                "its IAM roles on the bucket allow it (storage.objects.get / create / list)",
                code="denied",
            )
        if isinstance(exc, DataCorruption) or (isinstance(exc, gex.BadRequest) and "md5" in str(exc).lower()):
            return ChecksumError(f"{where}: the bytes moved do not match their checksum (after retries): {describe(exc)}")
        if is_transient(exc):
            return StorageError(
                f"{action} {where} still failed after {self.retry.policy.attempts} attempts: {describe(exc)}; "
                f"the store is throttling or unwell, or the network is; endpoint {self._endpoint()}",
                code="unavailable",
            )
        if isinstance(exc, gex.GoogleAPICallError):
            return StorageError(f"{action} {where} failed: {exc.code} {exc.message}")
        if isinstance(exc, gax.GoogleAuthError):
            return StorageError(f"cannot authenticate to {action} {where}: {exc}", code="no_credentials")
        return exc

    def _call(self, action: str, name: str | None, fn):
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

            def one_page(token: str | None = token) -> tuple[list[str], str | None]:
                pages = self.client.list_blobs(
                    self.bucket,
                    prefix=prefix,
                    start_offset=first,
                    page_token=token,
                    page_size=1000,
                    fields="items(name),nextPageToken",
                    retry=None,
                    timeout=self.tuning.timeout,
                )
                page = next(pages.pages, ())
                return [blob.name for blob in page], pages.next_page_token

            names, token = self._call("list", prefix, one_page)
            yield names
            if not token:
                return

    def _probe(self, names: list[str]) -> set[str]:
        def head(name: str) -> bool:
            blob = self.bucket.blob(name)
            return self._call("check", name, lambda: blob.exists(retry=None, timeout=self.tuning.timeout))

        workers = max(1, min(len(names), self.tuning.concurrency or MAX_POOL))
        with ThreadPoolExecutor(workers, thread_name_prefix="gcs-head") as pool:
            found = dict(zip(names, pool.map(head, names)))
        if not all(found.values()) and self._bucket_missing():
            raise self._no_bucket("check keys in", None)
        return {name for name, here in found.items() if here}

    # --- download

    def _concurrency(self, sizes: Iterable[int | None]) -> int:
        return self.tuning.concurrency or default_concurrency(sizes)

    def download(self, items: Sequence[DownloadItem], progress: Progress | None = None) -> None:
        activity = Activity(progress) if progress else Activity()
        activity.progress.start(len(items), sum(i.size or 0 for i in items))
        parts = ThreadPoolExecutor(self.tuning.part_workers, thread_name_prefix="gcs-part")
        over = threading.Event()
        retry = self.retry.until(over)

        def one(item: DownloadItem) -> None:
            name = self._name(item.key)
            large = item.size is not None and item.size >= self.tuning.large_threshold

            def fetch(dest: Path) -> str:
                if large:
                    return self._get_parts(name, dest, item.size or 0, parts, activity, retry)
                # Without a manifest MD5, let the library check the server's CRC32C.
                checksum = "crc32c" if item.md5 is None else None
                return retry(
                    lambda: self._get_whole(name, dest, activity, checksum), what=f"download {self._where(name)}"
                )

            try:
                fetch_verified(item.key, item.dest, item.md5, fetch)
            except ChecksumError as err:
                raise ChecksumError(f"{self._where(name)}: {err}") from None
            except Exception as exc:
                raise self._error(exc, "download", name) from exc
            activity.file_done(item.key)

        try:
            run_batch(
                "download",
                items,
                lambda i: i.key,
                one,
                concurrency=self._concurrency(i.size for i in items),
                activity=activity,
                stall_seconds=self.options.stall_seconds,
            )
        finally:
            over.set()
            parts.shutdown(wait=False, cancel_futures=True)

    def _get_whole(self, name: str, dest: Path, activity: Activity, checksum: str | None) -> str:
        blob = self.bucket.blob(name)
        with open(dest, "wb") as out:
            sink = _HashingSink(out, activity)
            blob.download_to_file(
                sink, raw_download=True, checksum=checksum, retry=None, timeout=self.tuning.timeout
            )
        return b64_from_digest(sink.digest.digest())

    def _get_parts(
        self, name: str, dest: Path, size: int, parts: Executor, activity: Activity, retry: Retrier
    ) -> str:
        blob = self.bucket.blob(name)

        def fetch_part(first: int, last: int, writer) -> None:
            blob.download_to_file(
                writer, start=first, end=last, raw_download=True, checksum=None, retry=None, timeout=self.tuning.timeout
            )

        return fetch_parts(
            dest, size, self.tuning.part_size, fetch_part, executor=parts, retry=retry, activity=activity
        )

    # --- upload

    def upload(self, items: Sequence[UploadItem], progress: Progress | None = None) -> None:
        activity = Activity(progress) if progress else Activity()
        activity.progress.start(len(items), sum(i.size or 0 for i in items))
        over = threading.Event()
        retry = self.retry.until(over)

        def one(item: UploadItem) -> None:
            name = self._name(item.key)
            try:
                md5 = item.md5 or md5_b64_of_file(item.source)
                retry(lambda: self._put(name, item.source, md5, activity), what=f"upload {self._where(name)}")
            except FileNotFoundError:
                raise StorageError(
                    f"{item.source}: no such file to upload to {self._where(name)}", code="missing_source"
                ) from None
            except Exception as exc:
                raise self._error(exc, "upload", name) from exc
            activity.file_done(item.key)

        try:
            run_batch(
                "upload",
                items,
                lambda i: i.key,
                one,
                concurrency=self._concurrency(i.size for i in items),
                activity=activity,
                stall_seconds=self.options.stall_seconds,
            )
        finally:
            over.set()

    def _put(self, name: str, source: Path, md5: str, activity: Activity) -> None:
        blob = self.bucket.blob(name, chunk_size=self.tuning.chunk_size)
        blob.md5_hash = md5  # sent as object metadata: GCS refuses content with another MD5
        size = os.path.getsize(source)
        with open(source, "rb") as handle:
            blob.upload_from_file(
                _CountingReader(handle, activity), size=size, checksum=None, retry=None, timeout=self.tuning.timeout
            )
        if blob.md5_hash != md5:
            # A store that did not check: remove exactly what we wrote, then fail.
            try:
                blob.delete(if_generation_match=blob.generation, retry=None, timeout=self.tuning.timeout)
            except Exception:
                pass
            raise ChecksumError(f"{source}: the store holds MD5 {blob.md5_hash} but expected {md5}; the file changed")

    # --- small whole objects

    def read_bytes(self, key: str) -> bytes:
        name = self._name(key)
        blob = self.bucket.blob(name)
        return self._call(
            "read", name, lambda: blob.download_as_bytes(raw_download=True, retry=None, timeout=self.tuning.timeout)
        )

    def write_bytes(self, key: str, data: bytes) -> None:
        name = self._name(key)

        def put() -> None:
            blob = self.bucket.blob(name)
            blob.md5_hash = b64_from_digest(hashlib.md5(data).digest())
            blob.upload_from_string(data, checksum=None, retry=None, timeout=self.tuning.timeout)

        self._call("write", name, put)

    def close(self) -> None:
        self.client.close()
