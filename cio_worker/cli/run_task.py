"""``cio-worker run-task TASK.json``: one task document by hand, with readable progress."""

from __future__ import annotations

import argparse
import dataclasses
import signal
from pathlib import Path

from cio_worker.cli.main import CliError, Streams, add_path_map_arguments, path_map_from_args
from cio_worker.job.document import TaskDocument
from cio_worker.node.execution import TaskControl, execute
from cio_worker.cli.common import add_node_arguments, node_context


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run-task", help="run one task document by hand (a test VM)")
    parser.add_argument("document", metavar="TASK.json", help="a task document (design.md), or - for stdin")
    parser.add_argument("--storage", default=None, help="use this storage URL instead of the document's")
    add_path_map_arguments(parser)
    add_node_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="do not echo the renderer's output")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, streams: Streams) -> int:
    import sys

    try:
        text = sys.stdin.read() if args.document == "-" else Path(args.document).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read the task document {args.document}: {exc.strerror or exc}") from None
    doc = TaskDocument.from_json(text)
    if args.storage:
        doc = dataclasses.replace(doc, job=dataclasses.replace(doc.job, storage=args.storage))
    out = streams.out

    def say(line: str) -> None:
        print(f"cio-worker: {line}", file=out, flush=True)

    ctx = node_context(args, path_map_from_args(args), say=say, progress=_progress(streams))
    if not args.quiet:
        ctx.echo = lambda line: print(f"  | {line.rstrip()}", file=out, flush=True)
    control = TaskControl()

    def on_signal(signum: int, frame) -> None:
        control.request_stop(f"{signal.Signals(signum).name} received", cause="released", grace=args.kill_grace)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        say(f"{doc.label}: frames {doc.task.frames}, tile {doc.task.tile}/{doc.task.tiles}, attempt {doc.task.attempt}")
        outcome = execute(doc, ctx, control)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if outcome.sync:
        s = outcome.sync
        say(f"inputs: {s.placed} placed, {s.already_present} already present, {s.from_cache} from cache, "
            f"{s.downloaded} downloaded ({s.bytes_downloaded} bytes)")
    if outcome.outputs:
        for f in outcome.outputs.files:
            say(f"output {f.relative_path} ({f.size} bytes, md5 {f.md5})")
        for skipped in outcome.outputs.skipped_symlinks:
            say(f"not uploaded (symlink): {skipped}")
    if outcome.run:
        r = outcome.run
        say(f"render: exit {r.exit_code}{f' signal {r.signal}' if r.signal else ''}, {r.wall_seconds:.1f} s wall, "
            f"{r.cpu_user + r.cpu_system:.1f} s CPU, peak RSS {r.peak_rss_bytes / 2**20:.0f} MiB")
    say(f"log: {outcome.log_path}")
    if outcome.status == "done":
        say(f"{doc.label} done: frames {outcome.frames_done}")
        return 0
    if outcome.status == "stopped":
        say(f"{doc.label} stopped ({outcome.reason}); frames finished: {outcome.frames_done or 'none'}")
        return 130
    say(f"{doc.label} FAILED [{outcome.error.code if outcome.error else 'error'}]: {outcome.reason}")
    return 1


def _progress(streams: Streams):
    try:
        from cio_worker.storage.progress import TerminalProgress
    except ImportError:  # pragma: no cover
        return lambda phase: None
    return lambda phase: TerminalProgress(streams.err, label=phase)
