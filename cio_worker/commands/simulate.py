"""``cio-worker simulate``: a whole job on this machine, the README's main job."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import CliError, Streams
from ..examples import example_job_path, example_root
from ..simulate import Simulation, SimulationConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run a whole job locally: submit, N agents, scouts, download, summary",
        description="Submit a job (default: the shipped example shot) to a temporary sqlite queue and "
        "storage, run N agent processes with the cnode simulator, release the scouts once they are done, "
        "download the frames and print a summary.",
    )
    parser.add_argument("job_spec", nargs="?", metavar="JOB_SPEC", help="default: the shipped example shot")
    parser.add_argument("--root", metavar="DIR",
                        help="the directory playing the artist's filesystem root (required with JOB_SPEC)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--storage", default=None, help="default: file://WORK_DIR/storage")
    parser.add_argument("--work-dir", default=None, help="default: a new temporary directory (kept)")
    parser.add_argument("--frame-seconds", type=float, default=0.2, help="simulated render time per frame")
    parser.add_argument("--no-release", action="store_true", help="leave held tasks held (scouts only)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, streams: Streams) -> int:
    if args.workers < 1:
        raise CliError("--workers must be at least 1")
    if args.job_spec and not args.root:
        raise CliError("with a JOB_SPEC, give --root: the directory that holds its artist paths")
    spec = Path(args.job_spec) if args.job_spec else example_job_path()
    root = Path(args.root) if args.root else example_root()
    if not root.is_dir():
        raise CliError(f"--root {root} is not a directory")
    config = SimulationConfig(
        job_spec=spec,
        source_root=root,
        workers=args.workers,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        storage_url=args.storage,
        frame_seconds=args.frame_seconds,
        release_scouts=not args.no_release,
        timeout_seconds=args.timeout,
    )
    summary = Simulation(config, out=streams.out).run()
    for line in summary.lines():
        print(line, file=streams.out)
    return 0 if summary.failed == 0 and summary.done == summary.tasks else 1
