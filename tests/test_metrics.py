"""The coordinator's ``/metrics`` as Prometheus scrapes it: a real coordinator on 127.0.0.1, real
claims and reports over HTTP, the page parsed by prometheus_client's own parser. Tasks and workers
by state follow the queue; claims, their latency and waits, completions, failures, releases,
retries and expired leases follow what agents did (a report resent after a lost answer, once);
requests are counted by route template and status. Two apps in one process count apart; a scrape
storm costs one count of the queue."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cio_worker.coordinator.app import CoordinatorConfig, create_app
from cio_worker.coordinator.metrics import QueueCollector
from cio_worker.errors import QueueError
from cio_worker.queue import NewTask, SqliteQueue, open_queue
from cio_worker.queue.base import AttemptFigures, Lease, WorkerStatus
from cio_worker.queue.http import HttpQueue
from tests.fleet import JOB, CoordinatorProxy, serving_app
from tests.waiting import wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Agent:
    """An agent's calls over HTTP, with its token."""

    def __init__(self, url: str, token: str, worker: str) -> None:
        self.url, self.worker = url, worker
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def post(self, path: str, body: dict) -> requests.Response:
        return self.session.post(self.url + path, json=body, timeout=30)

    def claim(self, wait: float = 0, **extra: Any) -> dict | None:
        response = self.post("/v1/claim", {"worker": self.worker, "wait_seconds": wait, **extra})
        assert response.status_code in (200, 204), response.text
        return response.json()["lease"] if response.status_code == 200 else None

    def report(self, path: str, lease: dict, **extra: Any) -> str:
        ref = {k: lease[k] for k in ("job_id", "task_id", "token", "worker")}
        response = self.post(path, {"lease": ref, **extra})
        assert response.status_code == 200, response.text
        return response.json()["state"]


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[tuple[str, SqliteQueue, Any, dict[str, str]]]:
    """A coordinator over a sqlite queue with one job of four tasks; tokens by scope. Counts are
    read on every scrape (no cache), and only a report or a submit wakes a waiting claim."""
    queue = SqliteQueue(tmp_path / "queue.db")
    tokens = {scope: queue.create_token(scope, [scope])[1] for scope in ("agent", "owner")}
    queue.create_job(JOB, [NewTask(str(f), f"cnode -image_frames_list {f}") for f in (1, 2, 3, 4)])
    app = create_app(queue, CoordinatorConfig(watch_seconds=3600, token_cache_seconds=0, metrics_cache_seconds=0))
    with serving_app(app) as url:
        yield url, queue, app, tokens
    queue.close()


