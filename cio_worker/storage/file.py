"""``file:///dir`` storage: a directory standing in for a bucket (simulation, tests, NFS)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import unquote, urlparse

from cio_worker.errors import ChecksumError, StorageError
from cio_worker.storage.base import DownloadItem, Progress, Storage, StorageOptions, UploadItem
from cio_worker.storage.common import Activity, copy_stream, default_concurrency, fetch_verified, remove_quietly, run_batch, temp_sibling


class FileStorage(Storage):
    def __init__(self, url: str, options: StorageOptions | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{url!r} is not a file:///absolute/dir URL", code="bad_storage_url")
        self.url = url
        self.root = Path(unquote(parsed.path))
        self.options = options or StorageOptions()
        if not self.root.is_absolute():
            raise StorageError(f"{url!r} must name an absolute directory", code="bad_storage_url")

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if key.startswith("/") or ".." in parts or "" in parts:
            raise StorageError(f"object key {key!r} is not a clean relative key", code="bad_key")
        return self.root.joinpath(*parts)

    def exists(self, keys: Iterable[str]) -> set[str]:
        return {key for key in keys if self._path(key).is_file()}

    def _concurrency(self, sizes: Iterable[int | None]) -> int:
        # Local disks: a few streams keep both cores busy hashing; more only adds seeks.
        return self.options.concurrency or min(8, default_concurrency(sizes))

    def download(self, items: Sequence[DownloadItem], progress: Progress | None = None) -> None:
        activity = Activity(progress) if progress else Activity()
        activity.progress.start(len(items), sum(i.size or 0 for i in items))

        def one(item: DownloadItem) -> None:
            source = self._path(item.key)

            def fetch(dest: Path) -> str:
                try:
                    with open(source, "rb") as src, open(dest, "wb") as out:
                        return copy_stream(src, out, activity)
                except FileNotFoundError:
                    if not source.exists():
                        raise StorageError(
                            f"{self.url}: object {item.key} does not exist (was the job's content uploaded?)",
                            code="not_found",
                        ) from None
                    raise

            fetch_verified(item.key, item.dest, item.md5, fetch)
            activity.file_done(item.key)

        run_batch(
            "download",
            items,
            lambda i: i.key,
            one,
            concurrency=self._concurrency(i.size for i in items),
            activity=activity,
            stall_seconds=self.options.stall_seconds,
        )

    def upload(self, items: Sequence[UploadItem], progress: Progress | None = None) -> None:
        activity = Activity(progress) if progress else Activity()
        activity.progress.start(len(items), sum(i.size or 0 for i in items))

        def one(item: UploadItem) -> None:
            target = self._path(item.key)
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = temp_sibling(target)
            try:
                with open(item.source, "rb") as src, open(temp, "wb") as out:
                    got = copy_stream(src, out, activity)
                if item.md5 is not None and got != item.md5:
                    raise ChecksumError(
                        f"{item.source}: read MD5 {got} but expected {item.md5}; the file changed while uploading"
                    )
                os.replace(temp, target)
            finally:
                remove_quietly(temp)
            activity.file_done(item.key)

        run_batch(
            "upload",
            items,
            lambda i: i.key,
            one,
            concurrency=self._concurrency(i.size for i in items),
            activity=activity,
            stall_seconds=self.options.stall_seconds,
        )

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.url}: object {key} does not exist", code="not_found") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_sibling(target)
        try:
            temp.write_bytes(data)
            os.replace(temp, target)
        finally:
            remove_quietly(temp)
