"""Our stand-in for a Clarisse project file, read by the cnode simulator, the dependency scan and
the worker's Clarisse duties.

A project is JSON (any file name; ``.project`` by custom)::

    {
      "format": "cio-project/1",
      "images": {
        "project://scene/image1": {
          "frames": "1-10",                                  # Conductor grammar, the image's range
          "save_as": "C:/proj/renders/beauty/beauty.####.png",
          "resolution": [64, 48],                            # optional, default [64, 48]
          "render_to_disk": true,                            # optional, default true
          "inputs": ["project://scene/wood"]                 # optional, default: every reference
        }
      },
      "references": {
        "project://scene/wood": {"path": "C:/proj/tex/wood.png"},
        "project://scene/plate": {"path": "../plates/bg.####.png", "frame_offset": -100}
      }
    }

Paths are artist paths (drive letters allowed) or relative to the project file's directory.
Time-varying paths carry ``#``-runs (``####``: padded to 4) or ``$F`` variables (``$4F``: padded to
4, ``$F``: unpadded). With ``frame_offset`` ``k`` the file read at frame ``f`` is frame ``f - k``
(the seed's example: offset -100 at frames 1-20 reads 0101-0120).
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cio_worker.errors import CioError, DocumentError, FrameSpecError
from cio_worker.job.frames import FrameSet

PROJECT_FORMAT = "cio-project/1"
DEFAULT_RESOLUTION = (64, 48)
# A time-varying part: a run of '#' or a $F variable with optional padding ($F, $4F).
_SEQUENCE = re.compile(r"#+|\$([0-9]*)F")
_DRIVE = re.compile(r"^[A-Za-z]:")


class ProjectError(CioError):
    code = "bad_project"


@dataclass(frozen=True)
class Reference:
    """A file the project reads: a texture, a geometry cache, an image sequence."""

    item: str
    path: str  # as written in the project (artist form or relative)
    frame_offset: int = 0

    @property
    def is_sequence(self) -> bool:
        return has_sequence(self.path)

    def file_frame(self, frame: int) -> int:
        return frame - self.frame_offset

    def path_at(self, frame: int) -> str:
        return sequence_path(self.path, self.file_frame(frame))


@dataclass(frozen=True)
class ImageItem:
    path: str  # project://scene/image1
    frames: FrameSet
    save_as: str
    resolution: tuple[int, int] = DEFAULT_RESOLUTION
    render_to_disk: bool = True
    inputs: tuple[str, ...] | None = None  # reference items; None: all

    def output_name(self, frame: int, tile_count: int = 1, tile_index: int = 1) -> str:
        return output_file_name(self.save_as, frame, tile_count, tile_index)


@dataclass(frozen=True)
class Project:
    path: str  # where it was read from (node form) or the artist path it was given as
    images: dict[str, ImageItem] = field(default_factory=dict)
    references: dict[str, Reference] = field(default_factory=dict)

    @property
    def directory(self) -> str:
        return posixpath.dirname(self.path.replace("\\", "/"))

    def resolve(self, written: str) -> str:
        """An absolute artist-form path for a path written in the project."""
        text = written.replace("\\", "/")
        if text.startswith("/") or _DRIVE.match(text):
            return text
        return posixpath.normpath(posixpath.join(self.directory, text))

    def image(self, item: str) -> ImageItem:
        try:
            return self.images[item]
        except KeyError:
            known = ", ".join(sorted(self.images)) or "none"
            raise ProjectError(f"project {self.path} has no image {item!r} (images: {known})") from None

    def references_of(self, image: ImageItem) -> list[Reference]:
        if image.inputs is None:
            return list(self.references.values())
        missing = [i for i in image.inputs if i not in self.references]
        if missing:
            raise ProjectError(f"image {image.path} reads {missing[0]!r}, which the project does not define")
        return [self.references[i] for i in image.inputs]


def has_sequence(path: str) -> bool:
    return _SEQUENCE.search(path) is not None


def sequence_path(path: str, frame: int) -> str:
    """Replace every time-varying part with the frame, padded as the pattern says."""

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        width = len(token) if token.startswith("#") else int(match.group(1) or 0)
        return _pad(frame, width)

    return _SEQUENCE.sub(substitute, path)


def sequence_glob(path: str) -> str:
    """A glob pattern that matches every frame of a sequence path (for the 'glob' scan)."""
    return _SEQUENCE.sub("*", _glob_escape(path))


def sequence_regex(path: str) -> re.Pattern[str]:
    """A regex matching exactly the frame files of a sequence path; group 'f<n>' per frame part."""
    pieces = []
    last = 0
    for index, match in enumerate(_SEQUENCE.finditer(path)):
        pieces.append(re.escape(path[last : match.start()]))
        token = match.group(0)
        width = len(token) if token.startswith("#") else int(match.group(1) or 0)
        # As _pad writes them: a minus sign takes one place of the width.
        pieces.append(rf"(?P<f{index}>-[0-9]{{{max(width - 1, 1)},}}|[0-9]{{{max(width, 1)},}})")
        last = match.end()
    pieces.append(re.escape(path[last:]))
    return re.compile("".join(pieces))


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _pad(frame: int, width: int) -> str:
    if frame < 0:
        return "-" + str(-frame).zfill(max(width - 1, 0))
    return str(frame).zfill(width)


def output_file_name(save_as: str, frame: int, tile_count: int = 1, tile_index: int = 1) -> str:
    """The file cnode writes for ``save_as`` at ``frame``, with the tile suffix when tiled.

    ``r.####.exr`` -> ``r.tilex16-02.0050.exr``; ``r####.exr`` -> ``r0050.tilex16-02.exr``
    (contract.md 2). The tile index is padded to the width of the tile count. A ``save_as`` with
    no frame pattern gets ``.####`` before its extension, as Clarisse does for animations.
    """
    if not has_sequence(save_as):
        stem, ext = posixpath.splitext(save_as)
        save_as = f"{stem}.####{ext}"
    name = sequence_path(save_as, frame)
    if tile_count <= 1:
        return name
    tile = f"tilex{tile_count}-{str(tile_index).zfill(len(str(tile_count)))}"
    match = list(_SEQUENCE.finditer(save_as))[-1]
    directory, base = posixpath.split(save_as)
    offset = len(save_as) - len(base)
    if match.start() < offset:  # the pattern is in the directory part: suffix before extension
        stem, ext = posixpath.splitext(name)
        return f"{stem}.{tile}{ext}"
    frame_text = sequence_path(save_as[match.start() : match.end()], frame)
    before = sequence_path(save_as[: match.start()], frame)
    after = save_as[match.end() :]
    if before.endswith("."):
        return f"{before}{tile}.{frame_text}{after}"
    dot = after.rfind(".")
    stem, ext = (after[:dot], after[dot:]) if dot >= 0 and "/" not in after[dot:] else (after, "")
    return f"{before}{frame_text}{stem}.{tile}{ext}"


def load_project(path: str | Path, *, display_path: str | None = None) -> Project:
    """Read a project file; ``display_path`` is the artist path it stands for (for resolving
    relative references), defaulting to the file's own path."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProjectError(f"project file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"project file {path} cannot be read: {exc}") from None
    return parse_project(text, display_path or str(path))


