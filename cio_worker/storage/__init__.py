"""Object storage behind one interface: ``open_storage(url)`` picks a backend by URL scheme.

Also the local side of file identity shared by the node and the artist: the stat-keyed MD5 cache
(``md5cache``) and the transfer progress displays (``progress``). Backends are imported only when
their scheme is used, so the cloud SDKs load only for ``s3://`` and ``gs://`` URLs.
May import: ``errors``, ``job``.
"""

from __future__ import annotations

from urllib.parse import urlparse

from cio_worker.errors import StorageError
from cio_worker.storage.base import DownloadItem, NullProgress, Progress, Storage, StorageOptions, TransferError, UploadItem

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
        from cio_worker.storage.file import FileStorage

        return FileStorage(url, options)
    if scheme == "s3":
        from cio_worker.storage.s3 import S3Storage

        return S3Storage(url, options)
    if scheme == "gs":
        from cio_worker.storage.gcs import GCSStorage

        return GCSStorage(url, options)
    raise StorageError(f"storage URL {url!r} has no known scheme (use file://, s3:// or gs://)", code="bad_storage_url")
