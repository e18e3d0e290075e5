"""What every storage backend must do, each scenario run on file://, S3 (moto's server) and GCS
(fake-gcs-server); those about requests, faults and buckets on the cloud stores only, with the
faults injected by a proxy in front of the server. The stores and their dialects are in
tests/stores.py; what only one backend does is in test_storage_s3.py / test_storage_gcs.py."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from cio_worker.errors import ChecksumError, StorageError
from cio_worker.job.hashing import md5_b64_of_bytes
from cio_worker.storage import DownloadItem, TransferError, UploadItem
from cio_worker.storage.progress import TerminalProgress
from tests.servers import Fault
from tests.stores import CloudStore, KiB, MiB, Recorder, Store, assert_records_work, assert_same, downloads_of, make_sources

LARGE = {"part_size": 1 * MiB, "large_threshold": 2 * MiB}  # 3 MiB and up: ranged parts of 1 MiB


def starts(ranges: list[str | None]) -> list[int]:
    return [int(r.split("=")[1].split("-")[0]) for r in ranges if r]


# --- every store


def test_cold_download_of_many_small_files_is_one_get_each(store: Store, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 150, 4 * KiB)
    store.seed(uploads)
    downloads = downloads_of(uploads, tmp_path / "dest")
    progress = Recorder()

    store.open().download(downloads, progress)
    assert_same(uploads, downloads)
    assert (progress.files, len(progress.done), progress.bytes) == (150, 150, 150 * 4 * KiB)
    if isinstance(store, CloudStore):
        assert len(store.object_gets()) == 150 and store.other_requests() == []  # no HEAD, no metadata reload

    for item in downloads[:10]:
        item.dest.write_bytes(b"stale")
    store.open().download(downloads, progress)  # the same batch again
    assert_same(uploads, downloads)
    if isinstance(store, CloudStore):
        assert len(store.object_gets()) == 300 and store.other_requests() == []


def test_large_objects_go_in_parts_both_ways_with_md5_checked(store: Store, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 1, 11 * MiB)
    storage = store.open(**LARGE)

    storage.upload(uploads)
    store.assert_uploaded_in_parts(uploads[0])

    downloads = downloads_of(uploads, tmp_path / "dest")
    storage.download(downloads)
    assert_same(uploads, downloads)
    if not isinstance(store, CloudStore):
        return
    ranges = sorted(s.range for s in store.object_gets(uploads[0].key))
    assert len(ranges) == 11 and "bytes=0-1048575" in ranges and "bytes=10485760-11534335" in ranges

    # One corrupted part: the whole object is fetched again and verified.
    store.proxy.add(Fault("corrupt", method="GET", path_contains=store.in_path(uploads[0].key)))
    downloads[0].dest.unlink()
    storage.download(downloads)
    assert_same(uploads, downloads)
    assert len(store.object_gets(uploads[0].key)) == 11 * 3


def test_upload_that_does_not_match_its_md5_leaves_nothing(store: Store, tmp_path: Path) -> None:
    small, large = make_sources(tmp_path / "a", 1, 10 * KiB) + make_sources(tmp_path / "b", 1, 11 * MiB, seed=1)
    wrong = md5_b64_of_bytes(b"something else")
    items = [UploadItem(small.key, small.source, wrong), UploadItem(large.key, large.source, wrong)]
    with pytest.raises(TransferError) as caught:
        store.open(**LARGE).upload(items)
    assert caught.value.code == "checksum_mismatch" and len(caught.value.failures) == 2
    assert all(isinstance(f.error, ChecksumError) for f in caught.value.failures)
    assert store.names() == [] and store.unfinished_uploads() == []


def test_upload_missing_sends_nothing_the_second_time(store: Store, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 30, 2 * KiB, duplicates=5)
    storage = store.open()
    assert storage.upload_missing(uploads) == 5  # the duplicate contents
    assert len(store.names()) == 25
    if isinstance(store, CloudStore):
        assert len(store.upload_requests()) == 25

    written = store.writes_seen()
    progress = Recorder()
    assert storage.upload_missing(uploads, progress) == 30
    assert store.writes_seen() == written
    assert progress.done == []


def test_exists_lists_for_many_keys_and_asks_about_a_few(store: Store, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 60, 100)
    store.seed(uploads[:40])

    assert store.open().exists(u.key for u in uploads) == {u.key for u in uploads[:40]}
    few = [uploads[0].key, uploads[1].key, uploads[50].key]
    if not isinstance(store, CloudStore):
        assert store.open().exists(few) == {uploads[0].key, uploads[1].key}
        return
    assert store.object_checks() == [] and len(store.list_requests()) == 1

    store.proxy.clear()
    fresh = store.open()
    assert fresh.exists(few) == {uploads[0].key, uploads[1].key}
    assert len(store.object_checks()) == 3 and store.list_requests() == []  # one check per key
    assert len(store.bucket_checks()) == 1  # a miss checks the bucket, once
    assert fresh.exists(few) == {uploads[0].key, uploads[1].key}
    assert len(store.object_checks()) == 6 and len(store.bucket_checks()) == 1


def test_corrupted_object_is_fetched_twice_then_a_checksum_error_naming_the_key(store: Store, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 3, 8 * KiB)
    store.seed(uploads)
    bad = uploads[1].key
    store.corrupt(bad)
    downloads = downloads_of(uploads, tmp_path / "dest")

    with pytest.raises(TransferError) as caught:
        store.open().download(downloads)
    assert caught.value.code == "checksum_mismatch"
    assert [f.key for f in caught.value.failures] == [bad]
    assert isinstance(caught.value.failures[0].error, ChecksumError)
    assert store.where(bad) in str(caught.value)
    if isinstance(store, CloudStore):
        assert len(store.object_gets(bad)) == 2
    assert not downloads[1].dest.exists()
    assert downloads[0].dest.read_bytes() == uploads[0].source.read_bytes()


def test_a_missing_object_is_not_found(store: Store, tmp_path: Path) -> None:
    key = "hashstore/" + "2" * 32
    with pytest.raises(TransferError) as caught:
        store.open().download([DownloadItem(key, tmp_path / "x")])
    assert caught.value.code == "not_found"
    assert f"{store.where(key)} does not exist" in str(caught.value)
    with pytest.raises(StorageError, match="does not exist") as caught:
        store.open().read_bytes("records/none.json")
    assert caught.value.code == "not_found"


def test_small_records_go_in_whole_and_come_back(store: Store) -> None:
    assert_records_work(store.open())


def test_a_real_transfer_drives_the_terminal_bar(store: Store, tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    uploads = make_sources(tmp_path / "src", 10, 2 * KiB)
    out = Terminal()
    store.open().upload(uploads, TerminalProgress(out, "upload"))
    final = out.getvalue().split("\r")[-1]
    assert final.startswith("upload: [########################] 100%  10/10 files  20.0 KiB/20.0 KiB")
    assert final.endswith("\n")
    assert store.read(uploads[0].key) == uploads[0].source.read_bytes()


# --- the cloud stores: buckets, denials, retries, stalls, ranged parts


def test_a_missing_bucket_says_which_bucket(cloud_store: CloudStore, tmp_path: Path) -> None:
    storage = cloud_store.open(bucket="no-such-bucket-here")
    with pytest.raises(TransferError) as caught:
        storage.download([DownloadItem("hashstore/" + "1" * 32, tmp_path / "x", size=10)])
    assert caught.value.code == "no_bucket"
    assert "'no-such-bucket-here' does not exist" in str(caught.value) and "endpoint" in str(caught.value)
    for action in (lambda: storage.read_bytes("records/a.json"), lambda: storage.exists(["hashstore/a"])):
        with pytest.raises(StorageError, match="'no-such-bucket-here' does not exist") as caught:
            action()
        assert caught.value.code == "no_bucket"
    assert not (tmp_path / "x").exists()


def test_a_denied_request_is_a_clear_error_and_not_retried(cloud_store: CloudStore, tmp_path: Path) -> None:
    store = cloud_store
    uploads = make_sources(tmp_path / "src", 2, 1 * KiB)
    store.seed(uploads)
    denied = uploads[0].key
    store.proxy.add(store.denied(path_contains=store.in_path(denied), times=-1))

    with pytest.raises(TransferError) as caught:
        store.open().download(downloads_of(uploads, tmp_path / "dest"))
    message = str(caught.value)
    assert caught.value.code == "denied" and [f.key for f in caught.value.failures] == [denied]
    assert f"access denied to {store.where(denied)}" in message
    assert "credentials" in message and store.denied_hint in message
    assert len(store.proxy.requests("GET", store.in_path(denied))) == 1

    store.proxy.add(store.upload_fault(store.denied(), times=-1))
    with pytest.raises(TransferError) as caught:
        store.open().upload([uploads[0]])
    assert caught.value.code == "denied" and len(store.upload_requests()) == 1


def test_throttling_and_resets_are_retried(cloud_store: CloudStore, tmp_path: Path) -> None:
    store = cloud_store
    uploads = make_sources(tmp_path / "src", 5, 64 * KiB)
    store.seed(uploads)
    slow, throttled, reset, cut, fine = (store.in_path(u.key) for u in uploads)
    store.proxy.add(store.error(503, path_contains=slow, times=2))
    store.proxy.add(store.error(429, path_contains=throttled))
    store.proxy.add(Fault("reset", method="GET", path_contains=reset))
    store.proxy.add(Fault("reset_body", method="GET", path_contains=cut))
    downloads = downloads_of(uploads, tmp_path / "dest")

    store.open().download(downloads)
    assert_same(uploads, downloads)
    assert [len(store.proxy.requests("GET", key)) for key in (slow, throttled, reset, cut, fine)] == [3, 2, 2, 2, 1]

    more = make_sources(tmp_path / "more", 1, 1 * KiB, seed=7)
    store.proxy.add(store.upload_fault(store.error(503)))
    store.open().upload(more)
    assert store.read(more[0].key) == more[0].source.read_bytes()
    assert len(store.upload_requests()) == 2


def test_retries_give_up_with_a_clear_error(cloud_store: CloudStore, tmp_path: Path) -> None:
    store = cloud_store
    uploads = make_sources(tmp_path / "src", 1, 1 * KiB)
    store.seed(uploads)
    store.proxy.add(store.error(503, times=-1))
    with pytest.raises(TransferError) as caught:
        store.open().download(downloads_of(uploads, tmp_path / "dest"))
    assert caught.value.code == "unavailable"
    assert f"after 4 attempts: {store.unavailable_said}" in str(caught.value)
    assert len(store.object_gets()) == 4


def test_the_stall_detector_fails_a_batch_the_store_stopped_answering(cloud_store: CloudStore, tmp_path: Path) -> None:
    store = cloud_store
    uploads = make_sources(tmp_path / "src", 3, 1 * KiB)
    store.seed(uploads)
    store.proxy.add(Fault("stall", method="GET", path_contains=store.in_path(uploads[2].key)))
    downloads = downloads_of(uploads, tmp_path / "dest")
    with pytest.raises(TransferError) as caught:
        store.open(stall_seconds=1.0, extra={"read_timeout": 60}).download(downloads)
    assert caught.value.code == "stalled" and [f.key for f in caught.value.failures] == [uploads[2].key]
    assert downloads[0].dest.exists() and downloads[1].dest.exists()


def test_large_objects_are_split_only_as_far_as_the_streams_need(cloud_store: CloudStore, tmp_path: Path) -> None:
    store = cloud_store
    one = make_sources(tmp_path / "one", 1, 17 * MiB)
    two = make_sources(tmp_path / "two", 2, 17 * MiB, seed=1)
    store.seed(one + two)
    storage = store.open(large_threshold=1 * MiB, extra={"part_concurrency": 4})

    storage.download(downloads_of(one, tmp_path / "a"))  # alone: 4 streams, parts of at least 8 MiB
    assert sorted(s.range for s in store.object_gets(one[0].key)) == [
        "bytes=0-8388607", "bytes=16777216-17825791", "bytes=8388608-16777215"]  # fmt: skip
    downloads = downloads_of(two, tmp_path / "b")
    storage.download(downloads)  # two objects share the 4 streams: two parts each
    assert_same(two, downloads)
    for item in two:
        assert sorted(s.range for s in store.object_gets(item.key)) == ["bytes=0-9437183", "bytes=9437184-17825791"]


def test_a_part_cut_short_resumes_where_it_stopped(cloud_store: CloudStore, tmp_path: Path) -> None:
    store = cloud_store
    uploads = make_sources(tmp_path / "src", 1, 3 * MiB)
    store.seed(uploads)
    store.proxy.add(Fault("cut_body", method="GET", path_contains=store.in_path(uploads[0].key)))  # half a part, then EOF
    downloads = downloads_of(uploads, tmp_path / "dest")

    store.open(**LARGE).download(downloads)
    assert_same(uploads, downloads)
    offsets = starts([s.range for s in store.object_gets(uploads[0].key)])
    assert len(offsets) == 4 and [s % MiB for s in offsets if s % MiB] == [512 * KiB]


def test_a_store_that_ignores_ranges_is_a_clear_error_not_retried(cloud_store: CloudStore, tmp_path: Path) -> None:
    store = cloud_store
    uploads = make_sources(tmp_path / "src", 1, 3 * MiB)
    store.seed(uploads)
    store.proxy.add(Fault("drop_range", method="GET", times=-1))
    with pytest.raises(TransferError) as caught:
        store.open(**LARGE).download(downloads_of(uploads, tmp_path / "dest"))
    assert caught.value.code == "no_ranges" and "ranged GETs" in str(caught.value)
    ranges = [s.range for s in store.object_gets()]
    assert 1 <= len(ranges) <= 3 and len(set(ranges)) == len(ranges)  # none retried (later parts may be cancelled)
    assert not os.path.exists(tmp_path / "dest" / "out0000.bin")
