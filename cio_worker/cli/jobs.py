"""Commands of the artist's side and the farm's: submit, status, release, kill, download."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cio_worker.cli.main import Streams, add_path_map_arguments, path_map_from_args
from cio_worker.artist.downloader import Downloader
from cio_worker.storage.md5cache import Md5Cache
from cio_worker.queue import open_queue
from cio_worker.artist.status_view import format_status
from cio_worker.storage import open_storage
from cio_worker.cli.common import env_default, open_existing_queue


def _queue_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue", default=env_default("QUEUE"), required=env_default("QUEUE") is None,
                        help="queue URL, e.g. sqlite:///queue.db (env CIO_QUEUE)")


def _md5cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--md5-cache", default=str(Path.home() / ".cache" / "cio-worker" / "artist-md5cache.db"),
                        help="MD5 cache keyed on path, size and mtime (default %(default)s)")


def _terminal_progress(stream):
    try:
        from cio_worker.storage.progress import TerminalProgress
    except ImportError:  # pragma: no cover
        return None
    return TerminalProgress(stream)


def register_submit(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("submit", help="scan, upload what storage lacks, and enqueue a job's tasks")
    parser.add_argument("job_spec", metavar="JOB_SPEC")
    _queue_argument(parser)
    parser.add_argument("--storage", required=True, help="file:///dir, s3://bucket/prefix or gs://bucket/prefix")
    add_path_map_arguments(parser)
    _md5cache_argument(parser)
    parser.add_argument("--allow-missing", action="store_true", help="submit even if dependencies are missing")
    parser.set_defaults(handler=run_submit)


def run_submit(args: argparse.Namespace, streams: Streams) -> int:
    from cio_worker.artist.submit import submit_job

    cache_path = Path(args.md5_cache).expanduser()
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    queue = open_queue(args.queue)
    with open_storage(args.storage) as storage:
        result = submit_job(
            args.job_spec,
            queue=queue,
            storage=storage,
            storage_url=args.storage,
            path_map=path_map_from_args(args),
            md5cache=Md5Cache(cache_path),
            progress=_terminal_progress(streams.err),
            allow_missing=args.allow_missing,
            say=lambda line: print(line, file=streams.err),
        )
    held = f", {result.holding} holding until `cio-worker release {result.job_id}`" if result.holding else ""
    print(f"job {result.job_id}: {result.task_count} tasks{held}; "
          f"uploaded {result.uploaded} contents, {result.skipped} already in storage", file=streams.out)
    queue.close()
    return 0


def register_status(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("status", help="show jobs, or one job's tasks")
    parser.add_argument("job", nargs="?", metavar="JOB")
    _queue_argument(parser)
    parser.set_defaults(handler=run_status)


def run_status(args: argparse.Namespace, streams: Streams) -> int:
    with open_existing_queue(args.queue) as queue:
        streams.out.write(format_status(queue, args.job))
    return 0


def register_release(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("release", help="release a job's held tasks (after its scout frames)")
    parser.add_argument("job", metavar="JOB")
    _queue_argument(parser)
    parser.set_defaults(handler=run_release)


def run_release(args: argparse.Namespace, streams: Streams) -> int:
    with open_existing_queue(args.queue) as queue:
        queue.job(args.job)
        moved = queue.release_job(args.job)
    print(f"job {args.job}: released {moved} held tasks", file=streams.out)
    return 0


def register_kill(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("kill", help="kill a job: waiting tasks fail, running ones are stopped")
    parser.add_argument("job", metavar="JOB")
    _queue_argument(parser)
    parser.set_defaults(handler=run_kill)


def run_kill(args: argparse.Namespace, streams: Streams) -> int:
    with open_existing_queue(args.queue) as queue:
        queue.job(args.job)
        count = queue.kill_job(args.job)
    print(f"job {args.job}: killed ({count} tasks stopped or failed)", file=streams.out)
    return 0


def register_download(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("download", help="place finished tasks' outputs where the artist expects them")
    _queue_argument(parser)
    parser.add_argument("--job", default=None)
    parser.add_argument("--watch", action="store_true", help="keep going until the job (or every job) is finished")
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    add_path_map_arguments(parser)
    _md5cache_argument(parser)
    parser.set_defaults(handler=run_download)


def run_download(args: argparse.Namespace, streams: Streams) -> int:
    cache_path = Path(args.md5_cache).expanduser()
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with open_existing_queue(args.queue) as queue:
        if args.job:
            queue.job(args.job)
        downloader = Downloader(queue, open_storage, path_map_from_args(args), Md5Cache(cache_path))

        def show(report) -> None:
            for path in report.placed:
                print(f"downloaded {path}", file=streams.out)
            for line in report.refused:
                print(f"refused {line}", file=streams.err)

        if args.watch:
            report = downloader.watch(args.job, poll=args.poll_seconds, on_report=show)
        else:
            report = downloader.run_once(args.job)
            show(report)
    print(f"{report.files_written} files written, {report.files_skipped} already in place, "
          f"{len(report.refused)} records refused", file=streams.err)
    return 2 if report.refused else 0
