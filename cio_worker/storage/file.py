"""``file:///dir`` storage: a directory standing in for a bucket (simulation, tests, NFS)."""

from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence
from urllib.parse import unquote, urlparse

from cio_worker.errors import ChecksumError, StorageError
from cio_worker.storage.base import DownloadItem, NullProgress, Progress, Storage, StorageOptions, UploadItem
from cio_worker.storage.common import (
    Activity,
    Item,
    clean_key,
    copy_fd_hashed,
    copy_stream,
    copy_to_new_file,
    corrupt_object,
    create_unnamed,
    default_concurrency,
    fetch_verified,
    remove_quietly,
    temp_sibling,
    transfer,
)


class FileStorage(Storage):
    splits_over_processes = True  # system calls and hashing per file; no connection to carry

    def __init__(self, url: str, options: StorageOptions | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{url!r} is not a file:///absolute/dir URL", code="bad_storage_url")
        self.url = url
        self.root = Path(unquote(parsed.path))
        self._root = str(self.root).rstrip("/")
        self.options = options or StorageOptions()
        if not self.root.is_absolute():
            raise StorageError(f"{url!r} must name an absolute directory", code="bad_storage_url")

    def for_split_worker(self) -> FileStorage:
        # A process a core already: threads of its own would only trade its GIL (20,000 x 4 KiB
        # over 2 processes: 2.66-3.04 s with one thread each, 2.89-4.58 s with two).
        if self.options.concurrency:
            return self
        return FileStorage(self.url, replace(self.options, concurrency=1))

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*clean_key(key))

    def exists(self, keys: Iterable[str]) -> set[str]:
        return {key for key in keys if self._path(key).is_file()}

    def _transfer(self, action: str, items: Sequence[Item], progress: Progress | None,
                  work: Callable[[Item, Activity], None]) -> None:  # fmt: skip
        activity = Activity(progress or NullProgress())
        # Local disks: a stream a core keeps the cores busy hashing. More only add seeks and, for
        # small files, contention for the directory's lock and the GIL (50,000 × 4 KiB: 8 streams
        # 16.7 s, 4: 14.6 s, 2: 12.8 s on 2 cores).
        concurrency = self.options.concurrency or min(8, max(2, os.cpu_count() or 2), default_concurrency(item.size for item in items))
        transfer(action, items, lambda item: work(item, activity), activity=activity, concurrency=concurrency,
                 stall_seconds=self.options.stall_seconds)  # fmt: skip

    def download(self, items: Sequence[DownloadItem], progress: Progress | None = None) -> None:
        self._transfer("download", items, progress, self._download_one)

    def _download_one(self, item: DownloadItem, activity: Activity) -> None:
        clean_key(item.key)
        source = f"{self._root}/{item.key}"  # a string: no Path per object of a large batch

        def fetch(dest: str | Path) -> str:
            try:
                src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise StorageError(
                    f"{self.url}: object {item.key} does not exist (was the job's content uploaded?)", code="not_found"
                ) from None
            try:
                return copy_to_new_file(src, dest, activity)
            finally:
                os.close(src)

        fetch_verified(item.key, item.dest, item.md5, fetch)

    def download_unnamed(
        self, items: Sequence[DownloadItem], place: Callable[[DownloadItem, int], None], progress: Progress | None = None
    ) -> bool:
        self._transfer("download", items, progress, partial(self._download_unnamed_one, place=place))
        return True

    def _download_unnamed_one(self, item: DownloadItem, activity: Activity, place: Callable[[DownloadItem, int], None]) -> None:
        clean_key(item.key)
        directory = os.fspath(item.dest).rpartition("/")[0] or "/"
        try:
            src = os.open(f"{self._root}/{item.key}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StorageError(
                f"{self.url}: object {item.key} does not exist (was the job's content uploaded?)", code="not_found"
            ) from None
        got = None
        try:
            for _ in range(2):  # a mismatch is fetched once more, as fetch_verified does
                out = create_unnamed(directory)
                try:
                    got = copy_fd_hashed(src, out, activity, item.size)
                    if item.size is not None and os.pread(src, 1, item.size):
                        got = None  # longer than the manifest says: not the content it names
                    if item.md5 is None or got == item.md5:
                        place(item, out)
                        return
                finally:
                    os.close(out)
                os.lseek(src, 0, os.SEEK_SET)
        finally:
            os.close(src)
        raise corrupt_object(got, item.md5)

    def upload(self, items: Sequence[UploadItem], progress: Progress | None = None) -> None:
        self._transfer("upload", items, progress, self._upload_one)

    def _upload_one(self, item: UploadItem, activity: Activity) -> None:
        def fill(out: BinaryIO) -> None:
            with open(item.source, "rb") as src:
                got = copy_stream(src, out, activity)
            if item.md5 is not None and got != item.md5:
                raise ChecksumError(f"{item.source}: read MD5 {got} but expected {item.md5}; the file changed while uploading")

        self._place(item.key, fill)

    def _place(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        """Write the object under a temporary name, then rename it into place: whole or not at all."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_sibling(target)
        try:
            with open(temp, "wb") as out:
                fill(out)
            os.replace(temp, target)
        finally:
            remove_quietly(temp)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.url}: object {key} does not exist", code="not_found") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        self._place(key, lambda out: out.write(data))
