"""Dependency scan: which files a job uploads (the seed's "No Scan", "Smart Sequence", "Glob").

Always the project file and the extra uploads (a directory stands for every file below it).
Then, for each image rendered and each reference it reads:

- ``none``: nothing more;
- ``smart``: a static file as it is; a sequence (``####``, ``$4F``, ``$F``) only at the files the
  rendered frames read (file frame = frame - frame_offset);
- ``glob``: a static file as it is; every file on disk that matches a sequence's pattern.

Artist paths are located on this machine through a PathMap. A file that is not there is reported
in ``missing`` (for ``glob``, a sequence with no file at all is reported by its pattern).
"""

from __future__ import annotations

import glob
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cio_worker.job.document import UploadFile
from cio_worker.errors import CioError
from cio_worker.job.frames import FrameSet
from cio_worker.job.hashing import md5_b64_of_file
from cio_worker.job.paths import PathMap
from cio_worker.job.project import Project, Reference, sequence_glob, sequence_path, sequence_regex

SCAN_MODES = ("none", "smart", "glob")


class ScanError(CioError, ValueError):
    code = "bad_dependency"


@dataclass(frozen=True, order=True)
class ScannedFile:
    artist_path: str  # forward slashes, drive letter kept: the upload's destination
    local_path: str  # where it is on this machine


@dataclass(frozen=True)
class ScanResult:
    files: list[ScannedFile]
    missing: list[str]  # artist paths (or patterns) not found

    @property
    def complete(self) -> bool:
        return not self.missing


def scan_dependencies(
    *,
    project: Project,
    project_file: str,
    images: Sequence[tuple[str, FrameSet]],
    mode: str,
    extra_uploads: Sequence[str] = (),
    path_map: PathMap = PathMap(),
) -> ScanResult:
    """Scan for ``images`` — (image item, frames it renders) — read from ``project``.

    ``project`` must have been loaded with its artist path as ``display_path`` so that relative
    references resolve to artist paths.
    """
    if mode not in SCAN_MODES:
        raise ScanError(f"dependency scan mode {mode!r} is not one of {', '.join(SCAN_MODES)}")
    scan = _Scan(path_map)
    scan.add_file(project_file, "the project file")
    for extra in extra_uploads:
        scan.add_tree(extra)
    if mode != "none":
        for item, frames in images:
            if not frames:
                continue
            image = project.image(item)
            for reference in project.references_of(image):
                artist = project.resolve(reference.path)
                if not reference.is_sequence:
                    scan.add_file(artist, f"reference {reference.item}")
                elif mode == "smart":
                    for frame in frames:
                        scan.add_file(_at(artist, reference, frame), f"reference {reference.item}")
                else:
                    scan.add_sequence(artist, reference)
    return scan.result()


def upload_files(files: Iterable[ScannedFile], md5_of: Callable[[Path], str] = md5_b64_of_file) -> list[UploadFile]:
    """Describe found files for a task document: artist destination, MD5 (base64), size, mode.

    ``md5_of`` lets a caller hash through a cache (submit uses the stat-keyed MD5 cache)."""
    out = []
    for found in files:
        try:
            info = os.stat(found.local_path)
            md5 = md5_of(Path(found.local_path))
        except OSError as exc:
            raise ScanError(f"{found.artist_path} ({found.local_path}) cannot be read: {exc.strerror or exc}") from None
        out.append(UploadFile(destination=found.artist_path, md5=md5, size=info.st_size, mode=info.st_mode))
    return out


def _at(artist_pattern: str, reference: Reference, frame: int) -> str:
    return sequence_path(artist_pattern, reference.file_frame(frame))


class _Scan:
    def __init__(self, path_map: PathMap) -> None:
        self.path_map = path_map
        self.found: dict[str, str] = {}
        self.missing: set[str] = set()

    def _local(self, artist: str, what: str) -> str:
        try:
            return self.path_map.local(artist, what=what)
        except CioError as exc:
            raise ScanError(f"{what}: {exc}") from None

    def add_file(self, artist: str, what: str) -> None:
        if artist in self.found or artist in self.missing:
            return
        local = self._local(artist, what)
        if os.path.isfile(local):
            self.found[artist] = local
        else:
            self.missing.add(artist)

    def add_tree(self, artist: str) -> None:
        local = self._local(artist, "extra upload")
        if not os.path.isdir(local):
            self.add_file(artist, "extra upload")
            return
        for directory, dirs, names in os.walk(local):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(directory, name)
                if not stat.S_ISREG(os.stat(path).st_mode):
                    continue
                relative = os.path.relpath(path, local).replace(os.sep, "/")
                self.found.setdefault(posixpath.join(artist, relative), path)

    def add_sequence(self, artist_pattern: str, reference: Reference) -> None:
        local_pattern = self._local(artist_pattern, f"reference {reference.item}")
        exact = sequence_regex(local_pattern)
        matched = False
        for path in sorted(glob.glob(sequence_glob(local_pattern))):
            match = exact.fullmatch(path)
            if match is None or not os.path.isfile(path):
                continue
            frames = {int(text) for text in match.groups()}
            # Every frame part must name the same frame, written as Clarisse would write it.
            if len(frames) != 1:
                continue
            file_frame = frames.pop()
            if sequence_path(local_pattern, file_frame) != path:
                continue
            self.found.setdefault(sequence_path(artist_pattern, file_frame), path)
            matched = True
        if not matched:
            self.missing.add(artist_pattern)

    def result(self) -> ScanResult:
        files = sorted(ScannedFile(artist, local) for artist, local in self.found.items())
        return ScanResult(files=files, missing=sorted(self.missing - set(self.found)))
