"""Run the coordinator: uvicorn (uvloop and httptools where installed) on HOST:PORT, TLS optional.

Behind a TLS-terminating proxy (nginx, a cloud load balancer) run it without ``--tls-*`` on a
private address; uvicorn honours ``X-Forwarded-*`` only from ``forwarded_allow_ips``.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from cio_worker.coordinator.app import CoordinatorConfig, create_app
from cio_worker.coordinator.collector import PacedCollector
from cio_worker.coordinator.transport import coalescing_protocol
from cio_worker.errors import CioError, QueueError
from cio_worker.queue.sql import SqlQueue


class ServeError(CioError, ValueError):
    code = "bad_serve"


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Listen":
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ServeError(f"--listen {text!r} is not HOST:PORT (e.g. 127.0.0.1:8700, or 0.0.0.0:8700 for every interface)")
        return cls(host.strip("[]") or "127.0.0.1", int(port))


def bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listen.host, listen.port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {listen.host}:{listen.port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def serve(
    queue: SqlQueue,
    listen: Listen,
    config: CoordinatorConfig | None = None,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    forwarded_allow_ips: str | None = None,
    on_ready=None,
    on_stopping=None,
    on_tick=None,
    tick_seconds: float = 1.0,
    configure_logging: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn's handlers: finish open requests, then exit).
    ``on_ready(url)`` is called once the app has started, ``on_stopping()`` when shutting down
    begins, ``on_tick()`` every ``tick_seconds`` from uvicorn's main loop (a watchdog ping).
    Without ``configure_logging`` uvicorn's records go to the handlers the caller has set up."""
    import uvicorn

    if not hasattr(queue, "authenticate"):
        raise QueueError("the coordinator serves a database queue (sqlite:/// or postgresql://), not another coordinator",
                         code="bad_queue_url")
    if (tls_cert is None) != (tls_key is None):
        raise ServeError("--tls-cert and --tls-key go together")
    for path in (tls_cert, tls_key):
        if path is not None and not Path(path).is_file():
            raise ServeError(f"TLS file {path} does not exist")
    sock = bind(listen)
    port = sock.getsockname()[1]
    options = dict(
        log_level="info",
        access_log=False,  # one line per claim and heartbeat drowns the log; errors are logged
        lifespan="on",
        loop="auto",  # uvloop where installed
        http=coalescing_protocol() or "auto",  # httptools where installed
        timeout_keep_alive=75,  # longer than a long poll's gap between requests
        # X-Forwarded-* is read only when a proxy is named: the middleware that reads it costs
        # every request, and with nobody to trust it has nothing to do.
        proxy_headers=forwarded_allow_ips is not None,
        forwarded_allow_ips=forwarded_allow_ips,
        server_header=False,
    )
    if not configure_logging:
        options.update(log_config=None)
    if tls_cert is not None:
        options.update(ssl_certfile=str(tls_cert), ssl_keyfile=str(tls_key))
    if on_tick is not None:
        async def tick() -> None:
            on_tick()

        options.update(callback_notify=tick, timeout_notify=tick_seconds)
    # Ten thousand idle agents keep some hundred thousand objects alive (connections, waiting
    # polls); Python's own collection schedule walked them with the loop stopped for up to 2 s,
    # which agents saw as heartbeat latency. The collector runs on the loop's clock instead.
    server = uvicorn.Server(uvicorn.Config(create_app(queue, config, PacedCollector()), **options))
    scheme = "https" if tls_cert else "http"
    url = f"{scheme}://{listen.host}:{port}"

    class _Ready(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if on_ready is not None and "startup complete" in record.getMessage():
                on_ready(url)
            if on_stopping is not None and record.getMessage() == "Shutting down":
                on_stopping()

    ready = _Ready()
    logging.getLogger("uvicorn.error").addHandler(ready)
    try:
        server.run(sockets=[sock])
    finally:
        logging.getLogger("uvicorn.error").removeHandler(ready)
        sock.close()
