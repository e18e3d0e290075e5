"""The agent's part of the fleet, against a real coordinator (``tests.coordinator_faults``) with a
sqlite queue behind it, and real agent loops on threads running real commands:

- registration: the worker shows in ``workers()`` with its instance identity, and stopped at exit;
- status: heartbeats carry what the task is doing (rendering with the render's percent, draining);
- long-poll claims, and heartbeat/lease lengths that follow what the coordinator says;
- the durable outbox: a report made while the coordinator is down is delivered once when it comes
  back (by the same agent, or by a new one on the same work dir); a report whose answer was lost
  is applied once; a report on a lease lost meanwhile is dropped with one line;
- heartbeats failing for less than a lease leave the render alone; for longer, the render stops
  and nothing is reported.

Commands that must wait for the test run ``while [ ! -f GO ]; do sleep 0.05; done``. No test
asserts a wall-clock duration; waits have generous timeouts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import psutil
import pytest

from cio_worker.artist.submit import submit_job
from cio_worker.coordinator.app import CoordinatorConfig
from cio_worker.errors import QueueError
from cio_worker.job.document import JobInfo, RetryPolicy
from cio_worker.job.paths import PathMap
from cio_worker.node.agent import Agent, AgentConfig
from cio_worker.node.execution import ExecutionContext
from cio_worker.node.identity import read_identity
from cio_worker.node.outbox import Outbox
from cio_worker.node.preemption import Notice, PreemptionConfig
from cio_worker.node.runner import ProcessRunner
from cio_worker.queue import NewTask, SqliteQueue
from cio_worker.queue.http import HttpQueue
from cio_worker.sim.metadata_server import MetadataServer
from cio_worker.sim.shim import install_cnode_shim
from cio_worker.storage import open_storage
from tests.coordinator_faults import Coordinator
from tests.shots import make_shot
from tests.waiting import wait_for


class Fleet:
    """A sqlite queue behind a restartable coordinator; agents on threads, each on its node dir."""

    def __init__(self, tmp: Path, **coordinator: float) -> None:
        self.tmp = tmp
        self.backend = SqliteQueue(tmp / "queue.db")
        _, self.token = self.backend.create_token("tests", ["agent", "owner"])
        settings = {"lease_seconds": 30.0, "heartbeat_seconds": 0.2, "long_poll_seconds": 1.0, "watch_seconds": 0.2,
                    **coordinator}
        self.coordinator = Coordinator(self.backend, CoordinatorConfig(**settings)).start()
        self.storage_url = f"file://{tmp / 'storage'}"
        self.bin = tmp / "bin"
        install_cnode_shim(self.bin)
        self.env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("CNODE_SIM_IGNORE_SIGTERM", None)
        self.clients: list[HttpQueue] = []
        self.threads: list[tuple[Agent, threading.Thread]] = []

    # jobs

    def command_job(self, command: str, frames: str = "1") -> str:
        job = JobInfo(id="00000", title="fleet", project="default", storage=self.storage_url,
                      output_path="C:/proj/renders", autoretry_policy=RetryPolicy(preempted=2, failed=0))
        return self.backend.create_job(job, [NewTask(frames, command)])

    def shot_job(self, **shot) -> str:
        made = make_shot(self.tmp / "shot", **shot)
        return submit_job(made.spec, queue=self.backend, storage=open_storage(self.storage_url),
                          storage_url=self.storage_url, path_map=PathMap.rooted(str(made.root))).job_id

    def task(self, job: str, task: str = "000"):
        return next(t for t in self.backend.tasks(job) if t.id == task)

    def kinds(self, job: str) -> list[tuple[str, str]]:
        return [(e.kind, e.worker) for e in self.backend.events(job, "000")]

    def worker(self, name: str):
        return next((w for w in self.backend.workers() if w.id == name), None)

    # agents

    def client(self, queue_class=HttpQueue, **kw) -> HttpQueue:
        kw.setdefault("retry_seconds", 0.3)
        client = queue_class(self.coordinator.url, self.token, **kw)
        self.clients.append(client)
        return client

    def agent(self, node: str, *, queue=None, worker: str | None = None, env: dict | None = None,
              identity=None, outbox_class=None, start: bool = True, **config) -> Agent:
        where = self.tmp / node
        where.mkdir(exist_ok=True)
        ctx = ExecutionContext(work_root=where / "work", open_storage=open_storage, runner=ProcessRunner(),
                               path_map=PathMap.rooted(str(where / "root")), base_env={**self.env, **(env or {})},
                               kill_grace=3.0)
        settings = {"poll_seconds": 0.1, "outbox_retry_seconds": 0.2, "report_retry_seconds": 0.2,
                    "exit_report_seconds": 2.0, **config}
        agent = Agent(AgentConfig(worker_id=worker or node, **settings), queue or self.client(), ctx,
                      identity=identity, outbox=outbox_class and outbox_class(where / "work" / "outbox"))
        if start:
            self.run(agent)
        return agent

    def run(self, agent: Agent) -> threading.Thread:
        thread = threading.Thread(target=agent.run, name=f"agent-{agent.config.worker_id}", daemon=True)
        thread.start()
        self.threads.append((agent, thread))
        return thread

    def finish(self, agent: Agent, timeout: float = 30.0) -> None:
        agent.stop_claiming("the test is over")
        thread = next(t for a, t in self.threads if a is agent)
        thread.join(timeout)
        assert not thread.is_alive(), "the agent did not stop"

    def outbox(self, node: str) -> list[Path]:
        box = self.tmp / node / "work" / "outbox"
        return sorted(box.glob("*.json")) if box.is_dir() else []

    def close(self) -> list[str]:
        problems = []
        for agent, thread in self.threads:
            agent.shutdown("the test is over", grace=1.0)
            thread.join(30)
            if thread.is_alive():
                problems.append(f"agent {agent.config.worker_id} still running")
        for client in self.clients:
            client.close()
        self.coordinator.stop()
        self.backend.close()
        return problems


@pytest.fixture
def make_fleet(tmp_path: Path):
    """``make_fleet(**coordinator_settings)``: the fleet, closed (and checked) after the test."""
    made: list[Fleet] = []

    def make(**coordinator: float) -> Fleet:
        made.append(Fleet(tmp_path, **coordinator))
        return made[-1]

    yield make
    problems = [p for f in made for p in f.close()]
    assert not problems, problems


@pytest.fixture
def fleet(make_fleet) -> Fleet:
    return make_fleet()


def gated(tmp: Path, name: str = "GO", pid_file: Path | None = None) -> tuple[str, Path]:
    """A command that runs until the file ``name`` appears (and writes its pid first)."""
    go = tmp / name
    pid = f"echo $$ > {pid_file}; " if pid_file else ""
    return f"{pid}while [ ! -f {go} ]; do sleep 0.05; done; echo rendered", go


# ------------------------------------------------------------------ registration and status


def test_an_agent_registers_with_its_identity_and_reports_itself_stopped(fleet) -> None:
    with MetadataServer(providers=["gce"]) as md:
        identity = read_identity(PreemptionConfig(provider="gce", gce_url=md.url))
    assert identity.provider == "gce"
    agent = fleet.agent("node-a", identity=identity)
    row = wait_for(lambda: fleet.worker("node-a"), 20, "the worker to register")
    assert row.info == identity.to_dict()
    assert row.state == "idle" and row.job_id is None
    fleet.finish(agent)
    row = fleet.worker("node-a")
    assert row.state == "stopped" and row.detail == agent.summary.exit_reason
    assert row.info["instance_id"] == md.identity.gce_id and row.info["machine_type"] == md.identity.machine_type


def test_a_queue_that_refuses_registration_and_status_does_not_stop_the_agent(fleet, caplog) -> None:
    class Refusing(HttpQueue):
        def register_worker(self, worker, info):
            raise QueueError("registration is down", code="queue_unavailable")

        def worker_report(self, worker, status):
            raise QueueError("reports are down", code="queue_unavailable")

    caplog.set_level(logging.INFO, logger="cio_worker.node.agent")
    job = fleet.command_job("echo rendered")
    agent = fleet.agent("node-a", queue=fleet.client(Refusing))
    wait_for(lambda: fleet.task(job).state == "done", 30, "the task to be done")
    fleet.finish(agent)
    assert agent.summary.done == 1 and agent.summary.exit_reason == "stopped taking work after a notice"
    text = caplog.text
    assert "registering worker node-a failed" in text and "reporting worker node-a stopped failed" in text


def test_the_workers_status_follows_the_task_with_the_renders_progress(fleet) -> None:
    job = fleet.shot_job(frames="1-6", chunk_size=6)
    agent = fleet.agent("node-a", env={"CNODE_SIM_FRAME_SECONDS": "0.4"})
    seen: list[tuple[str, float | None, str | None]] = []

    def look() -> bool:
        row = fleet.worker("node-a")
        if row is not None and (not seen or seen[-1] != (row.state, row.progress, row.task_id)):
            seen.append((row.state, row.progress, row.task_id))
        return fleet.task(job).state == "done"

    wait_for(look, 60, "the task to be done", poll=0.02)
    wait_for(lambda: look() and fleet.worker("node-a").state == "idle", 10, "the worker to be idle")
    rendering = [p for state, p, task in seen if state == "rendering"]
    assert rendering, seen
    assert any(p is not None and 0 < p < 100 for p in rendering), seen
    numbers = [p for p in rendering if p is not None]
    assert numbers == sorted(numbers)  # the render's percent only goes forward
    assert all(task == "000" for state, _, task in seen if state in ("syncing", "rendering", "uploading"))
    assert {state for state, _, _ in seen} <= {"idle", "syncing", "rendering", "uploading"}
    fleet.finish(agent)
    assert fleet.worker("node-a").state == "stopped"


def test_a_draining_worker_says_so(fleet) -> None:
    job = fleet.shot_job(frames="1-30", chunk_size=30)
    agent = fleet.agent("node-a", stop_grace=3.0,
                        env={"CNODE_SIM_FRAME_SECONDS": "0.4", "CNODE_SIM_IGNORE_SIGTERM": "1"})
    wait_for(lambda: (w := fleet.worker("node-a")) and w.state == "rendering" and (w.progress or 0) > 0, 60,
             "the render to make progress")
    now = time.time()
    agent.on_notice(Notice("preempt", "gce", now, now + 12, "test notice"))
    row = wait_for(lambda: (w := fleet.worker("node-a")) and w.state == "draining" and w, 10, "a draining status")
    assert "notice" in row.detail
    wait_for(lambda: fleet.task(job).state == "pending", 20, "the task to be released")
    assert fleet.task(job).attempts["preempted"] == 1


# ------------------------------------------------------------------ claims and settings


class CountingQueue(HttpQueue):
    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.waits: list[float] = []

    def claim(self, worker, lease_seconds, wait=0.0):
        self.waits.append(wait)
        return super().claim(worker, lease_seconds, wait=wait)


def test_an_idle_agent_waits_on_the_coordinator_instead_of_polling(make_fleet) -> None:
    fleet = make_fleet(long_poll_seconds=3.0)
    client = fleet.client(CountingQueue)
    # Were it to poll, the agent would sleep a minute between empty claims.
    agent = fleet.agent("node-a", queue=client, poll_seconds=60.0, long_poll_seconds=25.0)
    wait_for(lambda: client.waits, 20, "the first claim")
    job = fleet.command_job("echo rendered")
    wait_for(lambda: fleet.task(job).state == "done", 20, "the task to be claimed and done")
    assert client.waits and all(w == 3.0 for w in client.waits)  # the coordinator's long poll, not the default
    fleet.finish(agent, timeout=15)  # a stop does not wait for the poll to end


def test_a_stop_during_a_long_poll_gives_a_late_task_back_untouched(make_fleet) -> None:
    fleet = make_fleet(long_poll_seconds=5.0)
    client = fleet.client(CountingQueue)
    agent = fleet.agent("node-a", queue=client, poll_seconds=60.0)
    wait_for(lambda: client.waits, 20, "a claim to wait on the coordinator")
    time.sleep(0.3)
    fleet.finish(agent, timeout=15)  # the claim is still held by the coordinator
    job = fleet.command_job("echo rendered")  # ... and brings this task after the agent stopped
    wait_for(lambda: fleet.task(job).attempts["released"] == 1, 20, "the late lease to be given back")
    task = fleet.task(job)
    assert task.state == "pending" and task.attempts["preempted"] == 0 and task.attempts["failed"] == 0


class NextCounting(CountingQueue):
    """Counts completions that asked for the next task; ``then()`` runs when one brings a lease."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.next_asked: list[str] = []  # the task of each completion that asked for the next
        self.then = None

    def complete(self, lease, download=None, op_id=None, figures=None, next_lease_seconds=None):
        following = super().complete(lease, download, op_id, figures, next_lease_seconds)
        if next_lease_seconds is not None:
            self.next_asked.append(lease.task_id)
            if following is not None and self.then is not None:
                self.then()
        return following


