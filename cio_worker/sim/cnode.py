"""A stand-in for Clarisse's ``cnode`` that honours its command line (contract.md 2).

    cnode <project> -image <item> [<item> ...] -image_frames_list <spec> [<spec> ...]
          [-tile_rendering <count> <index>] [-license_server host:port] [-config_file F]
          [-log_width N] [-log_level L] [-script "..."] [-search_path P] [-module_path P]
          [-output D] [-format F]

It reads a project (``cio_worker.job.project``), really reads every input an image needs at each frame
and writes a real image per frame (per tile) straight to its final name, printing cnode-like
``Progress``/``Subprogress``/``Saved image`` lines: an OpenEXR (half-float RGBA, linear; ``exr.py``)
when the image's ``save_as`` ends in ``.exr``, else an 8-bit RGB PNG. Like cnode it cannot open a
project path with a space, fails when an output directory is missing (it never creates one), and
with any ``-tile_rendering`` (even ``1 1``) it puts the tile suffix into file names. A tile is
saved as its own smaller image of the tile's region (a PNG's ``tEXt`` chunk ``cio:tile`` says where
it sits; an EXR's data window sits inside the frame's display window).

Paths written in the project as absolute artist paths (``C:/proj/...``) are drive-stripped and
re-rooted through ``CIO_PATH_MAP`` (JSON of ``PathMap.to_dict()``); relative ones are resolved
against the project file's real directory and not mapped again.

Test controls (environment): ``CNODE_SIM_FRAME_SECONDS`` (time per frame: half rendering, half
writing the file), ``CNODE_SIM_FAIL`` = ``license`` (no licence free) | ``license_unreachable`` (the
licence server does not answer: RLM's -17 and -111 lines) | ``crash`` (exit 3 after the first frame) |
``frame:N`` (exit 1 at frame N) | ``segfault`` (SIGSEGV after the first frame),
``CNODE_SIM_MEMORY_MB`` (memory held, touched, during the render), ``CNODE_SIM_IGNORE_SIGTERM=1``.
SIGTERM (SIGINT) stops it promptly with exit 143 (130), removing a file it was half-way through.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import resource
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, TextIO

from cio_worker.errors import CioError
from cio_worker.job.frames import FrameSet
from cio_worker.job.paths import PathMap, posix_path
from cio_worker.job.project import ImageItem, Project, Reference, load_project, output_file_name
from cio_worker.sim.shim import install_cnode_shim  # noqa: F401  (also importable from here)
from cio_worker.sim.png import PngStreamWriter
from cio_worker.sim.render import FramePainter, TileRegion, frame_seed, input_digest, tile_region

if TYPE_CHECKING:
    from cio_worker.sim.exr import ExrStreamWriter

VERSION = "cnode-sim 0.1 (cio_worker stand-in for Isotropix Clarisse cnode)"
DEFAULT_LICENSE_SERVER = "localhost:40500"
PATH_MAP_ENV = "CIO_PATH_MAP"

# Option name -> number of values; None: one or more, up to the next known option.
_OPTIONS: dict[str, int | None] = {
    "-image": None,
    "-image_frames_list": None,
    "-tile_rendering": 2,
    "-license_server": 1,
    "-config_file": 1,
    "-log_width": 1,
    "-log_level": 1,
    "-script": 1,
    "-search_path": 1,
    "-module_path": 1,
    "-output": 1,
    "-format": 1,
}
# An option name, as opposed to a value such as the frame spec '-2:-1'.
_OPTION_SHAPED = re.compile(r"-[A-Za-z_]")
_BANDS = 4  # a frame is rendered and written in this many row bands (fewer for short tiles)
_SLEEP_SLICE = 0.02


class CnodeError(Exception):
    """A fatal error: printed as one ``[ERROR]`` line, then cnode exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class CnodeArgs:
    project: str
    argv: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    frame_lists: tuple[str, ...] | None = None
    tile: tuple[int, int] | None = None
    options: dict[str, str] = field(default_factory=dict)  # the single-valued options given


