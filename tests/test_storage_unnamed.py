"""Files made without a name (O_TMPFILE) and named once whole: ``UnnamedFiles`` and the file://
backend's ``download_unnamed`` (storage/common.py, storage/file.py), on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cio_worker.errors import ChecksumError
from cio_worker.job.hashing import hashstore_key, md5_b64_of_bytes
from cio_worker.storage import DownloadItem, TransferError
from cio_worker.storage.common import UnnamedFiles, create_unnamed
from cio_worker.storage.file import FileStorage

MiB = 1024 * 1024


@pytest.fixture
def names() -> UnnamedFiles:
    opened = UnnamedFiles.open()
    if opened is None:
        pytest.skip("/proc is not mounted here")
    yield opened
    opened.close()


def test_a_file_made_without_a_name_gets_one_only_when_linked(names: UnnamedFiles, tmp_path: Path) -> None:
    assert names.usable_in(str(tmp_path))
    assert os.listdir(tmp_path) == []  # the probe left nothing
    fd = create_unnamed(str(tmp_path))
    try:
        os.write(fd, b"whole")
        assert os.listdir(tmp_path) == []
        names.link(fd, str(tmp_path / "a"))
        names.link(fd, str(tmp_path / "b"))
        with pytest.raises(FileExistsError):
            names.link(fd, str(tmp_path / "a"))
    finally:
        os.close(fd)
    assert (tmp_path / "a").read_bytes() == b"whole" and (tmp_path / "a").stat().st_nlink == 2


def test_a_filesystem_without_unnamed_files_is_found_at_run_time(names: UnnamedFiles) -> None:
    # procfs cannot make files at all, let alone unnamed ones: the probe says so, nothing raised
    assert not names.usable_in("/proc")


def _store(tmp_path: Path, blobs: list[bytes]) -> tuple[FileStorage, list[DownloadItem]]:
    root = tmp_path / "store"
    storage = FileStorage(f"file://{root}")
    items = []
    for i, blob in enumerate(blobs):
        md5 = md5_b64_of_bytes(blob)
        storage.write_bytes(hashstore_key(md5), blob)
        items.append(DownloadItem(hashstore_key(md5), str(tmp_path / "dest" / f"f{i}"), md5, len(blob)))
    (tmp_path / "dest").mkdir()
    return storage, items


def test_download_unnamed_hands_over_verified_bytes_that_have_no_name(names: UnnamedFiles, tmp_path: Path) -> None:
    blobs = [os.urandom(3 * MiB + 5), b"small", b""]
    storage, items = _store(tmp_path, blobs)
    seen: dict[str, bytes] = {}

    finals = {Path(item.dest).name for item in items}

    def place(item: DownloadItem, fd: int) -> None:
        there = set(os.listdir(tmp_path / "dest"))  # others may be placed already, by other streams
        assert Path(item.dest).name not in there and there <= finals  # no temporary name, ever
        seen[item.key] = os.pread(fd, 4 * MiB, 0)
        names.link(fd, str(item.dest))

    assert storage.download_unnamed(items, place) is True
    assert [seen[item.key] for item in items] == blobs
    assert [Path(item.dest).read_bytes() for item in items] == blobs


def test_a_corrupt_object_is_fetched_twice_never_handed_over_and_leaves_nothing(
    names: UnnamedFiles, tmp_path: Path
) -> None:
    storage, items = _store(tmp_path, [b"good bytes", b"the real pixels"])
    (tmp_path / "store" / items[1].key).write_bytes(b"rotten pixels!!")
    placed: list[str] = []

    def place(item: DownloadItem, fd: int) -> None:
        placed.append(item.key)
        names.link(fd, str(item.dest))

    with pytest.raises(TransferError) as caught:
        storage.download_unnamed(items, place)
    assert [f.key for f in caught.value.failures] == [items[1].key]
    assert isinstance(caught.value.failures[0].error, ChecksumError)
    assert "fetched twice" in str(caught.value)
    assert placed == [items[0].key]
    assert os.listdir(tmp_path / "dest") == ["f0"]


def test_an_object_longer_than_its_manifest_is_refused_like_any_other_mismatch(
    names: UnnamedFiles, tmp_path: Path
) -> None:
    # The right bytes, then more: not the content its key and the manifest name (the path with a
    # temporary name refuses it by its MD5 over the whole object; this one reads only `size`).
    storage, items = _store(tmp_path, [b"the real pixels"])
    (tmp_path / "store" / items[0].key).write_bytes(b"the real pixels and then some")
    placed: list[str] = []
    with pytest.raises(TransferError) as caught:
        storage.download_unnamed(items, lambda item, fd: placed.append(item.key))
    assert isinstance(caught.value.failures[0].error, ChecksumError) and "fetched twice" in str(caught.value)
    assert placed == [] and os.listdir(tmp_path / "dest") == []
