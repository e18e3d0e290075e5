"""The storage interface every backend (file://, s3://, gs://) implements.

Keys are relative to the storage URL's root (``hashstore/<32 hex>``). Transfers are batches:
a backend moves many objects in parallel and streams large ones in parallel parts, so callers
hand over a whole manifest at once, never one call per byte range.

Contract for ``download``: each item's bytes are written to exactly ``item.dest`` (callers pass a
temporary name and rename it into place themselves), parent directories created; the MD5 is
computed while streaming and, when ``item.md5`` is given, checked; a mismatch re-fetches once,
then fails that item with ChecksumError naming the key. A failed item leaves nothing at ``dest``.
All items are attempted; failures are raised together as one TransferError.

Contract for ``download_unnamed`` (optional; ``False`` where a backend does not offer it): as for
``download``, but each item's bytes go to a new file *without a name* (``O_TMPFILE``) in the
directory of ``item.dest``, which the caller has checked can hold one (``UnnamedFiles``). Once
the MD5 is verified the backend calls ``place(item, fd)`` with the open read-write descriptor;
``place`` gives the file its names (``UnnamedFiles.link``) and the backend then closes it. So no
name ever shows a partial or unverified file, and a failed or interrupted item leaves nothing.

Contract for ``upload``: the object appears at ``item.key`` whole or not at all; when ``item.md5``
is given the store verifies it (or the backend does, after writing).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

from cio_worker.errors import StorageError


def object_url(storage_url: str, key: str) -> str:
    """The URL of ``key`` in the storage at ``storage_url`` (e.g. where a task log was put)."""
    return f"{storage_url.rstrip('/')}/{key}"


def key_of(storage_url: str, url: str) -> str | None:
    """``object_url``'s key back; None when ``url`` is not under ``storage_url``."""
    root = storage_url.rstrip("/") + "/"
    return url[len(root):] if url.startswith(root) and len(url) > len(root) else None


@dataclass(frozen=True)
class DownloadItem:
    key: str
    dest: Path | str
    md5: str | None = None  # base64
    size: int | None = None


@dataclass(frozen=True)
class UploadItem:
    key: str
    source: Path
    md5: str | None = None  # base64
    size: int | None = None


@dataclass
class ItemFailure:
    key: str
    error: Exception

    def __str__(self) -> str:
        return f"{self.key}: {self.error}"


class TransferError(StorageError):
    """Some items of a batch failed; ``failures`` lists each with its own error."""

    def __init__(self, action: str, failures: list[ItemFailure]) -> None:
        self.failures = failures
        first = failures[0]
        code = getattr(first.error, "code", None) or "storage"
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        super().__init__(f"{action} failed for {first}{more}", code=code)


class Progress(Protocol):
    """What a transfer reports as it goes; implementations must be thread-safe."""

    def start(self, files: int, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def file_done(self, key: str) -> None: ...


class NullProgress:
    def start(self, files: int, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def file_done(self, key: str) -> None:
        pass


class Storage(abc.ABC):
    """A content store rooted at ``url``."""

    url: str
    # True where a download's cost is per file on this machine's CPU (a local filesystem), so a
    # large one is worth splitting over processes; the object then pickles into a working copy.
    splits_over_processes: bool = False

    def for_split_worker(self) -> "Storage":
        """This store as used by one of the processes a split download runs in (one a core,
        ``splits_over_processes``)."""
        return self

    @abc.abstractmethod
    def exists(self, keys: Iterable[str]) -> set[str]:
        """The subset of ``keys`` that the store holds."""

    @abc.abstractmethod
    def download(self, items: Sequence[DownloadItem], progress: Progress | None = None) -> None:
        """Fetch every item to its ``dest`` (see module contract)."""

    def download_unnamed(
        self, items: Sequence[DownloadItem], place: Callable[[DownloadItem, int], None], progress: Progress | None = None
    ) -> bool:
        """Fetch every item to a file without a name and hand it to ``place`` (see module
        contract); False, having done nothing, where this backend cannot."""
        return False

    @abc.abstractmethod
    def upload(self, items: Sequence[UploadItem], progress: Progress | None = None) -> None:
        """Store every item at its ``key`` (see module contract)."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """A small object whole (manifests, records); StorageError if absent."""

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """A small object, whole or not at all."""

    def upload_missing(self, items: Sequence[UploadItem], progress: Progress | None = None) -> int:
        """Upload only the items whose key the store lacks; return how many were skipped."""
        unique: dict[str, UploadItem] = {}
        for item in items:
            unique.setdefault(item.key, item)
        present = self.exists(unique)
        missing = [item for key, item in unique.items() if key not in present]
        if missing:
            self.upload(missing, progress)
        return len(items) - len(missing)

    def close(self) -> None:
        pass

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# scheme -> factory(url, options) ; filled by cio_worker.storage.open_storage's imports
Factory = Callable[..., Storage]


@dataclass(frozen=True)
class StorageOptions:
    """Tuning shared by every backend; zero or None means 'choose for me'."""

    concurrency: int = 0  # parallel objects; 0: derived from sizes and CPU count
    part_size: int = 0  # bytes per ranged part / multipart part; 0: backend default
    large_threshold: int = 0  # objects at least this big go in parallel parts; 0: default
    stall_seconds: float = 60.0  # no byte and no file finished for this long: fail the batch
    extra: dict = field(default_factory=dict)
