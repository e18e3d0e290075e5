"""What only the PostgreSQL queue has: an explicit, versioned schema; the database's clock; claims
from many processes on many connections; a server that restarts; passwords kept out of messages."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from cio_worker.errors import LeaseLost, QueueError
from cio_worker.queue import NewTask, open_queue
from tests.pg_server import PostgresServer

psycopg = pytest.importorskip("psycopg")

from cio_worker.queue.postgres import SCHEMA_VERSION, PostgresQueue, init_schema, redact  # noqa: E402

JOB = {
    "title": "race",
    "project": "default",
    "storage": "file:///tmp/storage",
    "output_path": "/proj/renders",
    "autoretry_policy": {"preempted": {"max_retries": 3}, "failed": {"max_retries": 1}},
}


def tasks(n: int) -> list[NewTask]:
    return [NewTask(frames=str(i + 1), command=f"cnode -image_frames_list {i + 1}") for i in range(n)]


def sql(url: str, statement: str, *args: object) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, args)
        return cur.fetchall() if cur.description else []


def test_a_database_without_the_schema_is_refused_until_queue_init(pg_server: PostgresServer) -> None:
    url = pg_server.create_database(initialised=False)
    try:
        with pytest.raises(QueueError, match=r"no cio_worker schema; create it with `cio-worker queue init") as err:
            PostgresQueue(url)
        assert err.value.code == "queue_schema"
        assert sql(url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]  # opening wrote nothing
        assert init_schema(url) == (None, SCHEMA_VERSION)
        assert init_schema(url) == (SCHEMA_VERSION, SCHEMA_VERSION)  # twice is harmless
        with PostgresQueue(url) as q:
            job = q.create_job(JOB, tasks(2))
            assert [t.state for t in q.tasks(job)] == ["pending", "pending"]
        indexes = {r[0] for r in sql(url, "SELECT indexdef FROM pg_indexes WHERE tablename = 'tasks'")}
        assert any("WHERE (state = 'pending'::text)" in i for i in indexes), indexes
        assert any("WHERE (state = 'leased'::text)" in i for i in indexes), indexes
    finally:
        pg_server.drop_database(url)


def test_older_and_newer_schemas_are_refused_with_what_to_run(pg_url: str) -> None:
    sql(pg_url, "UPDATE schema_version SET version = %s", SCHEMA_VERSION + 1)
    with pytest.raises(QueueError, match="newer than this cio_worker's .*upgrade cio-worker"):
        PostgresQueue(pg_url)
    with pytest.raises(QueueError, match="newer"):
        init_schema(pg_url)  # never "migrates" a schema it does not know
    sql(pg_url, "UPDATE schema_version SET version = 0")
    with pytest.raises(QueueError, match=r"older than this cio_worker's .*queue init"):
        open_queue(pg_url)


def test_lease_times_come_from_the_database_clock(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_queue(pg_url) as q:
        job = q.create_job(JOB, tasks(1))
        # This machine's clock is a day off: leases must not notice.
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 86_400)
        lease = q.claim("agent-a", 30)
        db_now = sql(pg_url, "SELECT extract(epoch FROM clock_timestamp())::float8")[0][0]
        assert lease is not None and abs(lease.expires_at - (db_now + 30)) < 5
        reply = q.heartbeat(lease, 60)
        assert abs(reply.expires_at - (db_now + 60)) < 5
        monkeypatch.setattr(time, "time", real)
        assert q.tasks(job)[0].lease_expires == pytest.approx(reply.expires_at)


def test_a_lease_expires_by_the_database_clock_and_its_holder_loses_it(pg_url: str) -> None:
    with open_queue(pg_url) as q:
        job = q.create_job(JOB, tasks(1))
        first = q.claim("agent-a", 0.3)
        assert first is not None
        assert q.claim("agent-b", 30) is None  # still held
        time.sleep(0.5)
        second = q.claim("agent-b", 30)
        assert second is not None and second.task_id == first.task_id
        with pytest.raises(LeaseLost):
            q.heartbeat(first, 30)
        with pytest.raises(LeaseLost):
            q.complete(first)
        q.complete(second)
        row = q.tasks(job)[0]
        assert (row.state, row.attempts["preempted"], row.worker) == ("done", 1, "agent-b")


def _race_worker(url: str, worker: str, out: str, start: float) -> None:
    time.sleep(max(0.0, start - time.time()))
    q = open_queue(url)
    claimed = []
    while True:
        lease = q.claim(worker, 60)
        if lease is None:
            break
        claimed.append(lease.task_id)
        q.complete(lease)
    q.close()
    Path(out).write_text(json.dumps(claimed))


def test_eight_processes_race_for_2000_tasks_and_each_is_claimed_once(pg_url: str, tmp_path: Path) -> None:
    with open_queue(pg_url) as q:
        job = q.create_job(JOB, tasks(2000))
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"w{i}.json" for i in range(8)]
    start = time.time() + 2.0  # every process connected before the first claim
    procs = [ctx.Process(target=_race_worker, args=(pg_url, f"agent-{i}", str(o), start)) for i, o in enumerate(outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    claimed = [t for o in outs for t in json.loads(o.read_text())]
    assert len(claimed) == 2000 and len(set(claimed)) == 2000
    assert sum(1 for o in outs if json.loads(o.read_text())) >= 2  # the work really was shared
    with open_queue(pg_url) as q:
        rows = q.tasks(job)
        assert {r.state for r in rows} == {"done"}
        assert all(r.attempt_count == 0 for r in rows)
        claims = [e for e in q.events(job) if e.kind == "claimed"]
        assert len(claims) == 2000


def test_the_queue_comes_back_after_the_server_restarts(pg_server: PostgresServer, pg_url: str) -> None:
    q = PostgresQueue(pg_url)
    try:
        job = q.create_job(JOB, tasks(3))
        lease = q.claim("agent-a", 60)
        assert lease is not None
        pg_server.restart()
        deadline = time.monotonic() + 30
        while True:  # a connection the restart cut fails once with a QueueError; the pool replaces it
            try:
                q.complete(lease)
                break
            except QueueError as exc:
                assert exc.code == "queue_unavailable", exc
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert [t.state for t in q.tasks(job)] == ["done", "pending", "pending"]
    finally:
        q.close()


def test_an_unreachable_server_is_one_clear_error_without_the_password(tmp_path: Path) -> None:
    from tests.pg_server import free_port

    url = f"postgresql://farm:s3cret-pass@127.0.0.1:{free_port()}/queue"
    with pytest.raises(QueueError) as err:
        PostgresQueue(url, connect_timeout=1)
    text = str(err.value)
    assert "s3cret-pass" not in text and "farm:***@127.0.0.1" in text
    assert err.value.code == "queue_unavailable" and "check that PostgreSQL runs there" in text
    assert redact(url) == url.replace("s3cret-pass", "***")


@pytest.mark.parametrize("url, says", [
    ("postgresql://127.0.0.1:5432/", "names no database"),
    ("postgresql://127.0.0.1:notaport/db", "cannot be read"),
])
def test_bad_postgres_urls(url: str, says: str) -> None:
    with pytest.raises(QueueError, match=says):
        open_queue(url)


def _rows_read(plan: dict, relation: str) -> int:
    """Rows the plan node tree read from ``relation``: those kept and those a filter dropped, over all loops."""
    read = 0
    if plan.get("Relation Name") == relation:
        loops = plan.get("Actual Loops", 1)
        kept = plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
        read += kept * loops
    for child in plan.get("Plans", []):
        read += _rows_read(child, relation)
    return read


def test_reports_read_only_their_own_tasks_of_a_large_new_job(pg_url: str) -> None:
    """A new job's tasks have no planner statistics until autovacuum analyses them: locking the
    tasks a batch of completions names may read the job's tasks once (a scan, for a small
    table) but never once for each report in the batch (15 ms a batch at 5,000 tasks, growing
    with the job and the batch)."""
    with PostgresQueue(pg_url) as q:
        q.create_job(JOB, tasks(3000))
        for _ in range(10):  # a job under way: 1,000 of its tasks done
            leased = q.claim_many([f"busy{i}" for i in range(100)], 600)
            assert q.complete_many([(lease, None, None, None) for lease in leased if lease]) == [None] * 100
        leases = [q.claim(f"w{i}", 600) for i in range(12)]
        assert all(leases)
        read: list[int] = []
        with q._transaction() as tx:
            real = tx.execute

            def explained(statement: str, params: object = ()) -> object:
                if "FOR UPDATE" in statement and "FROM tasks t" in statement:
                    plan = real("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params).fetchone()
                    read.append(_rows_read(next(iter(plan.values()))[0]["Plan"], "tasks"))
                return real(statement, params)

            tx.execute = explained  # type: ignore[method-assign]
            rows = q._rows_for_update(tx, leases)
        assert len(rows) == len(leases)
        assert read and read[0] <= 3000 + len(leases), f"read {read[0]} task rows to lock {len(leases)}"
        for lease in leases:  # and the completions themselves go through
            q.complete(lease)
        assert sum(t.state == "done" for t in q.tasks(leases[0].job_id)) == 1012
