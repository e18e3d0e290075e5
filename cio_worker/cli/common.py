"""Arguments and objects several commands share: the node context, storage, queues, logging.

Imported when the parser is built: the node, queue and storage modules (and the SDKs behind them)
are imported inside the functions that need them, not here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import unquote, urlparse

from cio_worker.errors import QueueError, StorageError

if TYPE_CHECKING:
    from cio_worker.node.execution import ExecutionContext
    from cio_worker.queue import Queue

GIB = 1024**3


def env_default(name: str, default: str | None = None) -> str | None:
    """Options can come from the environment (systemd EnvironmentFile): CIO_<NAME>."""
    return os.environ.get(f"CIO_{name}", default)


def add_queue_argument(parser: argparse.ArgumentParser, example: str = "sqlite:///queue.db", *, token: bool = True) -> None:
    """--queue, required unless CIO_QUEUE gives it, and (``token``) --token-file for a coordinator's token."""
    parser.add_argument("--queue", default=env_default("QUEUE"), required=env_default("QUEUE") is None, metavar="URL",
                        help=f"queue URL, e.g. {example}" + (", or a coordinator's https://host:port" if token else "")
                        + " (env CIO_QUEUE)")
    if not token:
        return
    parser.add_argument("--token-file", default=env_default("TOKEN_FILE"), metavar="PATH",
                        help="file holding the coordinator's bearer token (env CIO_TOKEN_FILE; or the token itself "
                        "in env CIO_TOKEN)")


