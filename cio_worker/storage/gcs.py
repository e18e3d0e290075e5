"""``gs://bucket/prefix`` storage with google-cloud-storage.

Downloads: one media GET per object (no metadata reload first), streamed to disk while hashing,
sent straight on the client's own authorized session and read in 1 MiB blocks (see ``_media``;
``download_to_file`` when there is no manifest MD5, so that the library checks the CRC32C, or on a
client passed in); objects of a known size at least
``large_threshold`` come as parallel ranged GETs written at their offsets, split (unless
``part_size`` is configured) only as far as it takes to keep ``part_concurrency`` requests busy
across the batch, parts never under 8 MiB (see s3.py). Uploads: the object's
``md5Hash`` is sent with it (GCS checks it) and the MD5 the server reports is compared afterwards
(for stores that do not check): a mismatch deletes that generation. Objects up to 8 MiB go in
one multipart request, larger ones as a resumable upload in chunks of ``part_size`` when it is
configured, else of up to 64 MiB (fewer round trips; the library reads each chunk into memory, so
the chunks of a batch stay within 256 MiB; fake-gcs-server's cost per chunk grows with the object).
Parallel composite uploads are not used: composed objects carry no ``md5Hash``, and the emulators
lack the XML multipart API. transfer_manager is not used either: it reports no bytes as they
move, which the stall detector and the progress display need.

Credentials the SDK way: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, the
VM's service account, gcloud's ADC). With ``STORAGE_EMULATOR_HOST`` set the client talks to the
emulator anonymously. ``StorageOptions.extra`` may carry ``endpoint`` (an API endpoint URL),
``anonymous`` (bool), ``project``, ``connect_timeout``, ``read_timeout``, ``part_concurrency``,
``retry`` (a RetryPolicy), ``direct_get`` (default True).
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

from cio_worker.errors import ChecksumError, CioError, StorageError
from cio_worker.job.hashing import b64_from_digest, md5_b64_of_file
from cio_worker.storage.base import DownloadItem, Progress, Storage, StorageOptions, UploadItem
from cio_worker.storage.common import (
    COPY_BLOCK,
    Activity,
    ShortRead,
    default_concurrency,
    fetch_parts,
    fetch_verified,
    part_size_for,
    present_keys,
    run_batch,
)
from cio_worker.storage.retry import TRANSIENT_STATUS, Retrier, RetryPolicy, describe, is_network_error

try:
    from google.cloud.storage.exceptions import DataCorruption
except ImportError:  # google-cloud-storage 2.x
    from google.resumable_media import DataCorruption  # type: ignore[no-redef]

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
CHUNK_MULTIPLE = 256 * 1024  # resumable upload chunks must be multiples of this
MAX_UPLOAD_CHUNK = 64 * MiB
UPLOAD_CHUNK_BUDGET = 256 * MiB  # resumable-upload chunks in memory across a batch
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
    part_size: int  # the smallest ranged part; every part when ``fixed_parts``
    fixed_parts: bool  # part_size was configured: use it as it is
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
            fixed_parts=bool(options.part_size),
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
    client = storage.Client(
        project=project,
        credentials=credentials,
        _http=session,
        client_options={"api_endpoint": endpoint} if endpoint else None,
    )
    _settle_environment(session, str(getattr(client._connection, "API_BASE_URL", "") or ""))
    return client


def _settle_environment(session: requests.Session, url: str) -> None:
    """Read the proxy and CA-bundle settings from the environment once, for ``url``'s host.

    requests looks them up on every request (walking ``os.environ`` twice: a quarter of the CPU
    of a small GET here). Every request of this session goes to the one API host (token refreshes
    use a session of their own), so the answer cannot change: settle it, then stop asking.
    """
    if not url:
        return
    try:
        session.proxies.update(requests.utils.get_environ_proxies(url))  # honours NO_PROXY for the host
    except Exception:
        return  # keep requests' own per-request lookup
    if session.verify is True:
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle:
            session.verify = bundle
    session.trust_env = False


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


def _content_length(response: requests.Response) -> int | None:
    if response.headers.get("Content-Encoding"):
        return None  # stored compressed: the length on the wire is not the object's
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _stream_body(response: requests.Response, write) -> int:
    """Copy a streamed media response's raw bytes (never decoded) to ``write``, checking the length."""
    expected = _content_length(response)
    raw = response.raw
    got = 0
    try:
        while chunk := raw.read(COPY_BLOCK, decode_content=False):
            write(chunk)
            got += len(chunk)
    except BaseException:
        response.close()  # never hand a half-read connection back to the pool
        raise
    if expected is not None and got != expected:
        response.close()
        raise ShortRead(f"the body ended after {got} of {expected} bytes")
    raw.release_conn()
    return got


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
        # Media GETs go straight on our own session (see ``_media``) when we built the client.
        self._direct = client is None and bool(self.options.extra.get("direct_get", True))
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
        large_count = sum(1 for i in items if i.size is not None and i.size >= self.tuning.large_threshold)

        def one(item: DownloadItem) -> None:
            name = self._name(item.key)
            large = item.size is not None and item.size >= self.tuning.large_threshold

            def fetch(dest: Path) -> str:
                if large:
                    part_size = part_size_for(item.size or 0, large_count, self.tuning.part_size,
                                              self.tuning.part_workers, fixed=self.tuning.fixed_parts)  # fmt: skip
                    return self._get_parts(name, dest, item.size or 0, part_size, parts, activity, retry)
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

    def _media(self, name: str, first: int | None = None, last: int | None = None) -> requests.Response | None:
        """A streamed media GET of ``name`` (or bytes ``first..last``) sent on the client's own
        authorized session, or None where that path is not available.

        google-cloud-storage's ``download_to_file`` builds several objects per request and hands
        the body over in 8 KiB pieces: for many small objects, or a large one in parallel parts,
        that Python work (not the network) was what limited us. This is the same request (the
        library's own URL, raw bytes with ``Accept-Encoding: gzip``), read in 1 MiB blocks; an
        error answer becomes the same google.api_core exception the library would raise.
        """
        if not self._direct:
            return None
        try:
            url = self.bucket.blob(name)._get_download_url(self.client)
            http = self.client._http
        except Exception:  # a library without these: its public path is always there
            self._direct = False
            return None
        headers = {"Accept-Encoding": "gzip"}
        if first is not None:
            headers["Range"] = f"bytes={first}-{last}"
        response = http.request("GET", url, headers=headers, stream=True, timeout=self.tuning.timeout)
        if response.status_code not in (200, 206):
            try:
                response.content  # the error's JSON body, for its message
            except Exception:
                pass
            finally:
                response.close()
            raise gex.from_http_response(response)
        if first is not None and response.status_code != 206 and not (
            first == 0 and _content_length(response) == last + 1
        ):
            response.close()
            raise StorageError(
                f"the store answered a GET of bytes {first}-{last} with the whole object (status "
                f"{response.status_code}): it does not support ranged GETs; set a large_threshold above the object sizes",
                code="no_ranges",
            )
        return response

    def _get_whole(self, name: str, dest: Path, activity: Activity, checksum: str | None) -> str:
        with open(dest, "wb") as out:
            sink = _HashingSink(out, activity)
            # With the manifest's MD5 to check, no library checksum is needed: the direct path.
            response = self._media(name) if checksum is None else None
            if response is not None:
                _stream_body(response, sink.write)
            else:
                self.bucket.blob(name).download_to_file(
                    sink, raw_download=True, checksum=checksum, retry=None, timeout=self.tuning.timeout
                )
        return b64_from_digest(sink.digest.digest())

    def _get_parts(
        self, name: str, dest: Path, size: int, part_size: int, parts: Executor, activity: Activity, retry: Retrier
    ) -> str:
        blob = self.bucket.blob(name)

        def fetch_part(first: int, last: int, writer) -> None:
            response = self._media(name, first, last)
            if response is not None:
                _stream_body(response, writer.write)
                return
            blob.download_to_file(
                writer, start=first, end=last, raw_download=True, checksum=None, retry=None, timeout=self.tuning.timeout
            )

        return fetch_parts(dest, size, part_size, fetch_part, executor=parts, retry=retry, activity=activity)

    # --- upload

    def upload(self, items: Sequence[UploadItem], progress: Progress | None = None) -> None:
        activity = Activity(progress) if progress else Activity()
        activity.progress.start(len(items), sum(i.size or 0 for i in items))
        over = threading.Event()
        retry = self.retry.until(over)
        concurrency = self._concurrency(i.size for i in items)
        chunk = self._upload_chunk(concurrency)

        def one(item: UploadItem) -> None:
            name = self._name(item.key)
            try:
                md5 = item.md5 or md5_b64_of_file(item.source)
                retry(lambda: self._put(name, item.source, md5, activity, chunk), what=f"upload {self._where(name)}")
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
                concurrency=concurrency,
                activity=activity,
                stall_seconds=self.options.stall_seconds,
            )
        finally:
            over.set()

    def _upload_chunk(self, concurrency: int) -> int:
        """Bytes per resumable-upload request: ``part_size`` when configured; otherwise up to
        64 MiB, less when many uploads run at once, so that the chunks held in memory (the library
        reads each one whole) stay within 256 MiB for the batch; never under 8 MiB."""
        if self.tuning.fixed_parts:
            return self.tuning.chunk_size
        share = UPLOAD_CHUNK_BUDGET // max(1, concurrency)
        chunk = max(self.tuning.chunk_size, min(MAX_UPLOAD_CHUNK, share))
        return -(-chunk // CHUNK_MULTIPLE) * CHUNK_MULTIPLE

    def _put(self, name: str, source: Path, md5: str, activity: Activity, chunk_size: int) -> None:
        blob = self.bucket.blob(name, chunk_size=chunk_size)
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
