"""s3:// storage against moto's real S3 server on loopback; faults come from a proxy in front of it."""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import quote
from typing import Callable

import boto3
import pytest

from cio_worker.errors import ChecksumError, StorageError
from cio_worker.job.hashing import md5_b64_of_bytes
from cio_worker.storage import DownloadItem, StorageOptions, TransferError, UploadItem, open_storage
from cio_worker.storage.retry import RetryPolicy
from cio_worker.storage.s3 import S3Storage
from tests.servers import Fault, FaultProxy
from tests.test_storage_file import KiB, MiB, Recorder, assert_same, downloads_of, make_sources

FAST_RETRY = RetryPolicy(attempts=4, initial=0.01, maximum=0.05)
SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
DENIED = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"


@pytest.fixture
def raw(s3_endpoint: str, aws_env: None):
    """A plain boto3 client straight to the server, to seed and inspect."""
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def bucket(raw) -> str:
    name = f"cio-{uuid.uuid4().hex[:12]}"
    raw.create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(fault_proxy: Callable[[str], FaultProxy], s3_endpoint: str) -> FaultProxy:
    return fault_proxy(s3_endpoint)


@pytest.fixture
def s3(bucket: str, proxy: FaultProxy) -> Callable[..., S3Storage]:
    """An S3Storage on ``s3://bucket/job`` through the proxy (or ``endpoint``), fast retries."""

    def make(endpoint: str | None = None, bucket_name: str | None = None, **options) -> S3Storage:
        extra = {"endpoint_url": endpoint or proxy.url, "retry": FAST_RETRY, **options.pop("extra", {})}
        storage = open_storage(f"s3://{bucket_name or bucket}/job", StorageOptions(extra=extra, **options))
        assert isinstance(storage, S3Storage)
        return storage

    return make


def seed(raw, bucket: str, uploads: list[UploadItem]) -> None:
    for item in uploads:
        raw.put_object(Bucket=bucket, Key=f"job/{item.key}", Body=item.source.read_bytes())


def object_keys(raw, bucket: str) -> list[str]:
    pages = raw.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [entry["Key"] for page in pages for entry in page.get("Contents", ())]


def test_cold_download_of_many_small_files_is_one_get_each(s3, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 150, 4 * KiB)
    seed(raw, bucket, uploads)
    downloads = downloads_of(uploads, tmp_path / "dest")
    progress = Recorder()

    s3().download(downloads, progress)
    assert_same(uploads, downloads)
    assert len(proxy.requests("GET")) == 150 and proxy.requests("HEAD") == []
    assert (len(progress.done), progress.bytes) == (150, 150 * 4 * KiB)

    for item in downloads[:10]:
        item.dest.write_bytes(b"stale")
    s3().download(downloads)  # the same batch again
    assert_same(uploads, downloads)
    assert len(proxy.requests("GET")) == 300 and proxy.requests("HEAD") == []


def test_large_objects_go_in_parts_both_ways_with_md5_checked(s3, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 1, 11 * MiB)
    storage = s3(part_size=1 * MiB, large_threshold=2 * MiB)

    storage.upload(uploads)
    head = raw.head_object(Bucket=bucket, Key=f"job/{uploads[0].key}")
    assert head["ETag"].endswith('-3"')  # multipart, 5 MiB parts (S3's minimum)
    assert head["Metadata"]["md5"] == uploads[0].md5
    assert len(proxy.requests("PUT", "partNumber=")) == 3

    downloads = downloads_of(uploads, tmp_path / "dest")
    storage.download(downloads)
    assert_same(uploads, downloads)
    ranges = sorted(r.range for r in proxy.requests("GET", uploads[0].key))
    assert len(ranges) == 11 and "bytes=0-1048575" in ranges and "bytes=10485760-11534335" in ranges

    # One corrupted part: the whole object is fetched again and verified.
    proxy.add(Fault("corrupt", method="GET", path_contains=uploads[0].key))
    downloads[0].dest.unlink()
    storage.download(downloads)
    assert_same(uploads, downloads)
    assert len(proxy.requests("GET", uploads[0].key)) == 11 * 3


