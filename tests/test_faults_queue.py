"""Queue faults with figures: the coordinator's sqlite queue file locked by another process (at the
agent's start, while it renders, longer than its busy timeout), and a queue file or directory that
is missing or is not a queue.

A lock held for a while is waited out (sqlite's busy timeout) or retried (the agent's claim loop):
the agent continues after it and nothing is lost or reported twice. A missing or foreign queue is a
clear one-line error and exit status 2 from the command line, and no stray file is created.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.test_faults_storage import (
    Farm,
    agent_process,
    assert_farm_invariants,
    assert_no_orphans,
    captured_logs,
    record_figure,
)
from tests.test_faults_node import create_job, file_farm

LOCKER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
conn.close()
print("unlocked", flush=True)
"""


class Locker:
    """Another process holding an exclusive lock on the queue's database for ``seconds``."""

    def __init__(self, db: Path, seconds: float) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), str(seconds)],
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        assert line == "locked", f"the locker did not get its lock: {line!r}"
        self.seconds = seconds

    def wait(self, timeout: float = 60) -> None:
        assert self.process.wait(timeout) == 0
        assert self.process.stdout is not None
        assert self.process.stdout.read().strip() == "unlocked"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def lock_queue() -> Iterator[Callable[[Path, float], Locker]]:
    lockers: list[Locker] = []

    def start(db: Path, seconds: float) -> Locker:
        locker = Locker(db, seconds)
        lockers.append(locker)
        return locker

    yield start
    for locker in lockers:
        locker.stop()


def _claims(farm: Farm, job: str) -> int:
    return sum(e.kind == "claimed" for e in farm.queue.events(job))


# --- a lock held for a while ------------------------------------------------------------------


@pytest.mark.slow
def test_an_agent_started_on_a_locked_queue_waits_and_then_works(tmp_path: Path, lock_queue) -> None:
    farm = file_farm(tmp_path)
    job = farm.submit("job", frames="1-2")
    locker = lock_queue(farm.queue.path, 3.0)
    with agent_process(farm) as agent:
        locker.wait()
        assert agent.wait(timeout=120) == 0, agent.log_text()
    assert farm.task(job).state == "done" and _claims(farm, job) == 1
    states = assert_farm_invariants(farm)
    record_figure("queue-locked/agent-start", injected={"exclusive_lock_s": 3.0}, outcome=states,
                  queue_errors_logged=agent.log_text().count("queue unavailable"))
    farm.close()


@pytest.mark.slow
def test_a_lock_taken_while_the_task_renders_delays_the_report_and_loses_nothing(tmp_path: Path, lock_queue) -> None:
    farm = file_farm(tmp_path)
    farm.env["CNODE_SIM_FRAME_SECONDS"] = "1"
    job = farm.submit("job", frames="1-2")
    with agent_process(farm, "--lease-seconds", "30") as agent:
        deadline = time.monotonic() + 60
        while farm.task(job).state != "leased":
            assert time.monotonic() < deadline and agent.poll() is None, agent.log_text()
            time.sleep(0.05)
        locker = lock_queue(farm.queue.path, 4.0)  # heartbeats and the final report meet the lock
        locker.wait()
        assert agent.wait(timeout=120) == 0, agent.log_text()
    task = farm.task(job)
    assert task.state == "done" and _claims(farm, job) == 1 and task.attempt_count == 0
    assert len(farm.queue.downloads(job, state=None)) == 1
    states = assert_farm_invariants(farm)
    record_figure("queue-locked/during-render", injected={"exclusive_lock_s": 4.0}, outcome=states)
    farm.close()


def test_a_lock_longer_than_the_busy_timeout_is_retried_by_the_claim_loop(tmp_path: Path, lock_queue) -> None:
    """The agent's own queue gives up on a lock after 0.2 s: the claim fails, the loop says so and
    tries again until the lock is gone, then does the work."""
    farm = file_farm(tmp_path, queue_busy_timeout=0.2)
    job = farm.submit("job", frames="1-2")
    locker = lock_queue(farm.queue.path, 2.0)
    with captured_logs() as logs, farm.agent(poll_seconds=0.1) as running:
        locker.wait()
        farm.wait_finished(job, running)
    refused = logs.text.count("queue unavailable")
    assert refused >= 1 and "database is locked" in logs.text
    assert farm.task(job).state == "done" and _claims(farm, job) == 1
    states = assert_farm_invariants(farm)
    record_figure("queue-locked/claim-retried", injected={"exclusive_lock_s": 2.0}, claim_retries=refused,
                  outcome=states)
    farm.close()