def test_a_scrape_follows_the_farms_claims_and_reports(farm) -> None:
    url, queue, app, tokens = farm
    before = scrape(url)
    assert value(before, "cio_tasks", state="pending") == 4 and value(before, "cio_tasks", state="done") == 0
    assert value(before, "cio_queue_readable") == 1
    assert value(before, "cio_claims_total", outcome="leased") == 0

    agent = Agent(url, tokens["agent"], "w-a")
    assert agent.post("/v1/workers/register", {"worker": "w-a", "info": {}}).status_code == 200
    first, second, third, fourth = (agent.claim() for _ in range(4))
    assert agent.report("/v1/complete", first, op_id="c1") == "done"
    assert agent.report("/v1/fail", second, reason="boom", op_id="f1") == "pending"
    assert agent.report("/v1/release", third, cause="preempted", op_id="r1") == "pending"
    again, once_more = agent.claim(), agent.claim()
    assert {again["task_id"], once_more["task_id"]} == {second["task_id"], third["task_id"]}
    assert agent.report("/v1/release", once_more, cause="released", op_id="r2") == "pending"
    last = agent.claim(lease_seconds=0.2)
    assert agent.claim() is None  # nothing left: answered at once
    assert agent.claim(wait=0.3) is None  # waits out its poll on the server
    assert requests.get(url + "/v1/jobs/99999", headers={"Authorization": f"Bearer {tokens['owner']}"},
                        timeout=30).status_code == 404
    assert requests.post(url + "/v1/claim", json={"worker": "w-a"}, timeout=30).status_code == 401
    assert requests.get(url + "/no/such/page", timeout=30).status_code == 404

    after = scrape(url)
    assert value(after, "cio_tasks", state="done") == 1
    assert value(after, "cio_tasks", state="leased") == 3  # fourth, again and last
    assert value(after, "cio_tasks", state="pending") == 0
    assert value(after, "cio_workers", state="syncing") == 1  # the worker's state since its last claim
    assert value(after, "cio_claims_total", outcome="leased") == 7
    assert value(after, "cio_claims_total", outcome="empty") == 2
    assert value(after, "cio_claim_seconds_count") == 7
    assert value(after, "cio_claim_wait_seconds_count", outcome="empty") == 1  # only the long poll waited
    assert value(after, "cio_completions_total") == 1
    assert value(after, "cio_failures_total", outcome="retry") == 1
    assert value(after, "cio_failures_total", outcome="final") == 0
    assert value(after, "cio_releases_total", cause="preempted", outcome="retry") == 1
    assert value(after, "cio_releases_total", cause="released", outcome="retry") == 1
    assert value(after, "cio_retries_total", cause="failed") == 1
    assert value(after, "cio_retries_total", cause="preempted") == 1
    assert value(after, "cio_retries_total", cause="released") == 1
    requests_total = "cio_http_requests_total"
    assert value(after, requests_total, route="/v1/claim", method="POST", status="200") == 7
    assert value(after, requests_total, route="/v1/claim", method="POST", status="204") == 2
    assert value(after, requests_total, route="/v1/claim", method="POST", status="401") == 1
    assert value(after, requests_total, route="/v1/fail", method="POST", status="200") == 1
    assert value(after, requests_total, route="/v1/jobs/{job_id}", method="GET", status="404") == 1  # the template, not the id
    assert value(after, requests_total, route="unmatched", method="GET", status="404") == 1
    assert value(after, requests_total, route="/metrics", method="GET", status="200") == 1  # the first scrape
    assert value(after, "cio_http_request_seconds_count", route="/v1/claim") == 10
    assert value(after, "cio_leases_expired_total") == 0

    # The short lease runs out; a reap sends it back, and the scrape says so.
    wait_for(lambda: agent.post("/v1/reap", {}).json()["reaped"] == 1, 30, "the short lease to be reaped")
    reaped = scrape(url)
    assert value(reaped, "cio_leases_expired_total") == 1
    assert value(reaped, "cio_tasks", state="pending") == 1 and value(reaped, "cio_tasks", state="leased") == 2
    assert last["task_id"] in {t.id for t in queue.tasks(last["job_id"]) if t.state == "pending"}


REPORTS = ("/v1/complete", "/v1/fail", "/v1/release")
FIGURES = AttemptFigures(wall_seconds=120.0, sync_bytes=5_000_000, upload_bytes=700_000, drain_seconds=4.0,
                         cost=0.0125, currency="USD", storage_scheme="s3")


class FirstAnswersLost(CoordinatorProxy):
    """Forwards every request; of each report route, the first is applied by the coordinator and
    its answer dropped (a reset), so the agent resends the same report (the same op id)."""

    def draw(self, method: str, path: str) -> str | None:
        with self.lock:
            if path not in REPORTS or self.injected[path]:
                return None
            self.injected[path] += 1
        return "drop_response"


