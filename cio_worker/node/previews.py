"""Small previews of a task's outputs, for the farm's web view: one sRGB JPEG per uploaded frame
(or tile), longest side at most ``PreviewSettings.max_side`` pixels, made with OpenImageIO and
stored in the job's storage at ``preview_key(job, relative_path)`` (``_previews/<job>/<path>.jpg``).

The picture: the first subimage's R, G, B (a one- or two-channel image as grey; alpha dropped:
premultiplied colour is already over black), resized (never enlarged; a box filter, each preview
pixel the average of the pixels it covers: 35 times faster than the default filter on a 1080p
frame, and no ringing), then tone-mapped. A floating-point image (EXR, float TIFF) holds scene-linear light: it is
clamped to [0, 1] and encoded with the sRGB OETF (``colorconvert`` linear -> sRGB, OCIO's built-in
config, so a site's ``$OCIO`` cannot change it); an 8- or 16-bit image (PNG, JPEG, TIFF) is
display-referred already and is only resized. Resizing happens before the curve, in linear light.

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

from cio_worker.queue.base import preview_key
from cio_worker.storage import Storage, UploadItem

log = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 384
_OCIO_BUILTIN = "ocio://default"
_LINEAR_FORMATS = ("half", "float", "double")  # pixel types that hold scene-linear light


class PreviewError(Exception):
    """Why one preview could not be made (one line, for the task log)."""


@dataclass(frozen=True)
class PreviewSettings:
    max_side: int = PREVIEW_MAX_SIDE
    quality: int = 85  # JPEG quality


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


def make_preview(source: Path, dest: Path, settings: PreviewSettings = PreviewSettings()) -> tuple[int, int]:
    """Write the preview of the image ``source`` to ``dest`` (a JPEG); return its size.
    Raises PreviewError (or ImportError when OpenImageIO is not installed)."""
    import OpenImageIO as oiio
    from OpenImageIO import ImageBufAlgo

    rgb, spec = _read_rgb(oiio, source)
    scale = min(1.0, settings.max_side / max(spec.width, spec.height))
    width, height = max(1, round(spec.width * scale)), max(1, round(spec.height * scale))
    small = rgb if scale == 1.0 else ImageBufAlgo.resize(rgb, filtername="box",
                                                          roi=oiio.ROI(0, width, 0, height, 0, 1, 0, 3))
    if str(spec.format) in _LINEAR_FORMATS:
        small = ImageBufAlgo.clamp(small, 0.0, 1.0)
        small = ImageBufAlgo.colorconvert(small, "linear", "sRGB", colorconfig=_OCIO_BUILTIN)
    _check(small, "converting")
    small.specmod().attribute("oiio:ColorSpace", "sRGB")
    small.specmod().attribute("Compression", f"jpeg:{settings.quality}")
    if not small.write(str(dest), oiio.UINT8, "jpeg"):
        raise PreviewError(f"writing the JPEG failed: {_one_line(small.geterror())}")
    return width, height


def publish_previews(
    storage: Storage,
    job_id: str,
    outputs: Sequence[PreviewSource],
    work_dir: Path,
    task_log: Path | None = None,
    *,
    settings: PreviewSettings = PreviewSettings(),
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
            report.failed.setdefault(source.relative_path, f"unexpected {type(exc).__name__}: {_one_line(str(exc))}")
    lines = [f"WARNING: no preview of {path}: {reason}" for path, reason in report.failed.items()]
    lines.append(report.summary())
    for line in lines[:-1]:
        say(line)
    if task_log is not None:
        _append_section(task_log, lines)
    return report


def _publish(storage: Storage, job_id: str, outputs: Sequence[PreviewSource], work_dir: Path,
             settings: PreviewSettings, report: PreviewReport) -> None:
    if not outputs:
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    items: dict[str, UploadItem] = {}
    for number, source in enumerate(outputs):
        dest = work_dir / f"preview-{number}.jpg"
        try:
            make_preview(source.local_path, dest, settings)
        except ImportError as exc:
            report.failed[source.relative_path] = f"OpenImageIO is not installed ({exc}): pip install openimageio"
            continue
        except PreviewError as exc:
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
            report.failed[relative] = f"upload failed: {_one_line(str(exc))}"
        return
    report.made.update({relative: item.key for relative, item in items.items()})


def _read_rgb(oiio, path: Path):
    """The first subimage's R, G, B (or first three, or first as grey) as float at origin 0,0,
    and the file's own spec. Only the channels needed are read (an EXR may hold dozens of AOVs),
    without OpenImageIO's shared cache (a retry renders the same name again: a cached picture
    would be stale)."""
    from OpenImageIO import ImageBufAlgo

    image_input = oiio.ImageInput.open(str(path))
    if image_input is None:
        raise PreviewError(f"not an image OpenImageIO reads: {_one_line(oiio.geterror())}")
    try:
        spec = image_input.spec()
        if spec.width < 1 or spec.height < 1 or spec.depth > 1 or spec.nchannels < 1:
            raise PreviewError(f"not a 2D image ({spec.width}x{spec.height}x{spec.depth}, {spec.nchannels} channels)")
        names = list(spec.channelnames)
        if all(c in names for c in "RGB"):
            wanted = [names.index(c) for c in "RGB"]
        else:
            wanted = [0, 1, 2] if spec.nchannels >= 3 else [0, 0, 0]
        begin, end = min(wanted), max(wanted) + 1
        pixels = image_input.read_image(0, 0, begin, end, oiio.FLOAT)
        if pixels is None:
            raise PreviewError(f"its pixels cannot be read: {_one_line(image_input.geterror())}")
    finally:
        image_input.close()
    image = oiio.ImageBuf(oiio.ImageSpec(spec.width, spec.height, end - begin, oiio.FLOAT))
    image.set_pixels(oiio.ROI(0, spec.width, 0, spec.height, 0, 1, 0, end - begin), pixels)
    return ImageBufAlgo.channels(image, tuple(i - begin for i in wanted)), spec


def _check(image, what: str) -> None:
    if image.has_error:
        raise PreviewError(f"{what} failed: {_one_line(image.geterror())}")


def _append_section(path: Path, lines: list[str]) -> None:
    text = "==== cio_worker: previews ====\n" + "".join(f"{line}\n" for line in lines)
    try:
        with open(path, "a", encoding="utf-8", errors="replace") as handle:
            handle.write(text)
    except OSError as exc:
        log.warning("cannot add the previews' lines to the task log %s: %s", path, exc)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
