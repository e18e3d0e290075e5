"""Calls that arrive together go to the queue together (coordinator/batch.py), and the coordinator
gives concurrent claims and completions distinct, correct answers through it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from cio_worker.coordinator.app import CoordinatorConfig, create_app
from cio_worker.coordinator.batch import Batcher
from cio_worker.queue import NewTask, SqliteQueue
from tests.fleet import serving_app
from tests.waiting import wait_for

def raw_post(url: str, path: str, token: str, payload: dict) -> socket.socket:
    """A request sent on a socket of its own, left open for the caller to close unanswered."""
    parts = urlsplit(url)
    body = json.dumps(payload).encode()
    sock = socket.create_connection((parts.hostname, parts.port))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), token.encode(), len(body), body))
    return sock


JOB = {"title": "batch", "project": "default", "storage": "file:///tmp/s", "output_path": "/renders",
       "autoretry_policy": {"preempted": {"max_retries": 3}, "failed": {"max_retries": 1}}}


class SlowMany:
    """A run_many that holds each batch until released, recording what it got."""

    def __init__(self) -> None:
        self.calls: list[list] = []
        self.gate = asyncio.Event()

    async def __call__(self, items):
        self.calls.append(list(items))
        await self.gate.wait()
        return [ValueError(f"bad {i}") if isinstance(i, int) and i < 0 else f"ok {i}" for i in items]


def test_calls_waiting_while_a_batch_runs_go_together_and_errors_reach_only_their_caller() -> None:
    async def main():
        many = SlowMany()
        batcher: Batcher = Batcher(many, max_inflight=1, max_batch=10)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0)  # the first batch (of one) is at the "database"
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in (1, -2, 3, 4)]
        await asyncio.sleep(0)
        many.gate.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        return many.calls, results, batcher.batches

    calls, results, batches = asyncio.run(main())
    assert calls == [[0], [1, -2, 3, 4]] and batches == 2
    assert results[0] == "ok 0" and results[1] == "ok 1" and results[3:] == ["ok 3", "ok 4"]
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad -2"


def test_a_batch_holds_one_key_and_at_most_max_batch_items() -> None:
    async def main():
        many = SlowMany()
        many.gate.set()
        batcher: Batcher = Batcher(many, key=lambda item: item % 2, max_inflight=1, max_batch=2)
        blocker = asyncio.ensure_future(batcher.submit(100))
        await asyncio.sleep(0)
        await asyncio.gather(blocker, *(batcher.submit(i) for i in (1, 2, 3, 5, 7)))
        return many.calls

    calls = asyncio.run(main())
    assert all(len({i % 2 for i in call}) == 1 and len(call) <= 2 for call in calls), calls
    assert sorted(i for call in calls for i in call) == [1, 2, 3, 5, 7, 100]


def test_an_answer_whose_caller_went_away_is_handed_back() -> None:
    async def main():
        many = SlowMany()
        returned: list = []

        async def orphaned(answer):
            returned.append(answer)

        batcher: Batcher = Batcher(many, orphaned=orphaned)
        gone = asyncio.ensure_future(batcher.submit(7))
        await asyncio.sleep(0)
        gone.cancel()  # e.g. the coordinator stops while the claim is at the database
        many.gate.set()
        stays = await batcher.submit(8)
        await asyncio.sleep(0)
        return returned, stays

    returned, stays = asyncio.run(main())
    assert returned == ["ok 7"] and stays == "ok 8"


def test_a_failing_batch_fails_each_of_its_callers_and_the_next_batch_runs() -> None:
    async def main():
        state = {"n": 0}

        async def many(items):
            state["n"] += 1
            if state["n"] == 1:
                raise RuntimeError("database gone")
            return [f"ok {i}" for i in items]

        batcher: Batcher = Batcher(many, max_inflight=1)
        first = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        second = await batcher.submit(3)
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in first) and second == "ok 3"


# -- through a real coordinator -------------------------------------------------------------------


@pytest.fixture
def farm(tmp_path: Path):
    queue = SqliteQueue(tmp_path / "queue.db")
    _, agent = queue.create_token("fleet", ["agent"])
    job = queue.create_job(JOB, [NewTask(str(f), f"cnode -image_frames_list {f}") for f in range(1, 41)])
    app = create_app(queue, CoordinatorConfig(watch_seconds=3600, db_threads=4))
    with serving_app(app) as url:
        yield url, agent, queue, job, app
    queue.close()


def _in_threads(n: int, fn) -> list:
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        with requests.Session() as session:
            barrier.wait()
            results[i] = fn(i, session)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_concurrent_claims_and_completions_each_get_their_own_answer(farm) -> None:
    url, agent, queue, job, app = farm
    headers = {"Authorization": f"Bearer {agent}"}
    n = 24
    for i in range(n):
        assert requests.post(f"{url}/v1/workers/register", json={"worker": f"w{i}", "info": {}}, headers=headers).ok

    def claim(i, session):
        r = session.post(f"{url}/v1/claim", json={"worker": f"w{i}", "wait_seconds": 0}, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["lease"]

    leases = _in_threads(n, claim)
    assert len({lease["task_id"] for lease in leases}) == n
    assert all(lease["worker"] == f"w{i}" for i, lease in enumerate(leases))
    # Every third report names another worker's lease: 409 for it, the others applied.
    def complete(i, session):
        ref = {k: leases[i][k] for k in ("job_id", "task_id", "token", "worker")}
        if i % 3 == 0:
            ref["worker"] = f"w{(i + 1) % n}"
        r = session.post(f"{url}/v1/complete", json={"lease": ref, "op_id": f"op-{i}"}, headers=headers, timeout=30)
        return r.status_code

    statuses = _in_threads(n, complete)
    assert statuses == [409 if i % 3 == 0 else 200 for i in range(n)]
    rows = {r.id: r for r in queue.tasks(job)}
    for i, lease in enumerate(leases):
        assert rows[lease["task_id"]].state == ("leased" if i % 3 == 0 else "done"), i
    done_events = [e for e in queue.events(job) if e.kind == "done"]
    assert len(done_events) == n - len(range(0, n, 3))
    # The same completion resent: applied once, answered alike.
    ref = {k: leases[1][k] for k in ("job_id", "task_id", "token", "worker")}
    again = requests.post(f"{url}/v1/complete", json={"lease": ref, "op_id": "op-1"}, headers=headers, timeout=30)
    assert again.status_code == 200 and len([e for e in queue.events(job) if e.kind == "done"]) == len(done_events)
    # They went to the database in fewer calls than there were requests.
    assert app.state.claims.items == n and app.state.claims.batches < n


@pytest.mark.parametrize("told_by", ["extension", "receive"])
def test_a_long_poll_whose_agent_went_away_leases_nothing_to_it(tmp_path: Path, told_by: str) -> None:
    """An agent that stops (or dies) while its claim waits on the server: the work that arrives
    after goes to an agent still waiting, not to the closed connection (where it would sit until
    its lease expired, an attempt charged to the task). The coordinator's own protocol tells the
    poll of the disconnect (``extension``); under another server, a pending ``receive()`` does."""
    from cio_worker.coordinator.transport import coalescing_protocol

    queue = SqliteQueue(tmp_path / "q.db")
    _, agent = queue.create_token("fleet", ["agent"])
    app = create_app(queue, CoordinatorConfig(watch_seconds=0.2))
    headers = {"Authorization": f"Bearer {agent}"}
    with serving_app(app, **({"http": coalescing_protocol()} if told_by == "extension" else {})) as url:
        for name in ("gone", "waiting"):
            assert requests.post(f"{url}/v1/workers/register", json={"worker": name, "info": {}}, headers=headers).ok
        sock = raw_post(url, "/v1/claim", agent, {"worker": "gone", "wait_seconds": 30})
        time.sleep(0.5)  # the gone agent's claim is first in the line of waiters
        answers: list = []
        waiter = threading.Thread(target=lambda: answers.append(requests.post(
            f"{url}/v1/claim", json={"worker": "waiting", "wait_seconds": 20}, headers=headers, timeout=30)))
        waiter.start()
        time.sleep(0.5)
        sock.close()  # the agent goes away while its claim waits
        time.sleep(0.5)
        job = queue.create_job(JOB, [NewTask("1", "cnode a")])
        waiter.join(30)
        [task] = queue.tasks(job)
        assert answers and answers[0].status_code == 200, answers
        assert answers[0].json()["lease"]["worker"] == "waiting"
        assert task.state == "leased" and task.worker == "waiting"
        assert [e.worker for e in queue.events(job, task.id) if e.kind == "claimed"] == ["waiting"]
    queue.close()


class SlowCompletions(SqliteQueue):
    """Completions that take a while: time for their agent to go away meanwhile."""

    def complete_outcomes(self, reports):
        time.sleep(1.0)
        return super().complete_outcomes(reports)


@contextmanager
def slow_farm(tmp_path: Path) -> Iterator[tuple[SqliteQueue, str, str, str, dict]]:
    """A coordinator on ``SlowCompletions`` (its own protocol: it tells a request of its client
    leaving), a job of two tasks, the first claimed by w1: (queue, agent token, job, url, the
    completion of that task asking for the next)."""
    from cio_worker.coordinator.transport import coalescing_protocol

    queue = SlowCompletions(tmp_path / "q.db")
    _, agent = queue.create_token("fleet", ["agent"])
    job = queue.create_job(JOB, [NewTask("1", "cnode a"), NewTask("2", "cnode b")])
    app = create_app(queue, CoordinatorConfig(watch_seconds=0.2))
    try:
        with serving_app(app, http=coalescing_protocol()) as url:
            lease = requests.post(f"{url}/v1/claim", json={"worker": "w1", "wait_seconds": 0},
                                  headers={"Authorization": f"Bearer {agent}"}, timeout=30).json()["lease"]
            yield queue, agent, job, url, {"lease": {k: lease[k] for k in ("job_id", "task_id", "token", "worker")},
                                           "op_id": "op-1", "next_lease_seconds": 60}
    finally:
        queue.close()


def test_the_next_task_a_completion_claimed_for_an_agent_that_went_away_goes_back(tmp_path: Path) -> None:
    """A completion that also claims the next task, whose agent is gone before the answer: the
    completion stands, and the task claimed with it goes back to pending at no cost (a
    "released" attempt), not left leased to nobody until its lease expires."""
    with slow_farm(tmp_path) as (queue, agent, job, url, body):
        sock = raw_post(url, "/v1/complete", agent, body)
        time.sleep(0.3)
        sock.close()  # gone while its completion (and claim) is at the database
        wait_for(lambda: queue.tasks(job)[1].attempts["released"] == 1, 20, "the next task given back")
        first, second = queue.tasks(job)
        assert first.state == "done"
        assert second.state == "pending" and second.attempts == {"preempted": 0, "failed": 0, "released": 1}
        assert [e.kind for e in queue.events(job, "001")] == ["claimed", "released"]


def test_a_resend_whose_agent_went_away_leaves_the_next_task_with_its_worker(tmp_path: Path) -> None:
    """The first copy of a completion delivered its next task; a resend (replay) whose agent is
    gone before its answer must not give that task back: the worker holds it."""
    with slow_farm(tmp_path) as (queue, agent, job, url, body):
        headers = {"Authorization": f"Bearer {agent}"}
        first = requests.post(f"{url}/v1/complete", json=body, headers=headers, timeout=30).json()
        assert first["next"]["task_id"] == "001" and "replay" not in first
        again = requests.post(f"{url}/v1/complete", json=body, headers=headers, timeout=30).json()
        assert again["next"] == first["next"] and again["replay"] is True
        sock = raw_post(url, "/v1/complete", agent, body)
        time.sleep(0.3)
        sock.close()  # this resend's agent is gone before its answer
        time.sleep(2.0)  # the resend is answered (to nobody) meanwhile
        second = queue.tasks(job)[1]
        assert second.state == "leased" and second.worker == "w1" and second.attempt_count == 0
        assert [e.kind for e in queue.events(job, "001")] == ["claimed"]


def test_an_idle_report_after_a_stop_is_written_at_once(tmp_path: Path) -> None:
    """"idle" from a worker whose last written state was something else is a change of state,
    written before the answer, not left for the watcher's grouped write of still-idle workers."""
    queue = SqliteQueue(tmp_path / "q.db")
    _, agent = queue.create_token("fleet", ["agent"])
    app = create_app(queue, CoordinatorConfig(watch_seconds=3600))  # the watcher writes nothing meanwhile
    headers = {"Authorization": f"Bearer {agent}"}

    def state() -> str:
        [row] = [w for w in queue.workers() if w.id == "w1"]
        return row.state

    with serving_app(app) as url:
        def report(what: str) -> None:
            answer = requests.post(f"{url}/v1/workers/report", json={"worker": "w1", "status": {"state": what}},
                                   headers=headers, timeout=30)
            assert answer.status_code == 200, answer.text

        assert requests.post(f"{url}/v1/workers/register", json={"worker": "w1", "info": {}}, headers=headers).ok
        report("stopped")
        assert state() == "stopped"
        report("idle")
        assert state() == "idle"
        report("draining")
        report("idle")
        assert state() == "idle"
    queue.close()
