"""The stores the storage tests run against, one ``Store`` per backend, and test content.

Fixtures: ``store`` (parametrised over file://, S3 on moto's server and GCS on fake-gcs-server),
``cloud_store`` (S3 and GCS), ``s3_store``, ``gcs_store``. A cloud store is a fresh bucket on the
session's server with a fault-injecting proxy in front (``FaultProxy``): the Storage objects it
opens go through the proxy, with fast retries; ``seed``, ``read`` and ``names`` go straight to the
server. Each store also knows its dialect: what its requests look like, and its error answers.

Content helpers: ``make_sources``, ``downloads_of``, ``assert_same``, ``Recorder``.
"""

from __future__ import annotations

import json
import random
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from cio_worker.errors import StorageError
from cio_worker.job.hashing import hashstore_key, md5_b64_of_bytes
from cio_worker.storage import DownloadItem, Storage, StorageOptions, UploadItem, open_storage
from cio_worker.storage.retry import RetryPolicy
from tests.servers import Fault, FaultProxy, Seen

KiB = 1024
MiB = 1024 * 1024
FAST_RETRY = RetryPolicy(attempts=4, initial=0.01, maximum=0.05)
BACKENDS = ("file", "s3", "gcs")
CLOUD = ("s3", "gcs")


# --- content


def make_sources(root: Path, count: int, size: int, *, seed: int = 0, duplicates: int = 0) -> list[UploadItem]:
    """``count`` files of random bytes (the last ``duplicates`` repeat earlier contents)."""
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        source_index = i - (count - duplicates) if i >= count - duplicates else i
        data = random.Random(seed * 100_003 + source_index).randbytes(size)
        path = root / f"file{i:04d}.bin"
        path.write_bytes(data)
        md5 = md5_b64_of_bytes(data)
        items.append(UploadItem(key=hashstore_key(md5), source=path, md5=md5, size=size))
    return items


def downloads_of(uploads: list[UploadItem], dest: Path) -> list[DownloadItem]:
    return [DownloadItem(key=u.key, dest=dest / f"out{i:04d}.bin", md5=u.md5, size=u.size) for i, u in enumerate(uploads)]


def assert_same(uploads: list[UploadItem], downloads: list[DownloadItem]) -> None:
    for up, down in zip(uploads, downloads, strict=True):
        assert down.dest.read_bytes() == up.source.read_bytes(), down.key


class Recorder:
    """A Progress that counts what it is told."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files = self.total = self.bytes = 0
        self.done: list[str] = []

    def start(self, files: int, total_bytes: int) -> None:
        with self.lock:
            self.files, self.total, self.bytes, self.done = files, total_bytes, 0, []

    def advance(self, nbytes: int) -> None:
        with self.lock:
            self.bytes += nbytes

    def file_done(self, key: str) -> None:
        with self.lock:
            self.done.append(key)


# --- the stores


class Store:
    """One backend under test: opens Storage objects on it and reaches its content directly."""

    name: str
    proxy: FaultProxy | None = None  # cloud stores: sees (and can disturb) every request

    def open(self, **options: Any) -> Storage:
        """A Storage on this store's ``job`` prefix; ``options`` are StorageOptions fields."""
        raise NotImplementedError

    def seed(self, uploads: list[UploadItem]) -> None:
        """Put the files in the store, behind the backend's back."""
        raise NotImplementedError

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def names(self) -> list[str]:
        """Every object the store holds (full names)."""
        raise NotImplementedError

    def unfinished_uploads(self) -> list[object]:
        """Uploads begun and neither completed nor aborted (S3 multipart uploads)."""
        return []

    def where(self, key: str) -> str:
        """How the backend's messages name the object at ``key``."""
        raise NotImplementedError

    def corrupt(self, key: str) -> None:
        """From now on, whatever is fetched for ``key`` has the wrong bytes."""
        raise NotImplementedError

    def writes_seen(self) -> object:
        """A value that changes whenever anything is written to the store."""
        raise NotImplementedError

    def assert_uploaded_in_parts(self, item: UploadItem) -> None:
        """``item`` (11 MiB, sent with 1 MiB parts) is stored, whole and as the backend sends large files."""
        assert self.read(item.key) == item.source.read_bytes()


