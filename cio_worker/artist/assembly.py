"""Tiles become frames: a frame's tiles pasted into one image with OpenImageIO, on the artist's side.

cnode saves tile ``i`` of ``N`` with ``.tilex<N>-<i>`` inserted in the frame's file name, ``i``
padded to the width of ``N`` (contract.md 2): ``r.tilex4-2.0005.exr`` is tile 2 of ``r.0005.exr``,
``r0005.tilex16-02.exr`` tile 2 of ``r0005.exr``. ``N`` tiles form a ``side`` x ``side`` grid,
index 1-based and row-major from the top left (contract.md 5). Tiles need not be of equal size (an
image whose size the grid does not divide), but they form a grid: every tile of a column is as
wide, every tile of a row as tall. The frame's size and each tile's place follow from the tiles'
own sizes (column widths from the top row, row heights from the left column); a tile that says
where it sits (an EXR data window inside a larger display window) must agree with the grid.

The frame gets the tiles' format, channels and pixel type (half RGBA EXR stays half RGBA) and the
first tile's metadata. It is written to a hidden temporary name beside the frame, read back and
compared with every tile's pixels, byte for byte, region by region, and only then renamed to the
frame's name, so nothing half-written is ever visible under it. Tiles are read without
OpenImageIO's shared cache (a re-downloaded tile under the same name is read afresh).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cio_worker.errors import CioError
from cio_worker.imaging.display import one_line
from cio_worker.storage.common import remove_quietly, temp_sibling



class AssemblyError(CioError):
    code = "assembly_failed"


@dataclass(frozen=True)
class _Tile:
    path: Path
    spec: object  # OpenImageIO.ImageSpec
    pixels: object  # numpy array (height, width, channels) in the file's own pixel type
    format_name: str


def assemble_frame(tiles: Sequence[Path], frame: Path) -> tuple[int, int]:
    """Paste ``tiles`` (tile 1 first, all of them) into ``frame``; return the frame's size.
    Raises AssemblyError, leaving no frame and no temporary file behind."""
    import OpenImageIO as oiio

    count = len(tiles)
    side = math.isqrt(count)
    if count < 1 or side * side != count:
        raise AssemblyError(f"{count} tiles do not form a square grid")
    read = [_read(oiio, path) for path in tiles]
    first = read[0]
    for tile in read[1:]:
        for what, a, b in (("format", tile.format_name, first.format_name),
                           ("channels", tuple(tile.spec.channelnames), tuple(first.spec.channelnames)),
                           ("pixel type", str(tile.spec.format), str(first.spec.format))):
            if a != b:
                raise AssemblyError(f"tile {tile.path.name} has {what} {a} but tile {first.path.name} has {b}")
    widths = [read[c].spec.width for c in range(side)]
    heights = [read[r * side].spec.height for r in range(side)]
    xs = [sum(widths[:c]) for c in range(side)]
    ys = [sum(heights[:r]) for r in range(side)]
    width, height = sum(widths), sum(heights)
    for number, tile in enumerate(read):
        row, column = divmod(number, side)
        spec = tile.spec
        if (spec.width, spec.height) != (widths[column], heights[row]):
            raise AssemblyError(
                f"tile {tile.path.name} is {spec.width}x{spec.height}, but its column is {widths[column]} wide "
                f"and its row {heights[row]} tall: the tiles do not form a grid")
        placed = (spec.full_width, spec.full_height) != (spec.width, spec.height) or (spec.x, spec.y) != (0, 0)
        if placed and ((spec.x - spec.full_x, spec.y - spec.full_y, spec.full_width, spec.full_height)
                       != (xs[column], ys[row], width, height)):
            raise AssemblyError(
                f"tile {tile.path.name} says it sits at {spec.x - spec.full_x},{spec.y - spec.full_y} of "
                f"{spec.full_width}x{spec.full_height}, but the grid puts it at {xs[column]},{ys[row]} of {width}x{height}")
    import numpy as np

    pixels = np.empty((height, width, first.spec.nchannels), dtype=first.pixels.dtype)
    for number, tile in enumerate(read):
        row, column = divmod(number, side)
        pixels[ys[row] : ys[row] + tile.spec.height, xs[column] : xs[column] + tile.spec.width] = tile.pixels
    spec = oiio.ImageSpec(first.spec)
    spec.width, spec.height, spec.x, spec.y = width, height, 0, 0
    spec.full_x, spec.full_y, spec.full_width, spec.full_height = 0, 0, width, height
    spec.tile_width = spec.tile_height = 0  # scanlines, whatever the tiles were
    spec.erase_attribute("cio:tile")
    temp = temp_sibling(frame)
    try:
        _write(oiio, temp, first.format_name, spec, pixels)
        _verify(oiio, temp, read, xs, ys, (width, height))
        os.replace(temp, frame)
    finally:
        remove_quietly(temp)
    return width, height


def _read(oiio, path: Path) -> _Tile:
    image = oiio.ImageInput.open(str(path))
    if image is None:
        raise AssemblyError(f"tile {path.name} cannot be read: {one_line(oiio.geterror())}")
    try:
        spec = image.spec()
        if spec.depth > 1 or spec.width < 1 or spec.height < 1:
            raise AssemblyError(f"tile {path.name} is not a 2D image")
        pixels = image.read_image(0, 0, 0, spec.nchannels, spec.format)
        if pixels is None:
            raise AssemblyError(f"tile {path.name}'s pixels cannot be read: {one_line(image.geterror())}")
        return _Tile(path, spec, pixels.reshape(spec.height, spec.width, spec.nchannels), image.format_name())
    finally:
        image.close()


def _write(oiio, path: Path, format_name: str, spec, pixels) -> None:
    out = oiio.ImageOutput.create(format_name)
    if out is None:
        raise AssemblyError(f"OpenImageIO cannot write {format_name}: {one_line(oiio.geterror())}")
    if not out.open(str(path), spec):
        raise AssemblyError(f"cannot write {path}: {one_line(out.geterror())}")
    ok = out.write_image(pixels)
    closed = out.close()
    if not (ok and closed):
        raise AssemblyError(f"writing {path} failed: {one_line(out.geterror())}")


def _verify(oiio, path: Path, tiles: list[_Tile], xs: list[int], ys: list[int], size: tuple[int, int]) -> None:
    written = _read(oiio, path)
    if (written.spec.width, written.spec.height) != size or written.pixels.dtype != tiles[0].pixels.dtype:
        raise AssemblyError(f"the frame read back is {written.spec.width}x{written.spec.height} "
                            f"{written.pixels.dtype}, not {size[0]}x{size[1]} {tiles[0].pixels.dtype}")
    side = len(xs)
    for number, tile in enumerate(tiles):
        row, column = divmod(number, side)
        region = written.pixels[ys[row] : ys[row] + tile.spec.height, xs[column] : xs[column] + tile.spec.width]
        if region.tobytes() != tile.pixels.tobytes():
            raise AssemblyError(f"the frame read back differs from tile {tile.path.name} in its region")
