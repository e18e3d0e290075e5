"""The duties the old ``ciocnode`` wrapper did, done natively for any command that runs cnode
(contract.md 1, 2): run from the project's directory with its base name, add ``-config_file`` and
``-log_width 0``, pass ``-tile_rendering`` only for more than one tile, create every output
directory, and judge the result honestly: exit status, known fatal log lines, expected frames.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import stat
import threading
from typing import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cio_worker.errors import CioError, FrameSpecError, RenderError
from cio_worker.job.frames import FrameSet
from cio_worker.job.paths import PathMap, node_path
from cio_worker.job.project import Project, ProjectError, load_project, output_file_name
from cio_worker.node.logscan import LineFilter

CNODE_NAMES = ("cnode", "cnode.exe", "ciocnode")
# Words that make a command more than one simple cnode invocation: run it as given.
_SHELL_SYNTAX = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1", "(", ")"}
_PROGRESS = re.compile(r"^Progress for '([^']+)'\s*:\s*([0-9.]+)\s*%")
_SAVED = re.compile(r"^Saved image '([^']+)' frame (-?\d+) to '(.+)'\s*$")
# Known fatal lines -> reason code. Checked in order; the first match names the failure.
FATAL_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # The licence server did not answer this node (RLM's -17, -111, -112...): the node's fault.
    ("licence_unreachable", re.compile(
        r"communications? error with licen[sc]e server|connection refused at server|no server to connect to"
        r"|(cannot|can't|unable to|could not|failed to) (connect|reach)\b.*licen[sc]e server"
        r"|licen[sc]e server\b.*\b(unreachable|not responding|timed out)", re.I)),
    ("licence", re.compile(r"licen[sc]e\b.{0,40}?\b(unable|fail(s|ed|ure)?|errors?|denied|expired|no .{0,30}available)\b"
                           r"|unable to get a licen[sc]e"
                           r"|no authorization for product|authorization has expired|wrong host for authorization"
                           r"|all licen[sc]es in use", re.I)),  # the last four: RLM's checkout errors
    ("missing_input", re.compile(r"(cannot|can't|unable to) (open|read|find|load) (file|image|texture|project)|no such file", re.I)),
    ("out_of_memory", re.compile(r"out of memory|std::bad_alloc|cannot allocate memory", re.I)),
    ("disk_full", re.compile(r"no space left on device|disk quota exceeded", re.I)),
)
# A shell's own statuses for a program it could not start (POSIX: 127 not found, 126 not executable).
_SHELL_START_CODES = {127: "command_not_found", 126: "command_not_executable"}
# Only lines with one of these words are matched against FATAL_PATTERNS (most lines have none).
_FATAL_HINTS = ("error", "fatal", "no space left", "quota exceeded", "refused at server", "no server to connect",
                "unreachable", "not responding", "out of memory", "bad_alloc", "cannot allocate memory", "licen",
                "authorization")
# A fatal line that a later line may tell more precisely: RLM prints why a checkout failed after it.
_REFINED_BY = {"licence": ("licence_unreachable",)}
# Every line RenderMonitor.feed can use: the runner hands it only these.
MONITORED_LINES = LineFilter(prefixes=("Progress for '", "Saved image '"), words=_FATAL_HINTS)


@dataclass(frozen=True)
class CnodeCall:
    """One cnode command line, split into the parts the worker must understand."""

    program: str
    project: str
    images: tuple[str, ...]
    frame_specs: tuple[str, ...]
    tile_count: int = 1
    tile_index: int = 1
    other: tuple[str, ...] = ()  # every other flag and value, in order
    env_prefix: tuple[str, ...] = ()  # NAME=value words before the program

    @classmethod
    def parse(cls, command: str) -> "CnodeCall | None":
        """The cnode call in ``command``, or None when it is not one simple cnode command."""
        try:
            words = shlex.split(command, posix=True)
        except ValueError:
            return None
        prefix = []
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            prefix.append(words.pop(0))
        if not words or posixpath.basename(words[0]) not in CNODE_NAMES:
            return None
        if any(w in _SHELL_SYNTAX for w in words):
            return None
        program, rest = words[0], words[1:]
        if not rest or rest[0].startswith("-"):
            raise RenderError("the cnode command names no project file before its options", code="bad_command")
        project, rest = rest[0], rest[1:]
        images: list[str] = []
        specs: list[str] = []
        tiles = (1, 1)
        other: list[str] = []
        i = 0
        while i < len(rest):
            word = rest[i]
            if word in ("-image", "-image_frames_list"):
                target = images if word == "-image" else specs
                i += 1
                while i < len(rest) and not _is_flag(rest[i]):
                    target.append(rest[i])
                    i += 1
                continue
            if word == "-tile_rendering":
                try:
                    tiles = (int(rest[i + 1]), int(rest[i + 2]))
                except (IndexError, ValueError):
                    raise RenderError("-tile_rendering needs a tile count and a tile index", code="bad_command") from None
                i += 3
                continue
            other.append(word)
            i += 1
        if len(images) != len(specs):
            raise RenderError(
                f"the cnode command lists {len(images)} images but {len(specs)} frame specs; cnode needs one per image",
                code="bad_command",
            )
        for spec in specs:
            try:
                FrameSet.parse_cnode(spec)
            except FrameSpecError as exc:
                raise RenderError(f"the cnode command's frame spec is wrong: {exc}", code="bad_command") from None
            except ValueError:  # e.g. a frame number too long for int()
                shown = spec if len(spec) <= 40 else f"{spec[:20]}...{spec[-10:]} ({len(spec)} characters)"
                raise RenderError(f"the cnode command's frame spec {shown!r} is not a usable frame list",
                                  code="bad_command") from None
        count, index = tiles
        if count < 1 or not 1 <= index <= count:
            raise RenderError(f"-tile_rendering {count} {index}: the index must be 1 to the count", code="bad_command")
        return cls(program, project, tuple(images), tuple(specs), count, index, tuple(other), tuple(prefix))

    def image_frames(self) -> list[tuple[str, FrameSet]]:
        return [(image, FrameSet.parse_cnode(spec)) for image, spec in zip(self.images, self.frame_specs)]

    def without_frames(self, done: FrameSet) -> "CnodeCall":
        """The same call rendering only the frames not in ``done``; images left with none drop out."""
        keep = [(image, frames - done) for image, frames in self.image_frames()]
        keep = [(image, frames) for image, frames in keep if frames]
        return replace(self, images=tuple(i for i, _ in keep), frame_specs=tuple(f.cnode() for _, f in keep))

    def argv(self, project_arg: str | None = None) -> list[str]:
        argv = [self.program, project_arg or self.project, "-image", *self.images, "-image_frames_list", *self.frame_specs]
        if self.tile_count > 1:  # with one tile cnode puts tile noise into file names
            argv += ["-tile_rendering", str(self.tile_count), str(self.tile_index)]
        return argv + list(self.other)


def _is_flag(word: str) -> bool:
    return word.startswith("-") and not re.fullmatch(r"-?\d+(:-?\d+(%\d+)?)?(;.*)?", word)


@dataclass(frozen=True)
class Prepared:
    """What to run, where, and what it must write."""

    argv: list[str] | str  # a list is exec'd; a str goes to /bin/sh -c
    cwd: Path
    env: dict[str, str]
    call: CnodeCall | None = None
    project: Project | None = None
    expected: dict[tuple[str, int], Path] = field(default_factory=dict)  # (image, frame) -> file
    frames: FrameSet = FrameSet()

    @property
    def is_cnode(self) -> bool:
        return self.call is not None


def prepare(
    command: str,
    *,
    env: dict[str, str],
    path_map: PathMap,
    work_dir: Path,
    frames_done: FrameSet = FrameSet(),
) -> Prepared:
    """Do the wrapper's duties for a cnode command; anything else runs as given in ``work_dir``."""
    call = CnodeCall.parse(command)
    if call is None:
        return Prepared(argv=command, cwd=work_dir, env=env)
    if frames_done:
        call = call.without_frames(frames_done)
        if not call.images:
            raise RenderError("every frame of this task was already delivered", code="nothing_to_do")
    project_path = Path(path_map.apply(node_path(call.project, what="the cnode project path")))
    project = _read_project(project_path, call.project)
    expected: dict[tuple[str, int], Path] = {}
    if project is not None:
        for image, frames in call.image_frames():
            item = project.image(image)
            save_as = project.resolve(item.save_as)
            for frame in frames:
                name = output_file_name(save_as, frame, call.tile_count, call.tile_index)
                expected[(image, frame)] = Path(path_map.local(name, what=f"save_as of {image}"))
        for directory in {p.parent for p in expected.values()}:  # Clarisse will not create them
            directory.mkdir(parents=True, exist_ok=True)
    config = work_dir / "clarisse.cfg"
    if not config.exists():
        config.write_text("# written by cio-worker for cnode\n", encoding="utf-8")
    argv = call.argv(project_path.name)
    if "-config_file" not in call.other:
        argv += ["-config_file", str(config)]
    if "-log_width" not in call.other:
        argv += ["-log_width", "0"]
    run_env = dict(env)
    for assignment in call.env_prefix:
        name, value = assignment.split("=", 1)
        run_env[name] = value
    all_frames = FrameSet.of(f for _, frames in call.image_frames() for f in frames)
    return Prepared(
        argv=argv, cwd=project_path.parent, env=run_env, call=call, project=project, expected=expected, frames=all_frames
    )


