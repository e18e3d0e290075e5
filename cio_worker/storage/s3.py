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
import re
import threading
import uuid
from concurrent.futures import Future, wait
from pathlib import Path
from urllib.parse import quote, urlsplit

import boto3
import botocore.exceptions as bx
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config

from cio_worker.errors import ChecksumError, StorageError
from cio_worker.job.hashing import b64_from_digest, md5_b64_of_file
from cio_worker.storage.base import StorageOptions
from cio_worker.storage.cloud import Batch, CloudStorage, CloudTuning, Diagnosis
from cio_worker.storage.common import COPY_BLOCK, HashingSink, OffsetWriter, check_range_answer, content_length, drain
from cio_worker.storage.retry import TRANSIENT_STATUS, Retrier, RetryPolicy, describe, is_network_error

MiB = 1024 * 1024
MIN_UPLOAD_PART = 5 * MiB  # S3 rejects smaller multipart parts (all but the last)
MAX_PARTS = 10_000

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


def make_client(options: StorageOptions, tuning: CloudTuning):  # -> botocore S3 client
    """An S3 client with a pool sized to the concurrency, socket timeouts and no SDK retries."""
    return make_session_client(options, tuning)[0]


def make_session_client(options: StorageOptions, tuning: CloudTuning):  # -> (client, boto3 Session)
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
            check_range_answer(response.status, first, last, content_length(response.headers), response.close)
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


def _read_body(response, write) -> int:
    """Stream a direct response's body into ``write``; check it against Content-Length."""
    return drain(response.read, write, content_length(response.headers), close=response.close, release=response.release_conn)


