"""The artist-side downloader (contract.md 9): finished tasks' files placed at
``output_dir/relative_path``, verified, renamed into place, and reported downloaded.

Tiles become frames: once every tile of a frame is in place (``assembly.tile_name``), the frame
is pasted together under its own name (``assembly.assemble_frame``, verified against the tiles'
pixels) and its tiles are removed, unless ``keep_tiles``. A frame whose tiles have not all arrived
waits for them; once its job is finished without them, it is reported (``not_assembled``) and the
tiles that did arrive are kept. The waiting is remembered by this Downloader (a new process starts
from the records it downloads itself). Previews (``_previews/`` in storage) are never downloaded.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cio_worker.artist.assembly import AssemblyError, assemble_frame
from cio_worker.job.project import TileName, tile_name
from cio_worker.errors import CioError, PathError
from cio_worker.job.hashing import md5_b64_of_file
from cio_worker.storage.md5cache import Md5Cache
from cio_worker.job.paths import PathMap, relative_inside
from cio_worker.storage import DownloadItem, Progress, Storage
from cio_worker.storage.common import remove_quietly, temp_sibling


@dataclass
class DownloadReport:
    records: int = 0
    files_written: int = 0
    files_skipped: int = 0
    bytes_written: int = 0
    refused: list[str] = field(default_factory=list)  # records refused, with the reason
    placed: list[Path] = field(default_factory=list)
    assembled: list[Path] = field(default_factory=list)  # frames pasted together from their tiles
    not_assembled: list[str] = field(default_factory=list)  # frames that could not be, with the reason


@dataclass(frozen=True)
class _FrameTiles:
    job_id: str
    directory: Path
    name: TileName  # of a tile's base name

    def paths(self) -> list[Path]:
        return [self.directory / name for name in self.name.tiles()]


class Downloader:
    def __init__(
        self,
        queue,
        open_storage: Callable[[str], Storage],
        path_map: PathMap,
        md5cache: Md5Cache | None = None,
        progress: Progress | None = None,
        *,
        keep_tiles: bool = False,
    ) -> None:
        self.queue = queue
        self.open_storage = open_storage
        self.path_map = path_map
        self.md5cache = md5cache
        self.progress = progress
        self.keep_tiles = keep_tiles
        self._stores: dict[str, Storage] = {}
        self._refused: set[str] = set()  # records refused once are not retried in this run
        self._waiting: dict[Path, _FrameTiles] = {}  # frames with tiles in place, by the frame's path

    def _storage(self, job_id: str) -> Storage:
        url = self.queue.job(job_id).storage
        if url not in self._stores:
            self._stores[url] = self.open_storage(url)
        return self._stores[url]

    def run_once(self, job_id: str | None = None) -> DownloadReport:
        report = DownloadReport()
        finished = self._finished_jobs(job_id)  # before the records: a job finished now has them all
        for record in self.queue.downloads(job_id, state="pending"):
            if record.download_id in self._refused:
                continue
            report.records += 1
            try:
                self._place(record, report)
            except CioError as exc:
                self._refused.add(record.download_id)
                report.refused.append(f"download {record.download_id} (job {record.job_id} task {record.task_id}): {exc}")
                continue
            self.queue.mark_downloaded(record.download_id)
        self._assemble(report, finished)
        return report

    def watch(self, job_id: str | None, *, poll: float = 1.0, on_report: Callable[[DownloadReport], None] | None = None,
              should_stop: Callable[[], bool] = lambda: False, sleep: Callable[[float], None] = time.sleep) -> DownloadReport:
        """Keep downloading until the job (or every job) is finished and nothing is pending."""
        total = DownloadReport()
        while True:
            finished = self._finished(job_id)
            report = self.run_once(job_id)
            _merge(total, report)
            if on_report and (report.records or report.not_assembled):
                on_report(report)
            if finished and not report.records:
                return total
            if should_stop():
                return total
            if not report.records:
                sleep(poll)

    def _finished(self, job_id: str | None) -> bool:
        if job_id is not None:
            return self.queue.is_finished(job_id)
        return all(self.queue.is_finished(j.id) for j in self.queue.jobs())

    def _finished_jobs(self, job_id: str | None) -> dict[str, bool]:
        if job_id is not None:
            return {job_id: self.queue.is_finished(job_id)}
        return {j.id: j.finished for j in self.queue.jobs()}

    def _assemble(self, report: DownloadReport, finished: dict[str, bool]) -> None:
        for frame, group in list(self._waiting.items()):
            tiles = group.paths()
            missing = [index for index, path in enumerate(tiles, 1) if not path.is_file()]
            if missing:
                if finished.get(group.job_id):
                    del self._waiting[frame]
                    count = group.name.count
                    report.not_assembled.append(
                        f"{frame}: not assembled: tile{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} "
                        f"of {count} never arrived (job {group.job_id} is finished without "
                        f"{'them' if len(missing) > 1 else 'it'}); the {count - len(missing)} that did are kept")
                continue
            del self._waiting[frame]
            try:
                assemble_frame(tiles, frame)
            except ImportError as exc:
                report.not_assembled.append(f"{frame}: not assembled: OpenImageIO is not installed ({exc}); "
                                            "its tiles are kept")
                continue
            except (AssemblyError, OSError) as exc:
                report.not_assembled.append(f"{frame}: not assembled: {exc}; its tiles are kept")
                continue
            report.assembled.append(frame)
            if not self.keep_tiles:
                for path in tiles:
                    remove_quietly(path)

    def _wait_for_frame(self, job_id: str, dest: Path, written: bool) -> None:
        name = tile_name(dest.name)
        if name is None:
            return
        frame = dest.parent / name.frame
        if written or not frame.exists():  # a tile already in place beside its frame was assembled
            self._waiting[frame] = _FrameTiles(job_id, dest.parent, name)

    def _place(self, record, report: DownloadReport) -> None:
        root = Path(self.path_map.local(record.output_dir, what="output_dir"))
        targets = []
        for entry in record.files:
            try:
                relative = relative_inside(entry.relative_path, what="relative_path")
            except PathError as exc:
                raise PathError(f"refused: {exc}") from None
            targets.append((entry, root / relative))
        todo = []
        for entry, dest in targets:
            if self._already_there(dest, entry.md5):
                report.files_skipped += 1
                self._wait_for_frame(record.job_id, dest, written=False)
            else:
                todo.append((entry, dest))
        if not todo:
            return
        temps = [temp_sibling(dest) for _, dest in todo]
        items = [DownloadItem(e.key, t, e.md5, e.size) for (e, _), t in zip(todo, temps)]
        try:
            self._storage(record.job_id).download(items, self.progress)
            for (entry, dest), temp in zip(todo, temps):
                os.replace(temp, dest)
                if self.md5cache is not None:
                    self.md5cache.record(dest, entry.md5)
                report.files_written += 1
                report.bytes_written += entry.size
                report.placed.append(dest)
                self._wait_for_frame(record.job_id, dest, written=True)
        finally:
            for temp in temps:
                remove_quietly(temp)

    def _already_there(self, dest: Path, md5: str) -> bool:
        if not dest.is_file() or dest.is_symlink():
            return False
        if self.md5cache is not None:
            return self.md5cache.md5_of(dest) == md5
        return md5_b64_of_file(dest) == md5


def _merge(total: DownloadReport, part: DownloadReport) -> None:
    total.records += part.records
    total.files_written += part.files_written
    total.files_skipped += part.files_skipped
    total.bytes_written += part.bytes_written
    total.refused += part.refused
    total.placed += part.placed
    total.assembled += part.assembled
    total.not_assembled += part.not_assembled
