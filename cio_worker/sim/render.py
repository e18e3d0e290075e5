"""The simulator's "renderer": tile regions, a frame's seed, and deterministic pixels.

A frame's picture is a function of the image item, the frame and the bytes of every input read
for it (through an MD5 seed). A tile is the crop of that same picture to its cell of a
width x width grid (index 1-based, row-major), so a frame's tiles stitched together equal the
untiled render pixel for pixel, while any two tiles differ because the pattern varies with position.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable

from cio_worker.errors import CioError

_READ_BLOCK = 1024 * 1024


class TileError(CioError, ValueError):
    code = "bad_tile"


@dataclass(frozen=True)
class TileRegion:
    """The pixels one tile covers in a ``full_width`` x ``full_height`` image."""

    count: int
    index: int
    x: int
    y: int
    width: int
    height: int
    full_width: int
    full_height: int

    @property
    def is_whole(self) -> bool:
        return self.width == self.full_width and self.height == self.full_height

    def describe(self) -> str:
        return f"{self.index}/{self.count} at {self.x},{self.y} size {self.width}x{self.height} of {self.full_width}x{self.full_height}"


def tile_region(full_width: int, full_height: int, tile_count: int = 1, tile_index: int = 1) -> TileRegion:
    if tile_count < 1:
        raise TileError(f"tile count {tile_count} must be at least 1")
    side = math.isqrt(tile_count)
    if side * side != tile_count:
        raise TileError(f"tile count {tile_count} is not a square number (tiles form a width x width grid)")
    if not 1 <= tile_index <= tile_count:
        raise TileError(f"tile index {tile_index} is outside 1..{tile_count}")
    if side > full_width or side > full_height:
        raise TileError(f"an image of {full_width}x{full_height} cannot be split into {side}x{side} tiles")
    row, column = divmod(tile_index - 1, side)
    x0, x1 = full_width * column // side, full_width * (column + 1) // side
    y0, y1 = full_height * row // side, full_height * (row + 1) // side
    return TileRegion(tile_count, tile_index, x0, y0, x1 - x0, y1 - y0, full_width, full_height)


def input_digest(path: str | Path) -> bytes:
    """MD5 digest of a file's bytes; raises OSError as opening/reading it does."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK):
            digest.update(block)
    return digest.digest()


def frame_seed(item: str, frame: int, input_digests: Iterable[bytes]) -> bytes:
    digest = hashlib.md5()
    digest.update(item.encode("utf-8") + b"\x00")
    digest.update(struct.pack(">q", frame))
    for value in input_digests:
        digest.update(value)
    return digest.digest()


@dataclass(frozen=True)
class FramePainter:
    """Rows of 8-bit RGB for one tile region, from a frame seed."""

    seed: bytes
    region: TileRegion

    @cached_property
    def _red(self) -> bytes:
        region, s = self.region, self.seed
        return bytes((x * 256 // region.full_width + s[0]) & 0xFF for x in range(region.x, region.x + region.width))

    @cached_property
    def _blue_table(self) -> bytes:
        region, s = self.region, self.seed
        multiplier = s[3] | 1
        return bytes(((k * multiplier) + s[2]) & 0xFF for k in range(region.full_width + region.full_height))

    def rows(self, start: int, stop: int) -> list[bytes]:
        """Rows ``start..stop-1`` of the region (region-relative)."""
        region = self.region
        out = []
        for local_y in range(start, stop):
            y = region.y + local_y
            row = bytearray(3 * region.width)
            row[0::3] = self._red
            row[1::3] = bytes([(y * 256 // region.full_height + self.seed[1]) & 0xFF]) * region.width
            row[2::3] = self._blue_table[y + region.x : y + region.x + region.width]
            out.append(bytes(row))
        return out
