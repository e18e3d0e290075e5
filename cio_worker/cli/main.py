"""The command line: ``cio-worker [--traceback] <command> ...``.

Adding a command: write ``register(subparsers)`` in the command's own module; it calls
``add_command(subparsers, name, handler)`` and adds its arguments, each with a ``help``; then list
``"module:function"`` in COMMANDS. ``handler`` is ``callable(args, streams) -> int``; the first line
of its docstring is the command's line in ``cio-worker --help``, the rest its description (or give
``help=`` and ``description=``). tests/test_cli_help.py walks the parser for both. Handlers raise
CioError for bad input: ``main`` turns it into one line on stderr (``cio-worker: error: ...``) and
exit status 2, with the traceback only under ``--traceback``. Helpers for command modules:
``Streams``, ``add_path_map_arguments`` and ``path_map_from_args``.

Start-up: ``build_parser`` imports every command module, so a command module imports at its top only
what registering needs (argparse, this module, ``cli.common``); what its handler needs (the queue,
storage, the node, the cloud SDKs behind them) it imports inside the handler. ``cio-worker
--version`` and ``cio-worker frames`` then start without loading them (tests/test_cli_help.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence, TextIO

from cio_worker import __version__
from cio_worker.cli.common import JsonFormatter, whole_number
from cio_worker.errors import CioError
from cio_worker.job.paths import PathMap

if TYPE_CHECKING:
    from cio_worker.job.expand import ExpandedJob

PROG = "cio-worker"

# Each entry is "module:function"; the function is register(subparsers). Strings keep command
# modules free to import from this module.
COMMANDS: tuple[str, ...] = (
    "cio_worker.cli.main:register_preflight",
    "cio_worker.cli.main:register_frames",
    "cio_worker.cli.jobs:register_submit",
    "cio_worker.cli.agent:register",
    "cio_worker.cli.run_task:register",
    "cio_worker.cli.jobs:register_status",
    "cio_worker.cli.jobs:register_logs",
    "cio_worker.cli.jobs:register_job_actions",
    "cio_worker.cli.jobs:register_download",
    "cio_worker.cli.simulate:register",
    "cio_worker.cli.farm:register_serve",
    "cio_worker.cli.farm:register_workers",
    "cio_worker.cli.farm:register_token",
    "cio_worker.cli.farm:register_queue",
)

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Streams:
    out: TextIO
    err: TextIO


class CliError(CioError, ValueError):
    code = "bad_usage"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the convention of every other error).

    ``dash_values``: a pattern of words that start with '-' yet are values, not options (a frame
    spec such as ``-5--1``), so that they need no ``--`` before them.
    """

    def __init__(self, *args: Any, dash_values: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if dash_values is not None:
            # argparse reads this pattern to tell a negative number from an option; widened here.
            self._negative_number_matcher = re.compile(dash_values)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def build_parser(commands: Sequence[str] = COMMANDS) -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Render-node agent for a Conductor-style cloud farm for Clarisse.",
                     epilog=f"Run '{PROG} COMMAND --help' for a command's arguments.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help="the command to run")
    for entry in commands:
        module_name, _, function = entry.partition(":")
        getattr(importlib.import_module(module_name), function)(subparsers)
    for sub in subparsers.choices.values():
        # Also accepted after the command; SUPPRESS keeps the global value when not given here.
        sub.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of an error")
    return parser


Handler = Callable[[argparse.Namespace, "Streams"], int]


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    handler: Handler,
    *,
    help: str | None = None,
    description: str | None = None,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """A command's parser, running ``handler``.

    ``help`` is the command's line in ``cio-worker --help`` and ``description`` heads its own help;
    by default both come from the handler's docstring: its first line, then the paragraphs after it
    (under ``python -OO``, which drops docstrings, the command's name stands in).
    """
    summary, _, rest = inspect.cleandoc(handler.__doc__ or name).partition("\n")
    parser = subparsers.add_parser(
        name, help=help or summary, description=description or " ".join(rest.split()) or summary, **kwargs
    )
    parser.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    streams = Streams(out=stdout or sys.stdout, err=stderr or sys.stderr)
    parser = build_parser()
    try:
        with contextlib.redirect_stdout(streams.out), contextlib.redirect_stderr(streams.err):
            args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else EXIT_BAD_INPUT
    as_json = getattr(args, "log_format", "text") == "json"  # a command whose log is JSON reports errors so too
    try:
        return int(args.handler(args, streams) or EXIT_OK)
    except CioError as exc:
        _report(streams.err, "error", exc, _wants_traceback(args), as_json=as_json)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _say(streams.err, "interrupted", logging.WARNING, as_json)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK  # the reader went away (e.g. `| head`)
    except OSError as exc:
        _report(streams.err, "error", exc, _wants_traceback(args), as_json=as_json)
        return EXIT_BAD_INPUT
    except Exception as exc:  # a bug: say so, briefly, unless asked for the traceback
        _report(streams.err, "internal error", exc, _wants_traceback(args), bug=True, as_json=as_json)
        return EXIT_INTERNAL


def _wants_traceback(args: argparse.Namespace) -> bool:
    # Read when reporting: a handler may have turned it on (a job spec's show_tracebacks).
    return bool(getattr(args, "traceback", False))


def _report(err: TextIO, label: str, exc: BaseException, show_traceback: bool, bug: bool = False,
            as_json: bool = False) -> None:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if bug:
        text = f"{type(exc).__name__}: {text}" + ("" if show_traceback else f" (run {PROG} --traceback ... to see where)")
    if as_json:
        _say(err, f"{label}: {text}", logging.CRITICAL if bug else logging.ERROR, True, exc if show_traceback else None)
        return
    if show_traceback:
        err.write("".join(traceback.format_exception(exc)))
    _say(err, f"{label}: {text}", logging.ERROR, False)


def _say(err: TextIO, text: str, level: int, as_json: bool, exc: BaseException | None = None) -> None:
    """One line for a person (``cio-worker: TEXT``), or a JSON log record under ``--log-format json``."""
    if not as_json:
        err.write(f"{PROG}: {text}\n")
        return
    exc_info = None if exc is None else (type(exc), exc, exc.__traceback__)
    record = logging.LogRecord("cio_worker.cli", level, __file__, 0, text, None, exc_info)
    err.write(JsonFormatter().format(record) + "\n")


# -- shared argument helpers ------------------------------------------------------------------------


def add_path_map_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--path-map",
        action="append",
        default=[],
        metavar="FROM=TO",
        help="locate artist paths under FROM at TO on this machine (repeatable; longest FROM wins)",
    )
    parser.add_argument(
        "--root",
        metavar="DIR",
        help="locate every other artist path under DIR (drive letter stripped): /proj/a -> DIR/proj/a",
    )