def test_a_lock_longer_than_the_busy_timeout_at_report_time_does_not_end_the_agent(
    tmp_path: Path, lock_queue
) -> None:
    """The render ends while another process holds the queue past the agent's busy timeout: the
    report is retried until the queue answers; the task is done once and the agent goes on."""
    farm = file_farm(tmp_path, queue_busy_timeout=0.2)
    job = create_job(farm, "sleep 1 && echo rendered")
    with captured_logs() as logs, farm.agent(heartbeat_seconds=5) as running:
        deadline = time.monotonic() + 60
        while farm.task(job).state != "leased":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        locker = lock_queue(farm.queue.path, 2.5)  # held across the end of the render
        locker.wait()
        farm.wait_finished(job, running)
        good = create_job(farm, "echo next")
        farm.wait_finished(good, running)
    assert farm.task(job).state == "done" and _claims(farm, job) == 1
    assert farm.task(good).state == "done"
    refused = logs.text.count("the queue refused the report")
    assert refused >= 1
    states = assert_farm_invariants(farm)
    record_figure("queue-locked/report-retried", injected={"exclusive_lock_s": 2.5}, report_retries=refused,
                  outcome=states)
    farm.close()


# --- a queue that is not there, or not a queue ----------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cio_worker", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("missing", ["file", "directory"])
@pytest.mark.parametrize("command", [["status"], ["status", "00001"], ["release", "00001"], ["kill", "00001"],
                                     ["download", "--root", "ROOT"]])
def test_a_missing_queue_is_a_clear_error_with_exit_status_2(tmp_path: Path, command: list[str], missing: str) -> None:
    db = tmp_path / "queue.db" if missing == "file" else tmp_path / "no-such-dir" / "queue.db"
    args = [a.replace("ROOT", str(tmp_path / "artist")) for a in command]
    out = _cli(*args, "--queue", f"sqlite:///{db}")
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("cio-worker: error: ") and str(db.parent if missing == "directory" else db) in line
    assert "does not exist" in line and "Traceback" not in out.stderr
    assert not db.exists()  # no empty queue made by mistake
    record_figure(f"queue-missing/{missing}/{command[0]}", outcome={"exit": out.returncode}, message=line)


@pytest.mark.parametrize("missing", ["file", "directory"])
def test_an_agent_on_a_missing_queue_exits_2_saying_so(tmp_path: Path, missing: str) -> None:
    """A mistyped --queue must not leave an agent idling on a new, empty queue."""
    db = tmp_path / "queue.db" if missing == "file" else tmp_path / "no-such-dir" / "queue.db"
    out = _cli("agent", "--queue", f"sqlite:///{db}", "--root", str(tmp_path / "root"), "--work-dir",
               str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"), "--preemption", "none",
               "--idle-exit", "0.5")
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("cio-worker: error: ") and str(db) in line and "does not exist" in line
    assert not db.exists() and not db.parent.exists() if missing == "directory" else not db.exists()
    assert_no_orphans(tmp_path)
    record_figure(f"queue-missing/{missing}/agent", outcome={"exit": out.returncode}, message=line)


@pytest.mark.parametrize("command", ["status", "agent"])
def test_a_file_that_is_not_a_queue_is_a_clear_error_and_is_left_alone(tmp_path: Path, command: str) -> None:
    db = tmp_path / "queue.db"
    db.write_bytes(b"this is a text file, not a database\n" * 100)
    before = db.read_bytes()
    extra = ["--root", str(tmp_path / "root"), "--work-dir", str(tmp_path / "work"), "--cache-dir",
             str(tmp_path / "cache"), "--preemption", "none", "--idle-exit", "0.5"] if command == "agent" else []
    out = _cli(command, "--queue", f"sqlite:///{db}", *extra)
    assert out.returncode == 2, out.stderr
    assert "is not a cio_worker queue database" in out.stderr and "Traceback" not in out.stderr
    assert db.read_bytes() == before
