"""Helpers for the fleet-path fault tests (coordinator + ``HttpQueue``), all on 127.0.0.1.

- ``CoordinatorProxy``: the ``FaultProxy`` of ``tests/servers.py`` in front of a coordinator, with
  faults drawn at random (seeded) per request and counted per kind, faults that act *after* the
  coordinator has answered (``drop_response``: the coordinator acted, the client never hears;
  ``reset_body``: headers and half the body, then a reset), delays shorter and longer than the
  client's timeout, an outage switch (``down``: every request is reset unanswered), and the raw
  bodies it forwarded (to replay them).
- ``serving_app``: a given coordinator app in a thread (``tests/coordinators.serving`` builds its
  own; a test that watches ``app.state`` needs the object).
- ``CoordinatorProcess``: a real ``cio-worker serve`` process on a fixed port, its stderr kept;
  SIGKILLed, restarted and stopped by pid.
- ``queue_state``: what a refusal must leave unchanged (the queue's views and every table).
- ``CountingHttpQueue``: an ``HttpQueue`` that counts its retries and the statuses it saw.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cio_worker.queue.http import HttpQueue
from tests.servers import HOP_BY_HOP, Fault, FaultProxy, Seen, _ProxyHandler

# What a job of these tests looks like: retry budgets at the document's maximum (5), so that
# injected faults (a lease orphaned by a request that outlived its client, a deliberate failure)
# never exhaust a task's budget.
JOB = {
    "title": "fleet faults",
    "project": "default",
    "storage": "file:///tmp/cio-fleet-storage",
    "output_path": "/proj/renders",
    "autoretry_policy": {"preempted": {"max_retries": 5}, "failed": {"max_retries": 5}},
}

FAULT_KINDS = ("reset", "status", "delay", "timeout", "drop_response", "reset_body")


# -- the proxy ------------------------------------------------------------------------------------


@dataclass
class Forwarded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class CoordinatorProxy(FaultProxy):
    """``rates``: kind -> probability per request (only paths containing one of ``paths``);
    ``path_rates``: other rates for the paths that contain a key."""

    seed: int = 0
    rates: dict[str, float] = field(default_factory=dict)
    path_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    paths: tuple[str, ...] = ("/v1/",)
    delay_seconds: float = 0.2  # "delay": shorter than the client's timeout
    timeout_seconds: float = 2.0  # "timeout": longer than the client's timeout (the request goes on later)
    statuses: tuple[int, ...] = (502, 503, 504)
    injected: Counter = field(default_factory=Counter)
    forwarded: list[Forwarded] = field(default_factory=list)
    down: bool = False

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._next = threading.local()
        super().__post_init__()

    @classmethod
    def handler_class(cls) -> type:
        return _CoordinatorHandler

    def draw(self, method: str, path: str) -> str | None:
        """The fault for this request (None: forward it as it is), counted."""
        if not any(p in path for p in self.paths):
            return None
        rates = next((r for key, r in self.path_rates.items() if key in path), self.rates)
        with self.lock:
            roll = self._rng.random()
            status = self._rng.choice(self.statuses)
            for kind, rate in rates.items():
                if roll < rate:
                    self.injected[kind if kind != "status" else f"status_{status}"] += 1
                    if kind == "status":
                        self._next.fault = Fault("status", status=status, content_type="text/html",
                                                 body=f"<html><h1>{status}</h1>the proxy</html>".encode())
                    elif kind in ("reset", "reset_body"):
                        self._next.fault = Fault(kind)
                    return kind
                roll -= rate
        return None

    def _take(self, method: str, path: str, range_: str | None) -> Fault | None:
        with self.lock:
            self.seen.append(Seen(method, path, range_))
        fault, self._next.fault = getattr(self._next, "fault", None), None
        return fault

    def count(self, kind: str) -> None:
        with self.lock:
            self.injected[kind] += 1

    def bodies(self, path: str) -> list[Forwarded]:
        with self.lock:
            return [f for f in self.forwarded if f.path == path]


class _CoordinatorHandler(_ProxyHandler):
    owner: CoordinatorProxy

    def _read_body(self) -> bytes:
        body = super()._read_body()
        self._body = body
        return body

    def _forward(self, body: bytes) -> None:
        """Send the request on and read the whole answer (the coordinator has acted)."""
        owner = self.owner
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(owner.host, owner.port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            upstream.getresponse().read()
        finally:
            upstream.close()

    def _handle(self) -> None:
        owner = self.owner
        if owner.down:  # the coordinator is unreachable: nothing gets through
            self._read_body()
            owner.count("down")
            with owner.lock:
                owner.seen.append(Seen(self.command, self.path, None))
            self._reset()
            return
        kind = owner.draw(self.command, self.path)
        if kind == "delay":
            time.sleep(owner.delay_seconds)
        elif kind == "timeout":
            time.sleep(owner.timeout_seconds)
        elif kind == "drop_response":
            body = self._read_body()
            with owner.lock:
                owner.seen.append(Seen(self.command, self.path, None))
            self._remember(body)
            self._forward(body)
            self._reset()
            return
        super()._handle()
        if kind not in ("status", "reset"):  # it went through to the coordinator
            self._remember(self._body)

    def _remember(self, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        with self.owner.lock:
            self.owner.forwarded.append(Forwarded(self.command, self.path, headers, body))


# -- a coordinator app in a thread ----------------------------------------------------------------


@contextmanager
def serving_app(app: Any, **uvicorn_options: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread; yield its URL; stop it after."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = {"log_level": "warning", "lifespan": "on", **uvicorn_options}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="coordinator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the coordinator did not start")
        time.sleep(0.01)
    scheme = "https" if options.get("ssl_certfile") else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


# -- a real `cio-worker serve` process ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CoordinatorProcess:
    """``cio-worker serve --queue QUEUE --listen 127.0.0.1:PORT``; the same port across restarts."""

    def __init__(self, queue_url: str, *args: str, port: int | None = None) -> None:
        self.queue_url, self.args = queue_url, args
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log: list[str] = []  # every stderr line of every run
        self.starts = 0
        self._readers: list[threading.Thread] = []

    def start(self, timeout: float = 60.0) -> None:
        cli = Path(sys.executable).with_name("cio-worker")
        argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "cio_worker"]
        argv += ["serve", "--queue", self.queue_url, "--listen", f"127.0.0.1:{self.port}", *self.args]
        deadline = time.monotonic() + timeout
        while True:
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)
            ready = threading.Event()
            reader = threading.Thread(target=self._read, args=(process, ready), daemon=True)
            reader.start()
            self._readers.append(reader)
            while not ready.is_set() and process.poll() is None and time.monotonic() < deadline:
                ready.wait(0.05)
            if ready.is_set():
                self.process = process
                self.starts += 1
                return
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
            # The port may still be held a moment after a SIGKILL; try again until the deadline.
            if time.monotonic() > deadline:
                raise RuntimeError("cio-worker serve did not start:\n" + "\n".join(self.log[-20:]))
            time.sleep(0.2)

    def _read(self, process: subprocess.Popen, ready: threading.Event) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.log.append(line.rstrip("\n"))
            if "coordinator at http://" in line:
                ready.set()

    def kill(self) -> None:
        """SIGKILL, by pid: no shutdown, open requests cut."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)
        for reader in self._readers:
            reader.join(5)