def test_upload_that_does_not_match_its_md5_leaves_nothing(s3, raw, bucket, tmp_path: Path) -> None:
    small, large = make_sources(tmp_path / "a", 1, 10 * KiB) + make_sources(tmp_path / "b", 1, 11 * MiB, seed=1)
    wrong = md5_b64_of_bytes(b"something else")
    items = [UploadItem(small.key, small.source, wrong), UploadItem(large.key, large.source, wrong)]
    with pytest.raises(TransferError) as caught:
        s3(part_size=1 * MiB, large_threshold=2 * MiB).upload(items)
    assert caught.value.code == "checksum_mismatch" and len(caught.value.failures) == 2
    assert object_keys(raw, bucket) == []
    assert raw.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_upload_missing_sends_nothing_the_second_time(s3, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 30, 2 * KiB, duplicates=5)
    storage = s3()
    assert storage.upload_missing(uploads) == 5
    assert len(object_keys(raw, bucket)) == 25
    assert len(proxy.requests("PUT")) == 25

    proxy.clear()
    progress = Recorder()
    assert storage.upload_missing(uploads, progress) == 30
    assert proxy.requests("PUT") == [] and proxy.requests("POST") == []
    assert progress.done == []


def test_exists_lists_for_many_keys_and_heads_a_few(s3, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 60, 100)
    seed(raw, bucket, uploads[:40])
    storage = s3()

    assert storage.exists(u.key for u in uploads) == {u.key for u in uploads[:40]}
    assert proxy.requests("HEAD") == [] and len(proxy.requests("GET", "list-type=2")) == 1

    proxy.clear()
    few = [uploads[0].key, uploads[1].key, uploads[50].key]
    fresh = s3()
    assert fresh.exists(few) == {uploads[0].key, uploads[1].key}
    assert len(proxy.requests("HEAD")) == 3 + 1  # one HEAD per key; a miss checks the bucket, once
    assert fresh.exists(few) == {uploads[0].key, uploads[1].key}
    assert len(proxy.requests("HEAD")) == 4 + 3


def test_corrupted_object_is_fetched_twice_then_a_checksum_error_naming_the_key(s3, raw, bucket, proxy, tmp_path) -> None:
    uploads = make_sources(tmp_path / "src", 3, 8 * KiB)
    seed(raw, bucket, uploads)
    bad = uploads[1].key
    proxy.add(Fault("corrupt", method="GET", path_contains=bad, times=-1))
    downloads = downloads_of(uploads, tmp_path / "dest")

    with pytest.raises(TransferError) as caught:
        s3().download(downloads)
    assert caught.value.code == "checksum_mismatch"
    assert [f.key for f in caught.value.failures] == [bad]
    assert isinstance(caught.value.failures[0].error, ChecksumError)
    assert f"s3://{bucket}/job/{bad}" in str(caught.value)
    assert len(proxy.requests("GET", bad)) == 2
    assert not downloads[1].dest.exists() and downloads[0].dest.exists()


def test_a_missing_bucket_says_which_bucket(s3, tmp_path: Path) -> None:
    storage = s3(bucket_name="no-such-bucket-here")
    with pytest.raises(TransferError) as caught:
        storage.download([DownloadItem("hashstore/" + "1" * 32, tmp_path / "x", size=10)])
    assert caught.value.code == "no_bucket"
    assert "'no-such-bucket-here' does not exist" in str(caught.value) and "endpoint" in str(caught.value)
    for action in (lambda: storage.read_bytes("records/a.json"), lambda: storage.exists(["hashstore/a"])):
        with pytest.raises(StorageError, match="'no-such-bucket-here' does not exist") as caught:
            action()
        assert caught.value.code == "no_bucket"
    assert not (tmp_path / "x").exists()


def test_a_missing_object_is_not_found(s3, bucket, tmp_path: Path) -> None:
    with pytest.raises(TransferError) as caught:
        s3().download([DownloadItem("hashstore/" + "2" * 32, tmp_path / "x")])
    assert caught.value.code == "not_found"
    assert f"s3://{bucket}/job/hashstore/{'2' * 32} does not exist" in str(caught.value)


