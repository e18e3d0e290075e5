"""``gs://bucket/prefix`` storage with google-cloud-storage.

Downloads: one media GET per object (no metadata reload first), streamed to disk while hashing,
sent straight on the client's own authorized session and read in 1 MiB blocks (see ``_media``;
``download_to_file`` when there is no manifest MD5, so that the library checks the CRC32C, or on a
client passed in); objects of a known size at least
``large_threshold`` come as parallel ranged GETs written at their offsets, split (unless
``part_size`` is configured) only as far as it takes to keep ``part_concurrency`` requests busy
across the batch, parts never under 8 MiB (see cloud.py). Uploads: the object's
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

import os
from pathlib import Path
from typing import BinaryIO

import google.auth
import google.auth.exceptions as gax
import requests.adapters
from google.api_core import exceptions as gex
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import storage

from cio_worker.errors import ChecksumError, StorageError
from cio_worker.storage.base import StorageOptions
from cio_worker.storage.cloud import Batch, CloudStorage, CloudTuning, Diagnosis
from cio_worker.storage.common import Activity, HashingSink, OffsetWriter, check_range_answer, content_length, drain
from cio_worker.storage.retry import TRANSIENT_STATUS, RetryPolicy, describe, is_network_error

try:
    from google.cloud.storage.exceptions import DataCorruption
except ImportError:  # google-cloud-storage 2.x
    from google.resumable_media import DataCorruption  # type: ignore[no-redef]

MiB = 1024 * 1024
CHUNK_MULTIPLE = 256 * 1024  # resumable upload chunks must be multiples of this
MAX_UPLOAD_CHUNK = 64 * MiB
UPLOAD_CHUNK_BUDGET = 256 * MiB  # resumable-upload chunks in memory across a batch


def is_transient(exc: BaseException) -> bool:
    """Throttling (429), 5xx, resets, timeouts, bytes corrupted in transit; never 401/403/404."""
    if isinstance(exc, gex.GoogleAPICallError):
        return exc.code in TRANSIENT_STATUS
    if isinstance(exc, (DataCorruption, gax.TransportError)):
        return True
    if isinstance(exc, gax.RefreshError):
        return bool(getattr(exc, "retryable", False))
    return is_network_error(exc)


def make_client(options: StorageOptions, tuning: CloudTuning) -> storage.Client:
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
    return content_length(response.headers)


def _stream_body(response: requests.Response, write) -> int:
    """Copy a streamed media response's raw bytes (never decoded) to ``write``, checking the length."""
    raw = response.raw
    return drain(lambda n: raw.read(n, decode_content=False), write, _content_length(response),
                 close=response.close, release=raw.release_conn)  # fmt: skip