class FileStore(Store):
    name = "file"

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, **options: Any) -> Storage:
        options.setdefault("stall_seconds", 10)
        return open_storage(self.root.as_uri(), StorageOptions(**options))

    def seed(self, uploads: list[UploadItem]) -> None:
        for item in uploads:
            path = self.root / item.key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(item.source.read_bytes())

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def names(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def where(self, key: str) -> str:
        return key

    def corrupt(self, key: str) -> None:
        (self.root / key).write_bytes(b"not what the manifest says")

    def writes_seen(self) -> object:
        return {p: p.stat().st_mtime_ns for p in self.root.rglob("*") if p.is_file()}


class CloudStore(Store):
    """A fresh bucket on the session's server, reached through ``proxy``."""

    scheme: str
    unavailable_said: str  # what a message says after "still failed after 4 attempts: " on ``error(503)``
    denied_hint: str  # a word the message of a denied request has

    def __init__(self, endpoint: str, proxy: FaultProxy) -> None:
        self.endpoint = endpoint
        self.proxy = proxy
        self.bucket = f"cio-{uuid.uuid4().hex[:12]}"

    def extra(self, endpoint: str) -> dict[str, Any]:
        raise NotImplementedError

    def open(self, endpoint: str | None = None, bucket: str | None = None, **options: Any) -> Storage:
        """Through the proxy (or ``endpoint``), on ``bucket`` if given, with fast retries."""
        extra = {**self.extra(endpoint or self.proxy.url), "retry": FAST_RETRY, **options.pop("extra", {})}
        return open_storage(f"{self.scheme}://{bucket or self.bucket}/job", StorageOptions(extra=extra, **options))

    def where(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/job/{key}"

    def in_path(self, key: str) -> str:
        """How ``key`` shows in the path of a request for its object."""
        return key

    def corrupt(self, key: str) -> None:
        self.proxy.add(Fault("corrupt", method="GET", path_contains=self.in_path(key), times=-1))

    def writes_seen(self) -> object:
        return len(self.proxy.requests("PUT")) + len(self.proxy.requests("POST"))

    # requests seen
    def object_gets(self, key: str | None = None) -> list[Seen]:
        """GETs of objects' bytes (of ``key``'s only, if given)."""
        raise NotImplementedError

    def other_requests(self) -> list[Seen]:
        """Object requests that are not GETs of their bytes (metadata, existence checks)."""
        raise NotImplementedError

    def object_checks(self) -> list[Seen]:
        """Asked whether an object exists."""
        raise NotImplementedError

    def bucket_checks(self) -> list[Seen]:
        """Asked whether the bucket exists."""
        raise NotImplementedError

    def list_requests(self) -> list[Seen]:
        raise NotImplementedError

    def upload_requests(self) -> list[Seen]:
        """Requests that send a whole object or begin an upload."""
        raise NotImplementedError

    # the store's answers
    def error(self, status: int = 503, **fault: Any) -> Fault:
        """A throttling or server error answer in this store's dialect (``fault``: more Fault fields)."""
        raise NotImplementedError

    def denied(self, **fault: Any) -> Fault:
        raise NotImplementedError

    def upload_fault(self, fault: Fault, times: int = 1) -> Fault:
        """Aim ``fault`` at object uploads."""
        raise NotImplementedError


S3_SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
S3_DENIED = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"


class S3Store(CloudStore):
    name = scheme = "s3"
    unavailable_said = "SlowDown"
    denied_hint = "policies"

    def __init__(self, endpoint: str, proxy: FaultProxy) -> None:
        import boto3

        super().__init__(endpoint, proxy)
        self.raw = boto3.client("s3", endpoint_url=endpoint)
        self.raw.create_bucket(Bucket=self.bucket)

    def extra(self, endpoint: str) -> dict[str, Any]:
        return {"endpoint_url": endpoint}

    def seed(self, uploads: list[UploadItem]) -> None:
        for item in uploads:
            self.raw.put_object(Bucket=self.bucket, Key=f"job/{item.key}", Body=item.source.read_bytes())

    def read(self, key: str) -> bytes:
        return self.raw.get_object(Bucket=self.bucket, Key=f"job/{key}")["Body"].read()

    def names(self) -> list[str]:
        pages = self.raw.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return [entry["Key"] for page in pages for entry in page.get("Contents", ())]

    def unfinished_uploads(self) -> list[object]:
        return self.raw.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])

    def assert_uploaded_in_parts(self, item: UploadItem) -> None:
        head = self.raw.head_object(Bucket=self.bucket, Key=f"job/{item.key}")
        assert head["ETag"].endswith('-3"')  # multipart, 5 MiB parts (S3's minimum)
        assert head["Metadata"]["md5"] == item.md5
        assert len(self.proxy.requests("PUT", "partNumber=")) == 3

    def object_gets(self, key: str | None = None) -> list[Seen]:
        return self.proxy.requests("GET", f"/job/{key}" if key else "/job/")

    def other_requests(self) -> list[Seen]:
        gets = self.object_gets()
        return [s for s in self.proxy.requests() if s not in gets]

    def object_checks(self) -> list[Seen]:
        return self.proxy.requests("HEAD", "/job/")

    def bucket_checks(self) -> list[Seen]:
        return [s for s in self.proxy.requests("HEAD") if s.path.rstrip("/") == f"/{self.bucket}"]

    def list_requests(self) -> list[Seen]:
        return self.proxy.requests("GET", "list-type=2")

    def upload_requests(self) -> list[Seen]:
        return self.proxy.requests("PUT")

    def error(self, status: int = 503, **fault: Any) -> Fault:
        return Fault("status", status=status, body=S3_SLOW_DOWN, **fault)

    def denied(self, **fault: Any) -> Fault:
        return Fault("status", status=403, body=S3_DENIED, **fault)

    def upload_fault(self, fault: Fault, times: int = 1) -> Fault:
        fault.method, fault.path_contains, fault.times = "PUT", "hashstore", times
        return fault


