"""Frame sets: Conductor's frame-spec grammar, the canonical form, chunking, and cnode's form.

Conductor form (contract.md 3): blocks ``N``, ``N-M`` or ``N-MxS`` separated by commas and/or
spaces; negative frames allowed (``-5--1``); ``M < N`` is swapped; the step is an integer >= 1
without leading zeros. cnode form (contract.md 2): blocks ``start[:end[%step]]`` joined by ``;``.
Both printed forms split the sorted frames greedily into arithmetic progressions, built from the
numbers (never by rewriting the other form's text, which breaks negative frames).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from cio_worker.errors import FrameSpecError

# One block of the Conductor grammar. Frames may be negative; the step has no sign and no
# leading zero. ASCII digits only: ``\d`` also takes other scripts' digits, which int() reads.
# Anything the regex does not take is explained by _explain_bad_block.
_BLOCK = re.compile(r"(-?[0-9]+)(?:-(-?[0-9]+)(?:x([1-9][0-9]*))?)?")
# Separators: one comma with optional blanks around it, or a run of blanks.
_SEPARATOR = re.compile(r"[ \t]*,[ \t]*|[ \t]+")
_CNODE_BLOCK = re.compile(r"(-?[0-9]+)(?::(-?[0-9]+)(?:%([1-9][0-9]*))?)?")

# A frame range is expanded into memory: refuse specs that would describe absurd counts.
MAX_FRAMES = 1_000_000
MAX_DIGITS = 9  # frame numbers and steps; far past any real shot, and int() stays cheap


@dataclass(frozen=True)
class Progression:
    """``start, start+step, ..., end`` with ``end`` reached exactly; ``step`` >= 1."""

    start: int
    end: int
    step: int

    def conductor(self) -> str:
        if self.start == self.end:
            return str(self.start)
        if self.step == 1:
            return f"{self.start}-{self.end}"
        return f"{self.start}-{self.end}x{self.step}"

    def cnode(self) -> str:
        if self.start == self.end:
            return str(self.start)
        if self.step == 1:
            return f"{self.start}:{self.end}"
        return f"{self.start}:{self.end}%{self.step}"


@dataclass(frozen=True)
class FrameSet:
    """A sorted set of unique integer frames."""

    frames: tuple[int, ...] = ()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def of(cls, frames: Iterable[int]) -> "FrameSet":
        return cls(tuple(sorted(set(int(f) for f in frames))))

    @classmethod
    def parse(cls, spec: str) -> "FrameSet":
        """Parse a Conductor frame spec; raise FrameSpecError naming what is wrong."""
        if not isinstance(spec, str):
            raise FrameSpecError(f"a frame spec must be text, not {type(spec).__name__}")
        if spec == "" or spec.strip(" \t") == "":
            raise FrameSpecError("the frame spec is empty")
        if spec[0] in ", \t" or spec[-1] in ", \t":
            raise FrameSpecError(f"frame spec {spec!r} starts or ends with a separator")
        frames: set[int] = set()
        position = 0
        for separator in [*_SEPARATOR.finditer(spec), None]:
            block_end = separator.start() if separator else len(spec)
            block = spec[position:block_end]
            frames.update(_expand_block(block, spec))
            if len(frames) > MAX_FRAMES:
                raise FrameSpecError(f"frame spec {spec!r} names more than {MAX_FRAMES} frames")
            if separator:
                position = separator.end()
        return cls(tuple(sorted(frames)))

    @classmethod
    def parse_optional(cls, spec: str | None) -> "FrameSet":
        """Like parse, but an empty or missing spec is the empty set (e.g. ``frames_done``)."""
        if spec is None or (isinstance(spec, str) and spec.strip() == ""):
            return cls()
        return cls.parse(spec)

    @classmethod
    def parse_cnode(cls, spec: str) -> "FrameSet":
        """Parse cnode's ``start[:end[%step]];...`` form."""
        if not isinstance(spec, str) or spec.strip() == "":
            raise FrameSpecError("the cnode frame spec is empty")
        frames: set[int] = set()
        for block in spec.split(";"):
            match = _CNODE_BLOCK.fullmatch(block.strip())
            if not match:
                raise FrameSpecError(
                    f"cnode frame block {block!r} in {spec!r} is not start[:end[%step]]"
                )
            start, end, step = _numbers(match, spec)
            frames.update(_progression_frames(start, end, step, spec))
        return cls(tuple(sorted(frames)))

    # -- queries ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[int]:
        return iter(self.frames)

    def __contains__(self, frame: object) -> bool:
        return frame in self._lookup

    def __bool__(self) -> bool:
        return bool(self.frames)

    @property
    def _lookup(self) -> frozenset[int]:
        # Cached lazily on the frozen instance.
        cached = self.__dict__.get("_lookup_cache")
        if cached is None:
            cached = frozenset(self.frames)
            object.__setattr__(self, "_lookup_cache", cached)
        return cached

    @property
    def first(self) -> int:
        self._require_frames("first frame")
        return self.frames[0]

    @property
    def last(self) -> int:
        self._require_frames("last frame")
        return self.frames[-1]

    def _require_frames(self, what: str) -> None:
        if not self.frames:
            raise FrameSpecError(f"an empty frame set has no {what}")

    # -- set algebra --------------------------------------------------------------------------

    def intersect(self, other: "FrameSet") -> "FrameSet":
        keep = other._lookup
        return FrameSet(tuple(f for f in self.frames if f in keep))

    def union(self, other: "FrameSet") -> "FrameSet":
        return FrameSet.of((*self.frames, *other.frames))

    def difference(self, other: "FrameSet") -> "FrameSet":
        drop = other._lookup
        return FrameSet(tuple(f for f in self.frames if f not in drop))

    def __and__(self, other: "FrameSet") -> "FrameSet":
        return self.intersect(other)

    def __or__(self, other: "FrameSet") -> "FrameSet":
        return self.union(other)

    def __sub__(self, other: "FrameSet") -> "FrameSet":
        return self.difference(other)

    # -- chunking -----------------------------------------------------------------------------

    def chunks(self, chunk_size: int) -> list["FrameSet"]:
        """The linear strategy: consecutive slices, chunk size clamped to [1, len(self)]."""
        if not self.frames:
            return []
        size = clamp_chunk_size(chunk_size, len(self.frames))
        return [FrameSet(self.frames[i : i + size]) for i in range(0, len(self.frames), size)]

    # -- printed forms ------------------------------------------------------------------------

    def progressions(self) -> list[Progression]:
        """Greedy split into arithmetic progressions: from each frame, the longest run."""
        frames = self.frames
        out: list[Progression] = []
        i = 0
        while i < len(frames):
            if i + 1 == len(frames):
                out.append(Progression(frames[i], frames[i], 1))
                break
            step = frames[i + 1] - frames[i]
            j = i + 1
            while j + 1 < len(frames) and frames[j + 1] - frames[j] == step:
                j += 1
            out.append(Progression(frames[i], frames[j], step))
            i = j + 1
        return out

    def canonical(self) -> str:
        """Conductor form, e.g. ``1-10``, ``1-5x4``, ``2-9x7,20``; '' for the empty set."""
        return ",".join(p.conductor() for p in self.progressions())

    def cnode(self) -> str:
        """cnode form, e.g. ``5:8``, ``5:7%2``, ``-5:-1;3``."""
        self._require_frames("cnode form")
        return ";".join(p.cnode() for p in self.progressions())

    def __str__(self) -> str:
        return self.canonical()


