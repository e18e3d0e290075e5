"""A task's outputs: the files created or changed under the job's output path while it ran
(design.md step 6, contract.md 9), uploaded content-addressed and described for download.

Never a file outside the output path, never through a link: symlinks (to files or to
directories) are not followed and not uploaded, whatever they point at, and neither is a file with
more than one hard link (its other name may be anywhere on the file system, e.g. a link to
/etc/shadow made in the output directory). Each one skipped is named with its reason.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from cio_worker.job.hashing import b64_from_digest, hashstore_key
from cio_worker.storage import Progress, Storage, UploadItem

import hashlib


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class OutputFile:
    relative_path: str  # POSIX, relative to the job's output directory
    md5: str
    size: int
    key: str
    local_path: Path

    def record(self) -> dict:
        return {"relative_path": self.relative_path, "md5": self.md5, "size": self.size, "key": self.key}


@dataclass(frozen=True)
class SkippedOutput:
    relative_path: str
    reason: str  # "symlink", "hard link (2 names)", ...


@dataclass
class OutputScan:
    files: list[OutputFile]
    skipped: list[SkippedOutput]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def snapshot(root: Path) -> dict[str, FileState]:
    """The regular files under ``root`` (symlinks not followed), by relative path."""
    found: dict[str, FileState] = {}
    for relative, st in _walk(root, []):
        found[relative] = FileState(st.st_size, st.st_mtime_ns, st.st_ino)
    return found


def changed_since(root: Path, before: dict[str, FileState], *, only: Callable[[str], bool] | None = None) -> OutputScan:
    """Files under ``root`` that are new or changed since ``before``, hashed without following links."""
    skipped: list[SkippedOutput] = []
    files: list[OutputFile] = []
    for relative, st in _walk(root, skipped):
        state = FileState(st.st_size, st.st_mtime_ns, st.st_ino)
        if before.get(relative) == state:
            continue
        if only is not None and not only(relative):
            continue
        if st.st_nlink > 1:
            skipped.append(SkippedOutput(relative, _hard_link(st)))
            continue
        path = root / relative
        md5, refused = _md5_nofollow(path)
        if md5 is None:
            skipped.append(SkippedOutput(relative, refused))
            continue
        files.append(OutputFile(relative, md5, st.st_size, hashstore_key(md5), path))
    files.sort(key=lambda f: f.relative_path)
    return OutputScan(files, sorted(skipped, key=lambda s: s.relative_path))


def upload_outputs(storage: Storage, scan: OutputScan, progress: Progress | None = None) -> int:
    """Upload the contents the store lacks; return how many were already there."""
    items = [UploadItem(f.key, f.local_path, f.md5, f.size) for f in scan.files]
    return storage.upload_missing(items, progress) if items else 0


def _walk(root: Path, skipped: list[SkippedOutput]) -> Iterable[tuple[str, os.stat_result]]:
    if not root.is_dir() or root.is_symlink():
        return
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(directory)
        for name in list(dirnames):
            if (base / name).is_symlink():
                dirnames.remove(name)
                skipped.append(SkippedOutput((base / name).relative_to(root).as_posix(), "symlink"))
        for name in filenames:
            path = base / name
            relative = path.relative_to(root).as_posix()
            if name.startswith(".") and ".part" in name:
                continue  # another writer's temporary file
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                skipped.append(SkippedOutput(relative, "symlink"))
            elif stat.S_ISREG(st.st_mode):
                yield relative, st


def _hard_link(st: os.stat_result) -> str:
    return f"hard link ({st.st_nlink} names)"


def _md5_nofollow(path: Path) -> tuple[str | None, str]:
    """MD5 of a regular file with one name, opened without following a symlink or counting a
    hard link swapped in after the walk; or None and why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        return None, "symlink" if os.path.islink(path) else f"unreadable ({exc.strerror or exc})"
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_nlink > 1:
            return None, _hard_link(st)
        digest = hashlib.md5()
        while block := handle.read(1024 * 1024):
            digest.update(block)
    return b64_from_digest(digest.digest()), ""
