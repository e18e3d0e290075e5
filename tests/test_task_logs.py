"""Task logs off the instance: every attempt's log (success, failure, drain) uploaded to the job's
storage when it ends, its location recorded with the attempt and named in a failure's reason;
``cio-worker logs JOB TASK`` prints it from anywhere; ``--follow`` prints a running render's lines
before it ends, shipped by the agent through the queue (bounded: a cap per shipment, the newest
256 KiB kept per attempt). The queue calls on sqlite, PostgreSQL and a coordinator; real agents
on threads, real commands, the real CLI as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cio_worker.errors import DocumentError, LeaseLost
from cio_worker.node.logship import LogShipper
from cio_worker.queue import Queue, SqliteQueue
from cio_worker.queue.base import LOG_SHIPMENT_CAP, LOG_TAIL_CAP, AttemptFigures
from cio_worker.storage import open_storage
from tests.test_agent_fleet import Fleet
from tests.test_queue import Clock, clock, job_spec, queue, task  # noqa: F401  (fixtures)
from tests.waiting import wait_for


# -- the queue contract ---------------------------------------------------------------------------


def test_a_running_attempts_lines_are_kept_and_read_after_an_offset(queue: Queue) -> None:
    job = queue.create_job(job_spec(), [task("1")])
    assert queue.task_log(job, "000").attempt is None  # nothing shipped yet
    lease = queue.claim("w", 30)
    assert queue.append_log(lease, 0, "header\n") == 7
    assert queue.append_log(lease, 0, "header\n") == 7  # resent after a lost answer: kept once
    assert queue.append_log(lease, 7, "frame 1 done \u2713\n") == 7 + len("frame 1 done \u2713\n".encode())
    whole = queue.task_log(job, "000")
    assert (whole.attempt, whole.worker, whole.start, whole.text, whole.running, whole.skipped) == (
        1, "w", 0, "header\nframe 1 done \u2713\n", True, False)
    later = queue.task_log(job, "000", after=7)
    assert later.text == "frame 1 done \u2713\n" and later.end == whole.end
    assert queue.task_log(job, "000", after=whole.end).text == ""

    queue.fail(lease, "exit 3 (log: file:///s/_logs/1.log)", figures=AttemptFigures(log="file:///s/_logs/1.log"))
    ended = queue.task_log(job, "000")
    assert not ended.running and ended.log == "file:///s/_logs/1.log" and ended.text == whole.text
    with pytest.raises(LeaseLost):
        queue.append_log(lease, whole.end, "too late\n")

    second = queue.claim("w2", 30)
    queue.append_log(second, 0, "second attempt\n")
    assert queue.task_log(job, "000").attempt == 2 and queue.task_log(job, "000").running
    assert queue.task_log(job, "000", attempt=1).text == whole.text


def test_the_queue_keeps_the_newest_lines_and_refuses_an_oversized_shipment(queue: Queue) -> None:
    job = queue.create_job(job_spec(), [task("1")])
    lease = queue.claim("w", 30)
    line = "x" * 99 + "\n"  # 100 bytes
    offset = 0
    for n in range(LOG_TAIL_CAP // (LOG_SHIPMENT_CAP // 2) + 3):  # more than the cap, in half-cap shipments
        text = line * (LOG_SHIPMENT_CAP // 2 // 100)
        offset = queue.append_log(lease, offset, text)
    held = queue.task_log(job, "000")
    assert held.end == offset and len(held.text.encode()) <= LOG_TAIL_CAP
    assert held.end - held.start == len(held.text.encode()) and held.text.startswith("x") and held.start % 100 == 0
    assert held.skipped and not queue.task_log(job, "000", after=held.start).skipped  # the oldest lines are gone

    gap = queue.append_log(lease, offset + 500, "after a gap\n")  # shipments the agent gave up on
    assert gap == offset + 512
    assert queue.task_log(job, "000", after=offset).text == "[500 bytes of the log were not shipped]\nafter a gap\n"

    with pytest.raises(DocumentError) as err:
        queue.append_log(lease, gap, "y" * (LOG_SHIPMENT_CAP + 1))
    assert err.value.field == "text"
    assert queue.task_log(job, "000").end == gap


# -- the shipper ----------------------------------------------------------------------------------


def test_the_shipper_sends_whole_lines_within_its_caps(tmp_path: Path) -> None:
    with SqliteQueue(tmp_path / "queue.db") as q:
        job = q.create_job(job_spec(), [task("1")])
        lease = q.claim("w", 30)
        log = tmp_path / "task.log"
        shipper = LogShipper(q, lease, lambda: log, interval=0, shipment_cap=1000, tail_cap=4000)
        assert not shipper.ship()  # no file yet: nothing, no error
        log.write_text("one\ntwo\nthr")
        assert shipper.ship() and q.task_log(job, "000").text == "one\ntwo\n"  # a line still being written waits
        with log.open("a") as f:
            f.write("ee\n" + "".join(f"line {n:05d}\n" for n in range(2000)))  # 22 KB: far over the tail cap
        while shipper.ship():
            pass
        held = q.task_log(job, "000")
        assert held.text.endswith("line 01999\n") and "three" not in held.text
        assert shipper.shipments <= 2 + 4000 // 900 + 1  # skipped ahead instead of shipping it all
        assert "bytes of the log were not shipped]\nline " in held.text  # the skip lands on a line's start
        with log.open("a") as f:
            f.write("last words without a newline")
        shipper.stop(final=True)
        assert q.task_log(job, "000").text.endswith("last words without a newline")


# -- agents and the CLI ---------------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path):
    made = Fleet(tmp_path)
    yield made
    assert not made.close()


def cli(fleet: Fleet, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cio_worker", *args, "--queue", fleet.coordinator.url],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CIO_TOKEN": fleet.token},
                          **kwargs)


def stored_log(fleet: Fleet, location: str) -> str:
    assert location.startswith(fleet.storage_url + "/_logs/"), location
    with open_storage(fleet.storage_url) as storage:
        return storage.read_bytes(location[len(fleet.storage_url) + 1:]).decode()


def test_logs_of_a_success_and_a_failure_are_uploaded_and_printed(fleet: Fleet) -> None:
    ok = fleet.command_job("echo rendering frame 1; echo rendered")
    broken = fleet.command_job("echo broken scene; exit 3")
    fleet.agent("node-a", idle_exit_seconds=1.0, log_ship_seconds=0.2)
    wait_for(lambda: fleet.backend.is_finished(ok) and fleet.backend.is_finished(broken), 60, "both jobs")

    [done] = fleet.backend.attempts(ok)
    assert done.outcome == "done" and "rendered" in stored_log(fleet, done.figures.log)
    [failed] = fleet.backend.attempts(broken)
    assert failed.outcome == "failed" and "broken scene" in stored_log(fleet, failed.figures.log)
    assert f"(log: {failed.figures.log})" in fleet.task(broken).reason

    printed = cli(fleet, "logs", ok, "000")
    assert printed.returncode == 0 and "rendering frame 1\n" in printed.stdout and "rendered" in printed.stdout, printed
    printed = cli(fleet, "logs", broken, "000", "--attempt", "1")
    assert printed.returncode == 0 and "broken scene" in printed.stdout, printed
    missing = cli(fleet, "logs", broken, "000", "--attempt", "2")
    assert missing.returncode == 2 and "has no attempt 2 (attempts 1)" in missing.stderr, missing


def test_a_drained_attempts_log_is_uploaded_with_its_release(fleet: Fleet, tmp_path: Path) -> None:
    go = tmp_path / "GO"
    job = fleet.command_job(f"echo drained render started; while [ ! -f {go} ]; do sleep 0.05; done")
    agent = fleet.agent("node-a", log_ship_seconds=0.2)
    wait_for(lambda: "drained render started" in fleet.backend.task_log(job, "000").text, 60, "the first line")
    agent.shutdown("the operator stops the node", grace=2.0, cause="released")
    wait_for(lambda: fleet.backend.attempts(job), 60, "the release")
    [released] = fleet.backend.attempts(job)
    assert released.outcome == "released" and "drained render started" in stored_log(fleet, released.figures.log)
    assert fleet.task(job).state == "pending"


def test_an_attempt_that_never_rendered_still_leaves_a_log(fleet: Fleet) -> None:
    job = fleet.command_job("cnode /proj/missing.project -image a -image_frames_list '1'")  # nothing to render
    fleet.agent("node-a", idle_exit_seconds=1.0, env={"PATH": "/usr/bin:/bin"}, node_fault_limit=1)
    wait_for(lambda: fleet.backend.attempts(job), 60, "the attempt to end")
    [attempt] = fleet.backend.attempts(job)
    text = stored_log(fleet, attempt.figures.log)
    assert "attempt 1 on node-a" in text and attempt.outcome in ("released", "failed"), (attempt, text)
    assert f"(log: {attempt.figures.log})" in attempt.reason


def test_follow_prints_a_running_renders_lines_before_it_ends(fleet: Fleet, tmp_path: Path) -> None:
    go = tmp_path / "GO"
    job = fleet.command_job(f"echo line before GO; while [ ! -f {go} ]; do sleep 0.05; done; echo line after GO")
    follower = subprocess.Popen(
        [sys.executable, "-m", "cio_worker", "logs", job, "000", "--follow", "--poll-seconds", "0.2",
         "--queue", fleet.coordinator.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CIO_TOKEN": fleet.token})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        fleet.agent("node-a", log_ship_seconds=0.2)  # started after the follower: it waits for the task
        wait_for(lambda: any("line before GO" in line for line in lines), 60, "the follower to print the first line")
        assert fleet.task(job).state == "leased" and not go.exists()  # still rendering
        go.touch()
        assert follower.wait(60) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    reader.join(10)
    assert any("line after GO" in line for line in lines), lines
    assert "attempt 1 ended: done; its whole log: " + fleet.storage_url in follower.stderr.read()


def test_a_log_location_reads_back_as_a_key_only_under_its_jobs_storage() -> None:
    from cio_worker.storage.base import key_of, object_url

    url = object_url("s3://bucket/jobs/", "_logs/00001/000/1-abcdef12.log")
    assert url == "s3://bucket/jobs/_logs/00001/000/1-abcdef12.log"
    assert key_of("s3://bucket/jobs", url) == "_logs/00001/000/1-abcdef12.log"
    assert key_of("s3://bucket/job", url) is None  # a prefix of the name is not the same storage
    assert key_of("s3://other/jobs", url) is None and key_of("s3://bucket/jobs", "s3://bucket/jobs/") is None
