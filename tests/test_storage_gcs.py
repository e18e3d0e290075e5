"""gs:// storage against the real fake-gcs-server on loopback; faults come from a proxy in front of it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Callable

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage as gcs

from cio_worker.errors import ChecksumError, StorageError
from cio_worker.job.hashing import md5_b64_of_bytes
from cio_worker.storage import DownloadItem, StorageOptions, TransferError, UploadItem, open_storage
from cio_worker.storage.gcs import GCSStorage
from cio_worker.storage.retry import RetryPolicy
from tests.servers import Fault, FaultProxy
from tests.test_storage_file import KiB, MiB, Recorder, assert_same, downloads_of, make_sources

FAST_RETRY = RetryPolicy(attempts=4, initial=0.01, maximum=0.05)


def json_error(code: int, message: str, reason: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "errors": [{"reason": reason, "message": message}]}}).encode()


UNAVAILABLE = json_error(503, "Backend Error", "backendError")
DENIED = json_error(403, "caller does not have storage.objects.get access", "forbidden")


@pytest.fixture
def raw(gcs_endpoint: str, gcs_env: None) -> gcs.Client:
    """A plain client straight to the server, to seed and inspect."""
    return gcs.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs_endpoint})


@pytest.fixture
def bucket(raw: gcs.Client) -> str:
    name = f"cio-{uuid.uuid4().hex[:12]}"
    raw.create_bucket(name)
    return name


@pytest.fixture
def proxy(fault_proxy: Callable[[str], FaultProxy], gcs_endpoint: str) -> FaultProxy:
    return fault_proxy(gcs_endpoint)


@pytest.fixture
def store(bucket: str, proxy: FaultProxy) -> Callable[..., GCSStorage]:
    """A GCSStorage on ``gs://bucket/job`` through the proxy, anonymous, fast retries."""

    def make(bucket_name: str | None = None, **options) -> GCSStorage:
        extra = {"endpoint": proxy.url, "anonymous": True, "retry": FAST_RETRY, **options.pop("extra", {})}
        storage = open_storage(f"gs://{bucket_name or bucket}/job", StorageOptions(extra=extra, **options))
        assert isinstance(storage, GCSStorage)
        return storage

    return make


def seed(raw: gcs.Client, bucket: str, uploads: list[UploadItem]) -> None:
    for item in uploads:
        raw.bucket(bucket).blob(f"job/{item.key}").upload_from_filename(str(item.source))


def object_names(raw: gcs.Client, bucket: str) -> list[str]:
    return [blob.name for blob in raw.list_blobs(bucket)]


def media_gets(proxy: FaultProxy, key: str | None = None) -> list:
    quoted = key.replace("/", "%2F") if key else None
    return [s for s in proxy.requests("GET", "alt=media") if quoted is None or quoted in s.path]


def other_object_requests(proxy: FaultProxy) -> list:
    """Object requests other than media GETs (metadata reloads, HEAD-like checks).

    (The library also fetches the bucket's metadata once per client, in the background, for its
    tracing attributes: a bucket request, not counted here.)
    """
    return [s for s in proxy.requests() if "/o" in s.path and "alt=media" not in s.path]


def test_cold_download_of_many_small_files_is_one_get_each(store, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 150, 4 * KiB)
    seed(raw, bucket, uploads)
    downloads = downloads_of(uploads, tmp_path / "dest")
    progress = Recorder()

    store().download(downloads, progress)
    assert_same(uploads, downloads)
    assert len(media_gets(proxy)) == 150 and other_object_requests(proxy) == []  # no metadata reloads
    assert (len(progress.done), progress.bytes) == (150, 150 * 4 * KiB)

    for item in downloads[:10]:
        item.dest.write_bytes(b"stale")
    store().download(downloads)  # the same batch again
    assert_same(uploads, downloads)
    assert len(media_gets(proxy)) == 300 and other_object_requests(proxy) == []