def parse_args(argv: list[str]) -> CnodeArgs:
    project: str | None = None
    values: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in _OPTIONS:
            if token in values:
                raise CnodeError(f"Option {token} is given twice")
            arity = _OPTIONS[token]
            i += 1
            taken: list[str] = []
            while i < len(argv) and not _OPTION_SHAPED.match(argv[i]) and (arity is None or len(taken) < arity):
                taken.append(argv[i])
                i += 1
            if (arity is None and not taken) or (arity is not None and len(taken) != arity):
                wanted = "at least one value" if arity is None else f"{arity} value{'s' * (arity > 1)}"
                raise CnodeError(f"Option {token} needs {wanted}")
            values[token] = taken
        elif token.startswith("-"):
            raise CnodeError(f"Unknown option '{token}'")
        elif project is None:
            project = token
            i += 1
        else:
            raise CnodeError(f"Unexpected argument '{token}' (the project is already '{project}')")
    if project is None:
        raise CnodeError("No project given: cnode <project> -image <item> ... -image_frames_list <frames> ...")
    tile = None
    if "-tile_rendering" in values:
        try:
            count, index = (int(v) for v in values["-tile_rendering"])
        except ValueError:
            raise CnodeError(f"-tile_rendering needs two whole numbers, not {' '.join(values['-tile_rendering'])}") from None
        tile = (count, index)
    if "-log_width" in values and not values["-log_width"][0].lstrip("-").isdigit():
        raise CnodeError(f"-log_width needs a whole number, not '{values['-log_width'][0]}'")
    single = {name: v[0] for name, v in values.items() if _OPTIONS[name] == 1}
    return CnodeArgs(
        project=project,
        argv=tuple(argv),
        images=tuple(values.get("-image", ())),
        frame_lists=tuple(values["-image_frames_list"]) if "-image_frames_list" in values else None,
        tile=tile,
        options=single,
    )


@dataclass(frozen=True)
class SimControls:
    frame_seconds: float = 0.0
    fail: str | None = None  # license | license_unreachable | crash | segfault | frame
    fail_frame: int | None = None
    memory_mb: float = 0.0
    ignore_sigterm: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "SimControls":
        def number(name: str) -> float:
            text = env.get(name, "").strip()
            try:
                value = float(text) if text else 0.0
            except ValueError:
                raise CnodeError(f"{name}={text!r} is not a number") from None
            if value < 0:
                raise CnodeError(f"{name}={text!r} must not be negative")
            return value

        fail = env.get("CNODE_SIM_FAIL", "").strip() or None
        fail_frame = None
        if fail is not None and fail.startswith("frame:"):
            try:
                fail_frame = int(fail.split(":", 1)[1])
            except ValueError:
                raise CnodeError(f"CNODE_SIM_FAIL={fail!r}: frame:N needs a whole number") from None
            fail = "frame"
        elif fail not in (None, "license", "license_unreachable", "crash", "segfault"):
            raise CnodeError(f"CNODE_SIM_FAIL={fail!r} is not license, license_unreachable, crash, segfault or frame:N")
        return cls(
            frame_seconds=number("CNODE_SIM_FRAME_SECONDS"),
            fail=fail,
            fail_frame=fail_frame,
            memory_mb=number("CNODE_SIM_MEMORY_MB"),
            ignore_sigterm=env.get("CNODE_SIM_IGNORE_SIGTERM", "").strip() not in ("", "0"),
        )


class Log:
    """cnode's log on stdout, one flushed line at a time; a vanished reader does not stop the render."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def line(self, text: str) -> None:
        try:
            self._stream.write(text + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def info(self, text: str) -> None:
        self.line(f"[INFO] {text}")

    def warning(self, text: str) -> None:
        self.line(f"[WARNING] {text}")

    def error(self, text: str) -> None:
        self.line(f"[ERROR] {text}")


class StopFlag:
    """Set by SIGTERM/SIGINT; checked at safe points, where it raises Interrupted."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self, ignore_sigterm: bool = False) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_sigterm else self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            self.check()
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, _SLEEP_SLICE))


