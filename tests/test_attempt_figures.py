"""Each attempt's figures (wall, CPU, peak RSS, sync and upload bytes and seconds, instance type,
cost from a price table): carried by the final report through the HTTP wire and the outbox,
recorded once in the queue's attempts table (sqlite, PostgreSQL, behind a coordinator), shown by
``status JOB`` (the last attempt per task, the job's total cost) and ``status JOB --task ID``
(every attempt), and counted by the coordinator's /metrics as reports arrive. Real agents on
threads run the cnode simulator against a real coordinator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cio_worker.artist.status_view import format_status
from cio_worker.errors import DocumentError
from cio_worker.job.prices import PriceTableError, load_prices
from cio_worker.node.outbox import Outbox, Report
from cio_worker.queue import Queue, SqliteQueue
from cio_worker.queue.base import AttemptFigures
from tests.test_agent_fleet import Fleet
from tests.test_queue import Clock, clock, download, job_spec, queue, task  # noqa: F401  (fixtures)
from tests.waiting import wait_for

FIGURES = AttemptFigures(wall_seconds=120.0, cpu_seconds=410.5, peak_rss_bytes=3 * 2**30, sync_bytes=5_000_000,
                         sync_seconds=2.5, upload_bytes=700_000, upload_seconds=0.75, instance_type="n1-standard-8",
                         hourly_price=0.38, cost=0.38 * 120 / 3600, currency="USD", log="s3://b/p/_logs/x.log",
                         storage_scheme="s3")
IDENTITY = {"instance_id": "i-1", "provider": "gce", "zone": "z", "machine_type": "n1-standard-8",
            "preemptible": False, "cores": 8, "memory_gb": 30.0, "hostname": "h", "version": "t"}


# -- the queue contract ---------------------------------------------------------------------------


def test_each_report_records_its_attempt_with_figures(queue: Queue, clock: Clock) -> None:
    job = queue.create_job(job_spec(preempted=3, failed=2), [task("1-2"), task("3")])
    first = queue.claim("w1", 30)
    clock.advance(120)
    assert queue.fail(first, "exit 3 (log: s3://b/p/_logs/1.log)", figures=FIGURES) == "pending"
    second = queue.claim("w2", 30)
    assert (second.task_id, second.document.task.attempt) == ("000", 2)
    queue.release(second, "preempted", "1", figures=AttemptFigures(wall_seconds=5.0, drain_seconds=3.0))
    third = queue.claim("w3", 30)
    queue.complete(third, download("a.exr"), figures=AttemptFigures(wall_seconds=7.0, cost=0.01, currency="USD"))
    other = queue.claim("w1", 30)
    queue.complete(other)  # no figures: an older agent

    rows = queue.attempts(job, "000")
    assert [(a.attempt, a.worker, a.outcome) for a in rows] == [(1, "w1", "failed"), (2, "w2", "preempted"),
                                                                (3, "w3", "done")]
    assert rows[0].figures == AttemptFigures(**{**FIGURES.to_dict(), "drain_seconds": None, "storage_scheme": ""})
    assert rows[0].reason.startswith("exit 3") and rows[0].ended - rows[0].started == pytest.approx(120)
    assert rows[1].figures.wall_seconds == 5.0 and rows[2].figures.cost == 0.01
    every = queue.attempts(job)
    assert [(a.task_id, a.attempt) for a in every] == [("000", 1), ("000", 2), ("000", 3), ("001", 1)]
    assert every[-1].figures == AttemptFigures()  # recorded, figures unknown


def test_a_killed_attempt_started_when_it_was_leased_not_when_the_job_was_killed(queue: Queue, clock: Clock) -> None:
    job = queue.create_job(job_spec(), [task("1")])
    lease = queue.claim("w1", 300)
    clock.advance(100)
    queue.kill_job(job)  # asks the running task to stop
    clock.advance(5)
    queue.fail(lease, "killed by owner")
    (row,) = queue.attempts(job, "000")
    assert row.ended - row.started == pytest.approx(105)  # the whole attempt, not the 5 s since the kill


def test_a_resent_report_records_its_attempt_once(queue: Queue) -> None:
    job = queue.create_job(job_spec(failed=2), [task("1"), task("2"), task("3")])
    done, failed, released = queue.claim("w", 30), queue.claim("w", 30), queue.claim("w", 30)
    for _ in range(2):  # the same op id twice: a client that never got the first answer
        queue.complete(done, op_id="op-done", figures=FIGURES)
        queue.fail(failed, "broken", op_id="op-fail", figures=FIGURES)
        queue.release(released, "released", op_id="op-release", figures=FIGURES)
    assert [(a.task_id, a.outcome) for a in queue.attempts(job)] == [("000", "done"), ("001", "failed"),
                                                                     ("002", "released")]


def test_an_expired_lease_is_an_attempt_without_figures(queue: Queue, clock: Clock) -> None:
    job = queue.create_job(job_spec(), [task("1")])
    queue.claim("vanished", 10)
    clock.advance(11)
    assert queue.reap() == 1
    [row] = queue.attempts(job)
    assert (row.attempt, row.outcome, row.worker, row.figures) == (1, "lease_expired", "vanished", AttemptFigures())


@pytest.mark.parametrize("bad, field", [({"cost": -1.0}, "figures.cost"), ({"wall_seconds": "long"}, "figures.wall_seconds")])
def test_bad_figures_are_refused_and_nothing_changes(queue: Queue, bad: dict, field: str) -> None:
    job = queue.create_job(job_spec(), [task("1")])
    lease = queue.claim("w", 30)
    with pytest.raises(DocumentError) as err:
        queue.complete(lease, figures=AttemptFigures(**bad))
    assert err.value.field == field, err.value
    assert queue.tasks(job)[0].state == "leased" and queue.attempts(job) == []


def test_status_shows_each_tasks_last_attempt_and_the_jobs_total_cost(queue: Queue) -> None:
    job = queue.create_job(job_spec(failed=2), [task("1"), task("2"), task("3")])
    a, b, c = queue.claim("w1", 30), queue.claim("w2", 30), queue.claim("w3", 30)
    queue.complete(a, figures=FIGURES)
    queue.fail(b, "exit 1", figures=AttemptFigures(wall_seconds=60.0, instance_type="m9.huge"))  # not priced
    queue.complete(c, figures=AttemptFigures(wall_seconds=3600.0, cost=0.38, currency="USD"))
    view = format_status(queue, job)
    assert f"cost {FIGURES.cost + 0.38:.4f} USD over 3 attempts" in view
    assert "1 of them unknown (not in the price table: m9.huge)" in view
    row = next(line for line in view.splitlines() if line.startswith("000"))
    assert "2:00" in row and "6:50" in row and "3.0 GiB" in row and "4.8 MiB in 2.5 s" in row and "0.0127 USD" in row
    assert "unknown" in next(line for line in view.splitlines() if line.startswith("001"))

    attempts = format_status(queue, job, "001")
    assert "ATTEMPT" in attempts and "failed" in attempts and "m9.huge" in attempts and "exit 1" in attempts

    # Re-priced with the packaged table: the job is preemptible, so n1-standard-8 at its preemptible
    # price; m9.huge stays unknown.
    repriced = format_status(queue, job, prices=load_prices())
    assert f"{0.08 * 120 / 3600:.4f} USD" in repriced and "not in the price table: m9.huge" in repriced


# -- the price table ------------------------------------------------------------------------------


def test_the_packaged_price_table_and_a_sites_own(tmp_path: Path) -> None:
    packaged = load_prices()
    assert packaged.hourly("n1-standard-8") == 0.38 and packaged.hourly("n1-standard-8", preemptible=True) == 0.08
    assert packaged.cost("n1-standard-8", 1800.0) == pytest.approx(0.19)
    assert packaged.hourly("c5.2xlarge", preemptible=True) is None  # spot prices move: unknown, not 0
    assert packaged.cost("no-such-type", 100.0) is None

    site = tmp_path / "prices.toml"
    site.write_text('currency = "EUR"\n[on_demand]\n"n1-standard-8" = 1.0\n')
    own = load_prices(site)
    assert (own.currency, own.cost("n1-standard-8", 36.0), own.hourly("n1-standard-2")) == ("EUR", 0.01, None)
    for text, needle in (('[on_demand]\n"x" = -1\n', "on_demand.x"), ("currency = 3\n", "currency"),
                         ("[ondemand]\n", "unknown key 'ondemand'"), ("[on_demand\n", "not TOML")):
        site.write_text(text)
        with pytest.raises(PriceTableError, match=needle.replace("[", r"\[")):
            load_prices(site)
    with pytest.raises(PriceTableError, match="cannot read"):
        load_prices(tmp_path / "missing.toml")


# -- the outbox -----------------------------------------------------------------------------------


def test_figures_survive_the_outbox_and_a_redelivery_records_them_once(tmp_path: Path) -> None:
    with SqliteQueue(tmp_path / "queue.db") as queue:
        job = queue.create_job(job_spec(), [task("1")])
        lease = queue.claim("w", 30)
        box = Outbox(tmp_path / "outbox")
        report = Report.of("complete", lease, figures=FIGURES)
        box.put(report)
        [read_back] = box.entries()
        assert read_back.figures == FIGURES
        assert box.send(queue, read_back) == "done"
        box.put(read_back)  # an agent that died before it removed the file sends it again at start
        assert box.flush(queue).delivered
        [row] = queue.attempts(job)
        assert row.figures.cpu_seconds == FIGURES.cpu_seconds and row.outcome == "done"


# -- agents, the coordinator, the CLI -----------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path):
    made = Fleet(tmp_path)
    yield made
    assert not made.close()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_agents_report_figures_that_status_and_metrics_show(fleet: Fleet, tmp_path: Path) -> None:
    job = fleet.shot_job(frames="1-4", chunk_size=2)
    site = tmp_path / "site-prices.toml"
    site.write_text('currency = "USD"\n[on_demand]\n"n1-standard-8" = 36.0\n')  # 1 cent a second
    agent = fleet.agent("node-a", identity=IDENTITY, prices=load_prices(site), idle_exit_seconds=1.0)
    wait_for(lambda: fleet.backend.is_finished(job), 120, "the job to finish")
    wait_for(lambda: not fleet.threads[-1][1].is_alive(), 60, "the agent to exit idle")
    assert agent.summary.done == 2

    attempts = fleet.backend.attempts(job)
    assert [(a.task_id, a.outcome, a.worker) for a in attempts] == [("000", "done", "node-a"), ("001", "done", "node-a")]
    for a in attempts:
        f = a.figures
        assert f.instance_type == "n1-standard-8" and f.hourly_price == 36.0 and f.currency == "USD"
        assert f.wall_seconds > 0 and f.cost == pytest.approx(f.wall_seconds * 0.01)
        assert f.cpu_seconds is not None and f.cpu_seconds > 0 and f.peak_rss_bytes > 0
        assert f.upload_bytes > 0 and f.upload_seconds is not None
        assert f.sync_bytes is not None and f.sync_seconds is not None
        assert f.log.startswith(fleet.storage_url + "/_logs/" + job + "/" + a.task_id + "/1-")
    assert attempts[0].figures.sync_bytes > 0  # the first attempt fetched the inputs; the cache served the next

    env = {**os.environ, "CIO_TOKEN": fleet.token}
    out = subprocess.run([sys.executable, "-m", "cio_worker", "status", job, "--queue", fleet.coordinator.url],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    total = sum(a.figures.cost for a in attempts)
    assert f"cost {total:.4f} USD over 2 attempts" in out.stdout
    assert "WALL" in out.stdout and "PEAK RSS" in out.stdout
    listing = subprocess.run([sys.executable, "-m", "cio_worker", "status", job, "--task", "001", "--queue",
                              fleet.coordinator.url], capture_output=True, text=True, timeout=60, env=env)
    assert listing.returncode == 0 and attempts[1].figures.log in listing.stdout, listing

    seen = scrape(fleet.coordinator.url)
    synced = sum(v for (name, labels), v in seen.items() if name == "cio_agent_bytes_synced_total")
    uploaded = seen[("cio_agent_bytes_uploaded_total", (("scheme", "file"),))]
    assert synced == sum(a.figures.sync_bytes for a in attempts)
    assert uploaded == sum(a.figures.upload_bytes for a in attempts)
    assert seen[("cio_attempt_cost_total", (("currency", "USD"),))] == pytest.approx(total)
    assert seen[("cio_attempt_wall_seconds_count", (("outcome", "done"),))] == 2


def test_a_drained_attempt_reports_its_drain_time(fleet: Fleet, tmp_path: Path) -> None:
    go = tmp_path / "GO"
    job = fleet.command_job(f"echo started; while [ ! -f {go} ]; do sleep 0.05; done")
    agent = fleet.agent("node-a", identity={**IDENTITY, "machine_type": ""})
    wait_for(lambda: fleet.task(job).state == "leased" and (fleet.tmp / "node-a" / "work" / "logs").is_dir()
             and any((fleet.tmp / "node-a" / "work" / "logs").iterdir()), 60, "the render to start")
    agent.shutdown("the test drains it", grace=2.0, cause="preempted")
    wait_for(lambda: fleet.backend.attempts(job), 60, "the release")
    [row] = fleet.backend.attempts(job)
    assert row.outcome == "preempted" and row.figures.wall_seconds > 0
    assert row.figures.cost is None  # the job names no instance type and the packaged table has no ""
    seen = scrape(fleet.coordinator.url)
    assert seen[("cio_agent_drain_seconds_count", (("outcome", "preempted"),))] == 1
    assert seen[("cio_attempts_unpriced_total", ())] == 1
