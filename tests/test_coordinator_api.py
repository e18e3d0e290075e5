"""The coordinator's API as a client meets it (a real server on 127.0.0.1, requests): who may call
what (401 / 403), reports on a lease that is not the caller's (409), unknown ids (404), oversized
bodies (413), long-poll claims (204 after the wait; woken by a submit), the OpenAPI document, and a
log that never holds a token. Every refusal is JSON ``{"error", "message"}`` and leaves the queue
exactly as it was (its views and every table of its database)."""

from __future__ import annotations

import json
import logging
from collections import Counter
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from cio_worker.coordinator.app import MAX_BODY, MAX_SMALL_BODY, CoordinatorConfig, create_app, poll_length
from cio_worker.job.hashing import md5_b64_of_bytes
from cio_worker.queue import DownloadFile, NewDownload, NewTask, SqliteQueue
from cio_worker.queue.base import Lease
from tests.fleet import JOB, ROUTES, queue_state, serving_app



def lease_ref(lease: Lease, **changes: Any) -> dict[str, Any]:
    ref = {"job_id": lease.job_id, "task_id": lease.task_id, "token": lease.token, "worker": lease.worker}
    ref.update(changes)
    return ref


def a_download(name: str) -> NewDownload:
    return NewDownload("/proj/renders", (DownloadFile(name, md5_b64_of_bytes(name.encode()), len(name), f"hashstore/{name}"),))