@dataclass(frozen=True)
class ImageJob:
    item: str
    image: ImageItem
    frames: FrameSet
    references: tuple[Reference, ...]
    region: TileRegion


class Session:
    """One cnode run: check the licence, open the project, render every requested frame."""

    def __init__(self, args: CnodeArgs, controls: SimControls, log: Log, stop: StopFlag, env: Mapping[str, str]):
        self.args = args
        self.controls = controls
        self.log = log
        self.stop = stop
        self.env = env
        self.path_map = _path_map(env)
        self.frames_written = 0

    def run(self) -> int:
        started = time.monotonic()
        args = self.args
        self.log.line(VERSION)
        self.log.info(f"Command line: {shlex.join(['cnode', *args.argv])}")
        self._report_options()
        self._license()
        project = self._open_project()
        jobs = self._plan(project)
        held = self._hold_memory()
        for job in jobs:
            self._render_image(project, job)
        del held
        elapsed = time.monotonic() - started
        self.log.info(
            f"Render summary: {self.frames_written} frame{'s' * (self.frames_written != 1)} of "
            f"{len(jobs)} image{'s' * (len(jobs) != 1)} written in {elapsed:.2f} s"
        )
        self.log.info("cnode exited normally")
        return 0

    # -- start-up -----------------------------------------------------------------------------

    def _report_options(self) -> None:
        options = self.args.options
        if "-log_level" in options:
            self.log.info(f"Log level: {options['-log_level']}")
        config = options.get("-config_file")
        if config is not None:
            if os.path.isfile(config):
                self.log.info(f"Using configuration file '{config}'")
            else:
                self.log.warning(f"Configuration file '{config}' not found: using defaults")
        for name in ("-search_path", "-module_path"):
            if name in options:
                self.log.info(f"{name[1:]}: {options[name]}")
        if "-script" in options:
            self.log.warning(f"-script '{options['-script']}' is not run by the simulator")
        if "-format" in options:
            self.log.info(f"Output format '{options['-format']}' requested: the simulator writes EXR or PNG by the file's extension")

    def _license(self) -> None:
        server = self.args.options.get("-license_server") or self.env.get("ILISE_SERVER") or DEFAULT_LICENSE_SERVER
        self.log.info(f"Connecting to license server {server}")
        if self.controls.fail == "license":
            raise CnodeError(f"License: unable to get a license from server {server}")
        if self.controls.fail == "license_unreachable":  # RLM's words for a server that does not answer
            self.log.error(f"License: unable to check out a cnode license from server {server}")
            self.log.error("RLM: Communications error with license server (-17)")
            raise CnodeError("RLM: Connection refused at server (-111)")
        self.log.info(f"License: checked out a cnode license from server {server}")

    def _open_project(self) -> Project:
        given = self.args.project
        if " " in given:
            raise CnodeError(
                f"Cannot open project '{given}': cnode does not support paths containing spaces "
                "(change to the project's directory and pass its file name)"
            )
        path = os.path.abspath(given)
        self.log.info(f"Loading project '{path}'")
        try:
            project = load_project(path)
        except CioError as exc:
            raise CnodeError(f"Cannot open project '{given}': {exc}") from None
        self.log.info(f"Project loaded: {len(project.images)} images, {len(project.references)} references")
        return project

    def _plan(self, project: Project) -> list[ImageJob]:
        args = self.args
        if not args.images:
            raise CnodeError("No image to render: give -image <item> ... -image_frames_list <frames> ...")
        if args.frame_lists is not None and len(args.frame_lists) != len(args.images):
            raise CnodeError(
                f"-image names {len(args.images)} image(s) but -image_frames_list gives "
                f"{len(args.frame_lists)} frame list(s): give one per image, in the same order"
            )
        count, index = args.tile or (1, 1)
        jobs = []
        for position, item in enumerate(args.images):
            if item not in project.images:
                raise CnodeError(f"Image '{item}' does not exist in project '{project.path}'")
            image = project.images[item]
            if not image.render_to_disk:
                raise CnodeError(f"Image '{item}' has Render To Disk off: nothing to save")
            if args.frame_lists is None:
                frames = image.frames
            else:
                try:
                    frames = FrameSet.parse_cnode(args.frame_lists[position])
                except CioError as exc:
                    raise CnodeError(f"Invalid frame list for '{item}': {exc}") from None
            try:
                references = tuple(project.references_of(image))
                region = tile_region(image.resolution[0], image.resolution[1], count, index)
            except CioError as exc:
                raise CnodeError(f"Cannot render '{item}': {exc}") from None
            jobs.append(ImageJob(item, image, frames, references, region))
        return jobs

    def _hold_memory(self) -> bytearray | None:
        size = int(self.controls.memory_mb * 1024 * 1024)
        if size <= 0:
            return None
        held = bytearray(size)
        held[::4096] = b"\x01" * len(range(0, size, 4096))  # touch every page
        self.log.info(f"Allocated {self.controls.memory_mb:g} MB of render memory")
        return held

    # -- rendering ----------------------------------------------------------------------------

    def _render_image(self, project: Project, job: ImageJob) -> None:
        region = job.region
        tile_text = f", tile {region.describe()}" if self.args.tile else ""
        self.log.info(
            f"Rendering image '{job.item}': {len(job.frames)} frame(s) {job.frames.cnode()} "
            f"at {region.full_width}x{region.full_height}{tile_text}"
        )
        total = len(job.frames)
        self._progress(job.item, 0.0)
        for done, frame in enumerate(job.frames):
            self.stop.check()
            if self.controls.fail == "frame" and frame == self.controls.fail_frame:
                raise CnodeError(f"Rendering of '{job.item}' failed at frame {frame}: simulated render failure")
            digests = [self._read_input(project, reference, frame) for reference in job.references]
            painter = FramePainter(frame_seed(job.item, frame, digests), region)
            bands = _bands(region.height)
            half = self.controls.frame_seconds / 2
            rendered = []
            for number, (start, stop) in enumerate(bands, 1):
                rendered.append(painter.rows(start, stop))
                self.stop.sleep(half / len(bands))
                self.log.line(f"Subprogress for '{job.item}' : {100.0 * number / len(bands):.1f}%")
            self._progress(job.item, (done + 0.5) / total)
            target = self._output_path(project, job.image, frame)
            text = {"Software": VERSION, "cio:item": job.item, "cio:frame": str(frame), "cio:tile": region.describe()}
            self._write(target, region, rendered, half, text)
            self.frames_written += 1
            self.log.line(f"Saved image '{job.item}' frame {frame} to '{target}'")
            self._progress(job.item, (done + 1) / total)
            if self.frames_written == 1:
                self._fail_after_first_frame()

    def _progress(self, item: str, fraction: float) -> None:
        self.log.line(f"Progress for '{item}' : {100.0 * fraction:.1f}%")

    def _read_input(self, project: Project, reference: Reference, frame: int) -> bytes:
        self.stop.check()
        path = self._local(project, reference.path_at(frame), what=f"reference {reference.item}")
        try:
            return input_digest(path)
        except OSError as exc:
            raise CnodeError(f"Cannot open file '{path}': {exc.strerror or exc}") from None

    def _output_path(self, project: Project, image: ImageItem, frame: int) -> str:
        save_as = self.args.options.get("-output") or image.save_as
        resolved = project.resolve(save_as)
        name = _output_name(resolved, frame, self.args.tile)
        return self._map(save_as, name, what=f"save_as of {image.path}")

    def _local(self, project: Project, written: str, *, what: str) -> str:
        return self._map(written, project.resolve(written), what=what)

    def _map(self, written: str, resolved: str, *, what: str) -> str:
        """Artist-absolute paths go through the path map; relative ones are already local."""
        if not posix_path(written).startswith("/"):
            return resolved
        try:
            return self.path_map.local(resolved, what=what)
        except CioError as exc:
            raise CnodeError(f"Bad path: {exc}") from None

    def _write(self, target: str, region: TileRegion, bands: list[list[bytes]], seconds: float, text: dict[str, str]) -> None:
        directory = posixpath.dirname(target)
        if not os.path.isdir(directory):
            raise CnodeError(f"Cannot save image '{target}': directory '{directory}' does not exist")
        try:
            if target.lower().endswith(".exr"):
                from cio_worker.sim.exr import ExrStreamWriter  # OpenImageIO: loaded only for EXR

                self._write_rows(target, ExrStreamWriter(target, region, text), bands, seconds)
            else:
                with open(target, "wb") as handle:
                    self._write_rows(target, PngStreamWriter(handle, region.width, region.height, text), bands, seconds)
        except OSError as exc:
            _remove(target)
            raise CnodeError(f"Cannot save image '{target}': {exc.strerror or exc}") from None

    def _write_rows(self, target: str, writer: PngStreamWriter | ExrStreamWriter, bands: list[list[bytes]],
                    seconds: float) -> None:
        try:
            for rows in bands:
                writer.add_rows(rows)
                self.stop.sleep(seconds / len(bands))
            writer.finish()
        except BaseException:
            abandon = getattr(writer, "abandon", None)  # an EXR lets go of its file first
            if abandon is not None:
                abandon()
            _remove(target)
            raise

    def _fail_after_first_frame(self) -> None:
        if self.controls.fail == "crash":
            os._exit(3)
        if self.controls.fail == "segfault":
            signal.signal(signal.SIGSEGV, signal.SIG_DFL)
            _, hard = resource.getrlimit(resource.RLIMIT_CORE)
            resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
            os.kill(os.getpid(), signal.SIGSEGV)
            os._exit(139)  # not reached


