"""systemd's notify protocol as a Type=notify unit meets it: a real unix datagram socket as
$NOTIFY_SOCKET, real `cio-worker agent` and `cio-worker serve` processes. READY=1 arrives once the
service works, WATCHDOG=1 arrives again and again from its loop (and stops when the loop is
wedged), STOPPING=1 arrives on SIGTERM, and children never inherit the socket."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cio_worker.job.paths import PathMap
from cio_worker.node.agent import Agent, AgentConfig
from cio_worker.node.execution import ExecutionContext
from cio_worker.node.runner import ProcessRunner
from cio_worker.node.systemd import Notifier
from cio_worker.queue import SqliteQueue
from cio_worker.storage import open_storage


class NotifySocket:
    """What systemd listens on: a bound AF_UNIX datagram socket; ``messages`` collects what came."""

    def __init__(self, abstract: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sd-"))  # short: a socket path has 108 bytes at most
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.address = f"@cio-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + self.address[1:])
        else:
            self.address = str(self.dir / "notify")
            self.sock.bind(self.address)
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        return fields

    def wait_for(self, key: str, timeout: float = 60.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.receive(max(0.01, deadline - time.monotonic()))
            if message is not None and key in message:
                return message
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")

    def drain(self) -> list[dict[str, str]]:
        got = []
        while (message := self.receive(0.01)) is not None:
            got.append(message)
        return got

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify_socket():
    sock = NotifySocket()
    yield sock
    sock.close()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


# -- the notifier ------------------------------------------------------------------------------------

def test_from_environ_takes_the_variables_out_so_children_do_not_inherit_them():
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242",
               "PATH": "/usr/bin"}
    notifier = Notifier.from_environ(environ, pid=4242)
    assert notifier.address == "/run/systemd/notify"
    assert notifier.watchdog_seconds == 30.0 and notifier.ping_seconds == 15.0
    assert environ == {"PATH": "/usr/bin"}


def test_watchdog_meant_for_another_process_is_not_ours():
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, pid=2)
    assert notifier.enabled and notifier.watchdog_seconds is None


def test_not_under_systemd_every_call_does_nothing():
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.ready("x") is False and notifier.stopping() is False
    notifier.alive()


def test_messages_reach_a_path_and_an_abstract_socket():
    for abstract in (False, True):
        listener = NotifySocket(abstract=abstract)
        try:
            notifier = Notifier(listener.address)
            assert notifier.ready("serving http://x")
            assert listener.receive(5) == {"READY": "1", "STATUS": "serving http://x"}
            assert notifier.status("two\nlines")
            assert listener.receive(5) == {"STATUS": "two lines"}
        finally:
            listener.close()


def test_alive_pings_at_half_the_watchdog_time(notify_socket):
    now = [100.0]
    notifier = Notifier(notify_socket.address, watchdog_seconds=10.0, clock=lambda: now[0])
    for step in range(40):  # a loop turning every 0.5 s for 20 s
        notifier.alive()
        now[0] += 0.5
    pings = [m for m in notify_socket.drain() if m == {"WATCHDOG": "1"}]
    assert len(pings) == 4  # at 0, 5, 10 and 15 s


def test_a_socket_nobody_listens_on_is_reported_once_and_never_raises(tmp_path, caplog):
    notifier = Notifier(str(tmp_path / "gone"), watchdog_seconds=0.001)
    assert notifier.ready() is False
    notifier.alive()
    assert notifier.stopping() is False
    assert sum("cannot notify systemd" in r.getMessage() for r in caplog.records) == 1


# -- the agent -----------------------------------------------------------------------------------------

def _empty_queue(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    subprocess.run([sys.executable, "-m", "cio_worker", "queue", "init", url], check=True, capture_output=True)
    return url


def test_agent_process_is_ready_pings_its_watchdog_and_says_stopping_on_sigterm(tmp_path, notify_socket):
    url = _empty_queue(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "400000"}
    env.pop("CIO_QUEUE", None)
    log = open(tmp_path / "agent.log", "wb")
    agent = subprocess.Popen(
        [sys.executable, "-m", "cio_worker", "agent", "--queue", url, "--worker-id", "sd-agent",
         "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"), "--poll-seconds", "0.05",
         "--preemption", "none"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        ready = notify_socket.wait_for("READY")
        assert "sd-agent" in ready.get("STATUS", "")
        for _ in range(3):
            notify_socket.wait_for("WATCHDOG")
        agent.send_signal(signal.SIGTERM)
        stopping = notify_socket.wait_for("STOPPING")
        assert "signal" in stopping.get("STATUS", "")
        assert agent.wait(timeout=60) == 0
    finally:
        _stop(agent)
        log.close()
    text = (tmp_path / "agent.log").read_text()
    assert "cannot notify" not in text, text


class WedgingQueue(SqliteQueue):
    """A real sqlite queue whose claim can be made to hang, as a wedged call would."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.wedge = threading.Event()
        self.unwedge = threading.Event()
        self.stuck = threading.Event()

    def claim(self, worker, lease_seconds):
        if self.wedge.is_set():
            self.stuck.set()
            self.unwedge.wait(60)
        return super().claim(worker, lease_seconds)


def test_a_wedged_agent_loop_stops_the_watchdog_pings(tmp_path, notify_socket):
    queue = WedgingQueue(tmp_path / "queue.db")
    notifier = Notifier(notify_socket.address, watchdog_seconds=0.2)
    ctx = ExecutionContext(work_root=tmp_path / "work", open_storage=open_storage, runner=ProcessRunner(),
                           path_map=PathMap.rooted(str(tmp_path / "root")))
    agent = Agent(AgentConfig(worker_id="wedged", poll_seconds=0.02), queue, ctx, alive=notifier.alive)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        for _ in range(3):
            notify_socket.wait_for("WATCHDOG", timeout=30)
        queue.wedge.set()
        assert queue.stuck.wait(30)
        notify_socket.drain()  # a ping sent before the loop reached the wedged claim
        # systemd would kill the agent after 0.2 s without a ping; five times that passes silently
        assert notify_socket.receive(1.0) is None
        queue.wedge.clear()
        queue.unwedge.set()
        notify_socket.wait_for("WATCHDOG", timeout=30)
    finally:
        queue.unwedge.set()
        agent.shutdown("test over", cause="released")
        thread.join(30)
        queue.close()
    assert not thread.is_alive()


# -- the coordinator -------------------------------------------------------------------------------------

def test_coordinator_is_ready_once_serving_pings_from_its_loop_and_says_stopping(tmp_path, notify_socket):
    url = _empty_queue(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "1000000"}
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "cio_worker", "serve", "--queue", url, "--listen", "127.0.0.1:0"],
                             env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        ready = notify_socket.wait_for("READY")
        address = ready["STATUS"].removeprefix("serving ")
        assert address.startswith("http://127.0.0.1:")
        import requests

        assert requests.get(f"{address}/openapi.json", timeout=10).status_code == 200  # ready means serving
        for _ in range(3):
            notify_socket.wait_for("WATCHDOG")
        serve.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING")
        # uvicorn re-raises the SIGTERM once it has shut down; systemd counts that as a clean stop
        assert serve.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        _stop(serve)
        log.close()
