"""Commands of the farm's operator: serve the coordinator, manage tokens and the schema, list workers."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from cio_worker.cli.common import (
    add_log_format_argument,
    add_queue_argument,
    open_existing_queue,
    queue_token,
    setup_logging,
)
from cio_worker.cli.main import CliError, Streams


def _database_queue(url: str, connections: int | None = None):
    """The queue's own database (tokens and the schema live there, not behind a coordinator)."""
    if url.lower().startswith(("http:", "https:")):
        raise CliError(f"{url} is a coordinator; run this on the coordinator's machine with its database URL "
                       "(sqlite:///... or postgresql://...)")
    if connections is not None and url.lower().startswith(("postgresql:", "postgres:")):
        from cio_worker.queue.postgres import PostgresQueue

        return PostgresQueue(url, max_connections=connections)
    return open_existing_queue(url)


# -- serve --------------------------------------------------------------------------------------------

def register_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the coordinator: the farm's HTTP API in front of the queue",
        description="Serve the queue over HTTP/JSON for agents (claim, heartbeat, report) and owners (submit, "
        "status, release, kill, download). Stateless: several may serve one PostgreSQL. Needs the "
        "coordinator extra: pip install 'cio-worker[coordinator]'.",
    )
    add_queue_argument(parser, example="postgresql://cio@db:5432/cio", token=False)
    parser.add_argument("--listen", default="127.0.0.1:8700", metavar="HOST:PORT",
                        help="address to listen on (default %(default)s; 0.0.0.0:8700 for every interface)")
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help="serve HTTPS with this certificate")
    parser.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="the certificate's private key")
    parser.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                        help="trust X-Forwarded-* from these addresses (a TLS-terminating proxy in front)")
    parser.add_argument("--lease-seconds", type=float, default=60.0, metavar="S",
                        help="how long a claim holds without a heartbeat (default %(default)s)")
    parser.add_argument("--heartbeat-seconds", type=float, default=10.0, metavar="S",
                        help="how often agents are told to heartbeat (default %(default)s)")
    parser.add_argument("--long-poll-seconds", type=float, default=20.0, metavar="S",
                        help="how long an idle agent's claim waits on the server (default %(default)s)")
    parser.add_argument("--db-threads", type=int, default=8, metavar="N",
                        help="queue calls served at once, the database connections used (default %(default)s)")
    parser.add_argument("--metrics-token-required", action="store_true",
                        help="answer GET /metrics (the farm's figures for Prometheus) only with an owner token; "
                        "by default any caller may scrape it")
    add_log_format_argument(parser)
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace, streams: Streams) -> int:
    from cio_worker.coordinator.app import CoordinatorConfig
    from cio_worker.coordinator.server import Listen, serve
    from cio_worker.node.systemd import Notifier

    if args.heartbeat_seconds >= args.lease_seconds:
        raise CliError("--heartbeat-seconds must be shorter than --lease-seconds (several heartbeats per lease)")
    log = setup_logging("INFO", streams.err, args.log_format, libraries=True)  # uvicorn's records too
    listen = Listen.parse(args.listen)
    if args.db_threads < 1:
        raise CliError("--db-threads must be at least 1")
    queue = _database_queue(args.queue, connections=args.db_threads)
    systemd = Notifier.from_environ(os.environ)  # Type=notify: READY, watchdog pings from uvicorn's loop, STOPPING

    def ready(url: str) -> None:
        if args.log_format == "json":
            log.getChild("coordinator").info("coordinator at %s serving %r", url, queue)
        else:  # a line of its own, which scripts look for
            print(f"coordinator at {url} serving {queue!r}", file=streams.err, flush=True)
        systemd.ready(f"serving {url}")

    config = CoordinatorConfig(lease_seconds=args.lease_seconds, heartbeat_seconds=args.heartbeat_seconds,
                               long_poll_seconds=args.long_poll_seconds, db_threads=args.db_threads,
                               metrics_token_required=args.metrics_token_required)
    try:
        serve(queue, listen, config, tls_cert=args.tls_cert, tls_key=args.tls_key, configure_logging=False,
              forwarded_allow_ips=args.forwarded_allow_ips, on_ready=ready, on_stopping=systemd.stopping,
              on_tick=systemd.alive, tick_seconds=min(1.0, systemd.ping_seconds or 1.0))
    finally:
        queue.close()
    return 0


# -- tokens -------------------------------------------------------------------------------------------

def register_token(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "token", help="create, list and revoke the coordinator's bearer tokens",
        description="Bearer tokens for the coordinator, stored hashed in the queue's database. Scope 'agent' claims "
        "and reports; 'owner' submits, reads status, releases, kills and downloads.",
    )
    actions = parser.add_subparsers(dest="token_action", metavar="ACTION", required=True,
                                    help="create, list or revoke")
    create = actions.add_parser("create", help="make a token and print it once",
                                description="Make a token; it is printed once on stdout and never stored in clear.")
    add_queue_argument(create, example="postgresql://cio@db:5432/cio", token=False)
    create.add_argument("--scope", action="append", required=True, choices=("agent", "owner"),
                        help="what the token may do (repeat for both)")
    create.add_argument("--name", required=True, help="who or what the token is for (e.g. 'gce-fleet', 'alice')")
    create.set_defaults(handler=run_token_create)
    listing = actions.add_parser("list", help="list tokens (never their secrets)", description="List tokens: id, name, "
                                 "scopes, created, revoked.")
    add_queue_argument(listing, example="postgresql://cio@db:5432/cio", token=False)
    listing.set_defaults(handler=run_token_list)
    revoke = actions.add_parser("revoke", help="revoke a token by id or name",
                                description="Revoke the token with this id, or every active token with this name. "
                                "Coordinators refuse it within a few seconds.")
    revoke.add_argument("token", metavar="ID_OR_NAME", help="the token's id (from `token list`) or name")
    add_queue_argument(revoke, example="postgresql://cio@db:5432/cio", token=False)
    revoke.set_defaults(handler=run_token_revoke)


