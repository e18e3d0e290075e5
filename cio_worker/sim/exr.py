"""OpenEXR output for the simulator, as Clarisse writes it: half-float RGBA, scene-linear.

The painter's 8-bit sRGB rows are decoded to linear light (the sRGB EOTF, through a 256-entry
table) with alpha 1, so an EXR frame and the PNG of the same picture look alike once displayed.
A tile is written as its own small data window inside the frame's display window (``x``, ``y``,
``full_width``, ``full_height`` of the OpenImageIO spec), the way an EXR says where a crop sits.
Rows are written band by band straight to the final name, like ``PngStreamWriter``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import OpenImageIO as oiio

from cio_worker.sim.png import PngError
from cio_worker.sim.render import TileRegion


def _srgb_to_linear_table() -> np.ndarray:
    v = np.arange(256, dtype=np.float64) / 255.0
    linear = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    return linear.astype(np.float16)


SRGB_TO_LINEAR = _srgb_to_linear_table()


class ExrStreamWriter:
    """Writes ``region`` of a frame as a half RGBA OpenEXR at ``path``: ``add_rows`` (8-bit RGB
    rows, top to bottom) as often as wanted, then ``finish``."""

    def __init__(self, path: str | Path, region: TileRegion, text: dict[str, str] | None = None) -> None:
        spec = oiio.ImageSpec(region.width, region.height, 4, "half")
        spec.channelnames = ("R", "G", "B", "A")
        spec.alpha_channel = 3
        spec.x, spec.y = region.x, region.y
        spec.full_x, spec.full_y = 0, 0
        spec.full_width, spec.full_height = region.full_width, region.full_height
        spec.attribute("compression", "zip")
        for key, value in (text or {}).items():
            spec.attribute(key, value)
        self._out = oiio.ImageOutput.create("openexr")
        if self._out is None or not self._out.open(str(path), spec):
            error = self._out.geterror() if self._out is not None else oiio.geterror()
            raise OSError(f"cannot write an OpenEXR at {path}: {error}")
        self.region = region
        self._rows = 0

    def add_rows(self, rows: Iterable[bytes]) -> None:
        data = [np.frombuffer(row, dtype=np.uint8) for row in rows]
        if not data:
            return
        width = self.region.width
        if any(len(row) != 3 * width for row in data):
            raise PngError(f"a row of a {width}-pixel RGB image is {3 * width} bytes")
        if self._rows + len(data) > self.region.height:
            raise PngError(f"more than {self.region.height} rows given")
        band = np.ones((len(data), width, 4), dtype=np.float16)
        band[:, :, :3] = SRGB_TO_LINEAR[np.stack(data).reshape(len(data), width, 3)]
        y = self.region.y + self._rows
        if not self._out.write_scanlines(y, y + len(data), 0, band):
            raise OSError(f"writing rows {self._rows}..{self._rows + len(data)} failed: {self._out.geterror()}")
        self._rows += len(data)

    def finish(self) -> None:
        if self._rows != self.region.height:
            raise PngError(f"{self._rows} rows written of {self.region.height}")
        self.close()

    def close(self) -> None:
        if self._out is not None:
            out, self._out = self._out, None
            if not out.close():
                raise OSError(f"closing the OpenEXR failed: {out.geterror()}")

    def abandon(self) -> None:
        """Let go of the file half-way (the caller removes it); never raises."""
        out, self._out = self._out, None
        if out is not None:
            out.close()
