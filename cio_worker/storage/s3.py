"""``s3://bucket/prefix`` storage with boto3.

Small objects: one plain GET each, body streamed to disk while hashing (no HEAD first; not
``download_file``), and one ``put_object`` with ``Content-MD5`` so S3 checks the bytes. Large
objects (size known and at least ``large_threshold``): parallel ranged GETs written at their
offsets, and our own multipart upload whose whole-file MD5 is checked before it is completed, so a
file that changed while uploading never becomes an object. Multipart ETags are not MD5s: the key
carries the MD5 (hashstore) and so does the object metadata (``x-amz-meta-md5``, base64).

Ranged parts: with ``part_size`` left to us, a large object is split only as far as it takes to
keep ``part_concurrency`` requests busy across the batch, parts never under 8 MiB (one object of a
batch: that many parts; four: a quarter as many each). The same parallelism with the fewest
requests: fewer request charges, and servers whose cost per ranged GET grows with the object
(moto reads the whole object for each range) stay fast. A part cut short resumes where it stopped.

GETs go out "direct": signed with botocore's own SigV4 signer and sent on the client's own HTTP
session (its connection pool, proxies, TLS settings and timeouts), skipping botocore's per-call
machinery (endpoint rules, event hooks, response parsing), which costs more CPU per request than a
small object does; on a 2-core node that CPU was the bottleneck for many small files. Error
answers become the same ``ClientError`` the SDK would raise (so retries and messages are the
same); a redirect or a region mismatch switches the direct path off for the instance and the SDK
takes over, region redirection included. Only for clients this module builds (``extra`` may set
``direct_get`` to False).

Credentials, region and endpoint come the SDK way (instance role, environment, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``). ``StorageOptions.extra`` may carry:
``endpoint_url``, ``region``, ``profile``, ``addressing_style`` ("path" for some S3-compatible
stores), ``connect_timeout``, ``read_timeout``, ``part_concurrency``, ``retry`` (a RetryPolicy),
``direct_get`` (default True).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from urllib.parse import quote, urlparse, urlsplit

import boto3
import botocore.exceptions as bx
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config

from cio_worker.errors import ChecksumError, CioError, StorageError
from cio_worker.job.hashing import b64_from_digest, md5_b64_of_file
from cio_worker.storage.base import DownloadItem, Progress, Storage, StorageOptions, UploadItem
from cio_worker.storage.common import (
    COPY_BLOCK,
    Activity,
    ShortRead,
    copy_stream,
    default_concurrency,
    fetch_parts,
    fetch_verified,
    part_size_for,
    present_keys,
    run_batch,
)
from cio_worker.storage.retry import TRANSIENT_STATUS, Retrier, RetryPolicy, describe, is_network_error

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
MIN_UPLOAD_PART = 5 * MiB  # S3 rejects smaller multipart parts (all but the last)
MAX_PARTS = 10_000
MAX_POOL = 64  # the most parallel objects default_concurrency ever picks

THROTTLING = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"})
TRANSIENT_CODES = THROTTLING | {"RequestTimeout", "InternalError", "ServiceUnavailable", "OperationAborted"}
DENIED = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AccountProblem",
    }
)
NO_CREDENTIALS = (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)


def _status(exc: bx.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(exc: bx.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "")


def is_transient(exc: BaseException) -> bool:
    """Throttling, 5xx, resets and timeouts; never denied, missing or a bad request."""
    if isinstance(exc, bx.ClientError):
        return _status(exc) in TRANSIENT_STATUS or _code(exc) in TRANSIENT_CODES
    if isinstance(exc, bx.SSLError):
        return False
    if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError)):
        return True
    return is_network_error(exc)


@dataclass(frozen=True)
class S3Tuning:
    """Sizes and limits resolved from StorageOptions."""

    concurrency: int  # 0: per batch, from the object sizes
    part_size: int  # the smallest ranged part; every part when ``fixed_parts``
    fixed_parts: bool  # part_size was configured: use it as it is
    upload_part_size: int
    large_threshold: int
    part_workers: int
    connect_timeout: float
    read_timeout: float

    @classmethod
    def from_options(cls, options: StorageOptions) -> "S3Tuning":
        extra = options.extra
        part_size = options.part_size or DEFAULT_PART_SIZE
        cpus = os.cpu_count() or 2
        return cls(
            concurrency=options.concurrency,
            part_size=part_size,
            fixed_parts=bool(options.part_size),
            upload_part_size=max(part_size, MIN_UPLOAD_PART),
            large_threshold=options.large_threshold or 2 * part_size,
            part_workers=int(extra.get("part_concurrency") or options.concurrency or max(4, min(16, 4 * cpus))),
            # A read stuck longer than the stall window has failed the batch anyway: end the thread.
            connect_timeout=float(extra.get("connect_timeout") or min(10.0, options.stall_seconds)),
            read_timeout=float(extra.get("read_timeout") or options.stall_seconds),
        )

    @property
    def pool_size(self) -> int:
        return (self.concurrency or MAX_POOL) + self.part_workers


def make_client(options: StorageOptions, tuning: S3Tuning):  # -> botocore S3 client
    """An S3 client with a pool sized to the concurrency, socket timeouts and no SDK retries."""
    return make_session_client(options, tuning)[0]


def make_session_client(options: StorageOptions, tuning: S3Tuning):  # -> (client, boto3 Session)
    """``make_client``, and the session whose credentials it signs with."""
    extra = options.extra
    config = Config(
        max_pool_connections=tuning.pool_size,
        connect_timeout=tuning.connect_timeout,
        read_timeout=tuning.read_timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},  # retry.py is the one retry layer
        # We send Content-MD5 and verify MD5s ourselves; the CRC defaults add work and trip
        # some S3-compatible stores. Content-MD5 also makes a SHA-256 of every body (which
        # botocore computes on plain-http endpoints) redundant.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": extra.get("addressing_style", "auto"), "payload_signing_enabled": False},
    )
    try:
        session = boto3.session.Session(profile_name=extra.get("profile"), region_name=extra.get("region"))
        return session.client("s3", endpoint_url=extra.get("endpoint_url"), config=config), session
    except bx.ProfileNotFound as exc:
        raise StorageError(f"AWS profile not found: {exc}; check AWS_PROFILE and ~/.aws/config", code="no_credentials") from None
    except bx.BotoCoreError as exc:
        raise StorageError(f"cannot set up the S3 client: {exc}", code="bad_storage_url") from None


_ERROR_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_ERROR_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")
# Answers that mean "this endpoint, region or signature is not what the bucket wants": the SDK
# knows how to follow redirects and sign for odd setups; on these the direct path hands over.
_REDIRECT_STATUS = frozenset({301, 302, 307, 308})
_HAND_OVER = frozenset({"AuthorizationHeaderMalformed", "PermanentRedirect", "TemporaryRedirect",
                        "IllegalLocationConstraintException", "SignatureDoesNotMatch",
                        "AuthorizationQueryParametersError", "InvalidRequest"})  # fmt: skip
_SCOPE = re.compile(r"Credential=[^/,]+/\d{8}/([^/,]+)/([^/,]+)/aws4_request")
_PROBE_KEY = f"cio-worker-probe-{uuid.uuid4().hex}"


class _Captured(Exception):
    def __init__(self, url: str, authorization: str | None) -> None:
        super().__init__(url)
        self.url = url
        self.authorization = authorization


def _probe_request(client, bucket: str) -> tuple[str, str | None]:
    """The URL and Authorization header the SDK would send for a GetObject of a probe key, taken
    from the request just before it would go out (nothing is sent): the endpoint as the SDK's rules
    resolve it (region, addressing style, FIPS, dual-stack, access points) and the signing scope."""
    event = "before-send.s3.GetObject"
    handler_id = f"cio-worker-probe-{uuid.uuid4().hex}"

    def capture(request, **_: object) -> None:
        if request.url.split("?")[0].endswith("/" + _PROBE_KEY):
            raise _Captured(request.url, request.headers.get("Authorization"))
        return None  # another thread's request: not ours to stop

    client.meta.events.register_first(event, capture, unique_id=handler_id)
    try:
        client.get_object(Bucket=bucket, Key=_PROBE_KEY)
    except _Captured as got:
        auth = got.authorization.decode() if isinstance(got.authorization, bytes) else got.authorization
        return got.url, auth
    finally:
        client.meta.events.unregister(event, unique_id=handler_id)
    raise RuntimeError("the probe request was sent")


class _Redirected(Exception):
    """The direct path met a redirect, a region mismatch or a refused signature; the SDK must
    handle this request (and the store's requests from now on)."""


class DirectGets:
    """Signed GETs on the client's own HTTP session, without botocore's per-call machinery.

    Built from public pieces (the SDK's own request for a probe key, stopped before it is sent,
    gives the object URL form and the signing region and name; ``S3SigV4Auth`` signs; the
    session's credentials are refreshed as the SDK would) and one private one, the client's HTTP
    session (``client._endpoint.http_session``): ``DirectGets.build`` returns None when any is
    missing.
    """

    def __init__(self, http, credentials, region: str, base: str, service: str = "s3") -> None:
        self.http = http
        self.credentials = credentials
        self.region = region
        self.service = service
        self.base = base  # the URL of an object is base + its quoted name

    @classmethod
    def build(cls, client, session, bucket: str) -> "DirectGets | None":
        try:
            http = client._endpoint.http_session
            credentials = session.get_credentials()
            if credentials is None or not hasattr(http, "send"):
                return None
            url, authorization = _probe_request(client, bucket)
            parts = urlsplit(url)
            scope = _SCOPE.search(authorization or "")
            if scope is None or parts.scheme not in ("http", "https") or not parts.path.endswith("/" + _PROBE_KEY):
                return None
            base = f"{parts.scheme}://{parts.netloc}{parts.path[: -len(_PROBE_KEY)]}"
            return cls(http, credentials, scope.group(1), base, scope.group(2))
        except Exception:  # anything unexpected: the SDK path is always there
            return None

    def get(self, name: str, first: int | None = None, last: int | None = None):
        """Send a signed GET; returns the urllib3 response (status checked by ``open``)."""
        request = AWSRequest("GET", self.base + quote(name, safe="/~"), stream_output=True)
        if first is not None:
            request.headers["Range"] = f"bytes={first}-{last}"
        frozen = self.credentials.get_frozen_credentials()
        S3SigV4Auth(frozen, self.service, self.region).add_auth(request)
        return self.http.send(request.prepare()).raw

    def open(self, name: str, first: int | None = None, last: int | None = None):
        """The body of a successful GET (200, or 206 for a range), as a urllib3 response to read
        and then ``release_conn``; an error answer raises the ClientError the SDK would raise."""
        response = self.get(name, first, last)
        if response.status in (200, 206):
            if first is not None and response.status != 206 and not (first == 0 and _length(response) == last + 1):
                response.close()
                raise StorageError(
                    f"the store answered a GET of bytes {first}-{last} with the whole object (status "
                    f"{response.status}): it does not support ranged GETs; set a large_threshold above the object sizes",
                    code="no_ranges",
                )
            return response
        try:
            body = response.read(64 * 1024) or b""
        except Exception:
            body = b""
        finally:
            response.close()
        found = _ERROR_CODE.search(body)
        said = _ERROR_MESSAGE.search(body)
        code = found.group(1).decode(errors="replace") if found else ("NoSuchKey" if response.status == 404 else "")
        if response.status in _REDIRECT_STATUS or code in _HAND_OVER:
            raise _Redirected(f"{response.status} {code}")
        error = {"Code": code or str(response.status), "Message": said.group(1).decode(errors="replace") if said else ""}
        metadata = {"HTTPStatusCode": response.status, "HTTPHeaders": dict(response.headers)}
        raise bx.ClientError({"Error": error, "ResponseMetadata": metadata}, "GetObject")


def _length(response) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _read_body(response, write, block: int = COPY_BLOCK) -> int:
    """Stream a direct response's body into ``write``; check it against Content-Length."""
    expected = _length(response)
    got = 0
    try:
        while chunk := response.read(block):
            write(chunk)
            got += len(chunk)
    except BaseException:
        response.close()  # never hand a half-read connection back to the pool
        raise
    if expected is not None and got != expected:
        response.close()
        raise ShortRead(f"the body ended after {got} of {expected} bytes")
    response.release_conn()
    return got


class S3Storage(Storage):
    def __init__(
        self,
        url: str,
        options: StorageOptions | None = None,
        *,
        client=None,
        retry: RetryPolicy | None = None,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"{url!r} is not an s3://bucket/prefix URL", code="bad_storage_url")
        self.url = url
        self.bucket = parsed.netloc
        prefix = parsed.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.options = options or StorageOptions()
        self.tuning = S3Tuning.from_options(self.options)
        session = None
        if client is None:
            client, session = make_session_client(self.options, self.tuning)
        self.client = client
        self.retry = Retrier(retry or self.options.extra.get("retry") or RetryPolicy(), is_transient)
        self._bucket_seen = False
        self._session = session if self.options.extra.get("direct_get", True) else None
        self._direct: DirectGets | None = None
        self._direct_ready = session is None or self._session is None  # nothing to build
        self._direct_lock = threading.Lock()

    # --- names and errors

    def _name(self, key: str) -> str:
        parts = key.split("/")
        if key.startswith("/") or ".." in parts or "" in parts:
            raise StorageError(f"object key {key!r} is not a clean relative key", code="bad_key")
        return self.prefix + key

    def _where(self, name: str | None = None) -> str:
        return f"s3://{self.bucket}/{name}" if name else f"s3://{self.bucket}"

    def _error(self, exc: BaseException, action: str, name: str | None = None) -> BaseException:
        """A StorageError a person can act on, for an SDK or network failure."""
        if isinstance(exc, CioError):
            return exc
        where = self._where(name)
        endpoint = self.client.meta.endpoint_url
        if isinstance(exc, bx.ClientError):
            code, status = _code(exc), _status(exc)
            message = exc.response.get("Error", {}).get("Message") or ""
            if code == "NoSuchBucket":
                return self._no_bucket(action, name)
            if code in ("NoSuchKey", "NotFound") or status == 404:
                return StorageError(
                    f"{where} does not exist (while trying to {action}); was the job's content uploaded?",
                    code="not_found",
                )
            if code in DENIED or status in (401, 403):
                return StorageError(
                    f"access denied to {where} (while trying to {action}: {code or status}); check the "
                    "credentials in use (AWS_PROFILE, AWS_ACCESS_KEY_ID, the instance role) and that the "
                    "IAM and bucket policies allow it; a read of a missing key is also denied when "
                    "s3:ListBucket is not allowed",
                    code="denied",
                )
            if code in ("BadDigest", "InvalidDigest"):
                return ChecksumError(f"{where}: S3 received bytes whose MD5 is not the one sent ({code})")
            if is_transient(exc):
                return StorageError(
                    f"{action} {where} still failed after {self.retry.policy.attempts} attempts: {code} "
                    f"{message}; the store is throttling or unwell",
                    code="unavailable",
                )
            return StorageError(f"{action} {where} failed: {code or status} {message}".rstrip())
        if isinstance(exc, NO_CREDENTIALS):
            return StorageError(
                f"no usable AWS credentials to {action} {where}: {exc}; set AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or give the instance a role",
                code="no_credentials",
            )
        if is_transient(exc):
            return StorageError(
                f"{action} {where} still failed after {self.retry.policy.attempts} attempts: {describe(exc)}; "
                f"check the network and the endpoint ({endpoint})",
                code="unavailable",
            )
        if isinstance(exc, bx.BotoCoreError):
            return StorageError(f"{action} {where} failed: {exc}")
        return exc

    def _no_bucket(self, action: str, name: str | None) -> StorageError:
        return StorageError(
            f"S3 bucket {self.bucket!r} does not exist (while trying to {action} {self._where(name)}); check "
            f"the bucket name in {self.url}, the region and the endpoint ({self.client.meta.endpoint_url})",
            code="no_bucket",
        )

    def _call(self, action: str, name: str | None, fn):
        """Run one request with retries; SDK errors come out as StorageError."""
        try:
            return self.retry(fn, what=f"{action} {self._where(name)}")
        except Exception as exc:
            raise self._error(exc, action, name) from exc

    def _check_bucket(self) -> None:
        """Once per instance: a clear error when the bucket itself is missing."""
        if self._bucket_seen:
            return
        try:
            self.retry(lambda: self.client.head_bucket(Bucket=self.bucket), what=f"check {self._where()}")
        except bx.ClientError as exc:
            if _status(exc) == 404:
                raise self._no_bucket("check keys in", None) from exc
            if _status(exc) in (401, 403):
                return  # a denied HeadBucket says nothing about the bucket
            raise self._error(exc, "check keys in", None) from exc
        except Exception as exc:
            raise self._error(exc, "check keys in", None) from exc
        self._bucket_seen = True

    # --- exists

    def exists(self, keys: Iterable[str]) -> set[str]:
        by_name = {self._name(key): key for key in keys}
        present = present_keys(by_name, self._list_pages, self._probe)
        return {by_name[name] for name in present}

    def _list_pages(self, prefix: str, first: str) -> Iterator[list[str]]:
        request = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
        if len(first) > len(prefix):
            request["StartAfter"] = first[:-1]  # sorts just before ``first``
        while True:
            page = self._call("list", prefix, lambda: self.client.list_objects_v2(**request))
            self._bucket_seen = True
            yield [entry["Key"] for entry in page.get("Contents", ())]
            if not page.get("IsTruncated"):
                return
            request.pop("StartAfter", None)
            request["ContinuationToken"] = page["NextContinuationToken"]

    def _probe(self, names: list[str]) -> set[str]:
        def head(name: str) -> bool:
            try:
                self.retry(lambda: self.client.head_object(Bucket=self.bucket, Key=name), what=f"check {name}")
                return True
            except bx.ClientError as exc:
                if _status(exc) == 404:
                    return False
                raise self._error(exc, "check", name) from exc
            except Exception as exc:
                raise self._error(exc, "check", name) from exc

        workers = max(1, min(len(names), self.tuning.concurrency or MAX_POOL))
        with ThreadPoolExecutor(workers, thread_name_prefix="s3-head") as pool:
            found = dict(zip(names, pool.map(head, names)))
        if not all(found.values()):
            self._check_bucket()
        else:
            self._bucket_seen = True
        return {name for name, here in found.items() if here}

    # --- download

    def _concurrency(self, sizes: Iterable[int | None]) -> int:
        return self.tuning.concurrency or default_concurrency(sizes)

    def _direct_gets(self) -> DirectGets | None:
        """The direct GET path, built on first use; None when it cannot be (or was switched off)."""
        if not self._direct_ready:
            with self._direct_lock:
                if not self._direct_ready:
                    self._direct = DirectGets.build(self.client, self._session, self.bucket)
                    self._direct_ready = True
        return self._direct

    def _open_body(self, name: str, first: int | None = None, last: int | None = None):
        """(direct response, None) or (None, SDK StreamingBody) for a GET of ``name``."""
        direct = self._direct_gets()
        if direct is not None:
            try:
                return direct.open(name, first, last), None
            except _Redirected:
                self._direct = None  # this endpoint or region needs the SDK's redirect handling
        request = {"Bucket": self.bucket, "Key": name}
        if first is not None:
            request["Range"] = f"bytes={first}-{last}"
        return None, self.client.get_object(**request)["Body"]

    def download(self, items: Sequence[DownloadItem], progress: Progress | None = None) -> None:
        activity = Activity(progress) if progress else Activity()
        activity.progress.start(len(items), sum(i.size or 0 for i in items))
        parts = ThreadPoolExecutor(self.tuning.part_workers, thread_name_prefix="s3-part")
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
                return retry(lambda: self._get_whole(name, dest, activity), what=f"download {self._where(name)}")

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

    def _get_whole(self, name: str, dest: Path, activity: Activity) -> str:
        with open(dest, "wb") as out:
            direct, body = self._open_body(name)
            if direct is not None:
                digest = hashlib.md5()

                def write(chunk: bytes) -> None:
                    digest.update(chunk)
                    out.write(chunk)
                    activity.bytes_moved(len(chunk))

                _read_body(direct, write)
                return b64_from_digest(digest.digest())
            try:
                return copy_stream(body, out, activity)
            finally:
                body.close()

    def _get_parts(
        self, name: str, dest: Path, size: int, part_size: int, parts: Executor, activity: Activity, retry: Retrier
    ) -> str:
        def fetch_part(first: int, last: int, writer) -> None:
            direct, body = self._open_body(name, first, last)
            if direct is not None:
                _read_body(direct, writer.write)
                return
            try:
                for chunk in body.iter_chunks(COPY_BLOCK):
                    writer.write(chunk)
            finally:
                body.close()

        return fetch_parts(dest, size, part_size, fetch_part, executor=parts, retry=retry, activity=activity)

    # --- upload

    def upload(self, items: Sequence[UploadItem], progress: Progress | None = None) -> None:
        activity = Activity(progress) if progress else Activity()
        activity.progress.start(len(items), sum(i.size or 0 for i in items))
        parts = ThreadPoolExecutor(self.tuning.part_workers, thread_name_prefix="s3-part")
        # Bounds the multipart chunks held in memory across the whole batch.
        slots = threading.BoundedSemaphore(self.tuning.part_workers)
        over = threading.Event()
        retry = self.retry.until(over)

        def one(item: UploadItem) -> None:
            name = self._name(item.key)
            try:
                size = os.path.getsize(item.source)
                md5 = item.md5 or md5_b64_of_file(item.source)
                if size >= self.tuning.large_threshold and size > self.tuning.upload_part_size:
                    self._put_multipart(name, item.source, size, md5, parts, slots, activity, retry)
                else:
                    self._put_small(name, item.source, size, md5, retry, check=item.md5 is not None)
                    activity.bytes_moved(size)
            except FileNotFoundError:
                raise StorageError(f"{item.source}: no such file to upload to {self._where(name)}", code="missing_source") from None
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
            parts.shutdown(wait=False, cancel_futures=True)

    def _put_small(self, name: str, source: Path, size: int, md5: str, retry: Retrier, *, check: bool) -> None:
        if check:
            # S3 checks Content-MD5 against what it receives; stores that do not are covered here.
            got = md5_b64_of_file(source)
            if got != md5:
                raise ChecksumError(f"{source}: read MD5 {got} but expected {md5}; the file changed")

        def put() -> None:
            with open(source, "rb") as body:
                self.client.put_object(
                    Bucket=self.bucket, Key=name, Body=body, ContentLength=size, ContentMD5=md5, Metadata={"md5": md5}
                )

        retry(put, what=f"upload {self._where(name)}")

    def _put_multipart(
        self,
        name: str,
        source: Path,
        size: int,
        md5: str,
        parts: Executor,
        slots: threading.BoundedSemaphore,
        activity: Activity,
        retry: Retrier,
    ) -> None:
        part_size = max(self.tuning.upload_part_size, -(-size // MAX_PARTS))
        what = f"upload {self._where(name)}"
        upload_id = retry(
            lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=name, Metadata={"md5": md5})["UploadId"],
            what=what,
        )

        failed = threading.Event()

        def send(number: int, chunk: bytes) -> dict:
            part_md5 = b64_from_digest(hashlib.md5(chunk).digest())
            response = retry(
                lambda: self.client.upload_part(
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                    ContentMD5=part_md5,
                ),
                what=f"{what} part {number}",
            )
            activity.bytes_moved(len(chunk))
            return {"PartNumber": number, "ETag": response["ETag"]}

        def settled(future: Future[dict]) -> None:
            slots.release()  # also runs for a part cancelled before it started
            if future.cancelled() or future.exception() is not None:
                failed.set()

        futures: list[Future[dict]] = []
        try:
            digest = hashlib.md5()
            with open(source, "rb") as handle:
                for number in range(1, MAX_PARTS + 1):
                    slots.acquire()
                    chunk = handle.read(part_size) if not failed.is_set() else b""
                    if not chunk:
                        slots.release()
                        break
                    digest.update(chunk)
                    try:
                        future = parts.submit(send, number, chunk)
                    except BaseException:
                        slots.release()
                        raise
                    future.add_done_callback(settled)
                    futures.append(future)
            done = [future.result() for future in futures]
            got = b64_from_digest(digest.digest())
            if got != md5:
                raise ChecksumError(f"{source}: read MD5 {got} but expected {md5}; the file changed while uploading")
            retry(
                lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": done}
                ),
                what=what,
            )
        except BaseException:
            for future in futures:
                future.cancel()
            wait(futures)
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            except Exception:  # the upload's own error is what matters; S3 lifecycle rules clean up
                pass
            raise

    # --- small whole objects

    def read_bytes(self, key: str) -> bytes:
        name = self._name(key)

        def get() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=name)["Body"]
            try:
                return body.read()
            finally:
                body.close()

        return self._call("read", name, get)

    def write_bytes(self, key: str, data: bytes) -> None:
        name = self._name(key)
        md5 = b64_from_digest(hashlib.md5(data).digest())
        self._call(
            "write",
            name,
            lambda: self.client.put_object(Bucket=self.bucket, Key=name, Body=data, ContentMD5=md5, Metadata={"md5": md5}),
        )

    def close(self) -> None:
        self.client.close()
