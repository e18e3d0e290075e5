"""``cio-worker agent``: pull tasks from a queue until told to stop or idle for long enough.

Every option is also a key of the agent's configuration (``node/config.py``): an option given
here wins over ``CIO_<KEY>``, which wins over the TOML file (``--config``, default
/etc/cio-worker/agent.toml) and the instance's metadata. The parser's defaults only document the
defaults; an option counts as given only when it was typed (``_record_given``).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cio_worker.cli.common import (
    add_log_format_argument,
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
from cio_worker.cli.run_task import add_render_user_argument, use_render_user

if TYPE_CHECKING:
    from cio_worker.node.config import Resolved
    from cio_worker.node.execution import ExecutionContext
    from cio_worker.node.identity import InstanceIdentity
    from cio_worker.node.preemption import PreemptionConfig
    from cio_worker.node.systemd import Notifier
    from cio_worker.queue import Queue

DEFAULT_CONFIG_FILE = Path("/etc/cio-worker/agent.toml")
GIVEN = "_given_options"  # the namespace attribute naming the options that were typed
NOT_SETTINGS = frozenset({"help", "config", "print_config", "traceback"})


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
    parser.add_argument("--prices", default=None, metavar="FILE",
                        help="hourly prices of instance types (TOML, as cio_worker/job/prices.toml) for each "
                        "attempt's cost (default: the packaged list prices)")
    parser.add_argument("--node-fault-limit", type=int, default=3, metavar="N",
                        help="give up (run --give-up-command, exit status 69) after N tasks in a row failed by "
                        "this node (renderer missing, disk full, no licence); they go back at no cost to them "
                        "(0: never; default %(default)s)")
    parser.add_argument("--preemption", default=env_default("PREEMPTION", "auto"),
                        choices=("auto", "gce", "ec2", "azure", "none"),
                        help="which metadata server to read the configuration from and watch for preemption "
                        "notices (env CIO_PREEMPTION; default: detect)")
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
    add_render_user_argument(parser)
    parser.add_argument("--renderer", default=None, metavar="PROGRAM",
                        help="a program (name on PATH, or path) this node renders with: no work starts until "
                        "it is installed (default: not checked)")
    parser.add_argument("--give-up-after", type=float, default=None, metavar="SECONDS",
                        help="retry a start that fails (bad configuration, coordinator unreachable, renderer "
                        "missing, disk full) this long, counted across restarts, then run --give-up-command "
                        "and exit with status 69 (default 600 as a systemd service or on a cloud instance, "
                        "else 0: fail at once)")
    parser.add_argument("--give-up-command", default=None, metavar="COMMAND",
                        help="shell command run on giving up, e.g. 'touch /run/cio-worker/give-up' for the unit "
                        "to power off; $CIO_GIVE_UP_REASON says why (default: none)")
    parser.add_argument("--log-level", default="INFO", metavar="LEVEL",
                        help="the agent's log level on stderr: DEBUG, INFO, WARNING or ERROR (default %(default)s)")
    add_log_format_argument(parser)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"the agent's TOML configuration, keys named as these options with '_' "
                        f"(env CIO_CONFIG; default {DEFAULT_CONFIG_FILE} when it exists)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration and where each value came from (secrets "
                        "masked), then exit: 2 if it is not usable")
    _record_given(parser)


def _record_given(parser: argparse.ArgumentParser) -> None:
    """Make each setting's option note, when typed, that it was given: its default (also what
    main() reads, e.g. the log format) must not hide the environment, file and metadata. Every
    option but these is a key of ``AgentSettings`` (tests/test_agent_config.py checks)."""
    for action in parser._actions:
        if action.dest not in NOT_SETTINGS:
            action.required = False  # --queue may come from the file or the metadata
            action.__class__ = _noting(type(action))


_NOTING: dict[type, type] = {}


def _noting(cls: type) -> type:
    if cls not in _NOTING:
        def __call__(self, parser, namespace, values, option_string=None):  # noqa: N807 - argparse's signature
            given = getattr(namespace, GIVEN, None) or {}
            given[self.dest] = option_string or self.option_strings[0]
            setattr(namespace, GIVEN, given)
            cls.__call__(self, parser, namespace, values, option_string)

        _NOTING[cls] = type(f"Noting{cls.__name__}", (cls,), {"__call__": __call__})
    return _NOTING[cls]


@dataclass
class _Started:
    """What a successful start made, for the run."""

    resolved: "Resolved"
    queue: "Queue"
    ctx: "ExecutionContext"
    identity: "InstanceIdentity"
    preemption: "PreemptionConfig"


def run(args: argparse.Namespace, streams: Streams) -> int:
    """run the render-node agent: claim tasks, sync, render, upload, report

    Claim tasks from an existing queue and run them until stopped (SIGTERM/SIGINT: the current
    task's render is stopped, its finished frames uploaded and the task released) or idle.
    Options also come from CIO_* environment variables, the TOML file --config names and the
    instance's metadata (GCE attributes cio-queue, cio-token...; EC2 user-data and Azure userData
    as TOML); --print-config shows what came from where. A start that fails is retried for
    --give-up-after seconds, then --give-up-command runs and the agent exits with status 69.
    """
    from cio_worker.node.cloud_config import read_cloud_layers
    from cio_worker.node.config import command_line_layer, environment_layer, load_settings, resolve
    from cio_worker.node.giveup import GAVE_UP_EXIT_STATUS, STATE_FILE_NAME, GaveUp, GiveUpPolicy, start_or_give_up
    from cio_worker.node.systemd import Notifier

    log = setup_logging("INFO", streams.err, args.log_format, libraries=True)  # the configured level once loaded
    given_flags: dict[str, str] = getattr(args, GIVEN, None) or {}
    given = {key: getattr(args, key) for key in given_flags}
    config_file, config_required = _config_file(args)

    supervised = bool(os.environ.get("NOTIFY_SOCKET"))  # a systemd service (read before Notifier takes it out)

    def load() -> "Resolved":
        return load_settings(given, os.environ, config_file, config_required=config_required, flags=given_flags,
                             read_cloud=read_cloud_layers, supervised=supervised)

    if args.print_config:
        resolved = load()
        for line in resolved.lines():
            print(line, file=streams.out)
        resolved.check()
        return 0

    systemd = Notifier.from_environ(os.environ)  # Type=notify: READY, watchdog pings from the loop, STOPPING
    attempts: list["Resolved"] = []
    logged: list[str] = []

    def log_configuration(resolved: "Resolved") -> None:
        summary = resolved.summary()
        if summary not in logged[-1:]:
            log.info("configuration: %s", summary)
            logged.append(summary)

    def start() -> _Started:
        resolved = load()
        attempts.append(resolved)
        settings = resolved.check()
        setup_logging(settings.log_level, streams.err, settings.log_format, libraries=True)
        if settings.give_up_after > 0:  # retrying: say what each attempt used (failing at once: the error says it)
            log_configuration(resolved)
        started = _start(resolved, log)
        log_configuration(resolved)
        return started

    def policy() -> GiveUpPolicy:
        resolved = attempts[-1] if attempts else resolve([command_line_layer(given), environment_layer(os.environ)],
                                                         os.environ, supervised=supervised)
        settings = resolved.settings  # the usable values of a configuration that may have problems
        return GiveUpPolicy(settings.give_up_after, settings.give_up_command,
                            Path(settings.work_dir).expanduser() / STATE_FILE_NAME)

    def waiting(status: str, seconds: float) -> None:
        # Not ready yet: keep systemd's start timeout from ending the retries early.
        systemd.notify(f"STATUS={status}", f"EXTEND_TIMEOUT_USEC={int((seconds + 60) * 1e6)}")

    try:
        started = start_or_give_up(start, policy, on_wait=waiting, log=log)
    except GaveUp as exc:
        systemd.status(str(exc))
        log.error("%s", exc)
        return GAVE_UP_EXIT_STATUS
    return _work(started, systemd, log)


def _give_up_at_work(reason: str, command: str | None, systemd: "Notifier", log: logging.Logger) -> int:
    """The node kept failing tasks (node faults in a row): the give-up command, exit status 69."""
    from cio_worker.node.giveup import GAVE_UP_EXIT_STATUS, run_give_up_command

    systemd.status(reason)
    log.error("%s", reason)
    if command:
        run_give_up_command(command, reason, log)
    else:
        log.error("no give-up command is set (give_up_command)")
    return GAVE_UP_EXIT_STATUS


def _config_file(args: argparse.Namespace) -> tuple[Path, bool]:
    """The TOML file and whether it must exist (named by --config or CIO_CONFIG)."""
    named = args.config or os.environ.get("CIO_CONFIG") or None
    return (Path(named).expanduser(), True) if named else (DEFAULT_CONFIG_FILE, False)


def _start(resolved: "Resolved", log: logging.Logger) -> _Started:
    """One attempt at everything work needs: the queue (a coordinator that answers and takes our
    token), the node's directories, the renderer, this instance's identity."""
    from cio_worker.job.prices import load_prices
    from cio_worker.node.identity import read_identity
    from cio_worker.node.readiness import check_node
    from cio_worker.storage.progress import LoggingProgress

    settings = resolved.settings
    load_prices(settings.prices)  # an unreadable price table is a bad configuration: found before any work
    token = queue_token(settings) if settings.token_file else settings.token  # type: ignore[arg-type]
    # A mistyped sqlite --queue fails here, before any directory is made.
    queue = open_existing_queue(settings.queue, token)  # type: ignore[arg-type]
    try:
        ctx = node_context(settings, path_map_from_args(settings), say=lambda line: log.info("%s", line),  # type: ignore[arg-type]
                           progress=lambda phase: LoggingProgress(log, phase))
        check_node({"work directory": ctx.work_root,
                    "cache directory": None if settings.no_cache else Path(settings.cache_dir).expanduser()},
                   settings.renderer)
        for warning in use_render_user(settings, ctx):  # type: ignore[arg-type]
            log.warning("%s", warning)
        preemption = settings.preemption_config(os.environ, provider=resolved.provider)
        identity = read_identity(preemption, provider=resolved.provider)
        if hasattr(queue, "retry_seconds"):  # each attempt short; the give-up bound is the patience
            queue.retry_seconds = min(5.0, max(0.5, settings.give_up_after / 10))
        queue.register_worker(settings.worker_id, identity.to_dict())
        if hasattr(queue, "retry_seconds"):
            queue.retry_seconds = 30.0  # working now: ride out a coordinator's restart
    except BaseException:
        queue.close()
        raise
    return _Started(resolved, queue, ctx, identity, preemption)


def _work(started: _Started, systemd: "Notifier", log: logging.Logger) -> int:
    from cio_worker.job.prices import load_prices
    from cio_worker.node.agent import Agent, AgentConfig
    from cio_worker.node.preemption import start_watchers

    settings = started.resolved.settings
    queue = started.queue
    agent = Agent(
        AgentConfig(
            worker_id=settings.worker_id,
            lease_seconds=settings.lease_seconds,
            heartbeat_seconds=settings.heartbeat_seconds,
            poll_seconds=settings.poll_seconds,
            idle_exit_seconds=settings.idle_exit,
            max_tasks=settings.max_tasks,
            stop_grace=settings.stop_grace,
            node_fault_limit=settings.node_fault_limit,
            hard_stop_margin=settings.hard_stop_margin,
            grace_share=settings.grace_share,
            prices=load_prices(settings.prices),
        ),
        queue,
        started.ctx,
        log=logging.getLogger("cio_worker.node.agent"),
        alive=systemd.alive,
        identity=started.identity,
    )

    # SIGTERM (how a cloud stop or preemption reaches a service) and SIGINT become notices too.
    notices = []

    def on_notice(notice) -> None:
        notices.append(notice)
        if notice.hard:
            systemd.stopping(f"draining: {notice.provider} {notice.kind}")
        agent.on_notice(notice)

    watchers = start_watchers(started.preemption, on_notice)  # the provider was settled when loading
    if watchers.provider:
        log.info("watching %s metadata for preemption notices", watchers.provider)
    try:
        systemd.ready(f"worker {settings.worker_id} taking tasks")
        summary = agent.run()
        # Drained: an Azure event may go ahead now instead of at its NotBefore time.
        for notice in notices:
            if notice.hard and notice.provider == "azure" and watchers.acknowledge(notice):
                log.info("acknowledged Azure event %s: the instance may go now", notice.ref)
    finally:
        systemd.stopping("exiting")
        watchers.stop()
        queue.close()
    log.info("tasks %d: done %d, failed %d, released %d, lease lost %d", summary.tasks, summary.done,
             summary.failed, summary.released, summary.lost)
    late = [d for d in summary.drains if d.in_time is False]
    if late:
        log.error("%d drains reported after their deadline", len(late))
    if summary.gave_up:
        return _give_up_at_work(summary.exit_reason, settings.give_up_command, systemd, log)
    if summary.exit_reason.startswith("idle") and settings.on_idle_exit:
        log.info("running the idle-exit command: %s", settings.on_idle_exit)
        subprocess.run(settings.on_idle_exit, shell=True, check=False)
    return 0