def gcs_json_error(code: int, message: str, reason: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "errors": [{"reason": reason, "message": message}]}}).encode()


GCS_UNAVAILABLE = gcs_json_error(503, "Backend Error", "backendError")
GCS_DENIED = gcs_json_error(403, "caller does not have storage.objects.get access", "forbidden")


class GCSStore(CloudStore):
    name = "gcs"
    scheme = "gs"
    unavailable_said = "503 GET"
    denied_hint = "IAM"

    def __init__(self, endpoint: str, proxy: FaultProxy) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        super().__init__(endpoint, proxy)
        self.raw = gcs.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
        self.raw.create_bucket(self.bucket)

    def extra(self, endpoint: str) -> dict[str, Any]:
        return {"endpoint": endpoint, "anonymous": True}

    def seed(self, uploads: list[UploadItem]) -> None:
        for item in uploads:
            self.raw.bucket(self.bucket).blob(f"job/{item.key}").upload_from_filename(str(item.source))

    def read(self, key: str) -> bytes:
        return self.raw.bucket(self.bucket).blob(f"job/{key}").download_as_bytes()

    def names(self) -> list[str]:
        return [blob.name for blob in self.raw.list_blobs(self.bucket)]

    def assert_uploaded_in_parts(self, item: UploadItem) -> None:
        blob = self.raw.bucket(self.bucket).get_blob(f"job/{item.key}")
        assert blob.md5_hash == item.md5 and blob.size == 11 * MiB
        assert len(self.proxy.requests("POST", "uploadType=resumable")) == 1
        assert len(self.proxy.requests("PUT")) == 11  # 1 MiB resumable chunks: memory stays bounded

    def in_path(self, key: str) -> str:
        return key.replace("/", "%2F")

    def object_gets(self, key: str | None = None) -> list[Seen]:
        quoted = self.in_path(key) if key else None
        return [s for s in self.proxy.requests("GET", "alt=media") if quoted is None or quoted in s.path]

    def other_requests(self) -> list[Seen]:
        # (The library also fetches the bucket's metadata once per client, in the background, for
        # its tracing attributes: a bucket request, not counted here.)
        return [s for s in self.proxy.requests() if "/o" in s.path and "alt=media" not in s.path]

    def object_checks(self) -> list[Seen]:
        return [s for s in self.proxy.requests("GET") if "/o/" in s.path and "alt=media" not in s.path]

    def bucket_checks(self) -> list[Seen]:
        return self.proxy.requests("GET", f"/b/{self.bucket}?fields=name")

    def list_requests(self) -> list[Seen]:
        return self.proxy.requests("GET", f"/b/{self.bucket}/o?")

    def upload_requests(self) -> list[Seen]:
        return self.proxy.requests("POST", "/upload/")

    def error(self, status: int = 503, **fault: Any) -> Fault:
        return Fault("status", status=status, body=GCS_UNAVAILABLE, content_type="application/json", **fault)

    def denied(self, **fault: Any) -> Fault:
        return Fault("status", status=403, body=GCS_DENIED, content_type="application/json", **fault)

    def upload_fault(self, fault: Fault, times: int = 1) -> Fault:
        fault.method, fault.path_contains, fault.times = "POST", "/upload/", times
        return fault


def make_store(request: pytest.FixtureRequest, name: str) -> Store:
    """A fresh store of backend ``name`` (its server started on first use, for the session)."""
    if name == "file":
        return FileStore(request.getfixturevalue("tmp_path") / "store")
    kind: Callable[[str, FaultProxy], CloudStore] = S3Store if name == "s3" else GCSStore
    request.getfixturevalue("aws_env" if name == "s3" else "gcs_env")
    endpoint = request.getfixturevalue("s3_endpoint" if name == "s3" else "gcs_endpoint")
    return kind(endpoint, request.getfixturevalue("fault_proxy")(endpoint))


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Store:
    return make_store(request, request.param)


@pytest.fixture(params=CLOUD)
def cloud_store(request: pytest.FixtureRequest) -> CloudStore:
    return make_store(request, request.param)  # type: ignore[return-value]


@pytest.fixture
def s3_store(request: pytest.FixtureRequest) -> S3Store:
    return make_store(request, "s3")  # type: ignore[return-value]


@pytest.fixture
def gcs_store(request: pytest.FixtureRequest) -> GCSStore:
    return make_store(request, "gcs")  # type: ignore[return-value]


def assert_records_work(storage: Storage) -> None:
    """Small whole objects (records) go in and come back; a missing one is not_found."""
    storage.write_bytes("records/task.json", b'{"ok": true}')
    assert storage.read_bytes("records/task.json") == b'{"ok": true}'
    assert storage.exists(["records/task.json", "records/other.json"]) == {"records/task.json"}
    with pytest.raises(StorageError) as caught:
        storage.read_bytes("records/other.json")
    assert caught.value.code == "not_found"