def run_token_create(args: argparse.Namespace, streams: Streams) -> int:
    with _database_queue(args.queue) as queue:
        row, text = queue.create_token(args.name, sorted(set(args.scope)))
    print(text, file=streams.out)
    print(f"token {row.id} ({row.name}, scope {', '.join(sorted(row.scopes))}): shown once, keep it in a root-only file",
          file=streams.err)
    return 0


def run_token_list(args: argparse.Namespace, streams: Streams) -> int:
    with _database_queue(args.queue) as queue:
        rows = queue.list_tokens()
    lines = [f"{'ID':<14}{'NAME':<24}{'SCOPES':<14}{'CREATED':<22}REVOKED"]
    for r in rows:
        revoked = _when(r.revoked) if r.revoked is not None else "-"
        lines.append(f"{r.id:<14}{r.name[:23]:<24}{','.join(sorted(r.scopes)):<14}{_when(r.created):<22}{revoked}")
    streams.out.write("\n".join(lines) + "\n")
    return 0


def run_token_revoke(args: argparse.Namespace, streams: Streams) -> int:
    with _database_queue(args.queue) as queue:
        count = queue.revoke_token(args.token)
    if not count:
        raise CliError(f"no active token has id or name {args.token!r} (`cio-worker token list` shows them)")
    print(f"revoked {count} token{'s' if count != 1 else ''}", file=streams.out)
    return 0


# -- schema -------------------------------------------------------------------------------------------

def register_queue(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "queue", help="create or migrate a queue's database",
        description="Administer a queue's database. `queue init URL` creates the schema of a new PostgreSQL "
        "database (or migrates an older one; stop the coordinators first) or a new sqlite file.",
    )
    actions = parser.add_subparsers(dest="queue_action", metavar="ACTION", required=True, help="init")
    init = actions.add_parser("init", help="create or migrate the schema",
                              description="Create the queue's schema, or migrate it to this version. Safe to repeat.")
    init.add_argument("url", metavar="URL", help="postgresql://user@host:port/database or sqlite:///path.db")
    init.set_defaults(handler=run_queue_init)


def run_queue_init(args: argparse.Namespace, streams: Streams) -> int:
    url = args.url
    scheme = url.partition(":")[0].lower()
    if scheme in ("postgresql", "postgres"):
        from cio_worker.queue.postgres import init_schema, redact

        before, after = init_schema(url)
        what = "created" if before is None else ("already at" if before == after else f"migrated from {before} to")
        print(f"queue {redact(url)}: schema {what} version {after}", file=streams.out)
        return 0
    if scheme == "sqlite":
        from cio_worker.queue import open_queue, sqlite_path

        existed = sqlite_path(url).exists()
        open_queue(url).close()  # creates or migrates the file
        print(f"queue {url}: {'up to date' if existed else 'created'}", file=streams.out)
        return 0
    raise CliError(f"queue init takes a database URL (postgresql:// or sqlite:///), not {url.split('@')[-1]!r}")


# -- workers ------------------------------------------------------------------------------------------

def register_workers(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "workers", help="list the farm's workers and what each is doing",
        description="Every registered worker: state (idle, syncing, rendering, uploading, draining, stopped, or gone "
        "when silent), its job/task and progress, instance, last contact, tasks done and failed.",
    )
    add_queue_argument(parser, example="https://coordinator:8700")
    parser.set_defaults(handler=run_workers)


def run_workers(args: argparse.Namespace, streams: Streams) -> int:
    with open_existing_queue(args.queue, queue_token(args)) as queue:
        rows = queue.workers()
    now = time.time()
    lines = [f"{'WORKER':<28}{'STATE':<11}{'TASK':<14}{'PROGRESS':>9}  {'INSTANCE':<28}{'CONTACT':>9}{'DONE':>6}{'FAILED':>7}"]
    for w in rows:
        task = f"{w.job_id}/{w.task_id}" if w.job_id else "-"
        progress = f"{w.progress:.0f}%" if w.progress is not None else "-"
        kind = w.info.get("machine_type") or "-"
        if w.info.get("preemptible"):
            kind += " (spot)"
        instance = f"{w.info.get('provider', '-')}:{kind}"
        lines.append(f"{w.id[:27]:<28}{w.state:<11}{task:<14}{progress:>9}  {instance[:27]:<28}"
                     f"{_ago(now - w.last_contact):>9}{w.tasks_done:>6}{w.tasks_failed:>7}")
    if not rows:
        lines.append("(no worker has registered)")
    streams.out.write("\n".join(lines) + "\n")
    return 0


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"