def test_a_report_resent_after_its_answer_was_lost_counts_once(farm) -> None:
    url, queue, _, tokens = farm
    proxy = FirstAnswersLost(url)
    agent = HttpQueue(proxy.url, tokens["agent"], sleep=lambda _: None)  # resends at once
    try:
        agent.register_worker("w-a", {})
        done, failed, released = (agent.claim("w-a", 600) for _ in range(3))
        agent.complete(done, None, None, FIGURES)
        assert agent.fail(failed, "boom", None, FIGURES) == "pending"
        assert agent.release(released, "preempted", figures=FIGURES) == "pending"
    finally:
        agent.close()
        proxy.stop()
    for path in REPORTS:  # each report reached the coordinator twice, alike, the first answer lost
        first, resent = proxy.bodies(path)
        assert first.body == resent.body and proxy.injected[path] == 1
    assert sorted(a.outcome for a in queue.attempts(done.job_id)) == ["done", "failed", "preempted"]

    seen = scrape(url)
    for path in REPORTS:
        assert value(seen, "cio_http_requests_total", route=path, method="POST", status="200") == 2
    assert value(seen, "cio_completions_total") == 1
    assert value(seen, "cio_failures_total", outcome="retry") == 1
    assert value(seen, "cio_releases_total", cause="preempted", outcome="retry") == 1
    assert value(seen, "cio_retries_total", cause="failed") == 1
    assert value(seen, "cio_retries_total", cause="preempted") == 1
    for outcome in ("done", "failed", "preempted"):
        assert value(seen, "cio_attempt_wall_seconds_count", outcome=outcome) == 1, outcome
        assert value(seen, "cio_agent_drain_seconds_count", outcome=outcome) == 1, outcome
    assert value(seen, "cio_agent_bytes_synced_total", scheme="s3") == 3 * FIGURES.sync_bytes
    assert value(seen, "cio_agent_bytes_uploaded_total", scheme="s3") == 3 * FIGURES.upload_bytes
    assert value(seen, "cio_attempt_cost_total", currency="USD") == pytest.approx(3 * FIGURES.cost)


def test_a_resent_report_wakes_no_waiting_claim(farm) -> None:
    """A fail or release resent after a lost answer sends no task back, so a long poll waiting
    for work is not woken (woken, it would ask the queue again for nothing)."""
    url, _, app, tokens = farm
    agent = Agent(url, tokens["agent"], "w-a")
    assert agent.post("/v1/workers/register", {"worker": "w-a", "info": {}}).status_code == 200
    leases = [agent.claim() for _ in range(4)]
    assert agent.report("/v1/fail", leases[0], reason="boom", op_id="f1") == "pending"
    assert agent.report("/v1/release", leases[1], cause="preempted", op_id="r1") == "pending"
    assert agent.claim() is not None and agent.claim() is not None  # both tasks are at work again
    assert agent.claim() is None  # the queue is empty: a long poll now waits without asking it
    asked = app.state.claims.items
    polls: list[dict | None] = []
    waiter = threading.Thread(target=lambda: polls.append(Agent(url, tokens["agent"], "w-a").claim(wait=2)))
    waiter.start()
    try:
        wait_for(lambda: app.state.signal.waiting == 1, 30, "the long poll to wait")
        assert agent.report("/v1/fail", leases[0], reason="boom", op_id="f1") == "pending"  # resent
        assert agent.report("/v1/release", leases[1], cause="preempted", op_id="r1") == "pending"
    finally:
        waiter.join(60)
    assert polls == [None]
    assert app.state.claims.items == asked  # never woken to ask the queue


def test_what_only_agents_know_is_named_without_made_up_values(farm) -> None:
    url, *_ = farm
    response = requests.get(url + "/metrics", timeout=30)
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in ("cio_agent_bytes_synced", "cio_agent_bytes_uploaded", "cio_agent_drain_seconds"):
        assert name in families and families[name].samples == [], name


def test_two_apps_in_one_process_count_apart(tmp_path: Path) -> None:
    queues = [SqliteQueue(tmp_path / f"{name}.db") for name in ("a", "b")]
    tokens = [q.create_token("fleet", ["agent"])[1] for q in queues]
    for q in queues:
        q.create_job(JOB, [NewTask("1", "cnode -image_frames_list 1")])
    config = CoordinatorConfig(watch_seconds=3600, metrics_cache_seconds=0)
    try:
        with serving_app(create_app(queues[0], config)) as a, serving_app(create_app(queues[1], config)) as b:
            assert Agent(a, tokens[0], "w-a").claim() is not None
            seen_a, seen_b = scrape(a), scrape(b)
    finally:
        for q in queues:
            q.close()
    assert value(seen_a, "cio_claims_total", outcome="leased") == 1
    assert value(seen_b, "cio_claims_total", outcome="leased") == 0
    assert value(seen_a, "cio_tasks", state="leased") == 1 and value(seen_b, "cio_tasks", state="pending") == 1
    assert value(seen_b, "cio_http_requests_total", route="/v1/claim", method="POST", status="200") == 0


