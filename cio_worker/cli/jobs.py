"""Commands of the artist's side and the farm's: submit, status, release, retry, kill, download."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import NamedTuple

from cio_worker.cli.common import add_queue_argument, check_new_queue, open_existing_queue, queue_token
from cio_worker.cli.main import CliError, Streams, add_command, add_path_map_arguments, path_map_from_args


def _md5cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--md5-cache", default=str(Path.home() / ".cache" / "cio-worker" / "artist-md5cache.db"),
                        metavar="FILE", help="MD5 cache keyed on path, size and mtime (default %(default)s)")


def register_submit(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "submit", run_submit)
    parser.add_argument("job_spec", metavar="JOB_SPEC", help="the job spec file (TOML)")
    add_queue_argument(parser)
    parser.add_argument("--storage", required=True, metavar="URL",
                        help="file:///dir, s3://bucket/prefix or gs://bucket/prefix")
    add_path_map_arguments(parser)
    _md5cache_argument(parser)
    parser.add_argument("--allow-missing", action="store_true", help="submit even if dependencies are missing")


def run_submit(args: argparse.Namespace, streams: Streams) -> int:
    """scan, upload what storage lacks, and enqueue a job's tasks

    Expand a job spec, scan and hash its dependencies (MD5 cache keyed on path, size and mtime),
    upload the contents storage lacks into hashstore/ and enqueue the tasks. The one command that
    creates a sqlite queue file or a file:// store; a submission that fails creates neither.
    """
    from cio_worker.artist.submit import submit_job
    from cio_worker.queue import open_queue
    from cio_worker.storage import open_storage
    from cio_worker.storage.md5cache import Md5Cache
    from cio_worker.storage.progress import TerminalProgress

    check_new_queue(args.queue, queue_token(args))  # creates nothing: the queue is opened once the job is valid
    cache_path = Path(args.md5_cache).expanduser()
    with contextlib.ExitStack() as opened:
        storage = opened.enter_context(open_storage(args.storage))
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        result = submit_job(
            args.job_spec,
            queue=lambda: opened.enter_context(open_queue(args.queue, token=queue_token(args))),
            storage=storage,
            storage_url=args.storage,
            path_map=path_map_from_args(args),
            md5cache=Md5Cache(cache_path),
            progress=TerminalProgress(streams.err),
            allow_missing=args.allow_missing,
            say=lambda line: print(line, file=streams.err),
        )
    held = f", {result.holding} holding until `cio-worker release {result.job_id}`" if result.holding else ""
    print(f"job {result.job_id}: {result.task_count} tasks{held}; "
          f"uploaded {result.uploaded} contents, {result.skipped} already in storage", file=streams.out)
    return 0


def register_status(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "status", run_status)
    parser.add_argument("job", nargs="?", metavar="JOB", help="the job whose tasks to show (default: list the jobs)")
    parser.add_argument("--task", default=None, metavar="ID",
                        help="with JOB: every attempt of this task, with its figures, log location and reason")
    parser.add_argument("--prices", default=None, metavar="FILE",
                        help="re-price the attempts with this price table (TOML, as the packaged job/prices.toml) "
                        "instead of the prices their agents used")
    add_queue_argument(parser)


def run_status(args: argparse.Namespace, streams: Streams) -> int:
    """show jobs, or one job's tasks and cost

    Without JOB, list the queue's jobs with their task counts per state. With JOB, list its tasks:
    state, frames, tile, attempts (per cause), frames done, worker, the last attempt's figures (wall,
    CPU, peak RSS, synced and uploaded bytes, cost) and reason, and the job's total cost. With JOB
    --task ID, every attempt of that task.
    """
    from cio_worker.artist.status_view import format_status
    from cio_worker.job.prices import load_prices

    if args.task is not None and args.job is None:
        raise CliError("--task needs a JOB (cio-worker status JOB --task ID)")
    prices = load_prices(args.prices) if args.prices else None
    with open_existing_queue(args.queue, queue_token(args)) as queue:
        streams.out.write(format_status(queue, args.job, args.task, prices) + "\n")
    return 0


def register_logs(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "logs", run_logs)
    parser.add_argument("job", metavar="JOB", help="the job id, as `cio-worker status` lists it")
    parser.add_argument("task", metavar="TASK", help="the task id (000, 001, ...)")
    parser.add_argument("--attempt", type=int, default=None, metavar="N",
                        help="this attempt (`status JOB --task TASK` lists them; default: the running one, else "
                        "the last)")
    parser.add_argument("--follow", "-f", action="store_true",
                        help="print the running attempt's lines as they come until it ends (waits for a task "
                        "that has not started)")
    parser.add_argument("--poll-seconds", type=float, default=1.0, metavar="SECONDS",
                        help="with --follow, the wait between looks at the queue (default %(default)s)")
    add_queue_argument(parser)


def run_logs(args: argparse.Namespace, streams: Streams) -> int:
    """print a task's log, from anywhere

    Print the log of an attempt of TASK: an ended attempt's whole log from the job's storage
    (uploaded by its agent when it ended), a running one's newest lines from the queue. --follow
    prints a running attempt's lines as its agent ships them (every few seconds) until it ends.
    """
    from cio_worker.artist.task_logs import follow, target, whole_log
    from cio_worker.storage import open_storage

    with open_existing_queue(args.queue, queue_token(args)) as queue:
        queue.job(args.job)  # an unknown job fails here, naming it
        if not args.follow:
            streams.out.write(whole_log(queue, open_storage, args.job, target(queue, args.job, args.task,
                                                                                   args.attempt)))
            streams.out.flush()
            return 0

        def write(text: str) -> None:
            streams.out.write(text)
            streams.out.flush()

        ended = follow(queue, args.job, args.task, args.attempt, write, lambda line: print(line, file=streams.err),
                       poll=args.poll_seconds)
    record = ended.ended
    if record is not None:
        where = f"; its whole log: {record.figures.log}" if record.figures.log else ""
        print(f"attempt {ended.attempt} ended: {record.outcome}{where}", file=streams.err)
    return 0


class JobAction(NamedTuple):
    """A command that changes one job: the Queue method it calls and what it says after."""

    help: str
    description: str
    method: str
    report: str  # formatted with the method's count
    takes_tasks: bool = False  # --task ID (repeatable) narrows it to those tasks


JOB_ACTIONS = {
    "release": JobAction(
        "release a job's held tasks (after its scout frames)",
        "Make the tasks of JOB that are held behind its scout tasks claimable: run it once the scout "
        "frames look right.",
        "release_job",
        "released {count} held tasks",
    ),
    "retry": JobAction(
        "put a job's failed tasks back with fresh budgets",
        "Make the failed tasks of JOB (or only those named by --task) pending again, with their failed "
        "and preempted budgets whole; their history stays in the events. A named task that is not failed "
        "is an error, and then nothing changes.",
        "retry_tasks",
        "retried {count} failed tasks with fresh budgets",
        takes_tasks=True,
    ),
    "kill": JobAction(
        "kill a job: waiting tasks fail, running ones are stopped",
        "Kill JOB: its waiting tasks fail at once; agents running its tasks stop the render at their next "
        "heartbeat and the tasks fail as killed by owner.",
        "kill_job",
        "killed ({count} tasks stopped or failed)",
    ),
}


def register_job_actions(subparsers: argparse._SubParsersAction) -> None:
    for name, action in JOB_ACTIONS.items():
        parser = add_command(subparsers, name, run_job_action, help=action.help, description=action.description)
        parser.add_argument("job", metavar="JOB", help="the job id, as `cio-worker status` lists it")
        if action.takes_tasks:
            parser.add_argument("--task", dest="tasks", action="append", metavar="ID",
                                help="only this task (repeat for more; default: every failed task)")
        add_queue_argument(parser)


def run_job_action(args: argparse.Namespace, streams: Streams) -> int:
    action = JOB_ACTIONS[args.command]
    with open_existing_queue(args.queue, queue_token(args)) as queue:
        queue.job(args.job)  # an unknown job fails here, naming it
        method = getattr(queue, action.method)
        count = method(args.job, args.tasks) if action.takes_tasks else method(args.job)
    print(f"job {args.job}: {action.report.format(count=count)}", file=streams.out)
    return 0


def register_download(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "download", run_download)
    add_queue_argument(parser)
    parser.add_argument("--job", default=None, metavar="JOB", help="only this job's outputs (default: every job's)")
    parser.add_argument("--watch", action="store_true", help="keep going until the job (or every job) is finished")
    parser.add_argument("--poll-seconds", type=float, default=2.0, metavar="SECONDS",
                        help="with --watch, the wait between looks at the queue (default %(default)s)")
    parser.add_argument("--keep-tiles", action="store_true",
                        help="keep a tiled frame's tiles beside the frame pasted together from them "
                        "(default: remove them once the frame is written and verified)")
    add_path_map_arguments(parser)
    _md5cache_argument(parser)


def run_download(args: argparse.Namespace, streams: Streams) -> int:
    """place finished tasks' outputs where the artist expects them

    Download the outputs of finished tasks to output_path/relative_path on this machine (located
    with --root / --path-map), verified by MD5 and renamed into place; a record that would write
    outside the output path is refused. Once every tile of a frame is there, the tiles are pasted
    into the frame's own file (verified against them) and removed, unless --keep-tiles.
    """
    from cio_worker.artist.downloader import Downloader
    from cio_worker.storage import open_storage
    from cio_worker.storage.md5cache import Md5Cache

    with open_existing_queue(args.queue, queue_token(args)) as queue:
        if args.job:
            queue.job(args.job)
        cache_path = Path(args.md5_cache).expanduser()
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        downloader = Downloader(queue, open_storage, path_map_from_args(args), Md5Cache(cache_path),
                                keep_tiles=args.keep_tiles)

        def show(report) -> None:
            for path in report.placed:
                print(f"downloaded {path}", file=streams.out)
            for line in report.refused:
                print(f"refused {line}", file=streams.err)
            for path in report.assembled:
                print(f"assembled {path}", file=streams.out)
            for line in report.not_assembled:
                print(f"not assembled {line}", file=streams.err)

        if args.watch:
            report = downloader.watch(args.job, poll=args.poll_seconds, on_report=show)
        else:
            report = downloader.run_once(args.job)
            show(report)
    print(f"{report.files_written} files written, {report.files_skipped} already in place, "
          f"{len(report.refused)} records refused, {len(report.assembled)} frames assembled from tiles",
          file=streams.err)
    return 2 if report.refused else 0