def test_a_busy_agent_claims_each_next_task_with_its_completion(fleet) -> None:
    """One request per task to the coordinator, not two: the first claim is the only one."""
    job = fleet.backend.create_job(
        JobInfo(id="00000", title="fleet", project="default", storage=fleet.storage_url, output_path="C:/proj/renders"),
        [NewTask(str(frame), "echo rendered") for frame in (1, 2, 3)])
    client = fleet.client(NextCounting)
    agent = fleet.agent("node-a", queue=client, max_tasks=3)
    wait_for(lambda: all(t.state == "done" for t in fleet.backend.tasks(job)), 30, "the three tasks")
    fleet.threads[0][1].join(30)
    assert agent.summary.done == 3 and agent.summary.exit_reason == "ran 3 tasks"
    assert len(client.waits) == 1  # one claim; the completions brought the other two tasks
    assert client.next_asked == ["000", "001"]  # the third ended the agent's run: it asked for none
    for task in ("000", "001", "002"):
        assert [(e.kind, e.worker) for e in fleet.backend.events(job, task)] == [("claimed", "node-a"), ("done", "node-a")]


@pytest.mark.parametrize("stop", ["shutdown", "soft notice"])
def test_a_next_task_that_arrives_as_the_agent_stops_is_given_back_untouched(fleet, stop: str) -> None:
    """A stop between the completion that brought the next task and its start: nothing of it runs,
    and it goes back at no cost to it, as a claim that crossed a stop does."""
    job = fleet.backend.create_job(
        JobInfo(id="00000", title="fleet", project="default", storage=fleet.storage_url, output_path="C:/proj/renders"),
        [NewTask("1", "echo rendered"), NewTask("2", f"touch {fleet.tmp / 'RAN'}")])
    client = fleet.client(NextCounting)
    agent = fleet.agent("node-a", queue=client, start=False)
    client.then = (lambda: agent.shutdown("a notice")) if stop == "shutdown" else (lambda: agent.stop_claiming("a notice"))
    thread = fleet.run(agent)
    thread.join(30)
    assert not thread.is_alive()
    first, second = fleet.backend.tasks(job)
    assert first.state == "done" and client.next_asked == ["000"]
    assert second.state == "pending" and second.attempts == {"preempted": 0, "failed": 0, "released": 1}
    assert [e.kind for e in fleet.backend.events(job, "001")] == ["claimed", "released"]
    assert not (fleet.tmp / "RAN").exists()