def _read_project(path: Path, written: str) -> Project | None:
    if not path.is_file():
        raise RenderError(
            f"the project file {written} is not on this node (looked at {path}); was it in the job's upload list?",
            code="missing_input",
        )
    try:
        return load_project(path, display_path=node_path(written))
    except ProjectError:
        return None  # a real Clarisse project: we cannot list its outputs, cnode still renders it


class RenderMonitor:
    """Reads the render's output lines: progress, saved frames, fatal lines. Thread-safe."""

    def __init__(self, prepared: Prepared, on_percent: Callable[[float], None] | None = None,
                 step: float = 10.0) -> None:
        self.prepared = prepared
        self._lock = threading.Lock()
        self.progress: dict[str, float] = {}
        self.saved: set[tuple[str, int]] = set()
        self.fatal: tuple[str, str] | None = None  # (code, line)
        self._on_percent = on_percent
        self._step = step
        self._reported = -1.0  # the last whole step told to on_percent

    def feed(self, line: str) -> None:
        text = line.rstrip("\n")
        match = _PROGRESS.match(text)
        if match:
            with self._lock:
                self.progress[match.group(1)] = float(match.group(2))
            self._tell_percent()
            return
        with self._lock:
            match = _SAVED.match(text)
            if match:
                self.saved.add((match.group(1), int(match.group(2))))
                return
            lowered = text.lower()
            if "command line:" in lowered:  # cnode's echo of its own arguments (-license_server, paths) says nothing
                return
            if (self.fatal is None or self.fatal[0] in _REFINED_BY) and any(hint in lowered for hint in _FATAL_HINTS):
                for code, pattern in FATAL_PATTERNS:
                    if pattern.search(text):
                        if self.fatal is None or code in _REFINED_BY[self.fatal[0]]:
                            self.fatal = (code, text.strip())
                        break

    def _tell_percent(self) -> None:
        if self._on_percent is None:
            return
        percent = self.percent()
        bucket = percent // self._step * self._step
        with self._lock:
            if bucket <= self._reported:
                return
            self._reported = bucket
        self._on_percent(percent)

    def percent(self) -> float:
        call = self.prepared.call
        with self._lock:
            if call is None or not call.images:
                return 0.0
            return sum(self.progress.get(i, 0.0) for i in call.images) / len(call.images)

    def frames_finished(self) -> FrameSet:
        """Frames whose every image's file was announced saved and exists on disk."""
        call = self.prepared.call
        if call is None or not self.prepared.expected:
            return FrameSet()
        with self._lock:
            saved = set(self.saved)
        by_frame: dict[int, bool] = {}
        for (image, frame), path in self.prepared.expected.items():
            ok = (image, frame) in saved and _nonempty(path)
            by_frame[frame] = by_frame.get(frame, True) and ok
        return FrameSet.of(f for f, ok in by_frame.items() if ok)

    def missing_outputs(self) -> list[Path]:
        return sorted(p for p in self.prepared.expected.values() if not _nonempty(p))

    def judge(self, exit_code: int | None, signal: int | None) -> CioError | None:
        """None when the task succeeded; otherwise the reason, for a person."""
        if self.fatal is not None:
            code, line = self.fatal
            ended = ""
            if signal is not None:
                ended = f"; it was killed by signal {signal}"
            elif exit_code not in (0, None):
                ended = f"; it exited with status {exit_code}"
            return RenderError(f"the renderer reported a fatal error: {line}{ended}", code=code)
        if signal is not None:
            return RenderError(f"the renderer was killed by signal {signal}", code="render_crashed")
        if exit_code in _SHELL_START_CODES and isinstance(self.prepared.argv, str):
            code = _SHELL_START_CODES[exit_code]
            return RenderError(f"the command exited with status {exit_code}: {code.replace('_', ' ')} "
                               "(the shell could not run it on this node)", code=code)
        if exit_code != 0:
            return RenderError(f"the renderer exited with status {exit_code}", code="render_failed")
        missing = self.missing_outputs()
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            return RenderError(
                f"the renderer exited 0 but did not write {missing[0]}{more} as a non-empty file of its own "
                "(links are never uploaded)",
                code="missing_output",
            )
        return None


def _nonempty(path: Path) -> bool:
    """A regular file with one name and something in it; a symbolic link or a file with more than
    one hard link never counts (outputs.py never uploads those), whatever it points at."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size > 0 and st.st_nlink == 1
