"""Notice watchers against the metadata stand-in on loopback, and real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import requests

from cio_worker.sim.metadata_server import MetadataServer
from cio_worker.node.preemption import (AzureWatcher, Ec2Watcher, GceWatcher, Notice, NoticeBoard,
                                   PreemptionConfig, PreemptionConfigError, SignalWatcher,
                                   Watchers, detect_provider, start_watchers)

REPO = Path(__file__).resolve().parents[1]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class FakeClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def md():
    with MetadataServer() as server:
        yield server


@pytest.fixture
def board():
    return NoticeBoard()


@pytest.fixture
def running():
    """Start watchers through this; every one is stopped (and must stop) at teardown."""
    started: list = []

    def start(watcher):
        started.append(watcher)
        return watcher.start()

    yield start
    for watcher in started:
        assert watcher.stop(timeout=3.0), f"{watcher} did not stop"


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_of(md, path_end: str, method: str = "GET"):
    return [r for r in md.request_log() if r.path.endswith(path_end) and r.method == method]


# ---- GCE ----

def test_gce_watcher_detects_preemption_well_within_30s(md, board, running):
    running(GceWatcher(md.url, on_notice=board))
    wait_until(lambda: log_of(md, "instance/preempted"))
    raised = time.time()
    md.raise_gce_preempt()
    notice = board.wait(10)
    assert notice is not None
    assert (notice.kind, notice.provider) == ("preempt", "gce")
    assert notice.received_at - raised < 5
    assert notice.deadline == pytest.approx(notice.received_at + 30)
    assert board.draining


def test_gce_watcher_uses_hanging_gets_with_the_last_etag(md, board, running):
    etag = requests.get(f"{md.url}/computeMetadata/v1/instance/preempted", timeout=5,
                        headers={"Metadata-Flavor": "Google"}).headers["ETag"]
    md.clear_log()
    running(GceWatcher(md.url, on_notice=board, wait_timeout=30))
    wait_until(lambda: len(log_of(md, "instance/preempted")) >= 2)
    time.sleep(0.5)
    gets = log_of(md, "instance/preempted")
    assert len(gets) == 2, "the watcher must hang, not poll"
    first, hanging = gets
    assert "wait_for_change" not in first.query  # the current value first: it may already be TRUE
    assert hanging.query == {"wait_for_change": "true", "last_etag": etag, "timeout_sec": "30"}
    assert hanging.headers["metadata-flavor"] == "Google"
    assert len(log_of(md, "instance/maintenance-event")) == 2


def test_gce_terminate_on_host_maintenance_is_a_notice_migrate_is_not(md, board, running):
    running(GceWatcher(md.url, on_notice=board))
    wait_until(lambda: len(log_of(md, "instance/maintenance-event")) >= 2)
    md.raise_gce_maintenance("MIGRATE_ON_HOST_MAINTENANCE")
    migrate_etag = requests.get(f"{md.url}/computeMetadata/v1/instance/maintenance-event",
                                headers={"Metadata-Flavor": "Google"}, timeout=5).headers["ETag"]
    # the watcher has seen MIGRATE once it hangs on MIGRATE's ETag
    wait_until(lambda: any(r.query.get("last_etag") == migrate_etag
                           for r in log_of(md, "instance/maintenance-event")))
    assert board.notices() == []
    md.raise_gce_maintenance("TERMINATE_ON_HOST_MAINTENANCE")
    notice = board.wait(10)
    assert notice is not None and notice.kind == "terminate"
    assert "TERMINATE_ON_HOST_MAINTENANCE" in notice.detail


def test_gce_watcher_survives_503s_and_sees_a_notice_already_raised(md, board, running):
    md.fail_next(6, provider="gce")
    md.raise_gce_preempt()
    running(GceWatcher(md.url, on_notice=board, backoff_max=0.2))
    notice = board.wait(15)
    assert notice is not None and notice.kind == "preempt"
    statuses = [r.status for r in log_of(md, "instance/preempted")]
    # the last entry may be the next hanging GET, still unanswered (None)
    answered = [s for s in statuses if s is not None]
    assert answered.count(503) >= 3 and answered[-1] == 200


def test_gce_watcher_survives_the_server_going_away_and_coming_back(board, running):
    with MetadataServer() as first:
        port = int(first.url.rsplit(":", 1)[1])
        url = first.url
        running(GceWatcher(url, on_notice=board, backoff_max=0.2))
        wait_until(lambda: log_of(first, "instance/preempted"))
    time.sleep(0.5)  # connection refused meanwhile: retried, not fatal
    with MetadataServer(port=port) as second:
        second.raise_gce_preempt()
        notice = board.wait(15)
    assert notice is not None and notice.provider == "gce"


def test_gce_watcher_stop_cuts_a_hanging_get_short(md, board):
    watcher = GceWatcher(md.url, on_notice=board, wait_timeout=300).start()
    wait_until(lambda: len(log_of(md, "instance/preempted")) >= 2)
    assert watcher.stop(timeout=2.0)
    assert not watcher.alive


# ---- EC2 ----

def test_ec2_watcher_detects_spot_notice_with_default_polling(md, board, running):
    running(Ec2Watcher(md.url, on_notice=board))
    wait_until(lambda: log_of(md, "spot/instance-action"))
    raised = time.time()
    action = md.raise_ec2_spot()
    notice = board.wait(10)
    assert notice is not None
    assert (notice.kind, notice.provider) == ("preempt", "ec2")
    assert notice.received_at - raised < 5
    expected = time.mktime(time.strptime(action["time"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert notice.deadline == pytest.approx(expected)
    records = md.request_log()
    assert records[0].method == "PUT" and records[0].path == "/latest/api/token"
    gets = [r for r in records if r.method == "GET"]
    tokens = {r.headers.get("x-aws-ec2-metadata-token") for r in gets}
    assert len(tokens) == 1 and None not in tokens  # one token, sent with every GET
    assert all(r.status in (200, 404) for r in gets)


def test_ec2_polls_at_its_interval_and_reports_a_notice_once(md, board, running):
    running(Ec2Watcher(md.url, on_notice=board, poll_interval=0.25))
    wait_until(lambda: len(log_of(md, "spot/instance-action")) >= 5)
    times = [r.time for r in log_of(md, "spot/instance-action")]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert (times[-1] - times[0]) / len(gaps) >= 0.2, gaps  # waits between polls
    assert max(gaps) <= 2.0, gaps  # and never lets 2 s pass
    md.raise_ec2_spot()
    assert board.wait(10) is not None
    seen = len(log_of(md, "spot/instance-action"))
    wait_until(lambda: len(log_of(md, "spot/instance-action")) >= seen + 3)
    assert len(board.notices()) == 1


def test_ec2_gets_a_new_token_after_a_401(md, board, running):
    running(Ec2Watcher(md.url, on_notice=board, poll_interval=0.1))
    wait_until(lambda: len(log_of(md, "spot/instance-action")) >= 2)
    assert len(log_of(md, "/latest/api/token", "PUT")) == 1
    md.expire_tokens()
    wait_until(lambda: len(log_of(md, "/latest/api/token", "PUT")) >= 2)
    md.raise_ec2_spot()
    assert board.wait(10) is not None
    gets = [r for r in md.request_log() if r.method == "GET"]
    assert 401 in [r.status for r in gets]
    assert log_of(md, "spot/instance-action")[-1].status == 200
    new_token = md.request_log()[-1].headers["x-aws-ec2-metadata-token"]
    assert new_token != log_of(md, "spot/instance-action")[0].headers["x-aws-ec2-metadata-token"]


def test_ec2_refreshes_its_token_before_the_ttl_ends(md, board, running):
    clock = FakeClock()
    running(Ec2Watcher(md.url, clock=clock, on_notice=board, poll_interval=0.1, token_ttl=60))
    wait_until(lambda: len(log_of(md, "spot/instance-action")) >= 2)
    assert len(log_of(md, "/latest/api/token", "PUT")) == 1
    clock.offset = 50  # within the refresh margin of a 60 s token
    wait_until(lambda: len(log_of(md, "/latest/api/token", "PUT")) >= 2)
    assert all(r.status != 401 for r in md.request_log()), "refreshed before the server refused"
    put = log_of(md, "/latest/api/token", "PUT")[-1]
    assert put.headers["x-aws-ec2-metadata-token-ttl-seconds"] == "60"


def test_ec2_rebalance_is_a_soft_notice(md, board, running):
    running(Ec2Watcher(md.url, on_notice=board, poll_interval=0.1))
    md.raise_ec2_rebalance()
    notice = board.wait(10)
    assert notice is not None
    assert (notice.kind, notice.deadline, notice.hard) == ("rebalance", None, False)
    assert board.no_new_work and not board.draining
    assert board.wait(0.05, hard=True) is None
    md.raise_ec2_spot()
    hard = board.wait(10, hard=True)
    assert hard is not None and hard.kind == "preempt"
    assert board.draining and board.latest() == hard


def test_a_failing_on_notice_does_not_stop_the_watcher(md, running):
    received: list[Notice] = []

    def on_notice(notice: Notice) -> None:
        received.append(notice)
        raise RuntimeError("the agent's callback broke")

    running(Ec2Watcher(md.url, on_notice=on_notice, poll_interval=0.1))
    md.raise_ec2_rebalance()
    wait_until(lambda: received)
    md.raise_ec2_spot()
    wait_until(lambda: len(received) == 2)
    assert [n.kind for n in received] == ["rebalance", "preempt"]


# ---- Azure ----

def test_azure_watcher_detects_preempt_and_acknowledges(md, board, running):
    watcher = running(AzureWatcher(md.url, on_notice=board, poll_interval=0.2))
    wait_until(lambda: log_of(md, "/metadata/scheduledevents"))
    event = md.raise_azure_preempt(not_before_in=30)
    notice = board.wait(10)
    assert notice is not None
    assert (notice.kind, notice.provider, notice.ref) == ("preempt", "azure", event["EventId"])
    assert notice.deadline == pytest.approx(notice.received_at + 30, abs=2)
    polls = log_of(md, "/metadata/scheduledevents")
    assert all(r.headers["metadata"] == "true" and r.query["api-version"] == "2020-07-01"
               for r in polls)
    assert watcher.acknowledge(notice.ref)
    assert md.azure_acks() == [event["EventId"]]
    seen = len(log_of(md, "/metadata/scheduledevents"))
    wait_until(lambda: len(log_of(md, "/metadata/scheduledevents")) >= seen + 2)
    assert len(board.notices()) == 1  # the event, now Started, is not a second notice


# ---- detection and configuration ----

@pytest.mark.parametrize("provider", ["gce", "ec2", "azure"])
def test_detect_provider_picks_the_one_that_answers(provider):
    with MetadataServer(providers=[provider]) as md:
        endpoints = {"gce": md.url, "ec2": md.url, "azure": md.url}
        assert detect_provider(endpoints, timeout=2.0) == provider


def test_detect_provider_none_when_nothing_answers():
    dead = f"http://127.0.0.1:{unused_port()}"
    started = time.monotonic()
    assert detect_provider({"gce": dead, "ec2": dead, "azure": dead}, timeout=1.0) is None
    assert time.monotonic() - started < 5


def test_detect_provider_ignores_a_server_of_another_shape():
    with MetadataServer(providers=["azure"]) as azure:
        dead = f"http://127.0.0.1:{unused_port()}"
        assert detect_provider({"gce": azure.url, "ec2": dead}, timeout=1.0) is None
        assert detect_provider({"gce": dead, "azure": azure.url}, timeout=1.0) == "azure"


def test_config_defaults_and_environment():
    default = PreemptionConfig.from_env({})
    assert default.gce_url == "http://metadata.google.internal"
    assert default.ec2_url == default.azure_url == "http://169.254.169.254"
    assert (default.provider, default.poll_interval, default.signal_grace) == ("auto", 1.0, 25.0)
    env = {"GCE_METADATA_HOST": "127.0.0.1:8081",
           "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:8082/"}
    config = PreemptionConfig.from_env(env, provider="ec2", poll_interval=0.5)
    assert config.gce_url == "http://127.0.0.1:8081"
    assert config.ec2_url == "http://127.0.0.1:8082"
    assert (config.provider, config.poll_interval) == ("ec2", 0.5)
    assert PreemptionConfig.from_env({"GCE_METADATA_IP": "10.0.0.9"}).gce_url == "http://10.0.0.9"
    with pytest.raises(PreemptionConfigError):
        PreemptionConfig(provider="openstack")
    with pytest.raises(PreemptionConfigError):
        PreemptionConfig(poll_interval=0)


def test_start_watchers_auto_detects_and_stops_everything(board):
    before = set(threading.enumerate())
    with MetadataServer(providers=["ec2"]) as md:
        config = PreemptionConfig(gce_url=md.url, ec2_url=md.url, azure_url=md.url,
                                  poll_interval=0.1)
        watchers = start_watchers(config, board, install_signals=False)
        try:
            assert watchers.provider == "ec2"
            md.raise_ec2_spot()
            notice = board.wait(10)
            assert notice is not None and notice.provider == "ec2"
        finally:
            assert watchers.stop(timeout=2.0)
    assert set(threading.enumerate()) <= before


def test_start_watchers_azure_acknowledge_and_none(board):
    with MetadataServer(providers=["azure"]) as md:
        config = PreemptionConfig(provider="azure", azure_url=md.url, poll_interval=0.1)
        watchers = start_watchers(config, board, install_signals=False)
        try:
            md.raise_azure_preempt()
            notice = board.wait(10)
            assert notice is not None
            assert watchers.acknowledge(notice)
            assert md.azure_acks() == [notice.ref]
        finally:
            assert watchers.stop()
    nothing = start_watchers(PreemptionConfig(provider="none"), board, install_signals=False)
    assert (nothing.provider, nothing.members) == (None, [])
    assert nothing.stop()


def test_start_watchers_off_the_main_thread_skips_signals(board):
    result: list[Watchers] = []
    thread = threading.Thread(target=lambda: result.append(
        start_watchers(PreemptionConfig(provider="none"), board, install_signals=True)))
    thread.start()
    thread.join(10)
    assert result[0].members == []
    errors: list[Exception] = []

    def start_signal_watcher() -> None:
        try:
            SignalWatcher(board).start()
        except RuntimeError as err:
            errors.append(err)

    starter = threading.Thread(target=start_signal_watcher)
    starter.start()
    starter.join(10)
    assert len(errors) == 1 and "main thread" in str(errors[0])


# ---- signals ----

def test_signal_watcher_chains_and_restores_the_previous_handler(board):
    calls: list[int] = []

    def previous(signum, frame):
        calls.append(signum)

    original = signal.signal(signal.SIGUSR1, previous)
    try:
        watcher = SignalWatcher(board, grace=7.0, signals=[signal.SIGUSR1]).start()
        try:
            signal.raise_signal(signal.SIGUSR1)
            notice = board.wait(5)
            assert notice is not None
            assert (notice.kind, notice.provider, notice.detail) == ("signal", "signal", "SIGUSR1")
            assert notice.deadline == pytest.approx(notice.received_at + 7.0)
            assert calls == [signal.SIGUSR1]
            signal.raise_signal(signal.SIGUSR1)
            wait_until(lambda: len(calls) == 2)
        finally:
            assert watcher.stop()
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert len(board.notices()) == 1
    finally:
        signal.signal(signal.SIGUSR1, original)


CHILD = textwrap.dedent("""
    import json, signal, sys
    from cio_worker.node.preemption import NoticeBoard, PreemptionConfig, start_watchers
    board = NoticeBoard()
    watchers = start_watchers(PreemptionConfig(provider="none", signal_grace=7), board.post)
    print("ready", flush=True)
    notice = board.wait(20)
    watchers.stop()
    restored = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    print(json.dumps({"kind": notice and notice.kind, "detail": notice and notice.detail,
                      "grace": notice and notice.deadline - notice.received_at,
                      "restored": restored}), flush=True)
""")


def test_sigterm_to_a_real_process_becomes_a_notice_not_a_death():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGTERM)
        report = json.loads(child.stdout.readline())
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert report == {"kind": "signal", "detail": "SIGTERM", "grace": 7, "restored": True}


# ---- the board ----

def test_notice_board_orders_hard_over_soft_and_wakes_waiters():
    board = NoticeBoard()
    assert board.latest() is None and board.wait(0.01) is None
    assert not board.no_new_work and not board.draining
    soft = Notice("rebalance", "ec2", 100.0, None, "rebalance")
    board.post(soft)
    assert board.latest() == soft and board.no_new_work and not board.draining
    assert board.deadline() is None
    got: list[Notice | None] = []
    waiter = threading.Thread(target=lambda: got.append(board.wait(10, hard=True)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()
    late = Notice("signal", "signal", 101.0, 126.0, "SIGTERM")
    early = Notice("preempt", "gce", 102.0, 120.0, "preempted")
    board.post(late)
    board.post(early)
    board.post(Notice("rebalance", "ec2", 103.0, None, "again"))
    waiter.join(10)
    assert got and got[0] is not None and got[0].hard
    assert board.latest() == early
    assert board.deadline() == 120.0
    assert board.draining
    assert len(board.notices()) == 4