def path_map_from_args(args: argparse.Namespace) -> PathMap:
    root = os.path.abspath(args.root) if args.root else None
    return PathMap.parse(list(args.path_map), root=root)


# -- preflight --------------------------------------------------------------------------------------

PREFLIGHT_JOB_ID = "00000"
PREFLIGHT_STORAGE = "file:///tmp/cio-worker/storage"


def register_preflight(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "preflight", run_preflight)
    parser.add_argument("job_spec", metavar="JOB_SPEC", help="the job spec file (TOML)")
    add_path_map_arguments(parser)
    parser.add_argument("--temp-dir", default=None, metavar="DIR", help="the <temp_dir> token (default /tmp/conductor)")
    parser.add_argument("--json", action="store_true", help="print the task documents as a JSON list")
    parser.add_argument("--job-id", default=PREFLIGHT_JOB_ID, help="the job id of the JSON documents (default %(default)s)")
    parser.add_argument("--storage", default=PREFLIGHT_STORAGE, metavar="URL",
                        help="the storage URL of the JSON documents (default %(default)s)")


def run_preflight(args: argparse.Namespace, streams: Streams) -> int:
    """show what a job spec expands to: frames, chunks, scouts, dependencies, commands

    Expand a job spec as the submitter's Preflight did: the frames, chunks, scout tasks, dependency
    scan (found and missing files), output path and each task's command. With --json, print the task
    documents instead (upload MD5s computed from the local files), which `run-task` reads.
    """
    from cio_worker.job.depscan import upload_files
    from cio_worker.job.document import job_id_text
    from cio_worker.job.expand import DEFAULT_TEMP_DIR, expand_job
    from cio_worker.job.jobspec import load_job_spec

    path_map = path_map_from_args(args)
    spec = load_job_spec(args.job_spec)
    if spec.show_tracebacks:
        args.traceback = True
    expanded = expand_job(spec, path_map=path_map, temp_dir=args.temp_dir or DEFAULT_TEMP_DIR)
    if not args.json:
        streams.out.write(describe_job(expanded))
        if expanded.scan.missing:
            streams.err.write(
                f"{PROG}: warning: {len(expanded.scan.missing)} dependency file(s) missing; see 'Missing' above\n"
            )
        return EXIT_OK
    if expanded.scan.missing:
        raise CliError(
            f"{len(expanded.scan.missing)} dependency file(s) of {spec.source} are missing, so no task "
            f"documents can be written: {_some(expanded.scan.missing)}; fix the paths, or locate them "
            "with --root / --path-map"
        )
    job_id = job_id_text(int(args.job_id)) if args.job_id.isdigit() else args.job_id
    documents = expanded.documents(job_id, args.storage, upload_files(expanded.scan.files))
    json.dump([d.to_dict() for d in documents], streams.out, indent=2)
    streams.out.write("\n")
    return EXIT_OK