def test_large_objects_go_in_parts_both_ways_with_md5_checked(store, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 1, 11 * MiB)
    storage = store(part_size=1 * MiB, large_threshold=2 * MiB)

    storage.upload(uploads)
    blob = raw.bucket(bucket).get_blob(f"job/{uploads[0].key}")
    assert blob.md5_hash == uploads[0].md5 and blob.size == 11 * MiB
    assert len(proxy.requests("POST", "uploadType=resumable")) == 1
    assert len(proxy.requests("PUT")) == 11  # 1 MiB resumable chunks: memory stays bounded

    downloads = downloads_of(uploads, tmp_path / "dest")
    storage.download(downloads)
    assert_same(uploads, downloads)
    ranges = sorted(s.range for s in media_gets(proxy, uploads[0].key))
    assert len(ranges) == 11 and "bytes=0-1048575" in ranges and "bytes=10485760-11534335" in ranges

    # One corrupted part: the whole object is fetched again and verified.
    proxy.add(Fault("corrupt", method="GET", path_contains="alt=media"))
    storage.download(downloads)
    assert_same(uploads, downloads)
    assert len(media_gets(proxy, uploads[0].key)) == 11 * 3


def test_upload_that_does_not_match_its_md5_leaves_nothing(store, raw, bucket, tmp_path: Path) -> None:
    small, large = make_sources(tmp_path / "a", 1, 10 * KiB) + make_sources(tmp_path / "b", 1, 9 * MiB, seed=1)
    wrong = md5_b64_of_bytes(b"something else")
    items = [UploadItem(small.key, small.source, wrong), UploadItem(large.key, large.source, wrong)]
    with pytest.raises(TransferError) as caught:
        store(part_size=1 * MiB).upload(items)
    assert caught.value.code == "checksum_mismatch" and len(caught.value.failures) == 2
    assert all(isinstance(f.error, ChecksumError) for f in caught.value.failures)
    assert object_names(raw, bucket) == []


def test_upload_missing_sends_nothing_the_second_time(store, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 30, 2 * KiB, duplicates=5)
    storage = store()
    assert storage.upload_missing(uploads) == 5
    assert len(object_names(raw, bucket)) == 25
    assert len(proxy.requests("POST", "uploadType=multipart")) == 25

    proxy.clear()
    progress = Recorder()
    assert storage.upload_missing(uploads, progress) == 30
    assert proxy.requests("POST") == [] and proxy.requests("PUT") == []
    assert progress.done == []


def test_exists_lists_for_many_keys_and_asks_about_a_few(store, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 60, 100)
    seed(raw, bucket, uploads[:40])

    assert store().exists(u.key for u in uploads) == {u.key for u in uploads[:40]}
    listed = proxy.requests("GET", f"/b/{bucket}/o?")
    assert len(listed) == len(other_object_requests(proxy)) == 1

    proxy.clear()
    few = [uploads[0].key, uploads[1].key, uploads[50].key]
    assert store().exists(few) == {uploads[0].key, uploads[1].key}
    object_gets = [s for s in proxy.requests("GET") if "/o/" in s.path]
    assert len(object_gets) == len(other_object_requests(proxy)) == 3
    assert len(proxy.requests("GET", f"/b/{bucket}?fields=name")) == 1  # a miss checks the bucket, once


def test_corrupted_object_is_fetched_twice_then_a_checksum_error_naming_the_key(store, raw, bucket, proxy, tmp_path) -> None:
    uploads = make_sources(tmp_path / "src", 3, 8 * KiB)
    seed(raw, bucket, uploads)
    bad = uploads[1].key
    proxy.add(Fault("corrupt", method="GET", path_contains=bad.replace("/", "%2F"), times=-1))
    downloads = downloads_of(uploads, tmp_path / "dest")

    with pytest.raises(TransferError) as caught:
        store().download(downloads)
    assert caught.value.code == "checksum_mismatch"
    assert [f.key for f in caught.value.failures] == [bad]
    assert f"gs://{bucket}/job/{bad}" in str(caught.value)
    assert len(media_gets(proxy, bad)) == 2
    assert not downloads[1].dest.exists() and downloads[0].dest.exists()


def test_without_a_manifest_md5_the_library_checks_crc32c(store, raw, bucket, proxy, tmp_path) -> None:
    uploads = make_sources(tmp_path / "src", 1, 8 * KiB)
    seed(raw, bucket, uploads)
    proxy.add(Fault("corrupt", method="GET", path_contains="alt=media"))
    item = DownloadItem(uploads[0].key, tmp_path / "dest" / "x")
    store().download([item])  # corrupted once: DataCorruption, retried
    assert item.dest.read_bytes() == uploads[0].source.read_bytes()
    assert len(media_gets(proxy)) == 2


