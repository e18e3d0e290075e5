"""Small previews of a task's outputs, for the farm's web view: one sRGB JPEG per uploaded frame
(or tile), longest side at most ``PREVIEW_MAX_SIDE`` pixels, made by
``imaging.write_display_jpeg`` (OpenImageIO; an EXR clamped and encoded with the sRGB transfer
function) and stored in the job's storage at ``preview_key(job, relative_path)``
(``_previews/<job>/<path>.jpg``).

A preview is a courtesy: one that cannot be made (a corrupt or truncated image, a format
OpenImageIO does not read, OpenImageIO missing) or uploaded never fails the task. Each is named
with its reason in the task log and counted (``PreviewReport``); the outputs themselves are
uploaded before any preview is attempted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from cio_worker.imaging import DisplayError, DisplaySettings, write_display_jpeg
from cio_worker.imaging.display import one_line
from cio_worker.queue.base import preview_key
from cio_worker.storage import Storage, UploadItem

log = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 384
PREVIEW_SETTINGS = DisplaySettings(max_side=PREVIEW_MAX_SIDE)


class PreviewSource(Protocol):
    """One uploaded output (an ``outputs.OutputFile``): its path under the output directory and
    its file on this node."""

    @property
    def relative_path(self) -> str: ...

    @property
    def local_path(self) -> Path: ...


@dataclass
class PreviewReport:
    made: dict[str, str] = field(default_factory=dict)  # relative path -> storage key
    failed: dict[str, str] = field(default_factory=dict)  # relative path -> reason

    def summary(self) -> str:
        return f"previews: {len(self.made)} made, {len(self.failed)} not made"


def publish_previews(
    storage: Storage,
    job_id: str,
    outputs: Sequence[PreviewSource],
    work_dir: Path,
    task_log: Path | None = None,
    *,
    settings: DisplaySettings = PREVIEW_SETTINGS,
    say: Callable[[str], None] = lambda line: None,
) -> PreviewReport:
    """Make and upload the preview of every output in ``outputs``; never raises. What could not
    be done is said (``say``) and written to ``task_log`` as warnings."""
    report = PreviewReport()
    try:
        _publish(storage, job_id, outputs, work_dir, settings, report)
    except Exception as exc:  # noqa: BLE001 - a preview never costs the task
        log.exception("making previews failed")
        for source in outputs:
            report.made.pop(source.relative_path, None)
            report.failed.setdefault(source.relative_path, f"unexpected {type(exc).__name__}: {one_line(str(exc))}")
    lines = [f"WARNING: no preview of {path}: {reason}" for path, reason in report.failed.items()]
    lines.append(report.summary())
    for line in lines[:-1]:
        say(line)
    if task_log is not None:
        _append_section(task_log, lines)
    return report


def _publish(storage: Storage, job_id: str, outputs: Sequence[PreviewSource], work_dir: Path,
             settings: DisplaySettings, report: PreviewReport) -> None:
    if not outputs:
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    items: dict[str, UploadItem] = {}
    for number, source in enumerate(outputs):
        dest = work_dir / f"preview-{number}.jpg"
        try:
            write_display_jpeg(source.local_path, dest, settings)
        except ImportError as exc:
            report.failed[source.relative_path] = f"OpenImageIO is not installed ({exc}): pip install openimageio"
            continue
        except DisplayError as exc:
            report.failed[source.relative_path] = str(exc)
            continue
        key = preview_key(job_id, source.relative_path)
        items[source.relative_path] = UploadItem(key, dest, size=dest.stat().st_size)
    if not items:
        return
    try:
        storage.upload(list(items.values()))
    except Exception as exc:  # noqa: BLE001 - the outputs are in storage; the previews are extra
        for relative in items:
            report.failed[relative] = f"upload failed: {one_line(str(exc))}"
        return
    report.made.update({relative: item.key for relative, item in items.items()})


def _append_section(path: Path, lines: list[str]) -> None:
    text = "==== cio_worker: previews ====\n" + "".join(f"{line}\n" for line in lines)
    try:
        with open(path, "a", encoding="utf-8", errors="replace") as handle:
            handle.write(text)
    except OSError as exc:
        log.warning("cannot add the previews' lines to the task log %s: %s", path, exc)
