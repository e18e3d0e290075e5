"""Arguments and objects several commands share: the node context, storage, logging."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from cio_worker.node.cache import ContentCache
from cio_worker.errors import QueueError
from cio_worker.node.execution import ExecutionContext
from cio_worker.storage.md5cache import Md5Cache
from cio_worker.queue import Queue, open_queue, sqlite_path
from cio_worker.node.runner import ProcessRunner
from cio_worker.storage import StorageOptions, open_storage

GIB = 1024**3


def env_default(name: str, default: str | None = None) -> str | None:
    """Options can come from the environment (systemd EnvironmentFile): CIO_<NAME>."""
    return os.environ.get(f"CIO_{name}", default)


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a node keeps its work, cache and logs, and how it runs commands."""
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cio-worker"
    parser.add_argument("--work-dir", default=env_default("WORK_DIR", str(home / "work")),
                        help="per-task directories and logs (default %(default)s)")
    parser.add_argument("--cache-dir", default=env_default("CACHE_DIR", str(home / "cache")),
                        help="the content cache shared by tasks on this machine (default %(default)s)")
    parser.add_argument("--cache-budget-gb", type=float, default=float(env_default("CACHE_BUDGET_GB", "20")),
                        help="content cache size before least-recently-used eviction (default %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="download every input, keep no cache")
    parser.add_argument("--task-timeout", type=float, default=None, help="seconds before a render is stopped")
    parser.add_argument("--kill-grace", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping a render (default %(default)s)")
    parser.add_argument("--log-cap-mb", type=float, default=64.0, help="per-task log size cap (default %(default)s)")
    parser.add_argument("--storage-concurrency", type=int, default=0, help="parallel transfers (0: automatic)")


def node_context(args: argparse.Namespace, path_map, *, say=lambda line: None, progress=None) -> ExecutionContext:
    work = Path(args.work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = md5cache = None
    if not args.no_cache:
        cache_dir = Path(args.cache_dir).expanduser().resolve()
        cache = ContentCache(cache_dir / "contents", int(args.cache_budget_gb * GIB))
        md5cache = Md5Cache(cache_dir / "md5cache.db")
    options = StorageOptions(concurrency=args.storage_concurrency)
    return ExecutionContext(
        work_root=work,
        open_storage=lambda url: open_storage(url, options),
        runner=ProcessRunner(),
        path_map=path_map,
        cache=cache,
        md5cache=md5cache,
        kill_grace=args.kill_grace,
        task_timeout=args.task_timeout,
        log_cap_bytes=int(args.log_cap_mb * 1024 * 1024),
        say=say,
        progress=progress or (lambda phase: None),
    )


def open_existing_queue(url: str) -> Queue:
    """Open a queue that must already exist (status, release, kill, download).

    ``open_queue`` creates a missing sqlite file, which is right for ``submit``; for a command
    that only reads or changes existing jobs, a missing file is a wrong --queue, and a new empty
    queue would hide that ("no jobs in the queue").
    """
    if isinstance(url, str) and url.lower().startswith("sqlite:"):
        path = sqlite_path(url)
        if not path.exists():
            where = "its directory does not exist either" if not path.parent.is_dir() else "no file there"
            raise QueueError(
                f"queue {path} does not exist ({where}); check --queue (or CIO_QUEUE): "
                "`cio-worker submit` creates the queue with the first job",
                code="no_queue",
            )
    return open_queue(url)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def setup_logging(level: str = "INFO", stream=None) -> logging.Logger:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("cio_worker")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return root