@dataclass
class Farm:
    """A coordinator over a sqlite queue holding one job of four tasks: 000 leased by w-a, 001 leased
    by w-b, 002 done by w-b (with a download), 003 pending; tokens of each scope."""

    url: str
    queue: SqliteQueue
    db: Path
    app: Any
    agent: str
    owner: str
    both: str
    job: str
    lease_a: Lease
    lease_b: Lease
    done: Lease
    session: requests.Session = field(default_factory=requests.Session)

    def call(self, method: str, path: str, token: str | None = None, body: Any = None, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.session.request(method, self.url + path, json=body, headers=headers, timeout=30, **kwargs)

    def state(self) -> dict[str, Any]:
        return queue_state(self.queue, self.db)

    def valid_body(self, method: str, path: str) -> Any:
        """A body the route would accept from the right caller (so that only the token is wrong)."""
        bodies = {
            "/v1/workers/register": {"worker": "w-new", "info": {"zone": "z"}},
            "/v1/workers/report": {"worker": "w-a", "status": {"state": "idle"}},
            "/v1/claim": {"worker": "w-c", "lease_seconds": 60, "wait_seconds": 0},
            "/v1/heartbeat": {"lease": lease_ref(self.lease_a), "lease_seconds": 60},
            "/v1/complete": {"lease": lease_ref(self.lease_a), "op_id": "op-complete"},
            "/v1/fail": {"lease": lease_ref(self.lease_a), "reason": "boom", "op_id": "op-fail"},
            "/v1/release": {"lease": lease_ref(self.lease_a), "cause": "released", "op_id": "op-release"},
            "/v1/jobs": {"job": JOB, "tasks": [{"frames": "1", "command": "cnode x"}]},
            "/v1/logs/append": {"lease": lease_ref(self.lease_a), "offset": 0, "text": "a line\n"},
        }
        return bodies.get(path) if method == "POST" else None

    def path_of(self, template: str) -> str:
        return (template.replace("{job_id}", self.job).replace("{task_id}", self.lease_a.task_id)
                .replace("{download_id}", self.queue.downloads(None, None)[0].download_id))


def make_farm(tmp_path: Path, config: CoordinatorConfig, **uvicorn_options: Any) -> Iterator[Farm]:
    db = tmp_path / "queue.db"
    queue = SqliteQueue(db)
    _, agent = queue.create_token("fleet", ["agent"])
    _, owner = queue.create_token("alice", ["owner"])
    _, both = queue.create_token("ops", ["agent", "owner"])
    job = queue.create_job(JOB, [NewTask(str(f), f"cnode -image_frames_list {f}") for f in (1, 2, 3, 4)])
    queue.register_worker("w-a", {"zone": "a"})
    queue.register_worker("w-b", {"zone": "b"})
    lease_a = queue.claim("w-a", 600)
    lease_b = queue.claim("w-b", 600)
    done = queue.claim("w-b", 600)
    assert lease_a and lease_b and done
    queue.complete(done, a_download("img.0003.exr"), "op-done")
    app = create_app(queue, config)
    with serving_app(app, **uvicorn_options) as url:
        farm = Farm(url, queue, db, app, agent, owner, both, job, lease_a, lease_b, done)
        yield farm
        farm.session.close()
    queue.close()


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[Farm]:
    # watch_seconds far beyond any test: only a submit (or a report giving a task back) wakes a
    # waiting claim, never the watcher's look for work.
    yield from make_farm(tmp_path, CoordinatorConfig(token_cache_seconds=0, watch_seconds=3600, long_poll_seconds=5))


def refused(response: requests.Response, status: int, error: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    data = response.json()
    assert isinstance(data.get("error"), str) and data["error"], data
    assert isinstance(data.get("message"), str) and data["message"], data
    if error is not None:
        assert data["error"] == error, data
    return data


# -- auth -----------------------------------------------------------------------------------------


def test_no_token_is_401_on_every_route(farm: Farm) -> None:
    before = farm.state()
    for method, template, _ in ROUTES:
        path = farm.path_of(template)
        response = farm.call(method, path, None, farm.valid_body(method, template))
        refused(response, 401, "unauthorized")
        assert response.headers.get("WWW-Authenticate", "").startswith("Bearer"), (method, path)
        # Not a bearer token at all.
        refused(farm.call(method, path, None, farm.valid_body(method, template),
                          headers={"Authorization": f"Basic {farm.both}"}), 401)
    assert farm.state() == before


@pytest.mark.parametrize("bad", [
    "garbage",
    "cio_000000000000_" + "A" * 43,  # well formed, unknown id
    "cio_zzzzzzzzzzzz_" + "A" * 43,  # malformed id
    "cio_short",
    "",
])
def test_malformed_or_unknown_tokens_are_401(farm: Farm, bad: str) -> None:
    before = farm.state()
    for method, template, _ in ROUTES:
        response = farm.call(method, farm.path_of(template), None, farm.valid_body(method, template),
                             headers={"Authorization": f"Bearer {bad}"})
        refused(response, 401, "unauthorized")
    # The right id with a wrong secret.
    token_id = farm.owner.split("_")[1]
    refused(farm.call("GET", "/v1/jobs", f"cio_{token_id}_" + "B" * 43), 401)
    assert farm.state() == before


def test_a_revoked_token_is_refused_at_once_with_a_zero_cache(farm: Farm) -> None:
    assert farm.call("GET", "/v1/jobs", farm.owner).status_code == 200
    before = farm.state()
    assert farm.queue.revoke_token("alice") == 1
    after_revoke = farm.state()
    for method, template, scope in ROUTES:
        if scope == "owner":
            refused(farm.call(method, farm.path_of(template), farm.owner, farm.valid_body(method, template)), 401)
    assert farm.state() == after_revoke
    assert before != after_revoke  # (the revocation itself is the only change)


def test_a_wrong_scope_is_403_both_ways(farm: Farm) -> None:
    before = farm.state()
    for method, template, scope in ROUTES:
        wrong = farm.owner if scope == "agent" else farm.agent
        data = refused(farm.call(method, farm.path_of(template), wrong, farm.valid_body(method, template)), 403, "forbidden")
        assert scope in data["message"]
    assert farm.state() == before


def test_the_right_scope_is_let_through(farm: Farm) -> None:
    """(The refusals above are refusals of the token: the same calls with the right one pass.)"""
    assert farm.call("GET", "/v1/jobs", farm.owner).status_code == 200
    assert farm.call("GET", "/v1/workers", farm.both).status_code == 200
    response = farm.call("POST", "/v1/heartbeat", farm.agent, farm.valid_body("POST", "/v1/heartbeat"))
    assert response.status_code == 200 and response.json()["cancel"] is False


# -- leases, unknown ids --------------------------------------------------------------------------


def test_reports_on_another_workers_lease_are_409_and_change_nothing(farm: Farm) -> None:
    before = farm.state()
    a, b = farm.lease_a, farm.lease_b
    forged = [
        lease_ref(a, worker="w-b"),  # a's lease, named by b
        lease_ref(a, token=b.token),  # b's token on a's task
        lease_ref(a, token="0" * 32),  # a guessed token
        lease_ref(farm.done),  # the lease of a task already done
        lease_ref(b, worker="w-a"),
    ]
    for ref in forged:
        for path, extra in [
            ("/v1/heartbeat", {"lease_seconds": 60, "status": {"state": "rendering", "progress": 50}}),
            ("/v1/complete", {"op_id": "op-forged-complete"}),
            ("/v1/fail", {"reason": "forged", "op_id": "op-forged-fail"}),
            ("/v1/release", {"cause": "preempted", "frames_done": "1", "op_id": "op-forged-release"}),
            ("/v1/release", {"cause": "released"}),
        ]:
            refused(farm.call("POST", path, farm.agent, {"lease": ref, **extra}), 409, "lease_lost")
    # Replaying the op id of w-b's completion as w-a: applied for another worker.
    refused(farm.call("POST", "/v1/complete", farm.agent, {"lease": lease_ref(farm.done, worker="w-a"), "op_id": "op-done"}), 409)
    assert farm.state() == before


def test_unknown_jobs_tasks_downloads_and_workers_are_404(farm: Farm) -> None:
    before = farm.state()
    for job in ("99999", "00000", "abc", "9" * 40, "1e3", "-1"):
        for method, template, _ in ROUTES:
            if "{job_id}" in template:
                refused(farm.call(method, template.replace("{job_id}", job), farm.owner), 404, "unknown_job")
        refused(farm.call("GET", "/v1/downloads", farm.owner, params={"job": job}), 404, "unknown_job")
        for path in ("/v1/heartbeat", "/v1/complete", "/v1/fail", "/v1/release"):
            body = {"lease": lease_ref(farm.lease_a, job_id=job[:32])}
            if path == "/v1/fail":
                body["reason"] = "x"
            refused(farm.call("POST", path, farm.agent, body), 404, "unknown_job")
    refused(farm.call("GET", f"/v1/jobs/{farm.job}/events", farm.owner, params={"task": "999"}), 404, "unknown_task")
    refused(farm.call("POST", "/v1/complete", farm.agent, {"lease": lease_ref(farm.lease_a, task_id="999")}), 404, "unknown_task")
    refused(farm.call("POST", "/v1/downloads/00001-000-9/downloaded", farm.owner), 404, "unknown_download")
    refused(farm.call("POST", "/v1/workers/report", farm.agent, {"worker": "w-nobody", "status": {"state": "idle"}}),
            404, "unknown_worker")
    refused(farm.call("GET", "/v1/no-such-route", farm.owner), 404, "not_found")
    refused(farm.call("PUT", "/v1/claim", farm.agent, {}), 405, "method_not_allowed")
    assert farm.state() == before


def test_openapi_lists_every_v1_route(farm: Farm) -> None:
    from fastapi.routing import APIRoute

    response = farm.call("GET", "/openapi.json")
    assert response.status_code == 200
    listed = {(m.upper(), p) for p, item in response.json()["paths"].items() if p.startswith("/v1/") for m in item}
    served = {(m, r.path) for r in farm.app.app.routes if isinstance(r, APIRoute) and r.path.startswith("/v1/") for m in r.methods}
    assert listed == served
    assert listed == {(m, p) for m, p, _ in ROUTES}
    # The hot routes answered ahead of the framework are documented like the rest.
    assert {("POST", path) for path in farm.app.fast} <= listed


# -- bodies ---------------------------------------------------------------------------------------


def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request written by hand (a Content-Length that no client library would send)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def test_bodies_over_the_limit_are_413_declared_or_streamed(farm: Farm) -> None:
    before = farm.state()
    big = b"{" + b" " * MAX_SMALL_BODY + b"}"
    for token in (farm.agent, None):  # the size is judged before the token
        refused(farm.call("POST", "/v1/claim", token, data=big, headers={"Content-Type": "application/json"}), 413, "too_large")

    def streamed():  # chunked: no Content-Length to judge by
        for _ in range(MAX_SMALL_BODY // 65536 + 2):
            yield b" " * 65536

    refused(farm.call("POST", "/v1/complete", farm.agent, data=streamed(), headers={"Content-Type": "application/json"}),
            413, "too_large")
    # A job may be bigger, up to MAX_BODY; a declared length beyond it is refused unread.
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {farm.owner}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n").encode()
    status, body = raw_request(farm.url, head, b"{}")
    assert status == 413 and json.loads(body)["error"] == "too_large"
    status, body = raw_request(farm.url, b"POST /v1/claim HTTP/1.1\r\nHost: x\r\nContent-Length: 12x\r\n\r\n")
    assert 400 <= status < 500
    # Under the limit, a streamed body is read whole and judged as any other.
    small = json.dumps({"worker": "w-a", "status": {"state": "bogus"}}).encode()
    refused(farm.call("POST", "/v1/workers/report", farm.agent, data=iter([small[:10], small[10:]]),
                      headers={"Content-Type": "application/json"}), 422, "bad_document")
    assert farm.state() == before


# -- long polls -----------------------------------------------------------------------------------


def test_a_long_poll_ends_at_a_random_point_of_its_last_quarter_and_a_short_one_at_its_end() -> None:
    assert poll_length(20.0, 0.0) == 15.0 and poll_length(20.0, 0.5) == 17.5
    assert 19.99 < poll_length(20.0, 0.9999) < 20.0
    assert poll_length(2.0, 0.0) == poll_length(2.0, 0.9) == 2.0 and poll_length(0.0, 0.3) == 0.0


def test_a_long_poll_claim_answers_204_after_its_wait_when_there_is_no_work(farm: Farm) -> None:
    farm.queue.complete(farm.queue.claim("w-b", 600), None)  # 003: nothing is pending now
    before = farm.state()
    answer: dict[str, Any] = {}

    def claim() -> None:
        response = farm.call("POST", "/v1/claim", farm.agent, {"worker": "w-c", "wait_seconds": 1.0})
        answer.update(status=response.status_code, content=response.content)

    thread = threading.Thread(target=claim)
    thread.start()
    parked = False
    while thread.is_alive() and not parked:  # it waited on the server, not answered at once
        parked = farm.app.state.signal.waiting >= 1
        time.sleep(0.005)
    thread.join(30)
    assert parked
    assert answer == {"status": 204, "content": b""}
    assert farm.app.state.signal.waiting == 0
    assert farm.state() == before


def test_a_waiting_claim_is_woken_by_a_submit(farm: Farm, record_property) -> None:
    farm.queue.complete(farm.queue.claim("w-b", 600), None)
    wait = 10.0
    answer: dict[str, Any] = {}

    def claim() -> None:
        started = time.monotonic()
        response = farm.call("POST", "/v1/claim", farm.agent, {"worker": "w-c", "wait_seconds": wait})
        answer.update(status=response.status_code, body=response.json() if response.content else None,
                      waited=time.monotonic() - started)

    thread = threading.Thread(target=claim)
    thread.start()
    deadline = time.monotonic() + wait
    while farm.app.state.signal.waiting < 1:  # it found nothing and waits on the server
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    submitted = time.monotonic()
    response = farm.call("POST", "/v1/jobs", farm.owner, {"job": JOB, "tasks": [{"frames": "7", "command": "cnode y"}]})
    assert response.status_code == 201
    thread.join(wait + 5)
    assert answer["status"] == 200
    lease = answer["body"]["lease"]
    assert (lease["job_id"], lease["task_id"], lease["worker"]) == (response.json()["job_id"], "000", "w-c")
    # The watcher looks for work once an hour here, so only the submit can have woken it; and it
    # did so well before its wait ended.
    assert answer["waited"] < wait
    woken = time.monotonic() - submitted
    print(f"\n[figures] long poll woken {woken:.3f} s after the submit (wait {wait:g} s)")
    record_property("woken_after_submit_seconds", round(woken, 3))


# -- the log --------------------------------------------------------------------------------------


def test_no_token_ever_appears_in_the_coordinators_log(tmp_path: Path, caplog: pytest.LogCaptureFixture, record_property) -> None:
    caplog.set_level(logging.DEBUG)
    # uvicorn's own logging setup (from an earlier server in this process) may stop its records
    # from reaching the root logger: listen on its loggers directly.
    watched = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")]
    for logger in watched:
        logger.addHandler(caplog.handler)
    config = CoordinatorConfig(token_cache_seconds=0, watch_seconds=0.2)
    # More than `cio-worker serve` logs (info, no access log): debug, and a line per request.
    farms = make_farm(tmp_path, config, log_config=None, log_level="debug", access_log=True)
    farm = next(farms)
    try:
        fake = "cio_0123456789ab_" + "S" * 43
        for token in (farm.agent, farm.owner, farm.both, fake):
            for method, template, _ in ROUTES:
                farm.call(method, farm.path_of(template), token, farm.valid_body(method, template))
            farm.call("POST", "/v1/claim", token, data=b"not json", headers={"Content-Type": "application/json"})
            farm.call("POST", "/v1/claim", token, data=b"x" * (MAX_SMALL_BODY + 1))
            farm.call("GET", "/v1/nowhere", token)
        farm.queue.revoke_token("alice")
        farm.call("GET", "/v1/jobs", farm.owner)
        time.sleep(0.5)  # a few of the watcher's rounds
    finally:
        next(farms, None)
        for logger in watched:
            logger.removeHandler(caplog.handler)
    names = Counter(r.name for r in caplog.records)
    assert names["uvicorn.access"] > 50, names  # a line per request: the check below proves something
    text = caplog.text + "\n".join(str(r.__dict__) for r in caplog.records)
    for token in (farm.agent, farm.owner, farm.both, fake):
        secret = token.split("_", 2)[2]
        assert secret not in text
    print(f"\n[figures] log records checked for tokens: {dict(names)}")
    record_property("log_records_checked", sum(names.values()))
