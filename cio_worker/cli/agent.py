"""``cio-worker agent``: pull tasks from a queue until told to stop or idle for long enough."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess

from cio_worker.node.agent import Agent, AgentConfig
from cio_worker.cli.main import Streams, add_path_map_arguments, path_map_from_args
from cio_worker.node.preemption import PreemptionConfig, start_watchers
from cio_worker.errors import QueueError
from cio_worker.queue import open_queue, sqlite_path
from cio_worker.cli.common import add_node_arguments, default_worker_id, env_default, node_context, open_existing_queue, setup_logging


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="run the render-node agent: claim tasks, sync, render, upload, report",
        description="Claim tasks from the queue and run them until stopped (SIGTERM/SIGINT: the current "
        "task's render is stopped, its finished frames uploaded and the task released) or idle.",
    )
    parser.add_argument("--queue", default=env_default("QUEUE"), required=env_default("QUEUE") is None,
                        help="queue URL, e.g. sqlite:////var/lib/cio-worker/queue.db (env CIO_QUEUE)")
    parser.add_argument("--worker-id", default=env_default("WORKER_ID") or default_worker_id())
    add_path_map_arguments(parser)
    add_node_arguments(parser)
    parser.add_argument("--lease-seconds", type=float, default=60.0)
    parser.add_argument("--heartbeat-seconds", type=float, default=10.0)
    parser.add_argument("--poll-seconds", type=float, default=2.0, help="wait between empty claims")
    parser.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                        help="exit after this long without work (default: never)")
    parser.add_argument("--on-idle-exit", default=None, metavar="COMMAND",
                        help="run this shell command when exiting idle, e.g. 'sudo systemctl poweroff'")
    parser.add_argument("--max-tasks", type=int, default=None, help="exit after this many tasks")
    parser.add_argument("--stop-grace", type=float, default=20.0,
                        help="kill-ladder grace when stopped by a signal (default %(default)s)")
    parser.add_argument("--preemption", default=env_default("PREEMPTION", "auto"),
                        choices=("auto", "gce", "ec2", "azure", "none"),
                        help="which metadata server to watch for preemption notices (default: detect)")
    parser.add_argument("--gce-metadata-url", default=None, help="default: GCE_METADATA_HOST or the real one")
    parser.add_argument("--ec2-metadata-url", default=None,
                        help="default: AWS_EC2_METADATA_SERVICE_ENDPOINT or the real one")
    parser.add_argument("--azure-metadata-url", default=None)
    parser.add_argument("--notice-seconds", type=float, default=None,
                        help="how long the instance lives after a GCE notice or a SIGTERM/SIGINT, i.e. the "
                        "drain's deadline (default 30 for GCE, 25 for signals; EC2 and Azure notices carry "
                        "their own time)")
    parser.add_argument("--metadata-poll-seconds", type=float, default=None,
                        help="EC2 / Azure metadata polling interval (default 1)")
    parser.add_argument("--hard-stop-margin", type=float, default=1.5,
                        help="release the task this long before a notice's deadline if the drain has not "
                        "reported by then (default %(default)s)")
    parser.add_argument("--grace-share", type=float, default=0.3,
                        help="share of the time a notice leaves that goes to the render's kill ladder; the "
                        "rest is for uploading finished frames and reporting (default %(default)s)")
    parser.add_argument("--log-level", default="INFO")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, streams: Streams) -> int:
    log = setup_logging(args.log_level, streams.err)
    queue = _open_queue(args.queue)
    ctx = node_context(args, path_map_from_args(args), say=lambda line: log.info("%s", line),
                       progress=_log_progress(log))
    agent = Agent(
        AgentConfig(
            worker_id=args.worker_id,
            lease_seconds=args.lease_seconds,
            heartbeat_seconds=args.heartbeat_seconds,
            poll_seconds=args.poll_seconds,
            idle_exit_seconds=args.idle_exit,
            max_tasks=args.max_tasks,
            stop_grace=args.stop_grace,
            hard_stop_margin=args.hard_stop_margin,
            grace_share=args.grace_share,
        ),
        queue,
        ctx,
        log=logging.getLogger("cio_worker.node.agent"),
    )

    # SIGTERM (how a cloud stop or preemption reaches a service) and SIGINT become notices too.
    notices = []

    def on_notice(notice) -> None:
        notices.append(notice)
        agent.on_notice(notice)

    watchers = start_watchers(_preemption_config(args), on_notice)
    if watchers.provider:
        log.info("watching %s metadata for preemption notices", watchers.provider)
    try:
        summary = agent.run()
        # Drained: an Azure event may go ahead now instead of at its NotBefore time.
        for notice in notices:
            if notice.hard and notice.provider == "azure" and watchers.acknowledge(notice):
                log.info("acknowledged Azure event %s: the instance may go now", notice.ref)
    finally:
        watchers.stop()
        queue.close()
    log.info("tasks %d: done %d, failed %d, released %d, lease lost %d", summary.tasks, summary.done,
             summary.failed, summary.released, summary.lost)
    late = [d for d in summary.drains if d.in_time is False]
    if late:
        log.error("%d drains reported after their deadline", len(late))
    if summary.exit_reason.startswith("idle") and args.on_idle_exit:
        log.info("running the idle-exit command: %s", args.on_idle_exit)
        subprocess.run(args.on_idle_exit, shell=True, check=False)
    return 0


def _open_queue(url: str):
    """The agent's queue must exist: a mistyped --queue must not idle on a new, empty one."""
    try:
        missing_dir = not sqlite_path(url).parent.is_dir()
    except QueueError:
        missing_dir = False  # not a sqlite URL: open_queue says what is wrong with it
    return open_queue(url) if missing_dir else open_existing_queue(url)  # the former names the directory


def _preemption_config(args: argparse.Namespace) -> PreemptionConfig:
    overrides: dict = {"provider": args.preemption}
    for name in ("gce", "ec2", "azure"):
        url = getattr(args, f"{name}_metadata_url")
        if url:
            overrides[f"{name}_url"] = url
    if args.notice_seconds is not None:
        overrides["gce_grace"] = args.notice_seconds
        overrides["signal_grace"] = args.notice_seconds
    if args.metadata_poll_seconds is not None:
        overrides["poll_interval"] = args.metadata_poll_seconds
    return PreemptionConfig.from_env(os.environ, **overrides)


def _log_progress(log: logging.Logger):
    try:
        from cio_worker.storage.progress import LoggingProgress
    except ImportError:  # pragma: no cover - progress arrives with the storage work
        return lambda phase: None
    return lambda phase: LoggingProgress(log, phase)