def _output_name(save_as: str, frame: int, tile: tuple[int, int] | None) -> str:
    if tile is None:
        return output_file_name(save_as, frame)
    count, index = tile
    if count > 1:
        return output_file_name(save_as, frame, count, index)
    # cnode adds tile noise even for one tile; output_file_name only does so for count > 1.
    directory, base = posixpath.split(output_file_name(save_as, frame, 2, 1))
    return posixpath.join(directory, base.replace("tilex2-1", "tilex1-1", 1))


def _bands(height: int) -> list[tuple[int, int]]:
    count = min(_BANDS, height)
    return [(height * i // count, height * (i + 1) // count) for i in range(count)]


def _path_map(env: Mapping[str, str]) -> PathMap:
    text = env.get(PATH_MAP_ENV, "").strip()
    if not text:
        return PathMap()
    try:
        return PathMap.from_dict(json.loads(text))
    except (ValueError, TypeError, AttributeError) as exc:
        raise CnodeError(f"{PATH_MAP_ENV} is not a path map (JSON of PathMap.to_dict()): {exc}") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    log = Log(sys.stdout)
    stop = StopFlag()
    stop.install()
    try:
        controls = SimControls.from_env(os.environ)
        stop.install(ignore_sigterm=controls.ignore_sigterm)
        session = Session(parse_args(argv), controls, log, stop, os.environ)
        return session.run()
    except CnodeError as exc:
        log.error(str(exc))
        log.line("Render aborted.")
        return exc.exit_code
    except Interrupted as exc:
        name = signal.Signals(exc.signum).name
        log.warning(f"Interrupted by {name}: render stopped, no partial image left behind")
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