def describe_job(expanded: "ExpandedJob") -> str:
    """The preflight report for a person."""
    spec = expanded.spec
    lines: list[str] = []

    def row(label: str, value: object = "") -> None:
        lines.append(f"{label + ':':<16}{value}".rstrip())

    row("Job spec", spec.source)
    row("Title", spec.title)
    row("Job", spec.name)
    row("Project", spec.project)
    row("Project file", spec.project_file)
    row("Clarisse", spec.clarisse_version)
    frames_kind = "custom frames" if spec.frames_override is not None else "the images' ranges"
    row("Frames", f"{expanded.frames} ({len(expanded.frames)} frames, from {frames_kind})")
    row("Images")
    width = max(len(image) for image, _ in expanded.image_frames)
    for image, frames in expanded.image_frames:
        lines.append(f"  {image:<{width}}  {frames}")
    chunks = expanded.chunks
    row("Chunks", f"{len(chunks)} of up to {expanded.values['chunksize']} frames: " + ", ".join(str(c) for c in chunks))
    row("Tiles", spec.tiles)
    if spec.scouts is not None:
        row("Scout frames", f"{expanded.values['scout'] or '(none)'} ({len(expanded.scout_tasks)} scout tasks)")
    holding = len(expanded.tasks) - len(expanded.scout_tasks) if expanded.holding else 0
    if expanded.upload_only:
        row("Tasks", "none: upload only")
    else:
        row("Tasks", f"{len(expanded.tasks)}" + (f" ({holding} holding until released)" if holding else ""))
    row("Instance", f"{spec.instance_type} ({expanded.values['instance']}, {expanded.values['flavor']}), "
        f"{expanded.values['preemptible']}")  # fmt: skip
    policy = expanded.autoretry_policy
    row("Retries", f"preempted {policy.preempted}, failed {policy.failed}")
    row("Output path", expanded.output_path)
    row("Environment")
    for entry in expanded.environment:
        lines.append(f"  {entry.name} {entry.merge_policy} {entry.value}")
    if spec.notify:
        row("Notify", ", ".join(spec.notify))
    scan = expanded.scan
    row("Dependencies", f"{spec.dependency_scan} scan: {len(scan.files)} found, {len(scan.missing)} missing")
    for found in scan.files:
        where = "" if found.local_path == found.artist_path else f"  ({found.local_path})"
        lines.append(f"  {found.artist_path}{where}")
    if scan.missing:
        row("Missing")
        for missing in scan.missing:
            lines.append(f"  {missing}")
    if expanded.tasks:
        row("Commands")
        for task in expanded.tasks:
            scout = " scout" if task.scout else ""
            lines.append(f"  {task.id} frames {task.frames} tile {task.tile}/{task.tiles}{scout}")
            lines.append(f"      {task.command}")
    return "\n".join(lines) + "\n"


def _some(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


# -- frames -----------------------------------------------------------------------------------------


def register_frames(subparsers: argparse._SubParsersAction) -> None:
    # dash_values: -5--1 is a frame spec, not an option.
    parser = add_command(subparsers, "frames", run_frames, dash_values=r"^-\d")
    parser.add_argument("spec", nargs="+", metavar="SPEC",
                        help="the frame spec; several words are joined (1-10 20 is 1-10,20)")  # fmt: skip
    parser.add_argument("--chunk-size", type=_positive_int, default=None, metavar="N",
                        help="frames per chunk (default: all frames in one chunk)")  # fmt: skip


def run_frames(args: argparse.Namespace, streams: Streams) -> int:
    """print a frame spec's canonical form, count, chunks and cnode form

    Read a Conductor frame spec (e.g. 1-10x2,20 or -5--1) and print its canonical form, frame
    count, cnode form and chunks.
    """
    from cio_worker.job.frames import FrameSet, clamp_chunk_size

    frames = FrameSet.parse(" ".join(args.spec))
    size = clamp_chunk_size(args.chunk_size or len(frames), len(frames))
    chunks = frames.chunks(size)
    out = [
        f"canonical: {frames.canonical()}",
        f"count:     {len(frames)}",
        f"cnode:     {frames.cnode()}",
        f"chunks:    {len(chunks)} of up to {size} frames",
    ]
    width = max(len(c.canonical()) for c in chunks)
    out += [f"  {i + 1:>3}  {c.canonical():<{width}}  cnode {c.cnode()}" for i, c in enumerate(chunks)]
    streams.out.write("\n".join(out) + "\n")
    return EXIT_OK


_positive_int = whole_number(1)
