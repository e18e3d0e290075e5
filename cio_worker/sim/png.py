"""A small PNG writer (8-bit RGB, streamed in IDAT chunks) and a strict reader for checking it.

The writer is streamed so that a renderer can write straight to its final file name band by band,
as real renderers do; the reader verifies the signature, every chunk's CRC, the chunk order and the
exact amount of pixel data, so a truncated or corrupted file is an error, never a picture.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

from cio_worker.errors import CioError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # greyscale, RGB, grey+alpha, RGBA (8-bit only)


class PngError(CioError, ValueError):
    code = "bad_image"


def chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


class PngStreamWriter:
    """Writes an 8-bit RGB PNG to an open binary file: ``add_rows`` as often as wanted, then
    ``finish``. Each ``add_rows`` call ends with one IDAT chunk on disk."""

    def __init__(self, handle: BinaryIO, width: int, height: int, text: dict[str, str] | None = None):
        if not (1 <= width <= 0x7FFFFFFF and 1 <= height <= 0x7FFFFFFF):
            raise PngError(f"a PNG must be at least 1x1, not {width}x{height}")
        self._handle = handle
        self.width = width
        self.height = height
        self._rows = 0
        self._compressor = zlib.compressobj(6)
        handle.write(SIGNATURE)
        handle.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        for key, value in (text or {}).items():
            handle.write(chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1")))

    def add_rows(self, rows: Iterable[bytes]) -> None:
        stride = 3 * self.width
        data = bytearray()
        for row in rows:
            if len(row) != stride:
                raise PngError(f"a row of a {self.width}-pixel RGB image is {stride} bytes, not {len(row)}")
            self._rows += 1
            if self._rows > self.height:
                raise PngError(f"more than {self.height} rows given")
            data += b"\x00"  # filter type None
            data += row
        compressed = self._compressor.compress(bytes(data)) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        if compressed:
            self._handle.write(chunk(b"IDAT", compressed))
        self._handle.flush()

    def finish(self) -> None:
        if self._rows != self.height:
            raise PngError(f"{self._rows} rows written of {self.height}")
        self._handle.write(chunk(b"IDAT", self._compressor.flush(zlib.Z_FINISH)))
        self._handle.write(chunk(b"IEND", b""))
        self._handle.flush()


def encode_png(width: int, height: int, rows: Iterable[bytes], text: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    writer = PngStreamWriter(buffer, width, height, text)
    writer.add_rows(rows)
    writer.finish()
    return buffer.getvalue()


def write_png(path: str | Path, width: int, height: int, rows: Iterable[bytes], text: dict[str, str] | None = None) -> None:
    Path(path).write_bytes(encode_png(width, height, rows, text))


@dataclass(frozen=True)
class PngImage:
    width: int
    height: int
    color_type: int
    channels: int
    pixels: bytes  # unfiltered rows, top to bottom, ``channels`` bytes per pixel
    text: dict[str, str] = field(default_factory=dict)

    @property
    def stride(self) -> int:
        return self.width * self.channels

    def row(self, y: int) -> bytes:
        return self.pixels[y * self.stride : (y + 1) * self.stride]

    def pixel(self, x: int, y: int) -> tuple[int, ...]:
        start = y * self.stride + x * self.channels
        return tuple(self.pixels[start : start + self.channels])


def read_png(path: str | Path) -> PngImage:
    return decode_png(Path(path).read_bytes())


def decode_png(data: bytes) -> PngImage:
    if not data.startswith(SIGNATURE):
        raise PngError("not a PNG (bad signature)")
    position = len(SIGNATURE)
    header: tuple[int, ...] | None = None
    idat = bytearray()
    text: dict[str, str] = {}
    ended = False
    while position < len(data):
        if ended:
            raise PngError("data after the IEND chunk")
        if position + 8 > len(data):
            raise PngError("truncated chunk header")
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        crc_bytes = data[position + 8 + length : position + 12 + length]
        if len(body) != length or len(crc_bytes) != 4:
            raise PngError(f"truncated {kind!r} chunk")
        if struct.unpack(">I", crc_bytes)[0] != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise PngError(f"CRC mismatch in {kind!r} chunk")
        position += 12 + length
        if header is None and kind != b"IHDR":
            raise PngError("the first chunk is not IHDR")
        if kind == b"IHDR":
            if header is not None or length != 13:
                raise PngError("bad or repeated IHDR chunk")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\x00")
            text[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"IEND":
            ended = True
    if header is None or not ended:
        raise PngError("truncated PNG (no IEND chunk)")
    width, height, depth, color_type, compression, filtering, interlace = header
    if width == 0 or height == 0:
        raise PngError(f"IHDR size {width}x{height} is empty")
    if depth != 8 or color_type not in _COLOR_CHANNELS or compression or filtering or interlace:
        raise PngError(f"unsupported PNG (depth {depth}, colour type {color_type}, interlace {interlace})")
    channels = _COLOR_CHANNELS[color_type]
    try:
        raw = zlib.decompress(bytes(idat))
    except zlib.error as exc:
        raise PngError(f"pixel data does not decompress: {exc}") from None
    stride = width * channels
    if len(raw) != height * (stride + 1):
        raise PngError(f"pixel data is {len(raw)} bytes, expected {height * (stride + 1)}")
    return PngImage(width, height, color_type, channels, _unfilter(raw, height, stride, channels), text)


def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> bytes:
    out = bytearray()
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind = raw[start]
        row = bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                row[i] = (row[i] + row[i - bpp]) & 0xFF
        elif kind == 2:
            for i in range(stride):
                row[i] = (row[i] + previous[i]) & 0xFF
        elif kind == 3:
            for i in range(stride):
                left = row[i - bpp] if i >= bpp else 0
                row[i] = (row[i] + (left + previous[i]) // 2) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = row[i - bpp] if i >= bpp else 0
                b = previous[i]
                c = previous[i - bpp] if i >= bpp else 0
                row[i] = (row[i] + _paeth(a, b, c)) & 0xFF
        elif kind != 0:
            raise PngError(f"row {y} has unknown filter type {kind}")
        out += row
        previous = row
    return bytes(out)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c