def test_a_denied_request_is_a_clear_error_and_not_retried(s3, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 2, 1 * KiB)
    seed(raw, bucket, uploads)
    denied = uploads[0].key
    proxy.add(Fault("status", status=403, body=DENIED, path_contains=denied, times=-1))

    with pytest.raises(TransferError) as caught:
        s3().download(downloads_of(uploads, tmp_path / "dest"))
    message = str(caught.value)
    assert caught.value.code == "denied" and [f.key for f in caught.value.failures] == [denied]
    assert f"access denied to s3://{bucket}/job/{denied}" in message
    assert "credentials" in message and "policies" in message
    assert len(proxy.requests("GET", denied)) == 1

    with pytest.raises(TransferError) as caught:
        s3().upload([uploads[0]])
    assert caught.value.code == "denied" and len(proxy.requests("PUT", denied)) == 1


def test_throttling_and_resets_are_retried(s3, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 4, 64 * KiB)
    seed(raw, bucket, uploads)
    slow, reset, cut, fine = (u.key for u in uploads)
    proxy.add(Fault("status", status=503, body=SLOW_DOWN, method="GET", path_contains=slow, times=2))
    proxy.add(Fault("reset", method="GET", path_contains=reset))
    proxy.add(Fault("reset_body", method="GET", path_contains=cut))
    downloads = downloads_of(uploads, tmp_path / "dest")

    s3().download(downloads)
    assert_same(uploads, downloads)
    counts = [len(proxy.requests("GET", key)) for key in (slow, reset, cut, fine)]
    assert counts == [3, 2, 2, 1]

    more = make_sources(tmp_path / "more", 1, 1 * KiB, seed=7)
    proxy.add(Fault("status", status=503, body=SLOW_DOWN, method="PUT", path_contains=more[0].key))
    s3().upload(more)
    assert raw.get_object(Bucket=bucket, Key=f"job/{more[0].key}")["Body"].read() == more[0].source.read_bytes()
    assert len(proxy.requests("PUT", more[0].key)) == 2


def test_retries_give_up_with_a_clear_error(s3, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 1, 1 * KiB)
    seed(raw, bucket, uploads)
    proxy.add(Fault("status", status=503, body=SLOW_DOWN, times=-1))
    with pytest.raises(TransferError) as caught:
        s3().download(downloads_of(uploads, tmp_path / "dest"))
    assert caught.value.code == "unavailable" and "after 4 attempts: SlowDown" in str(caught.value)
    assert len(proxy.requests("GET")) == 4


def test_the_stall_detector_fails_a_batch_the_store_stopped_answering(s3, raw, bucket, proxy, tmp_path) -> None:
    uploads = make_sources(tmp_path / "src", 3, 1 * KiB)
    seed(raw, bucket, uploads)
    proxy.add(Fault("stall", method="GET", path_contains=uploads[2].key))
    downloads = downloads_of(uploads, tmp_path / "dest")
    with pytest.raises(TransferError) as caught:
        s3(stall_seconds=1.0, extra={"read_timeout": 60}).download(downloads)
    assert caught.value.code == "stalled" and [f.key for f in caught.value.failures] == [uploads[2].key]
    assert downloads[0].dest.exists() and downloads[1].dest.exists()


def test_the_endpoint_comes_from_aws_endpoint_url(s3_endpoint, bucket, monkeypatch, aws_env) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    storage = open_storage(f"s3://{bucket}/job")
    assert storage.client.meta.endpoint_url == s3_endpoint
    storage.write_bytes("records/task.json", b'{"ok": true}')
    assert storage.read_bytes("records/task.json") == b'{"ok": true}'
    assert storage.exists(["records/task.json", "records/other.json"]) == {"records/task.json"}
    with pytest.raises(StorageError) as caught:
        storage.read_bytes("records/other.json")
    assert caught.value.code == "not_found"


def test_client_pool_and_retries_are_configured(s3) -> None:
    storage = s3(concurrency=12, extra={"part_concurrency": 3, "read_timeout": 7})
    config = storage.client.meta.config
    assert config.max_pool_connections == 15
    assert config.retries["total_max_attempts"] == 1
    assert config.read_timeout == 7