def test_metrics_are_open_unless_an_owner_token_is_required(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "queue.db")
    agent = queue.create_token("fleet", ["agent"])[1]
    owner = queue.create_token("ops", ["owner"])[1]
    try:
        with serving_app(create_app(queue, CoordinatorConfig(watch_seconds=3600))) as url:
            assert requests.get(url + "/metrics", timeout=30).status_code == 200
        config = CoordinatorConfig(watch_seconds=3600, metrics_token_required=True, token_cache_seconds=0)
        with serving_app(create_app(queue, config)) as url:
            bare = requests.get(url + "/metrics", timeout=30)
            assert bare.status_code == 401 and bare.json()["error"] == "unauthorized"
            wrong = requests.get(url + "/metrics", headers={"Authorization": f"Bearer {agent}"}, timeout=30)
            assert wrong.status_code == 403 and "owner" in wrong.json()["message"]
            assert value(scrape(url, owner), "cio_tasks", state="pending") == 0
    finally:
        queue.close()


def test_a_scrape_storm_counts_the_queue_once_per_cache_period(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "queue.db")
    owner = queue.create_token("ops", ["owner"])[1]
    queue.create_job(JOB, [NewTask("1", "cnode -image_frames_list 1")])
    app = create_app(queue, CoordinatorConfig(watch_seconds=3600, metrics_cache_seconds=3600))
    try:
        with serving_app(app) as url:
            results: list[Samples] = []
            scrapers = [threading.Thread(target=lambda: results.append(scrape(url))) for _ in range(16)]
            for t in scrapers:
                t.start()
            for t in scrapers:
                t.join(60)
            assert len(results) == 16 and all(value(r, "cio_tasks", state="pending") == 1 for r in results)
            assert app.state.metrics.queue.reads == 1
            # Within the period a change is not counted again: the figures are the cached ones.
            response = requests.post(url + "/v1/jobs", json={"job": JOB, "tasks": [{"frames": "2", "command": "cnode x"}]},
                                     headers={"Authorization": f"Bearer {owner}"}, timeout=30)
            assert response.status_code == 201
            assert value(scrape(url), "cio_tasks", state="pending") == 1
            assert app.state.metrics.queue.reads == 1
    finally:
        queue.close()


def test_a_queue_that_cannot_count_leaves_the_other_figures_served() -> None:
    calls = []

    def broken() -> tuple[dict[str, int], dict[str, int]]:
        calls.append(1)
        raise QueueError("the database is down", code="queue_unavailable")

    now = [0.0]
    collector = QueueCollector(broken, ttl=1.0, clock=lambda: now[0])
    families = {f.name: f for f in collector.collect()}
    assert families["cio_queue_readable"].samples[0].value == 0
    assert families["cio_tasks"].samples == [] and families["cio_workers"].samples == []
    list(collector.collect())
    assert len(calls) == 1  # a failure is kept for the period too
    now[0] = 1.0
    list(collector.collect())
    assert len(calls) == 2


@pytest.fixture(params=["sqlite", "postgres"])
def any_queue(request, tmp_path: Path):
    if request.param == "sqlite":
        queue = open_queue(f"sqlite:///{tmp_path / 'queue.db'}")
    else:
        pytest.importorskip("psycopg")
        queue = open_queue(request.getfixturevalue("pg_url"))
    yield queue
    queue.close()


def test_counts_are_tasks_and_workers_by_state(any_queue) -> None:
    queue = any_queue
    queue.create_job(JOB, [NewTask(str(f), f"cnode -image_frames_list {f}") for f in (1, 2, 3)])
    queue.register_worker("w-a", {})
    queue.register_worker("w-b", {})
    queue.register_worker("w-c", {})
    assert isinstance(queue.claim("w-a", 600), Lease)
    queue.complete(queue.claim("w-b", 600))
    queue.worker_report("w-c", WorkerStatus("stopped"))
    tasks, workers = queue.counts()
    assert tasks == {"holding": 0, "pending": 1, "leased": 1, "done": 1, "failed": 0}
    assert workers["syncing"] == 1 and workers["idle"] == 1 and workers["stopped"] == 1 and workers["gone"] == 0
    assert sum(workers.values()) == 3
    # Silent longer than gone_after: gone, except a worker that said it stopped.
    _, silent = queue.counts(gone_after=-1)
    assert silent["gone"] == 2 and silent["stopped"] == 1 and silent["idle"] == silent["syncing"] == 0