def clamp_chunk_size(chunk_size: int, frame_count: int) -> int:
    return max(1, min(int(chunk_size), max(1, frame_count)))


def chunk_count(frame_count: int, chunk_size: int) -> int:
    if frame_count <= 0:
        return 0
    return math.ceil(frame_count / clamp_chunk_size(chunk_size, frame_count))


def _expand_block(block: str, spec: str) -> range:
    match = _BLOCK.fullmatch(block)
    if not match:
        raise FrameSpecError(_explain_bad_block(block, spec))
    return _progression_frames(*_numbers(match, spec), spec)


def _numbers(match: re.Match[str], spec: str) -> tuple[int, int, int]:
    """start, end, step of a matched block; absurdly long numbers are refused before int()."""
    for text in match.groups():
        if text is not None and len(text.lstrip("-")) > MAX_DIGITS:
            raise FrameSpecError(f"frame spec {spec!r}: {text[:12]}... has more than {MAX_DIGITS} digits")
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) is not None else start
    step = int(match.group(3)) if match.group(3) else 1
    return start, end, step


def _progression_frames(start: int, end: int, step: int, spec: str) -> range:
    if end < start:
        start, end = end, start
    if (end - start) // step + 1 > MAX_FRAMES:
        raise FrameSpecError(f"frame spec {spec!r} names more than {MAX_FRAMES} frames")
    return range(start, end + 1, step)


def _explain_bad_block(block: str, spec: str) -> str:
    where = f"block {block!r} of frame spec {spec!r}"
    if block == "":
        return f"frame spec {spec!r} has an empty block (two separators in a row)"
    if re.fullmatch(r"-?\d+x\d+", block):
        return f"{where}: a step needs a range (write N-MxS, not NxS)"
    if re.fullmatch(r"-?\d+-(-?\d+)x0+", block):
        return f"{where}: the step must be at least 1"
    if re.fullmatch(r"-?\d+-(-?\d+)x0\d+", block):
        return f"{where}: the step must be written without leading zeros"
    if ":" in block or "%" in block or ";" in block:
        return f"{where}: that is cnode's form; Conductor's is N, N-M or N-MxS"
    return f"{where}: expected N, N-M or N-MxS with integer frames"
