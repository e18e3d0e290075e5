"""``cio-worker simulate``: a whole job on this machine, the README's main job."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from cio_worker.cli.main import CliError, Streams, add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "simulate", run)
    parser.add_argument("job_spec", nargs="?", metavar="JOB_SPEC",
                        help="the job spec file (TOML; default: the shipped example shot)")
    parser.add_argument("--root", metavar="DIR",
                        help="the directory playing the artist's filesystem root (required with JOB_SPEC)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="agent processes to run (default %(default)s)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="the job's storage (default: file://WORK_DIR/storage)")
    parser.add_argument("--queue", default=None, metavar="DB_URL",
                        help="the database behind the coordinator, e.g. postgresql://user@host:5432/db "
                        "(default: a sqlite file in the work directory)")
    parser.add_argument("--no-coordinator", action="store_true",
                        help="have the agents and the artist open the queue directly instead of through a "
                        "coordinator process (the one-machine path, without HTTP)")
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="queue, storage and the agents' directories (default: a new temporary directory, kept)")
    parser.add_argument("--frame-seconds", type=float, default=0.2, metavar="SECONDS",
                        help="simulated render time per frame (default %(default)s)")
    parser.add_argument("--no-release", action="store_true", help="leave held tasks held (scouts only)")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                        help="give up on the job after this long (default %(default)s)")
    parser.add_argument("--keep-open", action="store_true",
                        help="leave the coordinator and its web view up after the job ends, until Ctrl-C")
    chaos = parser.add_argument_group(
        "chaos",
        "Each agent plays a cloud instance with its own GCE metadata server. Rates are Poisson: mean "
        "events per minute an instance spends holding a task (a busy agent-minute). 2 means, on "
        "average, one event every 30 s of work per agent. A preempted or killed instance is replaced "
        "by a fresh one (new node root, cache and work directory).",
    )
    chaos.add_argument("--preempt-rate", type=float, default=0.0, metavar="R",
                       help="GCE preemption notices per busy agent-minute; the instance is powered off "
                       "(every process SIGKILLed) --notice-seconds after its notice (default 0: none)")
    chaos.add_argument("--kill-rate", type=float, default=0.0, metavar="R",
                       help="instance deaths without notice (every process SIGKILLed at once) per busy "
                       "agent-minute (default 0: none)")
    chaos.add_argument("--notice-seconds", type=float, default=5.0,
                       help="time from a preemption notice to the power-off (default %(default)s; GCE gives 30)")
    chaos.add_argument("--seed", type=int, default=None, help="seed of the chaos, for a repeatable run")
    chaos.add_argument("--no-spare", action="store_true",
                       help="also preempt and kill tasks on the last attempt their preempted budget allows "
                       "(by default that attempt is spared, so that chaos alone never fails the job)")
    chaos.add_argument("--lease-seconds", type=float, default=None,
                       help="task lease; a killed agent's task returns to the queue this long after its last "
                       "heartbeat (default 30, or 6 with --kill-rate)")
    chaos.add_argument("--heartbeat-seconds", type=float, default=None,
                       help="heartbeat interval (default 2, or 1 with --kill-rate)")


def run(args: argparse.Namespace, streams: Streams) -> int:
    """run a whole job locally: submit, N agents, scouts, download, summary

    Start a coordinator on a queue (default: a sqlite file in a temporary directory), submit a job
    (default: the shipped example shot) through it, run N agent processes that speak HTTP to it with
    the cnode simulator, release the scouts once they are done, download the frames and print a
    summary. The coordinator's web view is open while the job runs (its address and how to sign in
    are printed first); --keep-open leaves it up after the job ends, until Ctrl-C.
    """
    from cio_worker.sim.examples import example_job_path, example_root
    from cio_worker.sim.simulate import Simulation, SimulationConfig, SimulationSummary  # noqa: F401

    if args.workers < 1:
        raise CliError("--workers must be at least 1")
    for name in ("preempt_rate", "kill_rate"):
        if getattr(args, name) < 0:
            raise CliError(f"--{name.replace('_', '-')} must be 0 or more (events per busy agent-minute)")
    if args.notice_seconds <= 0:
        raise CliError("--notice-seconds must be more than 0")
    lease = args.lease_seconds if args.lease_seconds is not None else (6.0 if args.kill_rate > 0 else 30.0)
    heartbeat = args.heartbeat_seconds if args.heartbeat_seconds is not None else (1.0 if args.kill_rate > 0 else 2.0)
    if heartbeat >= lease:
        raise CliError(f"--heartbeat-seconds ({heartbeat:g}) must be shorter than --lease-seconds ({lease:g})")
    if args.keep_open and args.no_coordinator:
        raise CliError("--keep-open keeps the coordinator's web view up; it needs the coordinator (drop --no-coordinator)")
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
        queue_url=args.queue,
        coordinator=not args.no_coordinator,
        frame_seconds=args.frame_seconds,
        release_scouts=not args.no_release,
        timeout_seconds=args.timeout,
        preempt_rate=args.preempt_rate,
        kill_rate=args.kill_rate,
        notice_seconds=args.notice_seconds,
        seed=args.seed,
        spare_last_attempt=not args.no_spare,
        lease_seconds=lease,
        heartbeat_seconds=heartbeat,
    )
    printed = []

    def report(summary: "SimulationSummary") -> None:
        for line in summary.lines():
            print(line, file=streams.out)
        printed.append(True)

    def hold(summary: "SimulationSummary") -> None:
        report(summary)
        print(f"the web view stays open at {simulation.web_url}/ ; Ctrl-C to stop", file=streams.out, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopping the coordinator", file=streams.out)

    simulation = Simulation(config, out=streams.out)
    summary = simulation.run(keep_open=hold if args.keep_open and config.coordinator else None)
    if not printed:
        report(summary)
    return 0 if summary.failed == 0 and summary.done == summary.tasks and not summary.orphans else 1