def test_a_sqlite_queue_is_polled_as_before(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    try:
        queue = SqliteQueue(tmp_path / "queue.db")
        job = fleet.command_job("echo rendered")
        agent = fleet.agent("node-a", queue=queue, idle_exit_seconds=0.5)
        wait_for(lambda: not fleet.threads[0][1].is_alive(), 30, "the agent to exit idle")
        assert fleet.task(job).state == "done" and agent.summary.done == 1
        assert fleet.worker("node-a").state == "stopped"
        queue.close()
    finally:
        assert not fleet.close()


def test_the_lease_and_the_heartbeats_follow_the_coordinator(make_fleet, tmp_path: Path) -> None:
    fleet = make_fleet(lease_seconds=3.0, heartbeat_seconds=0.2)
    command, go = gated(tmp_path)
    job = fleet.command_job(command)
    # The agent's own figures would never heartbeat within the task (and hold a 10-minute lease).
    agent = fleet.agent("node-a", lease_seconds=600.0, heartbeat_seconds=300.0)
    wait_for(lambda: fleet.task(job).state == "leased", 20, "the claim")
    seen_leases = []
    end = time.monotonic() + 4.0  # longer than the coordinator's lease
    while time.monotonic() < end:
        task = fleet.task(job)
        assert task.state == "leased"
        seen_leases.append(task.lease_expires - time.time())
        time.sleep(0.1)
    assert max(seen_leases) <= 3.5
    go.touch()
    wait_for(lambda: fleet.task(job).state == "done" and agent.summary.outcomes, 20, "the task to be done")
    assert ("lease_expired", "node-a") not in fleet.kinds(job)
    assert agent.summary.outcomes == [(job, "000", "done")]


# ------------------------------------------------------------------ the outbox


def test_a_report_made_while_the_coordinator_is_down_is_delivered_once_when_it_returns(fleet, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="cio_worker.node.agent")
    command, go = gated(tmp_path)
    job = fleet.command_job(command)
    agent = fleet.agent("node-a")
    wait_for(lambda: (w := fleet.worker("node-a")) and w.state == "rendering", 20, "the render")
    fleet.coordinator.stop()
    go.touch()  # the render ends; its report meets a coordinator that is down
    wait_for(lambda: agent.summary.deferred == 1, 20, "the report to be deferred")
    [waiting] = fleet.outbox("node-a")
    assert fleet.task(job).state == "leased"
    assert "waits in the outbox" in caplog.text
    fleet.coordinator.start()  # same address
    # The agent counts the delivery once the queue has answered: wait for that too.
    wait_for(lambda: fleet.task(job).state == "done" and not fleet.outbox("node-a") and agent.summary.done,
             20, "the delivery")
    assert [k for k in fleet.kinds(job) if k[0] == "done"] == [("done", "node-a")]
    assert agent.summary.redelivered == 1 and agent.summary.done == 1
    assert agent.summary.outcomes == [(job, "000", "deferred")]
    assert waiting.stem in caplog.text  # the delivery names the op id
    fleet.finish(agent)


def test_a_flush_as_a_report_is_written_leaves_it_to_the_agent_and_it_is_counted_once(fleet) -> None:
    # The background flush runs at the worst moment: right after the report's file appears, before
    # the agent sends it. It must leave that report alone (the agent is sending it), or the task is
    # delivered twice and counted done twice (seen in CI: done=17 of 16 tasks).
    flushes = []

    class FlushAfterPut(Outbox):
        def put(self, report):
            path = super().put(report)
            flushes.append(self.flush(fleet.backend))
            return path

    job = fleet.command_job("echo rendered")
    agent = fleet.agent("node-a", outbox_class=FlushAfterPut, idle_exit_seconds=1.0)
    fleet.threads[0][1].join(30)
    assert not fleet.threads[0][1].is_alive()
    assert flushes and all(not f.delivered and f.error is None for f in flushes)
    assert fleet.task(job).state == "done"
    assert agent.summary.done == 1 and agent.summary.redelivered == 0 and agent.summary.tasks == 1
    assert not fleet.outbox("node-a")


def test_a_report_left_in_the_outbox_is_delivered_by_the_next_agent_on_the_work_dir(fleet, tmp_path) -> None:
    command, go = gated(tmp_path)
    job = fleet.command_job(command)
    first = fleet.agent("node-a", max_tasks=1)
    wait_for(lambda: (w := fleet.worker("node-a")) and w.state == "rendering", 20, "the render")
    fleet.coordinator.stop()
    go.touch()
    fleet.threads[0][1].join(30)  # it ran its one task and exited, the report undelivered
    assert not fleet.threads[0][1].is_alive() and first.summary.deferred == 1
    assert len(fleet.outbox("node-a")) == 1
    fleet.coordinator.start()
    assert fleet.task(job).state == "leased"
    # systemd starts the agent again on the same node: it sends what its predecessor could not
    second = fleet.agent("node-a", idle_exit_seconds=1.0)
    fleet.threads[1][1].join(30)
    assert not fleet.threads[1][1].is_alive()
    assert second.summary.redelivered == 1 and not fleet.outbox("node-a")
    assert fleet.task(job).state == "done"
    assert [k for k in fleet.kinds(job) if k[0] == "done"] == [("done", "node-a")]
    assert len(fleet.backend.downloads(job, state=None)) <= 1


class LosingAnswers(HttpQueue):
    """The coordinator applies each of the first ``lose`` completes, and its answer is lost."""

    def __init__(self, *args, lose: int = 1, **kw) -> None:
        super().__init__(*args, **kw)
        self.lose = lose
        self.op_ids: list[str | None] = []

    def complete(self, lease, download=None, op_id=None):
        self.op_ids.append(op_id)
        super().complete(lease, download, op_id=op_id)
        if self.lose > 0:
            self.lose -= 1
            raise QueueError("the connection dropped before the answer", code="queue_unavailable")


@pytest.mark.parametrize("lose", [1, 20])
def test_a_report_whose_answer_was_lost_is_applied_once(fleet, lose: int) -> None:
    """Lost once: the in-line retry resends it; lost for longer: the outbox does. Same op id each time."""
    job = fleet.command_job("echo rendered")
    client = fleet.client(LosingAnswers, lose=lose)
    agent = fleet.agent("node-a", queue=client, report_retry_seconds=0.3 if lose == 1 else 0.0)
    wait_for(lambda: len(client.op_ids) > lose and not fleet.outbox("node-a"), 30, "the report to be answered")
    assert len(set(client.op_ids)) == 1
    assert [k for k in fleet.kinds(job) if k[0] == "done"] == [("done", "node-a")]
    assert fleet.task(job).state == "done" and len(fleet.backend.downloads(job, state=None)) <= 1
    fleet.finish(agent)


def test_a_report_on_a_lease_lost_meanwhile_is_dropped_with_one_line(fleet, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    command, go = gated(tmp_path)
    job = fleet.command_job(command)
    first = fleet.agent("node-a", max_tasks=1)
    wait_for(lambda: fleet.task(job).state == "leased", 20, "the claim")
    fleet.coordinator.stop()
    go.touch()
    fleet.threads[0][1].join(30)
    assert first.summary.deferred == 1
    [waiting] = fleet.outbox("node-a")
    op_id = waiting.stem
    # the lease runs out while the coordinator is down; another node gets the task
    ahead = SqliteQueue(tmp_path / "queue.db", clock=lambda: time.time() + 3600)
    other = ahead.claim("node-b", 30)
    ahead.close()
    assert other is not None and other.task_id == "000"
    fleet.coordinator.start()
    second = fleet.agent("node-a", idle_exit_seconds=0.5)
    fleet.threads[1][1].join(30)
    assert second.summary.dropped_reports == 1 and not fleet.outbox("node-a")
    lines = [r.getMessage() for r in caplog.records if op_id in r.getMessage() and "dropped" in r.getMessage()]
    assert len(lines) == 1 and f"job {job} task 000" in lines[0]
    assert ("done", "node-a") not in fleet.kinds(job)
    assert fleet.task(job).state == "leased" and fleet.task(job).worker == "node-b"


# ------------------------------------------------------------------ heartbeats that fail


def test_heartbeats_failing_for_less_than_a_lease_leave_the_render_alone(make_fleet, tmp_path, caplog) -> None:
    fleet = make_fleet(lease_seconds=6.0, heartbeat_seconds=0.2)
    caplog.set_level(logging.INFO, logger="cio_worker.node.agent")
    command, go = gated(tmp_path)
    job = fleet.command_job(command)
    agent = fleet.agent("node-a")
    wait_for(lambda: (w := fleet.worker("node-a")) and w.state == "rendering", 20, "the render")
    fleet.coordinator.stop()
    wait_for(lambda: caplog.text.count("heartbeat failed") >= 3, 20, "heartbeats to fail")
    fleet.coordinator.start()
    wait_for(lambda: "heartbeats get through again" in caplog.text, 20, "a heartbeat to get through")
    go.touch()
    # The queue says done as soon as the report lands; the agent notes it a moment later.
    wait_for(lambda: fleet.task(job).state == "done" and agent.summary.outcomes, 20, "the task to be done")
    assert agent.summary.lost == 0 and agent.summary.outcomes == [(job, "000", "done")]
    assert ("lease_expired", "node-a") not in fleet.kinds(job)
    assert "presumed lost" not in caplog.text
    fleet.finish(agent)


def test_heartbeats_failing_for_longer_than_a_lease_stop_the_render_and_nothing_is_reported(make_fleet, tmp_path) -> None:
    fleet = make_fleet(lease_seconds=1.5, heartbeat_seconds=0.2)
    pid_file = tmp_path / "render.pid"
    command, go = gated(tmp_path, pid_file=pid_file)
    job = fleet.command_job(command)
    agent = fleet.agent("node-a", max_tasks=1)
    wait_for(lambda: (w := fleet.worker("node-a")) and w.state == "rendering", 20, "the render")
    render = psutil.Process(int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10, "the pid")))
    fleet.coordinator.stop()
    wait_for(lambda: agent.summary.lost == 1, 20, "the lease to be presumed lost")
    fleet.threads[0][1].join(30)
    assert not fleet.threads[0][1].is_alive()
    assert not render.is_running() or render.status() == psutil.STATUS_ZOMBIE
    assert agent.summary.outcomes == [(job, "000", "lost")]
    assert agent.summary.deferred == 0 and not fleet.outbox("node-a")  # nothing to deliver later
    fleet.coordinator.start()  # it reaps the expired lease: the task runs again elsewhere
    wait_for(lambda: fleet.task(job).state == "pending", 20, "the lease to be reaped")
    kinds = fleet.kinds(job)
    assert ("lease_expired", "node-a") in kinds
    assert [k for k in kinds if k[1] == "node-a" and k[0] in ("done", "failed", "preempted", "released")] == []


def test_an_agent_whose_coordinator_is_gone_still_reaches_its_idle_exit(make_fleet) -> None:
    """An instance whose coordinator went away after it started must not bill on: with nothing to
    do and no queue to ask, it is idle, and its idle exit comes."""
    fleet = make_fleet()
    agent = fleet.agent("node-a", idle_exit_seconds=2.0)
    wait_for(lambda: fleet.worker("node-a") is not None and fleet.worker("node-a").state == "idle", 20,
             "the agent to register")
    fleet.coordinator.stop()
    thread = fleet.threads[0][1]
    wait_for(lambda: not thread.is_alive(), 60, "the agent to reach its idle exit")
    assert agent.summary.exit_reason.startswith("idle for"), agent.summary.exit_reason
