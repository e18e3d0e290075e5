"""What only gs:// does, against fake-gcs-server: configuration the SDK way (emulator, proxies),
the HTTP pool, CRC32C checks without a manifest MD5, and resumable-upload chunks. The scenarios
every backend shares are in test_storage_contract.py."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from google.auth.credentials import AnonymousCredentials

from cio_worker.storage import DownloadItem, StorageOptions, open_storage
from cio_worker.storage.gcs import GCSStorage
from tests.servers import Fault, FaultProxy
from tests.stores import KiB, MiB, GCSStore, assert_records_work, make_sources


def test_storage_emulator_host_just_works(gcs_store: GCSStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_store.endpoint)
    storage = open_storage(f"gs://{gcs_store.bucket}/job")
    assert isinstance(storage.client._credentials, AnonymousCredentials)
    assert_records_work(storage)


def test_the_http_pool_fits_the_concurrency(gcs_store: GCSStore) -> None:
    storage = gcs_store.open(concurrency=12, extra={"part_concurrency": 3})
    adapter = storage.client._http.get_adapter("http://127.0.0.1/")
    assert adapter._pool_maxsize == 15 and adapter.max_retries.total == 0


def test_without_a_manifest_md5_the_library_checks_crc32c(gcs_store: GCSStore, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 1, 8 * KiB)
    gcs_store.seed(uploads)
    gcs_store.proxy.add(Fault("corrupt", method="GET", path_contains="alt=media"))
    item = DownloadItem(uploads[0].key, tmp_path / "dest" / "x")
    gcs_store.open().download([item])  # corrupted once: DataCorruption, retried
    assert item.dest.read_bytes() == uploads[0].source.read_bytes()
    assert len(gcs_store.object_gets()) == 2


def test_resumable_uploads_send_big_chunks_within_a_memory_budget(gcs_store: GCSStore, tmp_path: Path) -> None:
    storage = gcs_store.open()
    assert isinstance(storage, GCSStorage)
    assert storage._upload_chunk(concurrency=4) == 64 * MiB
    assert storage._upload_chunk(concurrency=16) == 16 * MiB
    assert storage._upload_chunk(concurrency=64) == 8 * MiB  # never under 8 MiB
    assert gcs_store.open(part_size=1 * MiB)._upload_chunk(concurrency=4) == 1 * MiB  # configured: as it is

    uploads = make_sources(tmp_path / "src", 1, 20 * MiB)
    gcs_store.open(concurrency=4).upload(uploads)
    assert len(gcs_store.proxy.requests("PUT")) == 1  # one chunk for the whole object
    assert gcs_store.raw.bucket(gcs_store.bucket).get_blob(f"job/{uploads[0].key}").md5_hash == uploads[0].md5


def test_proxy_settings_from_the_environment_are_read_once_and_kept(
    gcs_store: GCSStore, fault_proxy: Callable[[str], FaultProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    forward = fault_proxy(gcs_store.endpoint)  # plays an HTTP proxy: it forwards what it is sent
    monkeypatch.setenv("HTTP_PROXY", forward.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    options = StorageOptions(extra={"endpoint": gcs_store.endpoint, "anonymous": True})
    storage = open_storage(f"gs://{gcs_store.bucket}/job", options)
    assert storage.client._http.trust_env is False and storage.client._http.proxies["http"] == forward.url
    storage.write_bytes("records/a.json", b"{}")
    assert storage.read_bytes("records/a.json") == b"{}"
    assert len(forward.requests()) >= 2

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    bypass = open_storage(f"gs://{gcs_store.bucket}/job", options)
    assert "http" not in bypass.client._http.proxies