class GCSStorage(CloudStorage):
    SCHEME = "gs"
    NAME = "GCS"
    URL_FORM = "a gs://bucket/prefix URL"
    DENIED_HINT = (
        "check the credentials in use (GOOGLE_APPLICATION_CREDENTIALS or the VM's service account) and that its "
        "IAM roles on the bucket allow it (storage.objects.get / create / list)"
    )

    def __init__(
        self,
        url: str,
        options: StorageOptions | None = None,
        *,
        client: storage.Client | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(url, options, retry=retry, is_transient=is_transient)
        # Media GETs go straight on our own session (see ``_media``) when we built the client.
        self._direct = client is None and bool(self.options.extra.get("direct_get", True))
        self.client = client or make_client(self.options, self.tuning)
        self.bucket = self.client.bucket(self.bucket_name)

    # --- errors

    def _endpoint(self) -> str:
        return str(getattr(self.client._connection, "API_BASE_URL", "Cloud Storage"))

    def _diagnose(self, exc: BaseException) -> Diagnosis | None:
        if isinstance(exc, gex.NotFound):
            return Diagnosis("no_bucket" if self._bucket_missing() else "not_found")
        if isinstance(exc, (gex.Forbidden, gex.Unauthorized)) or (isinstance(exc, gax.RefreshError) and not is_transient(exc)):
            return Diagnosis("denied", str(getattr(exc, "code", "credentials")))
        if isinstance(exc, DataCorruption) or (isinstance(exc, gex.BadRequest) and "md5" in str(exc).lower()):
            return Diagnosis("checksum", f"the bytes moved do not match their checksum (after retries): {describe(exc)}")
        if is_transient(exc):
            return Diagnosis("unavailable", f"{describe(exc)}; the store is throttling or unwell, or the network is; "
                                            f"endpoint {self._endpoint()}")  # fmt: skip
        if isinstance(exc, gex.GoogleAPICallError):
            return Diagnosis("failed", f"{exc.code} {exc.message}")
        if isinstance(exc, gax.GoogleAuthError):
            return Diagnosis("no_credentials", str(exc))
        return None

    def _bucket_found(self) -> bool | None:
        try:
            return self.retry(lambda: self.bucket.exists(retry=None, timeout=self.tuning.timeout), what=f"check {self._where()}")
        except Exception:  # denied (no storage.buckets.get) or unreachable: cannot tell
            return None

    # --- exists

    def _list_page(self, prefix: str, first: str, token: str | None) -> tuple[list[str], str | None]:
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

    def _head(self, name: str) -> bool:
        return self.bucket.blob(name).exists(retry=None, timeout=self.tuning.timeout)

    # --- download

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
        check_range_answer(response.status_code, first, last, _content_length(response), response.close)
        return response

    def _get(self, name: str, sink: HashingSink | OffsetWriter, first: int | None = None, last: int | None = None,
             *, verified: bool = True) -> None:  # fmt: skip
        # Unverified (no manifest MD5): the library's path, which checks the server's CRC32C.
        response = self._media(name, first, last) if verified else None
        if response is not None:
            _stream_body(response, sink.write)
            return
        self.bucket.blob(name).download_to_file(sink, start=first, end=last, raw_download=True,
                                                checksum=None if verified else "crc32c", retry=None,
                                                timeout=self.tuning.timeout)  # fmt: skip

    # --- upload

    def _upload_chunk(self, concurrency: int) -> int:
        """Bytes per resumable-upload request: ``part_size`` when configured; otherwise up to
        64 MiB, less when many uploads run at once, so that the chunks held in memory (the library
        reads each one whole) stay within 256 MiB for the batch; never under 8 MiB."""
        chunk = -(-self.tuning.part_size // CHUNK_MULTIPLE) * CHUNK_MULTIPLE
        if not self.tuning.fixed_parts:
            chunk = max(chunk, min(MAX_UPLOAD_CHUNK, UPLOAD_CHUNK_BUDGET // max(1, concurrency)))
        return -(-chunk // CHUNK_MULTIPLE) * CHUNK_MULTIPLE

    def _put(self, name: str, source: Path, size: int, md5: str, batch: Batch, *, checked: bool) -> None:
        chunk = self._upload_chunk(batch.concurrency)
        batch.retry(lambda: self._put_once(name, source, size, md5, batch.activity, chunk), what=f"upload {self._where(name)}")

    def _put_once(self, name: str, source: Path, size: int, md5: str, activity: Activity, chunk_size: int) -> None:
        blob = self.bucket.blob(name, chunk_size=chunk_size)
        blob.md5_hash = md5  # sent as object metadata: GCS refuses content with another MD5
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

    def _read(self, name: str) -> bytes:
        return self.bucket.blob(name).download_as_bytes(raw_download=True, retry=None, timeout=self.tuning.timeout)

    def _write(self, name: str, data: bytes, md5: str) -> None:
        blob = self.bucket.blob(name)
        blob.md5_hash = md5
        blob.upload_from_string(data, checksum=None, retry=None, timeout=self.tuning.timeout)