def test_a_missing_bucket_says_which_bucket(store, tmp_path: Path) -> None:
    storage = store(bucket_name="no-such-bucket-here")
    with pytest.raises(TransferError) as caught:
        storage.download([DownloadItem("hashstore/" + "1" * 32, tmp_path / "x", size=10)])
    assert caught.value.code == "no_bucket"
    assert "'no-such-bucket-here' does not exist" in str(caught.value) and "endpoint" in str(caught.value)
    for action in (lambda: storage.read_bytes("records/a.json"), lambda: storage.exists(["hashstore/a"])):
        with pytest.raises(StorageError, match="'no-such-bucket-here' does not exist") as caught:
            action()
        assert caught.value.code == "no_bucket"
    assert not (tmp_path / "x").exists()


def test_a_missing_object_is_not_found(store, bucket, tmp_path: Path) -> None:
    with pytest.raises(TransferError) as caught:
        store().download([DownloadItem("hashstore/" + "2" * 32, tmp_path / "x")])
    assert caught.value.code == "not_found"
    assert f"gs://{bucket}/job/hashstore/{'2' * 32} does not exist" in str(caught.value)


def test_a_denied_request_is_a_clear_error_and_not_retried(store, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 2, 1 * KiB)
    seed(raw, bucket, uploads)
    denied = uploads[0].key.replace("/", "%2F")
    proxy.add(Fault("status", status=403, body=DENIED, content_type="application/json", path_contains=denied, times=-1))

    with pytest.raises(TransferError) as caught:
        store().download(downloads_of(uploads, tmp_path / "dest"))
    message = str(caught.value)
    assert caught.value.code == "denied" and [f.key for f in caught.value.failures] == [uploads[0].key]
    assert f"access denied to gs://{bucket}/job/{uploads[0].key}" in message
    assert "credentials" in message and "IAM" in message
    assert len(proxy.requests("GET", denied)) == 1

    proxy.add(Fault("status", status=403, body=DENIED, content_type="application/json", method="POST", times=-1))
    with pytest.raises(TransferError) as caught:
        store().upload([uploads[0]])
    assert caught.value.code == "denied" and len(proxy.requests("POST")) == 1


def test_throttling_and_resets_are_retried(store, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 4, 64 * KiB)
    seed(raw, bucket, uploads)
    slow, reset, cut, fine = (u.key.replace("/", "%2F") for u in uploads)
    proxy.add(Fault("status", status=503, body=UNAVAILABLE, content_type="application/json", path_contains=slow, times=2))
    proxy.add(Fault("status", status=429, body=UNAVAILABLE, content_type="application/json", path_contains=fine))
    proxy.add(Fault("reset", method="GET", path_contains=reset))
    proxy.add(Fault("reset_body", method="GET", path_contains=cut))
    downloads = downloads_of(uploads, tmp_path / "dest")

    store().download(downloads)
    assert_same(uploads, downloads)
    assert [len(proxy.requests("GET", key)) for key in (slow, reset, cut, fine)] == [3, 2, 2, 2]

    more = make_sources(tmp_path / "more", 1, 1 * KiB, seed=7)
    proxy.add(Fault("status", status=503, body=UNAVAILABLE, content_type="application/json", method="POST"))
    store().upload(more)
    assert raw.bucket(bucket).blob(f"job/{more[0].key}").download_as_bytes() == more[0].source.read_bytes()
    assert len(proxy.requests("POST")) == 2


def test_retries_give_up_with_a_clear_error(store, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 1, 1 * KiB)
    seed(raw, bucket, uploads)
    proxy.add(Fault("status", status=503, body=UNAVAILABLE, content_type="application/json", times=-1))
    with pytest.raises(TransferError) as caught:
        store().download(downloads_of(uploads, tmp_path / "dest"))
    assert caught.value.code == "unavailable" and "after 4 attempts" in str(caught.value)
    assert len(media_gets(proxy)) == 4


def test_the_stall_detector_fails_a_batch_the_store_stopped_answering(store, raw, bucket, proxy, tmp_path) -> None:
    uploads = make_sources(tmp_path / "src", 3, 1 * KiB)
    seed(raw, bucket, uploads)
    proxy.add(Fault("stall", method="GET", path_contains=uploads[2].key.replace("/", "%2F")))
    downloads = downloads_of(uploads, tmp_path / "dest")
    with pytest.raises(TransferError) as caught:
        store(stall_seconds=1.0, extra={"read_timeout": 60}).download(downloads)
    assert caught.value.code == "stalled" and [f.key for f in caught.value.failures] == [uploads[2].key]
    assert downloads[0].dest.exists() and downloads[1].dest.exists()


