"""``cio-worker run-task TASK.json``: one task document by hand, with readable progress."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cio_worker.cli.common import add_node_arguments, check_existing_storage, env_default, node_context
from cio_worker.cli.main import CliError, Streams, add_command, add_path_map_arguments, path_map_from_args
from cio_worker.errors import CioError

if TYPE_CHECKING:
    from cio_worker.job.document import TaskDocument
    from cio_worker.node.execution import ExecutionContext


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "run-task", run,
        epilog="TASK.json is a task document (the JSON a queue hands an agent) or the list of them that "
        "`cio-worker preflight JOB_SPEC --json` prints: pick one with --task (a list of one needs no "
        "--task). A file:// store given with --storage must already exist (`cio-worker submit` creates it).",
    )
    parser.add_argument("document", metavar="TASK.json",
                        help="a task document, or a JSON list of them (preflight --json); - for stdin")
    parser.add_argument("--task", default=None, metavar="ID",
                        help="the task to run from a list of documents, by task id (e.g. 007 or 7)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="use this storage URL instead of the document's (a file:// store must already exist)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the renderer's output")
    add_path_map_arguments(parser)
    add_node_arguments(parser)
    add_render_user_argument(parser)


def add_render_user_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--render-user", default=env_default("RENDER_USER"), metavar="USER",
                        help="run renders as this unprivileged user (the agent must be root): it reads the "
                        "inputs and writes the outputs, never the agent's token, logs or cache "
                        "(env CIO_RENDER_USER; default: the agent's own user)")


def use_render_user(args: argparse.Namespace, ctx: "ExecutionContext") -> list[str]:
    """With --render-user, the context's runner starts renders as that user and the node's own
    directories are closed to it; returns warnings for a person."""
    if not args.render_user:
        return []
    from cio_worker.node.render_user import RenderUser, confine
    from cio_worker.node.runner import ProcessRunner

    user = RenderUser.resolve(args.render_user)
    ctx.runner = ProcessRunner(containment=ctx.runner.containment, render_user=user)
    cache_dir = None if args.no_cache else Path(args.cache_dir).expanduser().resolve()
    token_file = getattr(args, "token_file", None)
    return confine(user, ctx.work_root, cache_dir, [Path(token_file) if token_file else None])


def run(args: argparse.Namespace, streams: Streams) -> int:
    """run one task document by hand (a test VM)

    Run one task as an agent would, without a queue: sync its inputs from storage, run its command
    with the renderer's output echoed, collect and upload its outputs, and print a summary that ends
    with where the outputs are on this machine.
    """
    from cio_worker.node.execution import TaskControl, execute

    try:
        text = sys.stdin.read() if args.document == "-" else Path(args.document).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read the task document {args.document}: {exc.strerror or exc}") from None
    doc = choose_document(text, args.task, "stdin" if args.document == "-" else args.document)
    if args.storage:
        check_existing_storage(args.storage)  # a typed store must exist: `submit` alone creates one
        doc = dataclasses.replace(doc, job=dataclasses.replace(doc.job, storage=args.storage))
    path_map = path_map_from_args(args)
    out = streams.out

    def say(line: str) -> None:
        print(f"cio-worker: {line}", file=out, flush=True)

    ctx = node_context(args, path_map, say=say, progress=_progress(streams))
    for warning in use_render_user(args, ctx):
        say(f"warning: {warning}")
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
    delivered = outcome.outputs.files if outcome.outputs else []
    for f in delivered:
        say(f"output {f.relative_path} ({f.size} bytes, md5 {f.md5})")
    if outcome.run:
        r = outcome.run
        say(f"render: exit {r.exit_code}{f' signal {r.signal}' if r.signal else ''}, {r.wall_seconds:.1f} s wall, "
            f"{r.cpu_user + r.cpu_system:.1f} s CPU, peak RSS {r.peak_rss_bytes / 2**20:.0f} MiB")
    say(f"log: {outcome.log_path}")
    if outcome.status == "done":
        say(f"{doc.label} done: frames {outcome.frames_done}")
        code = 0
    elif outcome.status == "stopped":
        say(f"{doc.label} stopped ({outcome.reason}); frames finished: {outcome.frames_done or 'none'}")
        code = 130
    else:
        say(f"{doc.label} FAILED [{outcome.error.code if outcome.error else 'error'}]: {outcome.reason}")
        code = 1
    uploaded = f", uploaded to {doc.job.storage}" if delivered else ""
    say(f"outputs: {len(delivered)} files in {_output_dir(doc, path_map)} on this machine{uploaded}")
    return code


def _output_dir(doc: "TaskDocument", path_map) -> str:
    """Where the task's outputs are on this machine: its output path, located by the path map."""
    try:
        return path_map.local(doc.job.output_path, what="job.output_path")
    except CioError:  # the task failed on it already, and said why
        return doc.job.output_path


def choose_document(text: str, task_id: str | None, source: str) -> "TaskDocument":
    """The task document in ``text``: one document, or one of a JSON list (``preflight --json``)."""
    from cio_worker.errors import DocumentError
    from cio_worker.job.document import TaskDocument

    try:
        data: Any = json.loads(text)
    except (ValueError, RecursionError):
        data = None  # from_json below says what is wrong with it
    if not isinstance(data, list):
        doc = TaskDocument.from_json(text)
        if task_id is not None and not _same_id(doc.task.id, task_id):
            raise CliError(f"{source} holds task {doc.task.id}, not {task_id}")
        return doc
    ids = ", ".join(_task_id(item) or "?" for item in data)
    if not data:
        raise DocumentError("document", f"{source} holds an empty list: give a task document, or the list "
                            "`cio-worker preflight JOB_SPEC --json` prints")  # fmt: skip
    if task_id is None:
        if len(data) > 1:
            raise DocumentError("document", f"{source} holds {len(data)} task documents (tasks {ids}); "
                                "choose one with --task ID")  # fmt: skip
        index = 0
    else:
        matches = [n for n, item in enumerate(data) if _same_id(_task_id(item) or "", task_id)]
        if len(matches) != 1:
            what = "no task" if not matches else f"{len(matches)} tasks"
            raise CliError(f"{source} holds {what} with id {task_id} (tasks {ids})")
        index = matches[0]
    try:
        return TaskDocument.from_dict(data[index])
    except DocumentError as exc:
        where = f" (in document {index + 1} of the {len(data)} in {source})" if len(data) > 1 else ""
        raise DocumentError(exc.field, exc.problem + where) from None


def _task_id(item: Any) -> str | None:
    task = item.get("task") if isinstance(item, dict) else None
    value = task.get("id") if isinstance(task, dict) else None
    return value if isinstance(value, str) else None


def _same_id(have: str, want: str) -> bool:
    return have == want or (have.isdigit() and want.isdigit() and int(have) == int(want))


def _progress(streams: Streams):
    from cio_worker.storage.progress import TerminalProgress

    return lambda phase: TerminalProgress(streams.err, label=phase)