def parse_project(text: str, path: str) -> Project:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ProjectError(f"project file {path} is not a cio project (not JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != PROJECT_FORMAT:
        raise ProjectError(f"project file {path} is not a cio project (format must be {PROJECT_FORMAT!r})")
    try:
        return Project(path=path, images=_images(data.get("images")), references=_references(data.get("references")))
    except DocumentError as exc:
        raise ProjectError(f"project file {path}: {exc}") from None


def _images(raw: Any) -> dict[str, ImageItem]:
    if not isinstance(raw, dict) or not raw:
        raise DocumentError("images", "must be an object naming at least one image")
    images = {}
    for item, spec in raw.items():
        where = f"images[{item!r}]"
        if not isinstance(spec, dict):
            raise DocumentError(where, "must be an object")
        try:
            frames = FrameSet.parse(spec.get("frames", ""))
        except FrameSpecError as exc:
            raise DocumentError(f"{where}.frames", str(exc)) from None
        save_as = spec.get("save_as")
        if not isinstance(save_as, str) or not save_as.strip():
            raise DocumentError(f"{where}.save_as", "is missing (an image must have Save As to render to disk)")
        resolution = spec.get("resolution", list(DEFAULT_RESOLUTION))
        if (
            not isinstance(resolution, list)
            or len(resolution) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8192 for v in resolution)
        ):
            raise DocumentError(f"{where}.resolution", "must be [width, height], each 1 to 8192")
        inputs = spec.get("inputs")
        if inputs is not None and (not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs)):
            raise DocumentError(f"{where}.inputs", "must be a list of reference items")
        render_to_disk = spec.get("render_to_disk", True)
        if not isinstance(render_to_disk, bool):
            raise DocumentError(f"{where}.render_to_disk", "must be true or false")
        images[item] = ImageItem(
            path=item,
            frames=frames,
            save_as=save_as,
            resolution=(resolution[0], resolution[1]),
            render_to_disk=render_to_disk,
            inputs=None if inputs is None else tuple(inputs),
        )
    return images


def _references(raw: Any) -> dict[str, Reference]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DocumentError("references", "must be an object")
    refs = {}
    for item, spec in raw.items():
        where = f"references[{item!r}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str) or not spec["path"].strip():
            raise DocumentError(f"{where}.path", "is missing")
        offset = spec.get("frame_offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise DocumentError(f"{where}.frame_offset", "must be a whole number")
        refs[item] = Reference(item=item, path=spec["path"], frame_offset=offset)
    return refs


# What output_file_name adds to a tiled image's name, read back.
_TILE = re.compile(r"\.tilex(?P<count>[1-9]\d*)-(?P<index>\d+)(?=\.|$)")


@dataclass(frozen=True)
class TileName:
    """What a tile's file name says: the frame it belongs to, how many tiles, which one."""

    frame: str  # the frame's relative path (the tile's with its tile token removed)
    count: int
    index: int
    _head: str
    _tail: str

    def tile(self, index: int) -> str:
        """The relative path of tile ``index`` of the same frame."""
        return f"{self._head}.tilex{self.count}-{str(index).zfill(len(str(self.count)))}{self._tail}"

    def tiles(self) -> list[str]:
        return [self.tile(i) for i in range(1, self.count + 1)]


def tile_name(relative_path: str) -> TileName | None:
    """The tile a relative path names, or None when it is not a tile's name."""
    directory, base = posixpath.split(relative_path)
    matches = list(_TILE.finditer(base))
    if len(matches) != 1:
        return None
    match = matches[0]
    count, index_text = int(match["count"]), match["index"]
    if len(index_text) != len(str(count)) or not 1 <= int(index_text) <= count:
        return None
    head = posixpath.join(directory, base[: match.start()]) if directory else base[: match.start()]
    tail = base[match.end() :]
    return TileName(head + tail, count, int(index_text), head, tail)
