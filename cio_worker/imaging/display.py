"""A render's output as an sRGB JPEG a browser shows: the first subimage's R, G, B (a one- or
two-channel image as grey; alpha dropped: premultiplied colour is already over black), made
smaller when ``DisplaySettings.max_side`` asks (never enlarged; a box filter, each pixel the
average of the pixels it covers: 35 times faster than the default filter on a 1080p frame, and
no ringing), then tone-mapped. A floating-point image (EXR, float TIFF) holds scene-linear
light: it is clamped to [0, 1] and encoded with the sRGB OETF (``colorconvert`` linear -> sRGB,
OCIO's built-in config, so a site's ``$OCIO`` cannot change it); an 8- or 16-bit image (PNG,
JPEG, TIFF) is display-referred already and is only resized. Resizing happens before the curve,
in linear light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_OCIO_BUILTIN = "ocio://default"
_LINEAR_FORMATS = ("half", "float", "double")  # pixel types that hold scene-linear light


class DisplayError(Exception):
    """Why a picture could not be made of an image (one line, for a log or a refusal)."""


@dataclass(frozen=True)
class DisplaySettings:
    max_side: int | None = None  # longest side in pixels; None: the image's own size
    quality: int = 85  # JPEG quality


def write_display_jpeg(source: Path, dest: Path, settings: DisplaySettings = DisplaySettings()) -> tuple[int, int]:
    """Write the sRGB JPEG of the image ``source`` to ``dest``; return its size.
    Raises DisplayError (or ImportError when OpenImageIO is not installed)."""
    import OpenImageIO as oiio
    from OpenImageIO import ImageBufAlgo

    rgb, spec = _read_rgb(oiio, source)
    scale = 1.0 if settings.max_side is None else min(1.0, settings.max_side / max(spec.width, spec.height))
    width, height = max(1, round(spec.width * scale)), max(1, round(spec.height * scale))
    shown = rgb if scale == 1.0 else ImageBufAlgo.resize(rgb, filtername="box",
                                                          roi=oiio.ROI(0, width, 0, height, 0, 1, 0, 3))
    if str(spec.format) in _LINEAR_FORMATS:
        shown = ImageBufAlgo.clamp(shown, 0.0, 1.0)
        shown = ImageBufAlgo.colorconvert(shown, "linear", "sRGB", colorconfig=_OCIO_BUILTIN)
    if shown.has_error:
        raise DisplayError(f"converting failed: {one_line(shown.geterror())}")
    shown.specmod().attribute("oiio:ColorSpace", "sRGB")
    shown.specmod().attribute("Compression", f"jpeg:{settings.quality}")
    if not shown.write(str(dest), oiio.UINT8, "jpeg"):
        raise DisplayError(f"writing the JPEG failed: {one_line(shown.geterror())}")
    return width, height


def _read_rgb(oiio, path: Path):
    """The first subimage's R, G, B (or first three, or first as grey) as float at origin 0,0,
    and the file's own spec. Only the channels needed are read (an EXR may hold dozens of AOVs),
    without OpenImageIO's shared cache (a retry renders the same name again: a cached picture
    would be stale)."""
    from OpenImageIO import ImageBufAlgo

    image_input = oiio.ImageInput.open(str(path))
    if image_input is None:
        raise DisplayError(f"not an image OpenImageIO reads: {one_line(oiio.geterror())}")
    try:
        spec = image_input.spec()
        if spec.width < 1 or spec.height < 1 or spec.depth > 1 or spec.nchannels < 1:
            raise DisplayError(f"not a 2D image ({spec.width}x{spec.height}x{spec.depth}, {spec.nchannels} channels)")
        names = list(spec.channelnames)
        if all(c in names for c in "RGB"):
            wanted = [names.index(c) for c in "RGB"]
        else:
            wanted = [0, 1, 2] if spec.nchannels >= 3 else [0, 0, 0]
        begin, end = min(wanted), max(wanted) + 1
        pixels = image_input.read_image(0, 0, begin, end, oiio.FLOAT)
        if pixels is None:
            raise DisplayError(f"its pixels cannot be read: {one_line(image_input.geterror())}")
    finally:
        image_input.close()
    image = oiio.ImageBuf(oiio.ImageSpec(spec.width, spec.height, end - begin, oiio.FLOAT))
    image.set_pixels(oiio.ROI(0, spec.width, 0, spec.height, 0, 1, 0, end - begin), pixels)
    return ImageBufAlgo.channels(image, tuple(i - begin for i in wanted)), spec


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
