"""The metadata stand-in serves the shapes of spec/cloud.md, over real HTTP on loopback."""

from __future__ import annotations

import email.utils
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests

from cio_worker.sim.metadata_server import MetadataServer

GOOGLE = {"Metadata-Flavor": "Google"}
AZURE = {"Metadata": "true"}
API = {"api-version": "2020-07-01"}
REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def http():
    with requests.Session() as session:
        session.trust_env = False
        yield session


@pytest.fixture
def md():
    with MetadataServer() as server:
        yield server


def gce(http, md, path, **params):
    return http.get(f"{md.url}/computeMetadata/v1/{path}", headers=GOOGLE, params=params,
                    timeout=10)


def ec2_token(http, md, ttl="60"):
    response = http.put(f"{md.url}/latest/api/token",
                        headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl}, timeout=5)
    assert response.status_code == 200
    return response.text


def ec2(http, md, path, token):
    return http.get(f"{md.url}{path}", headers={"X-aws-ec2-metadata-token": token}, timeout=5)


# ---- GCE ----

def test_gce_requires_the_flavor_header_and_answers_with_it_and_an_etag(http, md):
    url = f"{md.url}/computeMetadata/v1/instance/preempted"
    assert http.get(url, timeout=5).status_code == 403
    assert http.get(url, headers={"Metadata-Flavor": "google"}, timeout=5).status_code == 403
    response = http.get(url, headers=GOOGLE, timeout=5)
    assert response.status_code == 200
    assert response.text == "FALSE"
    assert response.headers["Metadata-Flavor"] == "Google"
    assert response.headers["ETag"]


def test_gce_identity_scheduling_and_maintenance_values(http, md):
    assert gce(http, md, "instance/id").text == md.identity.gce_id
    assert gce(http, md, "instance/name").text == "cio-render-0"
    assert gce(http, md, "instance/machine-type").text.endswith("/machineTypes/n1-standard-8")
    assert gce(http, md, "instance/zone").text.endswith("/zones/us-central1-a")
    assert gce(http, md, "instance/scheduling/preemptible").text == "TRUE"
    assert gce(http, md, "instance/maintenance-event").text == "NONE"
    md.raise_gce_maintenance("MIGRATE_ON_HOST_MAINTENANCE")
    assert gce(http, md, "instance/maintenance-event").text == "MIGRATE_ON_HOST_MAINTENANCE"
    md.raise_gce_maintenance()
    assert gce(http, md, "instance/maintenance-event").text == "TERMINATE_ON_HOST_MAINTENANCE"
    md.raise_gce_preempt()
    assert gce(http, md, "instance/preempted").text == "TRUE"
    md.clear("gce")
    assert gce(http, md, "instance/preempted").text == "FALSE"
    assert gce(http, md, "instance/maintenance-event").text == "NONE"
    with pytest.raises(ValueError):
        md.raise_gce_maintenance("REBOOT")


def test_gce_attributes_404_when_absent_and_recursive_json(http, md):
    assert gce(http, md, "instance/attributes/cio-queue").status_code == 404
    md.set_gce_attributes(instance={"cio-queue": "sqlite:///q.db", "threads": "8"},
                          project={"cio-storage": "s3://bucket/prefix"})
    assert gce(http, md, "instance/attributes/cio-queue").text == "sqlite:///q.db"
    listing = gce(http, md, "instance/attributes/", recursive="true")
    assert listing.headers["Content-Type"] == "application/json"
    assert listing.json() == {"cio-queue": "sqlite:///q.db", "threads": "8"}
    assert gce(http, md, "project/attributes/cio-storage").text == "s3://bucket/prefix"
    assert gce(http, md, "project/attributes/", recursive="true").json() == {
        "cio-storage": "s3://bucket/prefix"}
    md.set_gce_attributes(instance={"threads": None})
    assert gce(http, md, "instance/attributes/threads").status_code == 404
    assert gce(http, md, "instance/nonsense").status_code == 404


def test_gce_hanging_get_blocks_until_the_value_changes(http, md):
    first = gce(http, md, "instance/preempted")
    answers: list[requests.Response] = []
    waiter = threading.Thread(target=lambda: answers.append(gce(
        http, md, "instance/preempted", wait_for_change="true",
        last_etag=first.headers["ETag"], timeout_sec="30")))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "a hanging GET with the current ETag must wait"
    md.raise_gce_preempt()
    waiter.join(10)
    assert not waiter.is_alive()
    assert answers[0].status_code == 200
    assert answers[0].text == "TRUE"
    assert answers[0].headers["ETag"] != first.headers["ETag"]


def test_gce_hanging_get_returns_the_current_value_at_its_timeout(http, md):
    first = gce(http, md, "instance/maintenance-event")
    started = time.monotonic()
    answer = gce(http, md, "instance/maintenance-event", wait_for_change="true",
                 last_etag=first.headers["ETag"], timeout_sec="1")
    assert time.monotonic() - started >= 0.9
    assert answer.status_code == 200
    assert answer.text == "NONE"
    assert answer.headers["ETag"] == first.headers["ETag"]