def queue_token(args: argparse.Namespace) -> str | None:
    """The coordinator token: --token-file (or CIO_TOKEN_FILE), else CIO_TOKEN; None when neither is set."""
    path = getattr(args, "token_file", None)
    if path:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise QueueError(f"cannot read the token file {path}: {exc.strerror or exc}", code="no_token") from None
        if not text:
            raise QueueError(f"the token file {path} is empty", code="no_token")
        return text
    return os.environ.get("CIO_TOKEN") or None


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``, else a usage error saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a node keeps its work, cache and logs, and how it runs commands."""
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cio-worker"
    parser.add_argument("--work-dir", default=env_default("WORK_DIR", str(home / "work")), metavar="DIR",
                        help="per-task directories and logs (env CIO_WORK_DIR; default %(default)s)")
    parser.add_argument("--cache-dir", default=env_default("CACHE_DIR", str(home / "cache")), metavar="DIR",
                        help="the content cache shared by tasks on this machine (env CIO_CACHE_DIR; "
                        "default %(default)s)")
    parser.add_argument("--cache-budget-gb", type=float, default=float(env_default("CACHE_BUDGET_GB", "20")),
                        metavar="GB", help="content cache size before least-recently-used eviction "
                        "(env CIO_CACHE_BUDGET_GB; default %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="download every input, keep no cache")
    parser.add_argument("--task-timeout", type=float, default=None, metavar="SECONDS",
                        help="seconds before a render is stopped (default: no limit)")
    parser.add_argument("--kill-grace", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between SIGTERM and SIGKILL when stopping a render (default %(default)s)")
    parser.add_argument("--log-cap-mb", type=float, default=64.0, metavar="MB",
                        help="per-task log size cap (default %(default)s)")
    parser.add_argument("--storage-concurrency", type=whole_number(0), default=0, metavar="N",
                        help="parallel transfers (0: automatic)")
    parser.add_argument("--sync-processes", type=whole_number(0), default=0, metavar="N",
                        help="processes a large download from a file:// store is split over (0: one a core, "
                        "at most 4, from 5,000 files on; 1: never split)")


def node_context(args: argparse.Namespace, path_map, *, say=lambda line: None, progress=None) -> "ExecutionContext":
    from cio_worker.node.cache import ContentCache
    from cio_worker.node.execution import ExecutionContext
    from cio_worker.node.runner import ProcessRunner
    from cio_worker.storage import StorageOptions, open_storage
    from cio_worker.storage.md5cache import Md5Cache

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
        sync_processes=args.sync_processes,
        say=say,
        progress=progress or (lambda phase: None),
    )


def open_existing_queue(url: str, token: str | None = None, *, patient: bool = False) -> "Queue":
    """Open a queue that must already exist (status, release, kill, download, agent).

    ``open_queue`` creates a missing sqlite file, which is right for ``submit`` only; for any other
    command a missing file is a wrong --queue, and a new empty queue would hide that ("no jobs in
    the queue", an agent idling on nothing). A coordinator that does not answer is retried for a
    few seconds before a person is told, or for half a minute when ``patient`` (an agent).
    """
    from cio_worker.queue import open_queue, sqlite_path

    if isinstance(url, str) and url.lower().startswith("sqlite:"):
        path = sqlite_path(url)
        if not path.exists():
            where = "its directory does not exist either" if not path.parent.is_dir() else "no file there"
            raise QueueError(
                f"queue {url} does not exist ({path}: {where}); check --queue (or CIO_QUEUE): "
                "`cio-worker submit` creates the queue with the first job",
                code="no_queue",
            )
    queue = open_queue(url, token=token)
    if hasattr(queue, "retry_seconds"):
        queue.retry_seconds = 30.0 if patient else 5.0
    return queue


def check_new_queue(url: str, token: str | None = None) -> None:
    """Fail now, creating nothing, if ``submit`` could not create or open the queue ``url``.

    The queue itself is opened (and a sqlite file created) only once the job is valid.
    """
    from cio_worker.queue import open_queue, sqlite_path

    if isinstance(url, str) and url.lower().startswith("sqlite:"):
        path = sqlite_path(url)
        if path.exists():
            open_queue(url).close()  # a file that is not a queue fails here
        elif not path.parent.is_dir():
            raise QueueError(
                f"cannot create queue {url}: directory {path.parent} does not exist; check --queue "
                "(or CIO_QUEUE), or create the directory first",
                code="bad_queue_url",
            )
        return
    open_queue(url, token=token).close()  # an unknown scheme (or a coordinator without a token) says what is wrong


def check_existing_storage(url: str) -> None:
    """Fail, creating nothing, if ``url`` is malformed or names a ``file://`` store that does not exist.

    For a storage URL typed on the command line (``run-task --storage``): uploads to a mistyped
    ``file://`` URL would otherwise fill a new directory nobody reads; ``submit`` alone creates a
    store. Bucket URLs are left to the task: checking them would open a cloud client for nothing.
    """
    from cio_worker.storage import open_storage

    scheme = urlparse(url).scheme
    if scheme in ("s3", "gs"):
        return
    open_storage(url).close()  # a malformed URL or an unknown scheme fails here, naming it
    root = Path(unquote(urlparse(url).path))
    if scheme == "file" and not root.is_dir():
        raise StorageError(
            f"storage {url} does not exist ({root} is not a directory on this machine); check the "
            "storage URL: `cio-worker submit` creates a file:// store with its first job",
            code="no_storage",
        )


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


LOG_FORMATS = ("text", "json")
_LIBRARIES_HANDLER = "cio_worker.libraries"


def _log_format(text: str) -> str:
    if text not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log format (use {' or '.join(LOG_FORMATS)})")
    return text


def add_log_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", type=_log_format, choices=LOG_FORMATS, default=env_default("LOG_FORMAT", "text"),
                        help="the log on stderr as text, or as one JSON object a line (time, level, severity, logger, "
                        "message) for Cloud Logging / CloudWatch agents (env CIO_LOG_FORMAT; default %(default)s)")


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: ``time`` (RFC 3339, UTC), ``level`` and ``severity`` (the
    name Cloud Logging reads), ``logger``, ``message``, and ``exception`` / ``stack`` when present.
    Non-ASCII text is escaped, so a line is valid whatever bytes a message held."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        entry = {"time": when.replace("+00:00", "Z"), "level": record.levelname, "severity": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def log_formatter(log_format: str = "text") -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup_logging(level: str = "INFO", stream=None, log_format: str = "text", *, libraries: bool = False) -> logging.Logger:
    """This package's records from ``level`` up on ``stream`` (stderr) in ``log_format``; with
    ``libraries``, every other library's too (warnings and up, or what its logger lets through,
    e.g. uvicorn's), in the same format, and in JSON Python's warnings as well."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(log_formatter(log_format))
    root = logging.getLogger("cio_worker")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    if libraries:
        others = logging.StreamHandler(handler.stream)
        others.setFormatter(handler.formatter)
        others.set_name(_LIBRARIES_HANDLER)
        top = logging.getLogger()
        top.handlers[:] = [h for h in top.handlers if h.get_name() != _LIBRARIES_HANDLER] + [others]
        logging.captureWarnings(log_format == "json")
    return root
