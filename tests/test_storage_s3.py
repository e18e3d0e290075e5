"""What only s3:// does, against moto's S3 server: configuration the SDK way, the client's pool,
and the direct signed GETs. The scenarios every backend shares are in test_storage_contract.py."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from cio_worker.storage import open_storage
from cio_worker.storage.s3 import S3Storage
from tests.servers import Fault
from tests.stores import KiB, S3Store, assert_records_work, assert_same, downloads_of, make_sources


def test_the_endpoint_comes_from_aws_endpoint_url(s3_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_store.endpoint)
    storage = open_storage(f"s3://{s3_store.bucket}/job")
    assert storage.client.meta.endpoint_url == s3_store.endpoint
    assert_records_work(storage)


def test_client_pool_and_retries_are_configured(s3_store: S3Store) -> None:
    storage = s3_store.open(concurrency=12, extra={"part_concurrency": 3, "read_timeout": 7})
    config = storage.client.meta.config
    assert config.max_pool_connections == 15
    assert config.retries["total_max_attempts"] == 1
    assert config.read_timeout == 7


# --- the direct GET path


def test_a_redirect_hands_the_direct_path_over_to_the_sdk(s3_store: S3Store, tmp_path: Path) -> None:
    uploads = make_sources(tmp_path / "src", 3, 4 * KiB)
    s3_store.seed(uploads)
    moved = b"<Error><Code>PermanentRedirect</Code><Message>use the bucket's endpoint</Message></Error>"
    s3_store.proxy.add(Fault("status", status=301, body=moved, method="GET", times=1))
    storage = s3_store.open(concurrency=1)
    assert isinstance(storage, S3Storage) and storage._direct_gets() is not None
    downloads = downloads_of(uploads, tmp_path / "dest")

    storage.download(downloads)
    assert_same(uploads, downloads)
    assert storage._direct is None  # the SDK (with its redirect handling) serves this store from now on
    assert len(s3_store.proxy.requests("GET")) == 3 + 1


def test_direct_gets_address_and_sign_keys_as_the_sdk_does(s3_store: S3Store) -> None:
    storage = s3_store.open()
    assert isinstance(storage, S3Storage)
    direct = storage._direct_gets()
    name = "job/odd name+(1)~é.bin"
    s3_store.raw.put_object(Bucket=s3_store.bucket, Key=name, Body=b"odd")
    body = direct.open(name)
    assert body.read() == b"odd"
    body.release_conn()
    # the URL is the SDK's own (moto does not check signatures, so compare with what botocore builds)
    presigned = storage.client.generate_presigned_url("get_object", Params={"Bucket": s3_store.bucket, "Key": name})
    assert presigned.split("?")[0] == direct.base + quote(name, safe="/~")
    assert direct.region == storage.client.meta.region_name
