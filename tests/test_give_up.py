"""Never bill for nothing: an agent that cannot start work retries for a bounded time, then runs its
give-up command and exits with status 69, and the bound holds across restarts.

Real `cio-worker agent` processes; a small supervisor loop restarts them as systemd's
Restart=on-failure would (and stops at status 69, RestartPreventExitStatus=69); a real coordinator
on a fixed loopback port that comes up while an agent waits for it. No test asserts a duration:
bounds are small, waits generous, and what is asserted is what happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cio_worker.errors import QueueError
from cio_worker.job.document import JobInfo, RetryPolicy
from cio_worker.node.giveup import GAVE_UP_EXIT_STATUS, STATE_FILE_NAME, GaveUp, GiveUpPolicy, start_or_give_up
from cio_worker.queue import NewTask, SqliteQueue
from tests.coordinator_faults import Coordinator
from tests.servers import free_port
from tests.test_agent_config import clean_env
from tests.test_queue import Clock
from tests.waiting import wait_for

RETRYING = "trying again in"


def give_up_script(tmp: Path) -> tuple[str, Path]:
    """A give-up command that writes a marker file (as `touch /run/cio-worker/give-up` would)."""
    marker = tmp / "gave-up"
    script = tmp / "give-up.sh"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$CIO_GIVE_UP_REASON" >> "{marker}"\n')
    script.chmod(0o755)
    return str(script), marker


def agent_argv(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cio_worker", "agent", "--worker-id", "node-a", "--root", str(tmp / "root"),
            "--work-dir", str(tmp / "work"), "--no-cache", "--preemption", "none", "--poll-seconds", "0.1", *extra]


@dataclass
class Supervision:
    exits: list[int] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


def supervise(argv: list[str], env: dict[str, str], *, kill_on: str, limit: float = 180.0) -> Supervision:
    """Start ``argv``; SIGKILL it when it logs ``kill_on`` (a crash, a watchdog kill); restart it
    after a failure unless it exited 0 or 69 (Restart=on-failure, RestartPreventExitStatus=69)."""
    seen = Supervision()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            killed = False
            assert process.stderr is not None
            for line in process.stderr:
                seen.log.append(line.rstrip("\n"))
                if kill_on in line and not killed:
                    os.kill(process.pid, signal.SIGKILL)
                    killed = True
            seen.exits.append(process.wait(60))
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(30)
        if seen.exits[-1] in (0, GAVE_UP_EXIT_STATUS):
            return seen
        time.sleep(0.1)  # RestartSec
    raise AssertionError(f"still restarting after {limit} s: exits {seen.exits}")


def test_a_bad_configuration_under_a_restarting_supervisor_ends_in_the_give_up_command(tmp_path: Path) -> None:
    command, marker = give_up_script(tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text(f'queu = "https://coordinator:8700"\ngive_up_after = 6\ngive_up_command = "{command}"\n')
    # Every run is killed as soon as it says it will try again: only the bound kept in the work
    # directory across restarts can bring the give-up; a bound per process would restart forever.
    seen = supervise(agent_argv(tmp_path, "--config", str(config)), clean_env(), kill_on=RETRYING)

    assert seen.exits[-1] == GAVE_UP_EXIT_STATUS, seen.log[-10:]
    assert len(seen.exits) >= 2 and set(seen.exits[:-1]) == {-signal.SIGKILL}, seen.exits
    # The command ran, saying why (once, unless a kill meant for a retry landed as it ran).
    reasons = marker.read_text().splitlines()
    assert reasons and all("unknown key 'queu'" in r and "did you mean 'queue'?" in r for r in reasons)
    record = json.loads((tmp_path / "work" / STATE_FILE_NAME).read_text())
    assert record["failures"] >= len(seen.exits)  # one first failure, failures counted across every restart
    assert marker.stat().st_mtime - record["first_failure"] >= 6  # not before the bound
    assert "gave up: cannot start work" in seen.log[-1]


def test_a_coordinator_unreachable_at_start_is_retried_then_given_up_on_and_a_restart_gives_up_at_once(tmp_path: Path) -> None:
    command, marker = give_up_script(tmp_path)
    nobody = f"http://127.0.0.1:{free_port()}"
    argv = agent_argv(tmp_path, "--queue", nobody, "--give-up-after", "2", "--give-up-command", command)
    env = clean_env(CIO_TOKEN="agent-token")
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert first.returncode == GAVE_UP_EXIT_STATUS, first.stderr
    assert RETRYING in first.stderr  # it retried before giving up
    [reason] = marker.read_text().splitlines()
    assert f"coordinator {nobody} did not answer" in reason
    assert "gave up: cannot start work" in first.stderr.splitlines()[-1]

    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert again.returncode == GAVE_UP_EXIT_STATUS, again.stderr
    assert RETRYING not in again.stderr and "(1 attempts in this process)" in again.stderr
    assert len(marker.read_text().splitlines()) == 2


def test_a_coordinator_that_comes_back_within_the_bound_gets_the_agent_working(tmp_path: Path) -> None:
    command, marker = give_up_script(tmp_path)
    backend = SqliteQueue(tmp_path / "queue.db")
    _, token = backend.create_token("fleet", ["agent", "owner"])
    (tmp_path / "storage").mkdir()
    job = backend.create_job(JobInfo(id="00000", title="give up", project="default", storage=f"file://{tmp_path / 'storage'}",
                                     output_path="C:/proj/renders", autoretry_policy=RetryPolicy(preempted=2, failed=0)),
                             [NewTask("1", "echo rendered")])
    coordinator = Coordinator(backend, port=free_port())  # not serving yet
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(
            agent_argv(tmp_path, "--queue", f"http://127.0.0.1:{coordinator.port}", "--give-up-after", "300",
                       "--give-up-command", command, "--max-tasks", "1"),
            env=clean_env(CIO_TOKEN=token), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        wait_for(lambda: RETRYING in log_path.read_text(), 120, "the agent to fail a start and retry",
                 detail=lambda: log_path.read_text()[-2000:])
        assert (tmp_path / "work" / STATE_FILE_NAME).exists()
        coordinator.start()
        assert agent.wait(180) == 0, log_path.read_text()[-3000:]
    finally:
        if agent.poll() is None:
            os.kill(agent.pid, signal.SIGKILL)
            agent.wait(30)
        coordinator.stop()
    [task] = backend.tasks(job)
    backend.close()
    assert task.state == "done"
    assert not marker.exists()
    assert not (tmp_path / "work" / STATE_FILE_NAME).exists()  # working: the next failure starts a new bound


# -- the retry loop itself, with its clock and sleep passed in --------------------------------------


def failing(error: Exception):
    calls = []

    def start():
        calls.append(1)
        raise error
    return start, calls


def test_a_first_failure_from_an_earlier_boot_does_not_count(tmp_path: Path) -> None:
    state = tmp_path / STATE_FILE_NAME
    clock = Clock()
    state.write_text(json.dumps({"first_failure": clock.now - 10_000, "boot_id": "an-earlier-boot", "failures": 9}))
    ran: list[str] = []
    start, calls = failing(QueueError("coordinator down", code="queue_unavailable"))
    with pytest.raises(GaveUp, match="coordinator down"):
        start_or_give_up(start, lambda: GiveUpPolicy(30.0, "poweroff", state), clock=clock, sleep=clock.advance,
                         boot=lambda: "this-boot", run_command=lambda command, reason: ran.append(command) or 0)
    record = json.loads(state.read_text())
    assert record["boot_id"] == "this-boot" and record["first_failure"] == 1_700_000_000.0
    assert len(calls) > 1 and ran == ["poweroff"]  # retried for this boot's bound, then gave up once
    assert clock.now - record["first_failure"] >= 30


def test_a_start_that_succeeds_removes_the_record_and_one_that_cannot_wait_raises_as_it_is(tmp_path: Path) -> None:
    state = tmp_path / STATE_FILE_NAME
    clock = Clock()
    outcomes = [QueueError("down"), QueueError("still down"), "started"]

    def start():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        assert state.exists()  # the failures so far are on disk
        return outcome

    policy = GiveUpPolicy(60.0, None, state)
    assert start_or_give_up(start, lambda: policy, clock=clock, sleep=clock.advance, boot=lambda: "b") == "started"
    assert not state.exists()

    start, calls = failing(QueueError("queue sqlite:///typo.db does not exist"))
    with pytest.raises(QueueError, match="typo.db"):  # after 0, no command: a person's terminal, as before
        start_or_give_up(start, lambda: GiveUpPolicy(0.0, None, state), clock=clock, sleep=clock.advance)
    assert len(calls) == 1 and not state.exists()