# -- the queue's state ----------------------------------------------------------------------------


def queue_state(queue: Any, db_path: Path | None = None) -> dict[str, Any]:
    """tasks, events (every job), downloads, workers; with ``db_path`` (sqlite) every table too."""
    state: dict[str, Any] = {"jobs": queue.jobs()}
    for summary in state["jobs"]:
        state[f"tasks {summary.id}"] = queue.tasks(summary.id)
        state[f"events {summary.id}"] = queue.events(summary.id)
    state["downloads"] = queue.downloads(None, None)
    state["workers"] = queue.workers(gone_after=1e12)
    if db_path is not None:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            for table in tables:
                state[f"table {table}"] = sorted(map(repr, conn.execute(f"SELECT * FROM {table}").fetchall()))
        conn.close()
    return state


# -- a client that counts -------------------------------------------------------------------------


class CountingHttpQueue(HttpQueue):
    """An ``HttpQueue`` whose retries (its backoff sleeps) and answers' statuses are counted."""

    def __init__(self, url: str, token: str, **kwargs: Any) -> None:
        self.retries = 0
        self.statuses: Counter = Counter()
        self._counts = threading.Lock()

        def sleep(seconds: float) -> None:
            with self._counts:
                self.retries += 1
            time.sleep(seconds)

        super().__init__(url, token, sleep=sleep, **kwargs)

    def _session(self):  # type: ignore[no-untyped-def]
        session = super()._session()
        if not getattr(session, "_counted", False):
            session._counted = True  # type: ignore[attr-defined]

            def hook(response, *args, **kwargs):  # type: ignore[no-untyped-def]
                with self._counts:
                    self.statuses[response.status_code] += 1

            session.hooks["response"].append(hook)
        return session


def figures_line(name: str, figures: dict[str, Any]) -> str:
    return f"[figures] {name}: " + json.dumps(figures, sort_keys=True, default=str)


# Every route of the API: (method, path template, scope). test_openapi_lists_every_v1_route keeps
# this table equal to the app's routes, so the auth and hostile-request tests cover each one.
ROUTES = [
    ("POST", "/v1/workers/register", "agent"),
    ("POST", "/v1/workers/report", "agent"),
    ("POST", "/v1/claim", "agent"),
    ("POST", "/v1/heartbeat", "agent"),
    ("POST", "/v1/complete", "agent"),
    ("POST", "/v1/fail", "agent"),
    ("POST", "/v1/release", "agent"),
    ("POST", "/v1/reap", "agent"),
    ("POST", "/v1/logs/append", "agent"),
    ("POST", "/v1/jobs", "owner"),
    ("GET", "/v1/jobs", "owner"),
    ("GET", "/v1/jobs/{job_id}", "owner"),
    ("GET", "/v1/jobs/{job_id}/tasks", "owner"),
    ("GET", "/v1/jobs/{job_id}/events", "owner"),
    ("GET", "/v1/jobs/{job_id}/attempts", "owner"),
    ("GET", "/v1/jobs/{job_id}/tasks/{task_id}/log", "owner"),
    ("POST", "/v1/jobs/{job_id}/release", "owner"),
    ("POST", "/v1/jobs/{job_id}/retry", "owner"),
    ("POST", "/v1/jobs/{job_id}/kill", "owner"),
    ("GET", "/v1/downloads", "owner"),
    ("POST", "/v1/downloads/{download_id}/downloaded", "owner"),
    ("GET", "/v1/workers", "owner"),
]
