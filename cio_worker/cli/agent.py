"""``cio-worker agent``: pull tasks from a queue until told to stop or idle for long enough."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
from typing import TYPE_CHECKING

from cio_worker.cli.common import (
    add_node_arguments,
    add_queue_argument,
    default_worker_id,
    env_default,
    node_context,
    open_existing_queue,
    queue_token,
    setup_logging,
)
from cio_worker.cli.main import Streams, add_command, add_path_map_arguments, path_map_from_args

if TYPE_CHECKING:
    from cio_worker.node.preemption import PreemptionConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "agent", run)
    add_queue_argument(parser, example="sqlite:////var/lib/cio-worker/queue.db")
    parser.add_argument("--worker-id", default=env_default("WORKER_ID") or default_worker_id(), metavar="ID",
                        help="this agent's name in the queue (env CIO_WORKER_ID; default HOST-PID)")
    add_path_map_arguments(parser)
    add_node_arguments(parser)
    parser.add_argument("--lease-seconds", type=float, default=60.0, metavar="SECONDS",
                        help="a claimed task returns to the queue this long after the last heartbeat "
                        "(default %(default)s)")
    parser.add_argument("--heartbeat-seconds", type=float, default=10.0, metavar="SECONDS",
                        help="interval of the heartbeats that keep the lease (default %(default)s)")
    parser.add_argument("--poll-seconds", type=float, default=2.0, metavar="SECONDS",
                        help="wait between empty claims (default %(default)s)")
    parser.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                        help="exit after this long without work (default: never)")
    parser.add_argument("--on-idle-exit", default=None, metavar="COMMAND",
                        help="run this shell command when exiting idle, e.g. 'sudo systemctl poweroff'")
    parser.add_argument("--max-tasks", type=int, default=None, metavar="N", help="exit after this many tasks")
    parser.add_argument("--stop-grace", type=float, default=20.0, metavar="SECONDS",
                        help="kill-ladder grace when stopped by a signal (default %(default)s)")
    parser.add_argument("--preemption", default=env_default("PREEMPTION", "auto"),
                        choices=("auto", "gce", "ec2", "azure", "none"),
                        help="which metadata server to watch for preemption notices (env CIO_PREEMPTION; default: detect)")
    parser.add_argument("--gce-metadata-url", default=None, metavar="URL",
                        help="the GCE metadata server (default: GCE_METADATA_HOST or the real one)")
    parser.add_argument("--ec2-metadata-url", default=None, metavar="URL",
                        help="the EC2 metadata server (default: AWS_EC2_METADATA_SERVICE_ENDPOINT or the real one)")
    parser.add_argument("--azure-metadata-url", default=None, metavar="URL",
                        help="the Azure metadata server (default: the real one)")
    parser.add_argument("--notice-seconds", type=float, default=None, metavar="SECONDS",
                        help="how long the instance lives after a GCE notice or a SIGTERM/SIGINT, i.e. the "
                        "drain's deadline (default 30 for GCE, 25 for signals; EC2 and Azure notices carry "
                        "their own time)")
    parser.add_argument("--metadata-poll-seconds", type=float, default=None, metavar="SECONDS",
                        help="EC2 / Azure metadata polling interval (default 1)")
    parser.add_argument("--hard-stop-margin", type=float, default=1.5,
                        help="release the task this long before a notice's deadline if the drain has not "
                        "reported by then (default %(default)s)")
    parser.add_argument("--grace-share", type=float, default=0.3,
                        help="share of the time a notice leaves that goes to the render's kill ladder; the "
                        "rest is for uploading finished frames and reporting (default %(default)s)")
    parser.add_argument("--log-level", default="INFO", metavar="LEVEL",
                        help="the agent's log level on stderr: DEBUG, INFO, WARNING or ERROR (default %(default)s)")


def run(args: argparse.Namespace, streams: Streams) -> int:
    """run the render-node agent: claim tasks, sync, render, upload, report

    Claim tasks from an existing queue and run them until stopped (SIGTERM/SIGINT: the current
    task's render is stopped, its finished frames uploaded and the task released) or idle. Options
    also come from the CIO_* environment variables named in their help.
    """
    from cio_worker.node.agent import Agent, AgentConfig
    from cio_worker.node.identity import read_identity
    from cio_worker.node.preemption import start_watchers
    from cio_worker.storage.progress import LoggingProgress

    log = setup_logging(args.log_level, streams.err)
    queue = open_existing_queue(args.queue, queue_token(args), patient=True)  # a mistyped --queue must not idle on a new, empty one
    ctx = node_context(args, path_map_from_args(args), say=lambda line: log.info("%s", line),
                       progress=lambda phase: LoggingProgress(log, phase))
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

    config = _preemption_config(args)
    watchers = start_watchers(config, on_notice)
    if watchers.provider:
        log.info("watching %s metadata for preemption notices", watchers.provider)
    # What the agent registers as: read from the provider's metadata server when it starts.
    agent.identity = lambda: read_identity(config, provider=watchers.provider or "none")
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


def _preemption_config(args: argparse.Namespace) -> "PreemptionConfig":
    from cio_worker.node.preemption import PreemptionConfig

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