def test_storage_emulator_host_just_works(gcs_endpoint, bucket, monkeypatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    storage = open_storage(f"gs://{bucket}/job")
    assert isinstance(storage.client._credentials, AnonymousCredentials)
    storage.write_bytes("records/task.json", b'{"ok": true}')
    assert storage.read_bytes("records/task.json") == b'{"ok": true}'
    assert storage.exists(["records/task.json", "records/other.json"]) == {"records/task.json"}
    with pytest.raises(StorageError) as caught:
        storage.read_bytes("records/other.json")
    assert caught.value.code == "not_found"


def test_the_http_pool_fits_the_concurrency(store) -> None:
    storage = store(concurrency=12, extra={"part_concurrency": 3})
    adapter = storage.client._http.get_adapter("http://127.0.0.1/")
    assert adapter._pool_maxsize == 15 and adapter.max_retries.total == 0


# --- the direct media path: resumed parts, stores without ranges, upload chunks, proxies


def test_a_part_cut_short_resumes_where_it_stopped(store, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 1, 3 * MiB)
    seed(raw, bucket, uploads)
    proxy.add(Fault("cut_body", method="GET", path_contains="alt=media"))  # half of one part, then EOF
    downloads = downloads_of(uploads, tmp_path / "dest")

    store(part_size=1 * MiB, large_threshold=2 * MiB).download(downloads)
    assert_same(uploads, downloads)
    starts = [int(s.range.split("=")[1].split("-")[0]) for s in media_gets(proxy, uploads[0].key)]
    assert len(starts) == 4 and [s % MiB for s in starts if s % MiB] == [512 * KiB]


def test_a_store_that_ignores_ranges_is_a_clear_error_not_retried(store, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 1, 3 * MiB)
    seed(raw, bucket, uploads)
    proxy.add(Fault("drop_range", method="GET", times=-1))
    with pytest.raises(TransferError) as caught:
        store(part_size=1 * MiB, large_threshold=2 * MiB).download(downloads_of(uploads, tmp_path / "dest"))
    assert caught.value.code == "no_ranges" and "ranged GETs" in str(caught.value)
    ranges = [s.range for s in media_gets(proxy)]
    assert 1 <= len(ranges) <= 3 and len(set(ranges)) == len(ranges)  # none retried (later parts may be cancelled)


def test_resumable_uploads_send_big_chunks_within_a_memory_budget(store, raw, bucket, proxy, tmp_path: Path) -> None:
    storage = store()
    assert storage._upload_chunk(concurrency=4) == 64 * MiB
    assert storage._upload_chunk(concurrency=16) == 16 * MiB
    assert storage._upload_chunk(concurrency=64) == 8 * MiB  # never under 8 MiB
    assert store(part_size=1 * MiB)._upload_chunk(concurrency=4) == 1 * MiB  # configured: as it is

    uploads = make_sources(tmp_path / "src", 1, 20 * MiB)
    store(concurrency=4).upload(uploads)
    assert len(proxy.requests("PUT")) == 1  # one chunk for the whole object
    assert raw.bucket(bucket).get_blob(f"job/{uploads[0].key}").md5_hash == uploads[0].md5


def test_proxy_settings_from_the_environment_are_read_once_and_kept(gcs_endpoint, bucket, fault_proxy,
                                                                    monkeypatch, tmp_path: Path) -> None:  # fmt: skip
    forward = fault_proxy(gcs_endpoint)  # plays an HTTP proxy: it forwards what it is sent
    monkeypatch.setenv("HTTP_PROXY", forward.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    storage = open_storage(f"gs://{bucket}/job", StorageOptions(extra={"endpoint": gcs_endpoint, "anonymous": True}))
    assert storage.client._http.trust_env is False and storage.client._http.proxies["http"] == forward.url
    storage.write_bytes("records/a.json", b"{}")
    assert storage.read_bytes("records/a.json") == b"{}"
    assert len(forward.requests()) >= 2

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    bypass = open_storage(f"gs://{bucket}/job", StorageOptions(extra={"endpoint": gcs_endpoint, "anonymous": True}))
    assert "http" not in bypass.client._http.proxies
