"""Storage backends behind one interface: ``open_storage(url)`` picks one by URL scheme."""

from __future__ import annotations

from urllib.parse import urlparse

from ..errors import StorageError
from .base import DownloadItem, NullProgress, Progress, Storage, StorageOptions, TransferError, UploadItem

__all__ = [
    "DownloadItem",
    "NullProgress",
    "Progress",
    "Storage",
    "StorageOptions",
    "TransferError",
    "UploadItem",
    "open_storage",
]


def open_storage(url: str, options: StorageOptions | None = None) -> Storage:
    """``file:///dir``, ``s3://bucket/prefix`` or ``gs://bucket/prefix``."""
    options = options or StorageOptions()
    scheme = urlparse(url).scheme
    if scheme == "file":
        from .file import FileStorage

        return FileStorage(url, options)
    if scheme == "s3":
        from .s3 import S3Storage

        return S3Storage(url, options)
    if scheme == "gs":
        from .gcs import GCSStorage

        return GCSStorage(url, options)
    raise StorageError(f"storage URL {url!r} has no known scheme (use file://, s3:// or gs://)", code="bad_storage_url")