class S3Storage(CloudStorage):
    SCHEME = "s3"
    NAME = "S3"
    URL_FORM = "an s3://bucket/prefix URL"
    DENIED_HINT = (
        "check the credentials in use (AWS_PROFILE, AWS_ACCESS_KEY_ID, the instance role) and that the IAM and "
        "bucket policies allow it; a read of a missing key is also denied when s3:ListBucket is not allowed"
    )
    BUCKET_HINT = ", the region"

    def __init__(
        self,
        url: str,
        options: StorageOptions | None = None,
        *,
        client=None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(url, options, retry=retry, is_transient=is_transient)
        self.upload_part_size = max(self.tuning.part_size, MIN_UPLOAD_PART)
        session = None
        if client is None:
            client, session = make_session_client(self.options, self.tuning)
        self.client = client
        self._session = session if self.options.extra.get("direct_get", True) else None
        self._direct: DirectGets | None = None
        self._direct_ready = session is None or self._session is None  # nothing to build
        self._direct_lock = threading.Lock()

    # --- errors

    def _endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def _diagnose(self, exc: BaseException) -> Diagnosis | None:
        if isinstance(exc, bx.ClientError):
            code, status = _code(exc), _status(exc)
            message = exc.response.get("Error", {}).get("Message") or ""
            if code == "NoSuchBucket":
                return Diagnosis("no_bucket")
            if code in ("NoSuchKey", "NotFound") or status == 404:
                return Diagnosis("not_found")
            if code in DENIED or status in (401, 403):
                return Diagnosis("denied", code or str(status))
            if code in ("BadDigest", "InvalidDigest"):
                return Diagnosis("checksum", f"S3 received bytes whose MD5 is not the one sent ({code})")
            if is_transient(exc):
                return Diagnosis("unavailable", f"{code} {message}; the store is throttling or unwell")
            return Diagnosis("failed", f"{code or status} {message}")
        if isinstance(exc, NO_CREDENTIALS):
            return Diagnosis(
                "no_credentials",
                f"no usable AWS credentials ({exc}); set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "or give the instance a role",
            )
        if is_transient(exc):
            return Diagnosis("unavailable", f"{describe(exc)}; check the network and the endpoint ({self._endpoint()})")
        if isinstance(exc, bx.BotoCoreError):
            return Diagnosis("failed", str(exc))
        return None

    def _bucket_found(self) -> bool | None:
        def head() -> bool | None:
            try:
                self.client.head_bucket(Bucket=self.bucket_name)
                return True
            except bx.ClientError as exc:
                if _status(exc) == 404:
                    return False
                if _status(exc) in (401, 403):
                    return None  # a denied HeadBucket says nothing about the bucket
                raise

        return self._call("check keys in", None, head)

    # --- exists

    def _list_page(self, prefix: str, first: str, token: str | None) -> tuple[list[str], str | None]:
        request = {"Bucket": self.bucket_name, "Prefix": prefix, "MaxKeys": 1000}
        if token:
            request["ContinuationToken"] = token
        elif len(first) > len(prefix):
            request["StartAfter"] = first[:-1]  # sorts just before ``first``
        page = self.client.list_objects_v2(**request)
        names = [entry["Key"] for entry in page.get("Contents", ())]
        return names, page.get("NextContinuationToken") if page.get("IsTruncated") else None

    def _head(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket_name, Key=name)
            return True
        except bx.ClientError as exc:
            if _status(exc) == 404:
                return False
            raise

    # --- download

    def _direct_gets(self) -> DirectGets | None:
        """The direct GET path, built on first use; None when it cannot be (or was switched off)."""
        if not self._direct_ready:
            with self._direct_lock:
                if not self._direct_ready:
                    self._direct = DirectGets.build(self.client, self._session, self.bucket_name)
                    self._direct_ready = True
        return self._direct

    def _get(self, name: str, sink: HashingSink | OffsetWriter, first: int | None = None, last: int | None = None,
             *, verified: bool = True) -> None:  # fmt: skip
        direct = self._direct_gets()
        if direct is not None:
            try:
                _read_body(direct.open(name, first, last), sink.write)
                return
            except _Redirected:
                self._direct = None  # this endpoint or region needs the SDK's redirect handling
        request = {"Bucket": self.bucket_name, "Key": name}
        if first is not None:
            request["Range"] = f"bytes={first}-{last}"
        body = self.client.get_object(**request)["Body"]
        try:
            for chunk in body.iter_chunks(COPY_BLOCK):
                sink.write(chunk)
        finally:
            body.close()

    # --- upload

    def _put(self, name: str, source: Path, size: int, md5: str, batch: Batch, *, checked: bool) -> None:
        if size >= self.tuning.large_threshold and size > self.upload_part_size:
            self._put_multipart(name, source, size, md5, batch)
            return
        if checked:
            # S3 checks Content-MD5 against what it receives; stores that do not are covered here.
            got = md5_b64_of_file(source)
            if got != md5:
                raise ChecksumError(f"{source}: read MD5 {got} but expected {md5}; the file changed")

        def put() -> None:
            with open(source, "rb") as body:
                self.client.put_object(
                    Bucket=self.bucket_name, Key=name, Body=body, ContentLength=size, ContentMD5=md5, Metadata={"md5": md5}
                )

        batch.retry(put, what=f"upload {self._where(name)}")
        batch.activity.bytes_moved(size)

    def _put_multipart(self, name: str, source: Path, size: int, md5: str, batch: Batch) -> None:
        """Our own multipart upload, parts on ``batch.parts`` (at most ``batch.slots`` in memory);
        the whole file's MD5 is checked before it is completed."""
        part_size = max(self.upload_part_size, -(-size // MAX_PARTS))
        what = f"upload {self._where(name)}"
        retry: Retrier = batch.retry
        upload_id = retry(
            lambda: self.client.create_multipart_upload(Bucket=self.bucket_name, Key=name, Metadata={"md5": md5})["UploadId"],
            what=what,
        )

        failed = threading.Event()

        def send(number: int, chunk: bytes) -> dict:
            part_md5 = b64_from_digest(hashlib.md5(chunk).digest())
            response = retry(
                lambda: self.client.upload_part(
                    Bucket=self.bucket_name,
                    Key=name,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                    ContentMD5=part_md5,
                ),
                what=f"{what} part {number}",
            )
            batch.activity.bytes_moved(len(chunk))
            return {"PartNumber": number, "ETag": response["ETag"]}

        def settled(future: Future[dict]) -> None:
            batch.slots.release()  # also runs for a part cancelled before it started
            if future.cancelled() or future.exception() is not None:
                failed.set()

        futures: list[Future[dict]] = []
        try:
            digest = hashlib.md5()
            with open(source, "rb") as handle:
                for number in range(1, MAX_PARTS + 1):
                    batch.slots.acquire()
                    chunk = handle.read(part_size) if not failed.is_set() else b""
                    if not chunk:
                        batch.slots.release()
                        break
                    digest.update(chunk)
                    try:
                        future = batch.parts.submit(send, number, chunk)
                    except BaseException:
                        batch.slots.release()
                        raise
                    future.add_done_callback(settled)
                    futures.append(future)
            done = [future.result() for future in futures]
            got = b64_from_digest(digest.digest())
            if got != md5:
                raise ChecksumError(f"{source}: read MD5 {got} but expected {md5}; the file changed while uploading")
            retry(
                lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket_name, Key=name, UploadId=upload_id, MultipartUpload={"Parts": done}
                ),
                what=what,
            )
        except BaseException:
            for future in futures:
                future.cancel()
            wait(futures)
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket_name, Key=name, UploadId=upload_id)
            except Exception:  # the upload's own error is what matters; S3 lifecycle rules clean up
                pass
            raise

    # --- small whole objects

    def _read(self, name: str) -> bytes:
        body = self.client.get_object(Bucket=self.bucket_name, Key=name)["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def _write(self, name: str, data: bytes, md5: str) -> None:
        self.client.put_object(Bucket=self.bucket_name, Key=name, Body=data, ContentMD5=md5, Metadata={"md5": md5})