def test_gce_hanging_get_with_a_stale_etag_answers_at_once(http, md):
    started = time.monotonic()
    answer = gce(http, md, "instance/preempted", wait_for_change="true",
                 last_etag="0000000000000000", timeout_sec="60")
    assert time.monotonic() - started < 10
    assert answer.text == "FALSE"


def test_stopping_the_server_releases_a_hanging_get(http):
    server = MetadataServer().start()
    answers: list[object] = []

    def hang() -> None:
        try:
            answers.append(gce(http, server, "instance/preempted", wait_for_change="true",
                               timeout_sec="120").status_code)
        except requests.RequestException as err:
            answers.append(err)

    waiter = threading.Thread(target=hang)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(10)
    waiter.join(10)
    assert not stopper.is_alive() and not waiter.is_alive()
    assert answers


def test_injected_503s_answer_the_next_requests_then_stop(http, md):
    md.fail_next(2)
    statuses = [gce(http, md, "instance/preempted").status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    md.fail_next(1, provider="ec2")
    assert gce(http, md, "instance/preempted").status_code == 200
    assert http.put(f"{md.url}/latest/api/token", timeout=5,
                    headers={"X-aws-ec2-metadata-token-ttl-seconds": "5"}).status_code == 503


# ---- EC2 IMDSv2 ----

@pytest.mark.parametrize("ttl", [None, "0", "21601", "abc", "-5"])
def test_ec2_token_ttl_outside_1_to_21600_is_400(http, md, ttl):
    headers = {} if ttl is None else {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
    assert http.put(f"{md.url}/latest/api/token", headers=headers, timeout=5).status_code == 400


def test_ec2_token_is_required_for_gets(http, md):
    response = http.put(f"{md.url}/latest/api/token", timeout=5,
                        headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    assert response.status_code == 200
    assert response.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    token = response.text
    url = f"{md.url}/latest/meta-data/instance-id"
    assert http.get(url, timeout=5).status_code == 401
    assert ec2(http, md, "/latest/meta-data/instance-id", "not-a-token").status_code == 401
    assert ec2(http, md, "/latest/meta-data/instance-id", token).text == "i-0123456789abcdef0"
    assert ec2(http, md, "/latest/meta-data/instance-type", token).text == "c5.2xlarge"
    assert http.get(f"{md.url}/latest/api/token", timeout=5).status_code == 405


def test_ec2_token_ttl_runs_on_the_server_clock(http):
    clock = FakeClock(1_800_000_000.0)
    with MetadataServer(clock=clock) as md:
        token = ec2_token(http, md, ttl="10")
        clock.now += 9
        assert ec2(http, md, "/latest/meta-data/instance-id", token).status_code == 200
        clock.now += 1.5
        assert ec2(http, md, "/latest/meta-data/instance-id", token).status_code == 401
        fresh = ec2_token(http, md, ttl="10")
        assert ec2(http, md, "/latest/meta-data/instance-id", fresh).status_code == 200


def test_ec2_expire_tokens_control(http, md):
    token = ec2_token(http, md)
    assert ec2(http, md, "/latest/meta-data/instance-id", token).status_code == 200
    assert md.expire_tokens() == 1
    assert ec2(http, md, "/latest/meta-data/instance-id", token).status_code == 401


def test_ec2_spot_action_404_until_notice_then_time_two_minutes_on(http):
    notice_at = datetime(2026, 11, 21, 8, 20, 0, tzinfo=timezone.utc).timestamp()
    with MetadataServer(clock=FakeClock(notice_at)) as md:
        token = ec2_token(http, md)
        path = "/latest/meta-data/spot/instance-action"
        assert ec2(http, md, path, token).status_code == 404
        assert ec2(http, md, "/latest/meta-data/spot/termination-time", token).status_code == 404
        md.raise_ec2_spot()
        answer = ec2(http, md, path, token)
        assert answer.status_code == 200
        assert answer.json() == {"action": "terminate", "time": "2026-11-21T08:22:00Z"}
        assert ec2(http, md, "/latest/meta-data/spot/termination-time",
                   token).text == "2026-11-21T08:22:00Z"
        md.clear("ec2")
        assert ec2(http, md, path, token).status_code == 404


def test_ec2_rebalance_and_user_data(http):
    notice_at = datetime(2026, 11, 21, 8, 0, 5, tzinfo=timezone.utc).timestamp()
    with MetadataServer(clock=FakeClock(notice_at)) as md:
        token = ec2_token(http, md)
        path = "/latest/meta-data/events/recommendations/rebalance"
        assert ec2(http, md, path, token).status_code == 404
        md.raise_ec2_rebalance()
        assert ec2(http, md, path, token).json() == {"noticeTime": "2026-11-21T08:00:05Z"}
        assert ec2(http, md, "/latest/user-data", token).status_code == 404
        md.set_ec2_user_data(b"#cio\nqueue=sqlite:///q.db\n")
        assert ec2(http, md, "/latest/user-data", token).content == b"#cio\nqueue=sqlite:///q.db\n"
        assert ec2(http, md, "/latest/meta-data/nothing-here", token).status_code == 404


# ---- Azure ----

def test_azure_requires_the_metadata_header_and_api_version(http, md):
    url = f"{md.url}/metadata/scheduledevents"
    assert http.get(url, params=API, timeout=5).status_code == 400
    assert http.get(url, headers=AZURE, timeout=5).status_code == 400
    answer = http.get(url, params=API, headers=AZURE, timeout=5)
    assert answer.status_code == 200
    assert answer.json() == {"DocumentIncarnation": 1, "Events": []}


def test_azure_preempt_event_shape_and_acknowledgement(http):
    clock = FakeClock(1_800_000_000.0)
    with MetadataServer(clock=clock) as md:
        url = f"{md.url}/metadata/scheduledevents"
        md.raise_azure_preempt()
        document = http.get(url, params=API, headers=AZURE, timeout=5).json()
        assert document["DocumentIncarnation"] == 2
        [event] = document["Events"]
        assert event["EventType"] == "Preempt"
        assert event["ResourceType"] == "VirtualMachine"
        assert event["Resources"] == ["cio-render-0"]
        assert event["EventStatus"] == "Scheduled"
        not_before = email.utils.parsedate_to_datetime(event["NotBefore"]).timestamp()
        assert not_before == clock.now + 30
        assert http.post(url, params=API, headers=AZURE, json={"Nope": []},
                         timeout=5).status_code == 400
        ack = {"StartRequests": [{"EventId": event["EventId"]}]}
        assert http.post(url, params=API, json=ack, timeout=5).status_code == 400
        assert http.post(url, params=API, headers=AZURE, json=ack, timeout=5).status_code == 200
        assert md.azure_acks() == [event["EventId"]]
        after = http.get(url, params=API, headers=AZURE, timeout=5).json()
        assert after["DocumentIncarnation"] == 3
        assert after["Events"][0]["EventStatus"] == "Started"


# ---- control endpoints, providers, log, process ----

def test_control_endpoints_mirror_the_methods(http, md):
    control = f"{md.url}/_control"
    assert http.post(f"{control}/raise_gce_preempt", timeout=5).json() == {"result": None}
    assert gce(http, md, "instance/preempted").text == "TRUE"
    spot = http.post(f"{control}/raise_ec2_spot", json={"action": "stop"}, timeout=5).json()
    assert spot["result"]["action"] == "stop"
    event = http.post(f"{control}/raise_azure_preempt", json={"not_before_in": 45},
                      timeout=5).json()["result"]
    assert event["EventType"] == "Preempt"
    http.post(f"{control}/set_gce_attributes", json={"instance": {"k": "v"}}, timeout=5)
    assert gce(http, md, "instance/attributes/k").text == "v"
    http.post(f"{control}/fail_next", json={"count": 1}, timeout=5)
    assert gce(http, md, "instance/attributes/k").status_code == 503
    assert http.post(f"{control}/raise_gce_maintenance", json={"event": "BAD"},
                     timeout=5).status_code == 400
    assert http.post(f"{control}/raise_ec2_spot", json={"bogus": 1}, timeout=5).status_code == 400
    assert http.post(f"{control}/no_such_control", timeout=5).status_code == 404
    log = http.get(f"{control}/request_log", timeout=5).json()["result"]
    assert [entry["status"] for entry in log] == [200, 200, 503]
    assert all(entry["provider"] == "gce" for entry in log)
    assert log[0]["headers"]["metadata-flavor"] == "Google"


def test_request_log_records_tokens_and_arrival_times(http, md):
    before = time.time()
    token = ec2_token(http, md)
    ec2(http, md, "/latest/meta-data/spot/instance-action", token)
    put, get = md.request_log()
    assert (put.method, put.path, put.status) == ("PUT", "/latest/api/token", 200)
    assert (get.method, get.status) == ("GET", 404)
    assert get.headers["x-aws-ec2-metadata-token"] == token
    assert before <= put.time <= get.time <= time.time()
    md.clear_log()
    assert md.request_log() == []


def test_providers_can_be_switched_off(http):
    with MetadataServer(providers=["ec2"]) as md:
        assert gce(http, md, "instance/id").status_code == 404
        assert http.get(f"{md.url}/metadata/scheduledevents", params=API, headers=AZURE,
                        timeout=5).status_code == 404
        ec2_token(http, md)
    with pytest.raises(ValueError):
        MetadataServer(providers=["openstack"])


def test_main_runs_as_a_process_and_stops_on_sigterm(http):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "cio_worker.sim.metadata_server", "--port", "0"],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = child.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        answer = http.get(f"{url}/computeMetadata/v1/instance/preempted", headers=GOOGLE,
                          timeout=5)
        assert answer.text == "FALSE"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