# --- ranged parts chosen for the batch, resumed parts, stores without ranges, the direct GET path


def test_large_objects_are_split_only_as_far_as_the_streams_need(s3, raw, bucket, proxy, tmp_path: Path) -> None:
    one = make_sources(tmp_path / "one", 1, 17 * MiB)
    two = make_sources(tmp_path / "two", 2, 17 * MiB, seed=1)
    seed(raw, bucket, one + two)
    storage = s3(large_threshold=1 * MiB, extra={"part_concurrency": 4})

    storage.download(downloads_of(one, tmp_path / "a"))  # alone: 4 streams, parts of at least 8 MiB
    assert sorted(r.range for r in proxy.requests("GET", one[0].key)) == [
        "bytes=0-8388607", "bytes=16777216-17825791", "bytes=8388608-16777215"]  # fmt: skip
    downloads = downloads_of(two, tmp_path / "b")
    storage.download(downloads)  # two objects share the 4 streams: two parts each
    assert_same(two, downloads)
    for item in two:
        assert sorted(r.range for r in proxy.requests("GET", item.key)) == ["bytes=0-9437183", "bytes=9437184-17825791"]


def test_a_part_cut_short_resumes_where_it_stopped(s3, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 1, 3 * MiB)
    seed(raw, bucket, uploads)
    proxy.add(Fault("cut_body", method="GET", path_contains=uploads[0].key))  # half of one part, then EOF
    downloads = downloads_of(uploads, tmp_path / "dest")

    s3(part_size=1 * MiB, large_threshold=2 * MiB).download(downloads)
    assert_same(uploads, downloads)
    ranges = [r.range for r in proxy.requests("GET", uploads[0].key)]
    assert len(ranges) == 4
    resumed = [r for r in ranges if int(r.split("=")[1].split("-")[0]) % MiB]
    assert len(resumed) == 1 and int(resumed[0].split("=")[1].split("-")[0]) % MiB == 512 * KiB


def test_a_store_that_ignores_ranges_is_a_clear_error_not_retried(s3, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 1, 3 * MiB)
    seed(raw, bucket, uploads)
    proxy.add(Fault("drop_range", method="GET", times=-1))
    with pytest.raises(TransferError) as caught:
        s3(part_size=1 * MiB, large_threshold=2 * MiB).download(downloads_of(uploads, tmp_path / "dest"))
    assert caught.value.code == "no_ranges" and "ranged GETs" in str(caught.value)
    ranges = [r.range for r in proxy.requests("GET")]
    assert 1 <= len(ranges) <= 3 and len(set(ranges)) == len(ranges)  # none retried (later parts may be cancelled)
    assert not (tmp_path / "dest" / "out0000.bin").exists()


def test_a_redirect_hands_the_direct_path_over_to_the_sdk(s3, raw, bucket, proxy, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 3, 4 * KiB)
    seed(raw, bucket, uploads)
    moved = b"<Error><Code>PermanentRedirect</Code><Message>use the bucket's endpoint</Message></Error>"
    proxy.add(Fault("status", status=301, body=moved, method="GET", times=1))
    storage = s3(concurrency=1)
    assert storage._direct_gets() is not None
    downloads = downloads_of(uploads, tmp_path / "dest")

    storage.download(downloads)
    assert_same(uploads, downloads)
    assert storage._direct is None  # the SDK (with its redirect handling) serves this store from now on
    assert len(proxy.requests("GET")) == 3 + 1


def test_direct_gets_address_and_sign_keys_as_the_sdk_does(s3, raw, bucket, tmp_path: Path) -> None:
    storage = s3()
    direct = storage._direct_gets()
    name = "job/odd name+(1)~é.bin"
    raw.put_object(Bucket=bucket, Key=name, Body=b"odd")
    body = direct.open(name)
    assert body.read() == b"odd"
    body.release_conn()
    # the URL is the SDK's own (moto does not check signatures, so compare with what botocore builds)
    presigned = storage.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": name})
    assert presigned.split("?")[0] == direct.base + quote(name, safe="/~")
    assert direct.region == storage.client.meta.region_name
