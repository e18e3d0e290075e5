"""The queue contract on every backend (sqlite, postgresql): lifecycle, scouts, retry budgets,
leases, kill, downloads; sqlite's URLs, and claims from several real OS processes at once."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from cio_worker.job.document import JobInfo, RetryPolicy
from cio_worker.errors import DocumentError, LeaseLost, QueueError
from cio_worker.job.hashing import md5_b64_of_bytes
from cio_worker.queue import (
    DownloadFile,
    NewDownload,
    NewTask,
    Queue,
    SqliteQueue,
    open_queue,
)
from cio_worker.artist.status_view import format_status


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def job_spec(preempted: int = 3, failed: int = 1, title: str = "Clarisse - shot_A") -> dict:
    return {
        "title": title,
        "project": "default",
        "storage": "file:///tmp/storage",
        "output_path": "C:/proj/renders",
        "autoretry_policy": {"preempted": {"max_retries": preempted}, "failed": {"max_retries": failed}},
    }


def task(frames: str, scout: bool = False, tile: int = 1, tiles: int = 1) -> NewTask:
    return NewTask(frames=frames, command=f"cnode -image_frames_list '{frames}'", tile=tile, tiles=tiles, scout=scout)


def download(*names: str, output_dir: str = "C:/proj/renders") -> NewDownload:
    return NewDownload(
        output_dir=output_dir,
        files=tuple(
            DownloadFile(relative_path=n, md5=md5_b64_of_bytes(n.encode()), size=len(n), key=f"hashstore/{i:032x}")
            for i, n in enumerate(names)
        ),
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgresql", "http"])
def queue(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock):
    """The same contract against every backend (the test's clock stands in for the database's);
    ``http`` is the coordinator's client, with a sqlite queue behind a real coordinator."""
    if request.param == "sqlite":
        q: Queue = SqliteQueue(tmp_path / "queue.db", clock=clock)
    elif request.param == "postgresql":
        from cio_worker.queue.postgres import PostgresQueue

        q = PostgresQueue(request.getfixturevalue("pg_url"), clock=clock)
    else:
        from cio_worker.queue.http import HttpQueue
        from tests.coordinators import serving

        backend = SqliteQueue(tmp_path / "queue.db", clock=clock)
        _, token = backend.create_token("tests", ["agent", "owner"])
        with serving(backend) as url:
            q = HttpQueue(url, token, retry_seconds=2)
            q.backend = backend  # type: ignore[attr-defined]  (tokens are an admin's, not the API's)
            yield q
            q.close()
        backend.close()
        return
    yield q
    q.close()


def states(q, job_id: str) -> list[str]:
    return [t.state for t in q.tasks(job_id)]


# -- lifecycle ------------------------------------------------------------------------------------


def test_whole_lifecycle(queue: Queue, clock: Clock) -> None:
    job_id = queue.create_job(job_spec(), [task("1-2"), task("3-4"), task("5")])
    assert job_id == "00001"
    assert states(queue, job_id) == ["pending"] * 3
    assert not queue.is_finished(job_id)

    leases = [queue.claim("w1", 30), queue.claim("w2", 30), queue.claim("w1", 30)]
    assert [l.task_id for l in leases] == ["000", "001", "002"]
    assert queue.claim("w3", 30) is None
    doc = leases[1].document
    assert doc.job.id == "00001" and doc.job.output_path == "C:/proj/renders"
    assert (doc.task.id, doc.task.frames, doc.task.attempt, doc.task.frames_done) == ("001", "3-4", 1, "")
    assert leases[1].expires_at == clock.now + 30
    assert states(queue, job_id) == ["leased"] * 3

    for lease in leases:
        queue.complete(lease, download(f"img.{lease.task_id}.exr"))
    assert states(queue, job_id) == ["done"] * 3
    assert queue.is_finished(job_id)
    rows = queue.tasks(job_id)
    assert [r.worker for r in rows] == ["w1", "w2", "w1"]
    assert rows[0].frames_done == "1-2"
    (summary,) = queue.jobs()
    assert summary.id == job_id and summary.title == "Clarisse - shot_A"
    assert summary.counts == {"holding": 0, "pending": 0, "leased": 0, "done": 3, "failed": 0}
    assert summary.created == clock.now and summary.finished
    assert [e.kind for e in queue.events(job_id, "001")] == ["claimed", "done"]
    assert queue.events(job_id)[0].kind == "created"
    assert queue.job(job_id).id == job_id


def test_job_and_task_ids_are_zero_padded_and_in_order(queue: Queue) -> None:
    first = queue.create_job(job_spec(), [task(str(f)) for f in range(12)])
    second = queue.create_job(job_spec(), [task("1")])
    assert (first, second) == ("00001", "00002")
    assert [t.id for t in queue.tasks(first)][-2:] == ["010", "011"]
    # Oldest job first, then task order.
    assert [(l.job_id, l.task_id) for l in (queue.claim("w", 10), queue.claim("w", 10))] == [("00001", "000"), ("00001", "001")]


def test_job_info_placeholder_id_is_replaced(queue: Queue) -> None:
    info = JobInfo(id="00000", title="t", project="p", storage="s3://b/p", output_path="/out",
                   autoretry_policy=RetryPolicy(preempted=2, failed=0))
    job_id = queue.create_job(info, [task("7")])
    stored = queue.job(job_id)
    assert stored.id == job_id == "00001"
    assert stored.autoretry_policy == RetryPolicy(preempted=2, failed=0)
    assert queue.claim("w", 10).document.job == stored


def test_upload_only_job_is_finished_at_once(queue: Queue) -> None:
    job_id = queue.create_job(job_spec(), [])
    assert queue.is_finished(job_id)
    assert queue.tasks(job_id) == []
    assert queue.claim("w", 10) is None
    assert "no tasks" in format_status(queue, job_id)


@pytest.mark.parametrize(
    "job, tasks, field",
    [
        ({**job_spec(), "storage": "ftp://x"}, [task("1")], "job.storage"),
        (job_spec(), [task("1"), task("1-x")], "tasks[1].frames"),
        (job_spec(), [task("1", tile=5, tiles=4)], "tasks[0].tile"),
        (job_spec(), [NewTask("1", "")], "tasks[0].command"),
        (job_spec(), [("1", "cmd", 1)], None),  # a plain tuple is accepted
    ],
)
def test_bad_job_input_is_refused_and_nothing_stored(queue: Queue, job, tasks, field) -> None:
    if field is None:
        assert queue.create_job(job, tasks) == "00001"
        return
    with pytest.raises(DocumentError) as err:
        queue.create_job(job, tasks)
    assert err.value.field == field
    assert queue.jobs() == []


# -- scouts ---------------------------------------------------------------------------------------


def test_scouts_run_first_and_hold_the_rest_until_release(queue: Queue) -> None:
    job_id = queue.create_job(job_spec(), [task("1"), task("2", scout=True), task("3"), task("4", scout=True)])
    assert states(queue, job_id) == ["holding", "pending", "holding", "pending"]
    scouts = [queue.claim("w", 10), queue.claim("w", 10)]
    assert [l.task_id for l in scouts] == ["001", "003"]
    assert queue.claim("w", 10) is None
    for lease in scouts:
        queue.complete(lease)
    assert not queue.is_finished(job_id)
    assert "waiting for release" in format_status(queue)

    assert queue.release_job(job_id) == 2
    assert queue.release_job(job_id) == 0
    assert [queue.claim("w", 10).task_id, queue.claim("w", 10).task_id] == ["000", "002"]


def test_all_scout_job_is_all_pending(queue: Queue) -> None:
    job_id = queue.create_job(job_spec(), [task("1", scout=True), task("2", scout=True)])
    assert states(queue, job_id) == ["pending", "pending"]


# -- retry budgets ---------------------------------------------------------------------------------


def test_failed_budget_one_retry_then_final_with_reason(queue: Queue) -> None:
    job_id = queue.create_job(job_spec(failed=1), [task("1-3")])
    lease = queue.claim("w1", 10)
    assert queue.fail(lease, "cnode exited with status 1") == "pending"
    with pytest.raises(LeaseLost):
        queue.fail(lease, "again")  # the lease ended with the report
    retry = queue.claim("w2", 10)
    assert retry.document.task.attempt == 2
    assert queue.fail(retry, "licence server unreachable") == "failed"
    (row,) = queue.tasks(job_id)
    assert (row.state, row.reason) == ("failed", "licence server unreachable")
    assert row.attempts == {"preempted": 0, "failed": 2, "released": 0}
    assert queue.claim("w3", 10) is None
    assert queue.is_finished(job_id)


def test_failed_budget_zero_fails_at_once(queue: Queue) -> None:
    queue.create_job(job_spec(failed=0), [task("1")])
    assert queue.fail(queue.claim("w", 10), "missing file /proj/tex.exr") == "failed"


def test_preempted_budget(queue: Queue) -> None:
    job_id = queue.create_job(job_spec(preempted=1, failed=0), [task("1-4")])
    assert queue.release(queue.claim("w1", 10), "preempted", reason="GCE preemption notice") == "pending"
    assert queue.tasks(job_id)[0].reason == "GCE preemption notice"
    assert queue.release(queue.claim("w2", 10), "preempted") == "failed"
    (row,) = queue.tasks(job_id)
    assert row.attempts["preempted"] == 2
    assert "preempted twice" in row.reason


def test_clean_release_counts_but_spends_no_budget(queue: Queue) -> None:
    job_id = queue.create_job(job_spec(preempted=0, failed=0), [task("1")])
    for _ in range(3):
        assert queue.release(queue.claim("w", 10), cause="released", reason="agent shutting down") == "pending"
    lease = queue.claim("w", 10)
    assert lease.document.task.attempt == 4
    assert queue.tasks(job_id)[0].attempts == {"preempted": 0, "failed": 0, "released": 3}
    with pytest.raises(DocumentError):
        queue.release(lease, cause="failed")
    assert queue.tasks(job_id)[0].state == "leased"


# -- leases ---------------------------------------------------------------------------------------


def test_expired_lease_returns_task_counted_preempted_and_old_lease_is_lost(queue: Queue, clock: Clock) -> None:
    job_id = queue.create_job(job_spec(preempted=3), [task("1")])
    old = queue.claim("w1", 10)
    clock.advance(11)
    new = queue.claim("w2", 10)  # the claim reaps the expired lease first
    assert (new.task_id, new.document.task.attempt) == ("000", 2)
    assert new.token != old.token
    assert queue.tasks(job_id)[0].attempts["preempted"] == 1
    assert queue.tasks(job_id)[0].reason == "the lease of w1 expired"
    with pytest.raises(LeaseLost) as err:
        queue.complete(old, download("a.exr"))
    assert "leased by w2" in str(err.value)
    with pytest.raises(LeaseLost):
        queue.heartbeat(old, 10)
    queue.complete(new, download("b.exr"))
    assert [d.files[0].relative_path for d in queue.downloads(job_id)] == ["b.exr"]
    assert "lease_expired" in [e.kind for e in queue.events(job_id, "000")]


def test_expired_lease_with_budget_spent_fails(queue: Queue, clock: Clock) -> None:
    job_id = queue.create_job(job_spec(preempted=1), [task("1")])
    for _ in range(2):
        queue.claim("w", 10)
        clock.advance(10)
        assert queue.reap() == 1
    (row,) = queue.tasks(job_id)
    assert (row.state, row.attempts["preempted"]) == ("failed", 2)
    assert row.reason.startswith("lease expired twice")


def test_heartbeat_extends_the_lease(queue: Queue, clock: Clock) -> None:
    queue.create_job(job_spec(), [task("1")])
    lease = queue.claim("w1", 10)
    clock.advance(8)
    reply = queue.heartbeat(lease, 10)
    assert reply.expires_at == clock.now + 10 and reply.cancel is False
    clock.advance(8)  # past the first expiry, within the extended one
    assert queue.claim("w2", 10) is None
    assert queue.reap() == 0
    queue.complete(lease)
    with pytest.raises(LeaseLost):
        queue.complete(lease)
    with pytest.raises(LeaseLost):
        queue.heartbeat(lease, 10)


def test_complete_twice_makes_no_second_download_record(queue: Queue) -> None:
    job_id = queue.create_job(job_spec(), [task("1")])
    lease = queue.claim("w", 10)
    queue.complete(lease, download("a.exr"))
    with pytest.raises(LeaseLost):
        queue.complete(lease, download("a.exr"))
    assert len(queue.downloads(job_id, state=None)) == 1


def test_bad_claim_arguments(queue: Queue) -> None:
    with pytest.raises(DocumentError):
        queue.claim("", 10)
    with pytest.raises(DocumentError):
        queue.claim("w", 0)


# -- kill -----------------------------------------------------------------------------------------


def test_kill_job_fails_waiting_tasks_and_cancels_leased_ones(queue: Queue, clock: Clock) -> None:
    job_id = queue.create_job(job_spec(failed=5), [task("1", scout=True), task("2", scout=True), task("3"), task("4")])
    running, expiring = queue.claim("w1", 10), queue.claim("w2", 10)
    other = queue.create_job(job_spec(), [task("9")])
    assert queue.kill_job(job_id) == 4
    assert states(queue, job_id) == ["leased", "leased", "failed", "failed"]
    assert queue.tasks(job_id)[2].reason == "killed by owner"
    assert queue.heartbeat(running, 10).cancel is True
    assert queue.claim("w3", 10).job_id == other  # nothing of the killed job is handed out
    assert queue.fail(running, "stopped: job killed") == "failed"  # not retried despite the budget
    clock.advance(11)
    queue.reap()
    assert [t.reason for t in queue.tasks(job_id)] == ["killed by owner"] * 4
    assert queue.is_finished(job_id)
    assert queue.jobs()[0].killed
    with pytest.raises(LeaseLost):
        queue.heartbeat(expiring, 10)


def test_unknown_job_is_a_clear_error(queue: Queue) -> None:
    for call in (queue.release_job, queue.kill_job, queue.tasks, queue.job, queue.is_finished):
        with pytest.raises(QueueError) as err:
            call("00042")
        assert err.value.code == "unknown_job" and "00042" in str(err.value)


# -- frames done ----------------------------------------------------------------------------------


def test_frames_done_accumulate_across_attempts(queue: Queue) -> None:
    job_id = queue.create_job(job_spec(preempted=5), [task("1-10")])
    assert queue.release(queue.claim("w1", 10), frames_done="1-3") == "pending"
    lease = queue.claim("w2", 10)
    assert lease.document.task.frames_done == "1-3"
    with pytest.raises(DocumentError) as err:
        queue.release(lease, frames_done="11")  # not a frame of this task: refused, nothing changes
    assert err.value.field == "frames_done"
    assert queue.tasks(job_id)[0].state == "leased"
    queue.release(lease, frames_done="5,4")
    lease = queue.claim("w3", 10)
    assert (lease.document.task.frames_done, lease.document.task.attempt) == ("1-5", 3)
    queue.complete(lease)
    assert queue.tasks(job_id)[0].frames_done == "1-10"


# -- downloads ------------------------------------------------------------------------------------


def test_download_records_and_mark_downloaded(queue: Queue) -> None:
    job_id = queue.create_job(job_spec(), [task("1-2"), task("3-4")])
    first, second = queue.claim("w", 10), queue.claim("w", 10)
    queue.release(first, frames_done="1", download=download("img.0001.exr"))  # a partial delivery
    queue.complete(second, download("img.0003.exr", "sub/img.0004.exr"))
    records = queue.downloads(job_id)
    assert [(r.task_id, r.state) for r in records] == [("000", "pending"), ("001", "pending")]
    as_dict = records[1].to_dict()
    assert set(as_dict) == {"download_id", "job_id", "task_id", "output_dir", "size", "files", "state"}
    assert as_dict["job_id"] == "00001" and as_dict["task_id"] == "001"
    assert as_dict["size"] == len("img.0003.exr") + len("sub/img.0004.exr")
    assert as_dict["files"][1] == {
        "relative_path": "sub/img.0004.exr",
        "md5": md5_b64_of_bytes(b"sub/img.0004.exr"),
        "size": 16,
        "key": "hashstore/" + "0" * 31 + "1",
    }
    queue.mark_downloaded(records[0].download_id)
    queue.mark_downloaded(records[0].download_id)  # again: no harm
    assert [r.task_id for r in queue.downloads(job_id)] == ["001"]
    assert [r.task_id for r in queue.downloads(state="downloaded")] == ["000"]
    assert len(queue.downloads(None, state=None)) == 2
    with pytest.raises(QueueError) as err:
        queue.mark_downloaded("00001-007-1")
    assert err.value.code == "unknown_download"
    with pytest.raises(QueueError):
        queue.downloads(state="lost")


@pytest.mark.parametrize(
    "bad, field",
    [
        (NewDownload("C:/out", (DownloadFile("/abs.exr", md5_b64_of_bytes(b""), 0, "k"),)), "download.files[0].relative_path"),
        (NewDownload("C:/out", (DownloadFile("../up.exr", md5_b64_of_bytes(b""), 0, "k"),)), "download.files[0].relative_path"),
        (NewDownload("C:/out", (DownloadFile("a.exr", "abc", 0, "k"),)), "download.files[0].md5"),
        (NewDownload("C:/out", (DownloadFile("a.exr", md5_b64_of_bytes(b""), -1, "k"),)), "download.files[0].size"),
        (NewDownload("", ()), "download.output_dir"),
    ],
)
def test_bad_download_record_is_refused_and_the_lease_still_holds(queue: Queue, bad, field) -> None:
    job_id = queue.create_job(job_spec(), [task("1")])
    lease = queue.claim("w", 10)
    with pytest.raises(DocumentError) as err:
        queue.complete(lease, bad)
    assert err.value.field == field
    assert queue.downloads(job_id, state=None) == []
    queue.complete(lease, download("a.exr"))
    assert queue.tasks(job_id)[0].state == "done"


# -- URLs and files -------------------------------------------------------------------------------


def test_open_queue_absolute_and_relative_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = open_queue(f"sqlite:///{tmp_path}/abs.db")  # tmp_path starts with '/': four slashes
    job_id = absolute.create_job(job_spec(), [task("1")])
    absolute.close()
    assert (tmp_path / "abs.db").is_file()
    again = open_queue(f"sqlite:////{str(tmp_path).lstrip('/')}/abs.db")
    assert [j.id for j in again.jobs()] == [job_id]
    again.close()

    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = open_queue("sqlite:///sub/rel.db")
    relative.close()
    assert (tmp_path / "sub" / "rel.db").is_file()


def test_bad_urls_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a database, just some text that is long enough" * 10)
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE customers (name TEXT)")
    other.commit()
    other.close()
    cases = {
        "redis://localhost/0": "unknown scheme",
        "queue.db": "no scheme",
        "": "empty",
        "sqlite://host/queue.db": "sqlite:///relative",
        "sqlite:///": "names no database",
        f"sqlite:///{tmp_path}/q.db?mode=ro": "no options",
        f"sqlite:///{tmp_path}/missing/q.db": "does not exist",
        f"sqlite:///{tmp_path}": "is a directory",
        f"sqlite:///{tmp_path}/notes.txt": "not a cio_worker queue",
        f"sqlite:///{tmp_path}/other.db": "not a cio_worker queue",
    }
    for url, words in cases.items():
        with pytest.raises(QueueError) as err:
            open_queue(url)
        assert words in str(err.value), url
    assert not (tmp_path / "missing").exists()
    # The foreign database is left as it was: its table is there and it was not switched to WAL.
    other = sqlite3.connect(tmp_path / "other.db")
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert other.execute("SELECT name FROM sqlite_master").fetchall() == [("customers",)]
    other.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    SqliteQueue(tmp_path / "q.db").close()
    raw = sqlite3.connect(tmp_path / "q.db")
    raw.execute("UPDATE schema_version SET version = 99")
    raw.commit()
    raw.close()
    with pytest.raises(QueueError) as err:
        open_queue(f"sqlite:///{tmp_path}/q.db")
    assert err.value.code == "queue_schema"


def test_closed_queue_refuses_calls(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q.db")
    q.close()
    with pytest.raises(QueueError):
        q.jobs()


# -- status view ----------------------------------------------------------------------------------


def test_format_status(queue: Queue) -> None:
    assert format_status(queue) == "no jobs in the queue"
    job_id = queue.create_job(job_spec(title="shot_B", failed=2), [task("1-4", tile=2, tiles=4), task("5-8")])
    first, _ = queue.claim("render-7", 10), queue.claim("render-8", 10)
    queue.fail(first, "cnode exited with status 3")
    listing = format_status(queue)
    assert "00001" in listing and "shot_B" in listing and "running" in listing
    assert listing.splitlines()[0].split()[:3] == ["JOB", "TITLE", "STATUS"]

    view = format_status(queue, job_id)
    rows = {line.split()[0]: line for line in view.splitlines() if line[:3].isdigit()}
    assert set(rows) == {"000", "001"}
    assert "pending" in rows["000"] and "2/4" in rows["000"] and "1 (failed 1)" in rows["000"]
    assert "render-7" in rows["000"] and "previous: cnode exited with status 3" in rows["000"]
    assert "leased" in rows["001"] and "render-8" in rows["001"] and "5-8" in rows["001"]
    with pytest.raises(QueueError):
        format_status(queue, "00009")


# -- processes ------------------------------------------------------------------------------------


def _claim_until_empty(url: str, worker: str, out: str, start=None) -> None:
    q = open_queue(url)
    claimed = []
    if start is not None:
        start.wait(60)  # all processes claim at the same time, not one after another as they boot
    while (lease := q.claim(worker, 60)) is not None:
        q.heartbeat(lease, 60)
        q.complete(lease, download(f"{lease.task_id}.exr"))
        claimed.append([lease.job_id, lease.task_id, lease.token])
    q.close()
    Path(out).write_text(json.dumps(claimed))


def _create_one_job(url: str, out: str) -> None:
    q = open_queue(url)
    job_id = q.create_job(job_spec(), [task("1")])
    q.close()
    Path(out).write_text(job_id)


def _run_all(ctx, targets: list[tuple]) -> None:
    procs = [ctx.Process(target=target, args=args) for target, args in targets]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_four_processes_claim_200_tasks_each_done_exactly_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/queue.db"
    q = open_queue(url)
    job_id = q.create_job(job_spec(), [task(str(f)) for f in range(1, 201)])
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"worker{i}.json" for i in range(4)]
    start = ctx.Barrier(4)
    _run_all(ctx, [(_claim_until_empty, (url, f"w{i}", str(out), start)) for i, out in enumerate(outs)])

    claims = [tuple(c) for out in outs for c in json.loads(out.read_text())]
    assert len(claims) == 200
    assert len({(j, t) for j, t, _ in claims}) == 200  # no task claimed twice
    assert states(q, job_id) == ["done"] * 200
    assert sorted(r.task_id for r in q.downloads(job_id)) == [f"{i:03d}" for i in range(200)]
    assert [e.kind for e in q.events(job_id)].count("claimed") == 200
    q.close()


def test_fresh_file_opened_by_several_processes_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fresh.db"
    outs = [tmp_path / f"job{i}.txt" for i in range(4)]
    _run_all(multiprocessing.get_context("spawn"), [(_create_one_job, (url, str(out))) for out in outs])
    assert sorted(out.read_text() for out in outs) == ["00001", "00002", "00003", "00004"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_queue_object_survives_fork(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q.db")
    job_id = q.create_job(job_spec(), [task(str(f)) for f in range(1, 21)])
    first = q.claim("parent", 60)  # the parent's connection is open and has been used
    out = tmp_path / "child.json"
    ctx = multiprocessing.get_context("fork")
    _run_all(ctx, [(_claim_until_empty_with, (q, "child", str(out)))])
    q.complete(first)  # the parent's connection still works after the child's exit
    assert len(json.loads(out.read_text())) == 19
    assert states(q, job_id) == ["done"] * 20
    q.close()


def _claim_until_empty_with(q: SqliteQueue, worker: str, out: str) -> None:
    claimed = []
    while (lease := q.claim(worker, 60)) is not None:
        q.complete(lease)
        claimed.append(lease.task_id)
    Path(out).write_text(json.dumps(claimed))


def test_a_stored_job_that_no_longer_reads_fails_its_tasks_and_claim_goes_on(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q.db")
    broken = q.create_job(job_spec(), [task("1")])
    good = q.create_job(job_spec(), [task("2")])
    q.close()
    raw = sqlite3.connect(tmp_path / "q.db")
    raw.execute("UPDATE jobs SET document = ? WHERE number = 1", (json.dumps({"id": "00001", "storage": "ftp://x"}),))
    raw.commit()
    raw.close()
    q = SqliteQueue(tmp_path / "q.db")
    assert q.claim("w", 10).job_id == good
    (row,) = q.tasks(broken)
    assert row.state == "failed" and "stored job document is invalid" in row.reason
    q.close()


# -- operation ids, workers, tokens (every backend) --------------------------------------------------


def test_a_report_resent_with_its_operation_id_is_applied_once(queue: Queue) -> None:
    job = queue.create_job(job_spec(failed=3), [task("1"), task("2"), task("3")])
    first = queue.claim("agent-a", 30)
    queue.complete(first, download("beauty.0001.png"), op_id="op-1")
    queue.complete(first, download("beauty.0001.png"), op_id="op-1")  # the answer was lost; resent
    second = queue.claim("agent-a", 30)
    assert queue.fail(second, "crashed", op_id="op-2") == "pending"
    assert queue.fail(second, "crashed", op_id="op-2") == "pending"
    third = queue.claim("agent-a", 30)
    assert queue.release(third, "preempted", frames_done="", op_id="op-3") == "pending"
    assert queue.release(third, "preempted", frames_done="", op_id="op-3") == "pending"
    rows = {r.id: r for r in queue.tasks(job)}
    assert rows["000"].state == "done" and len(queue.downloads(job)) == 1
    assert rows[second.task_id].attempts["failed"] == 1 and rows[third.task_id].attempts["preempted"] == 1
    kinds = [e.kind for e in queue.events(job)]
    assert kinds.count("done") == 1 and kinds.count("failed") == 1 and kinds.count("preempted") == 1
    # Without the id, the same resend is a report on a lease that is gone.
    with pytest.raises(LeaseLost):
        queue.complete(first)


def test_a_report_on_another_workers_lease_changes_nothing(queue: Queue) -> None:
    job = queue.create_job(job_spec(), [task("1")])
    lease = queue.claim("agent-a", 30)
    stolen = type(lease)(**{**lease.__dict__, "worker": "agent-b"})
    before = [(e.kind, e.detail) for e in queue.events(job)]
    for report in (lambda: queue.complete(stolen), lambda: queue.fail(stolen, "x"), lambda: queue.release(stolen),
                   lambda: queue.heartbeat(stolen, 30)):
        with pytest.raises(LeaseLost, match="belongs to agent-a"):
            report()
    assert [(e.kind, e.detail) for e in queue.events(job)] == before
    assert queue.tasks(job)[0].state == "leased"
    queue.complete(lease, op_id="op-a")
    with pytest.raises(LeaseLost):  # nor can another worker replay agent-a's operation
        queue.complete(stolen, op_id="op-a")


def test_a_completion_claims_the_workers_next_task_when_asked(queue: Queue, clock: Clock) -> None:
    job = queue.create_job(job_spec(), [task("1"), task("2"), task("3")])
    first = queue.claim("agent-a", 30)
    assert queue.complete(first, op_id="op-1") is None  # not asked: nothing claimed
    assert states(queue, job) == ["done", "pending", "pending"]
    second = queue.claim("agent-a", 30)
    third = queue.complete(second, download("b.exr"), op_id="op-2", next_lease_seconds=45)
    assert third is not None and (third.job_id, third.task_id, third.worker) == (job, "002", "agent-a")
    assert third.expires_at == clock.now + 45
    assert third.document.task.frames == "3" and third.document.task.attempt == 1
    assert states(queue, job) == ["done", "done", "leased"]
    assert queue.heartbeat(third, 30).cancel is False  # a lease like any claim's
    assert [(e.kind, e.worker) for e in queue.events(job, "002")] == [("claimed", "agent-a")]
    assert queue.complete(third, op_id="op-3", next_lease_seconds=45) is None  # nothing left to claim
    assert queue.is_finished(job)
    assert len(queue.downloads(job)) == 1


def test_a_resent_completion_gets_the_lease_it_claimed_and_claims_no_other(queue: Queue) -> None:
    job = queue.create_job(job_spec(), [task("1"), task("2"), task("3")])
    first = queue.claim("agent-a", 30)
    second = queue.complete(first, op_id="op-1", next_lease_seconds=30)
    assert second is not None
    # The answer was lost and the report resent: applied once, and the same next task comes back.
    again = queue.complete(first, op_id="op-1", next_lease_seconds=30)
    assert again is not None and (again.task_id, again.token, again.worker) == (second.task_id, second.token, "agent-a")
    assert again.document.task.frames == "2" and again.expires_at == second.expires_at
    assert states(queue, job) == ["done", "leased", "pending"]
    assert queue.complete(first, op_id="op-1") is None  # not asked for it: none
    stolen = type(second)(**{**second.__dict__, "worker": "agent-b"})
    with pytest.raises(LeaseLost):
        queue.complete(stolen, op_id="op-2", next_lease_seconds=30)
    with pytest.raises(DocumentError, match="next_lease_seconds"):
        queue.complete(second, op_id="op-3", next_lease_seconds=0)
    assert states(queue, job) == ["done", "leased", "pending"]
    assert queue.tasks(job)[1].worker == "agent-a"
    # Once that lease is no longer the worker's, a resend brings nothing.
    queue.release(second, "released", op_id="op-4")
    assert queue.complete(first, op_id="op-1", next_lease_seconds=30) is None
    assert states(queue, job) == ["done", "pending", "pending"]


def test_a_claim_recorded_under_its_op_id_is_found_again_while_its_lease_holds(queue: Queue) -> None:
    if not hasattr(queue, "claim_many"):
        pytest.skip("claim_many is the engines' (the coordinator batches claims into it)")
    job = queue.create_job(job_spec(), [task("1"), task("2"), task("3")])
    [first] = queue.claim_many(["w1"], 30, ["c-1"])
    again = queue.claimed_after("c-1", "w1")
    assert again is not None and (again.task_id, again.token, again.expires_at) == (first.task_id, first.token, first.expires_at)
    assert again.document.task.frames == "1" and again.document.task.attempt == 1
    assert queue.claimed_after("c-1", "w2") is None and queue.claimed_after("c-2", "w1") is None
    # A copy of the claim that crossed the first (both sent before either was answered) leases
    # too, without an error; the first record stands.
    [crossed] = queue.claim_many(["w1"], 30, ["c-1"])
    assert crossed.task_id == "001" and queue.claimed_after("c-1", "w1").token == first.token
    queue.complete(first)
    assert queue.claimed_after("c-1", "w1") is None  # no longer the worker's lease
    assert states(queue, job) == ["done", "leased", "pending"]
    # A report whose op id ends as a claim's record does is not read as one.
    queue.complete(crossed, op_id="c-3+next")
    assert queue.claimed_after("c-3", "w1") is None


def test_workers_register_and_their_state_follows_their_tasks(queue: Queue, clock: Clock) -> None:
    from cio_worker.queue import WorkerStatus

    info = {"instance_id": "i-123", "provider": "gce", "zone": "us-central1-a", "machine_type": "n1-standard-8",
            "preemptible": True, "cores": 8, "memory_gb": 30.0, "version": "0.1.0"}
    queue.register_worker("agent-a", info)
    queue.register_worker("agent-b", {"provider": "none"})
    job = queue.create_job(job_spec(), [task("1"), task("2")])
    lease = queue.claim("agent-a", 30)
    [a, b] = queue.workers()
    assert (a.id, a.state, a.job_id, a.task_id, a.info) == ("agent-a", "syncing", job, "000", info)
    assert (b.state, b.job_id) == ("idle", None)
    queue.heartbeat(lease, 30, WorkerStatus("rendering", progress=40.0, detail="frame 1"))
    a = queue.workers()[0]
    assert (a.state, a.progress, a.detail) == ("rendering", 40.0, "frame 1")
    queue.complete(lease)
    second = queue.claim("agent-a", 30)
    queue.fail(second, "crashed")
    a = queue.workers()[0]
    assert (a.state, a.job_id, a.tasks_done, a.tasks_failed) == ("idle", None, 1, 1)
    clock.advance(200)
    queue.worker_report("agent-b", WorkerStatus("idle"))
    states = {w.id: w.state for w in queue.workers(gone_after=120)}
    assert states == {"agent-a": "gone", "agent-b": "idle"}
    with pytest.raises(DocumentError, match="status.state"):
        queue.worker_report("agent-b", WorkerStatus("dancing"))
    with pytest.raises(QueueError, match="not registered"):
        queue.worker_report("agent-z", WorkerStatus("idle"))


def test_tokens_are_stored_hashed_and_can_be_revoked(queue: Queue) -> None:
    from cio_worker.queue.credentials import TokenError

    queue = getattr(queue, "backend", queue)  # tokens are made on the coordinator's database
    row, text = queue.create_token("render fleet", "agent")
    owner, owner_text = queue.create_token("alice", ["owner", "agent"])
    assert text.startswith(f"cio_{row.id}_") and row.scopes == {"agent"} and owner.scopes == {"owner", "agent"}
    assert queue.authenticate(text).id == row.id
    assert queue.authenticate(owner_text).name == "alice"
    assert queue.authenticate(text[:-1] + ("A" if text[-1] != "A" else "B")) is None  # wrong secret
    assert queue.authenticate("cio_000000000000_" + "x" * 43) is None and queue.authenticate("nonsense") is None
    assert all(text not in repr(r) for r in queue.list_tokens())
    assert queue.revoke_token("render fleet") == 1
    assert queue.authenticate(text) is None and queue.authenticate(owner_text) is not None
    states = {r.name: r.active for r in queue.list_tokens()}
    assert (states["render fleet"], states["alice"]) == (False, True)
    with pytest.raises(TokenError):
        queue.create_token("x", "root")


def test_a_version_1_sqlite_queue_is_migrated_when_opened(tmp_path: Path) -> None:
    from cio_worker.queue import sqlite as sqlite_backend

    raw = sqlite3.connect(tmp_path / "old.db")
    for statement in sqlite_backend.MIGRATIONS[0][1]:
        raw.execute(statement)
    raw.execute("INSERT INTO schema_version (version) VALUES (1)")
    raw.execute("INSERT INTO jobs (title, document, created, scout, retry_preempted, retry_failed)"
                " VALUES ('old', '{}', 0, 0, 1, 1)")
    raw.commit()
    raw.close()
    q = SqliteQueue(tmp_path / "old.db")
    try:
        assert [j.title for j in q.jobs()] == ["old"]
        q.register_worker("agent-a", {})
        assert [w.id for w in q.workers()] == ["agent-a"]
    finally:
        q.close()
    raw = sqlite3.connect(tmp_path / "old.db")
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(sqlite_backend.SCHEMA_VERSION,)]
    raw.close()


def database_queue(backend: str, tmp_path: Path, request, clock: Clock | None = None):
    """A sqlite or PostgreSQL queue of its own (the calls the coordinator makes on a database)."""
    if backend == "sqlite":
        return SqliteQueue(tmp_path / "q.db", clock=clock) if clock else SqliteQueue(tmp_path / "q.db")
    from cio_worker.queue.postgres import PostgresQueue

    return PostgresQueue(request.getfixturevalue("pg_url"), clock=clock)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_claim_many_gives_each_worker_its_own_task_in_order(backend: str, tmp_path: Path, request) -> None:
    """What a coordinator does with claims that arrive together: one transaction, a distinct task
    per worker in queue order, each worker's row following its task, None for those left over;
    a task whose stored document no longer reads is failed and skipped."""
    q = database_queue(backend, tmp_path, request)
    try:
        job_id = q.create_job(job_spec(), [task(str(n)) for n in range(1, 5)])
        for w in ("a", "b", "c", "d", "e", "f"):
            q.register_worker(w, {})
        with q._transaction() as tx:  # a task whose stored row no longer reads
            tx.execute("UPDATE tasks SET frames = 'x' WHERE number = 2")
        leases = q.claim_many(["a", "b", "c", "d", "e", "f"], 60)
        assert [None if lease is None else lease.task_id for lease in leases] == ["000", "001", "003", None, None, None]
        assert [lease.worker for lease in leases[:3]] == ["a", "b", "c"]
        assert len({lease.token for lease in leases[:3]}) == 3
        rows = {r.id: r for r in q.tasks(job_id)}
        assert rows["002"].state == "failed" and "stored task is invalid" in rows["002"].reason
        assert [rows[t].state for t in ("000", "001", "003")] == ["leased"] * 3
        workers = {w.id: w for w in q.workers()}
        assert (workers["b"].state, workers["b"].task_id) == ("syncing", "001")
        assert workers["d"].state == "idle" and workers["d"].task_id is None
        claimed = [e for e in q.events(job_id) if e.kind == "claimed"]
        assert sorted((e.task_id, e.worker) for e in claimed) == [("000", "a"), ("001", "b"), ("003", "c")]
        q.complete(leases[1])  # a lease from a batch reports like any other
        assert {r.id: r.state for r in q.tasks(job_id)}["001"] == "done"
        assert q.claim_many(["a"], 60) == [None]
    finally:
        q.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_complete_many_applies_each_report_alone(backend: str, tmp_path: Path, request) -> None:
    """Completions sent together share a transaction, but each is answered as if alone: applied,
    applied before (its op id), or refused (a lost lease, an unknown task) with nothing changed."""
    q = database_queue(backend, tmp_path, request)
    try:
        job_id = q.create_job(job_spec(), [task(str(n)) for n in range(1, 5)])
        for w in ("a", "b", "c", "d"):
            q.register_worker(w, {})
        a, b, c, d = q.claim_many(["a", "b", "c", "d"], 60)
        q.complete(d, None, "op-d")  # sent before; its copy below is answered alike
        from dataclasses import replace as _replace

        stolen = _replace(b, worker="a")  # a report on another worker's lease
        unknown = _replace(c, task_id="999")
        answers = q.complete_many([(a, download("a.exr"), "op-a"), (stolen, None, "op-x"), (unknown, None, None),
                                   (c, None, "op-c"), (d, None, "op-d")])
        assert answers[0] is None and answers[3] is None and answers[4] is None
        assert isinstance(answers[1], LeaseLost)
        assert isinstance(answers[2], QueueError) and answers[2].code == "unknown_task"
        states = {r.id: r.state for r in q.tasks(job_id)}
        assert states == {a.task_id: "done", b.task_id: "leased", c.task_id: "done", d.task_id: "done"}
        assert len([e for e in q.events(job_id) if e.kind == "done"]) == 3
        assert [r.files[0].relative_path for r in q.downloads(job_id)] == ["a.exr"]
        workers = {w.id: w for w in q.workers()}
        assert (workers["a"].tasks_done, workers["b"].tasks_done, workers["c"].tasks_done) == (1, 0, 1)
        # Copies of one report in one batch: applied once; another report on that lease is refused.
        e = b  # still leased to b
        copies = q.complete_many([(e, None, "op-e"), (e, None, "op-e"), (e, None, "op-other")])
        assert copies[:2] == [None, None] and isinstance(copies[2], LeaseLost)
        assert len([ev for ev in q.events(job_id) if ev.kind == "done" and ev.task_id == e.task_id]) == 1
        assert {w.id: w for w in q.workers()}["b"].tasks_done == 1
    finally:
        q.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_batch_of_completions_records_every_attempt_event_and_operation_as_sent(backend: str, tmp_path: Path,
                                                                                  request) -> None:
    """A batch's rows go to the database together (on PostgreSQL as one statement a table, each
    column an array): figures absent, partial (whole numbers in real-valued columns), whole;
    text with quotes, braces and non-ASCII; every row read back as it was sent, and a worker
    that ended two tasks in the batch counted twice."""
    from cio_worker.queue.base import AttemptFigures

    q = database_queue(backend, tmp_path, request)
    try:
        job_id = q.create_job(job_spec(), [task(str(n)) for n in range(1, 5)])
        for worker in ("w-1", "w-2", "w-3"):
            q.register_worker(worker, {})
        leases = q.claim_many(["w-1", "w-2", "w-3", "w-3"], 60)  # w-3 runs two (an agent of two slots)
        busy = {w.id: (w.state, w.task_id) for w in q.workers()}
        assert (busy["w-1"], busy["w-3"]) == (("syncing", leases[0].task_id), ("syncing", leases[3].task_id))
        figures = [None, AttemptFigures(wall_seconds=7, peak_rss_bytes=2**40),
                   AttemptFigures(wall_seconds=1.5, cpu_seconds=0.25, sync_bytes=3, instance_type='n1 "{é}"',
                                  hourly_price=0.38, cost=0.001, currency="USD", log="s3://b/p/_logs/{x}.log"),
                   AttemptFigures()]
        answers = q.complete_many([(lease, None, f"op-{i}-'{{é}}'", f) for i, (lease, f) in enumerate(zip(leases, figures))])
        assert answers == [None] * 4
        recorded = {a.task_id: a for a in q.attempts(job_id)}
        for lease, sent in zip(leases, figures):
            got = recorded[lease.task_id]
            assert (got.worker, got.outcome, got.attempt) == (lease.worker, "done", 1)
            expected = AttemptFigures() if sent is None else sent
            assert got.figures.to_dict() == {**expected.to_dict(), "drain_seconds": None, "storage_scheme": ""}
        assert {w.id: (w.tasks_done, w.state) for w in q.workers()} == {"w-1": (1, "idle"), "w-2": (1, "idle"),
                                                                        "w-3": (2, "idle")}
        done = [e for e in q.events(job_id) if e.kind == "done"]
        assert sorted((e.task_id, e.worker) for e in done) == sorted((l.task_id, l.worker) for l in leases)
        claimed = [e for e in q.events(job_id) if e.kind == "claimed"]
        assert sorted(e.detail for e in claimed) == ["attempt 1"] * 4
        # every operation id was recorded as sent: each copy is answered as applied before
        again = q.complete_outcomes([(lease, None, f"op-{i}-'{{é}}'", None) for i, lease in enumerate(leases)])
        assert [(o.state, o.replay) for o in again] == [("done", True)] * 4
    finally:
        q.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_replayed_report_is_told_from_one_applied_now(backend: str, tmp_path: Path, request) -> None:
    """What a coordinator counts by: a report's outcome says whether this call applied it or it
    is a copy (its op id) of one applied before, resent or in the same batch; the plain calls
    answer both alike, as before."""
    from cio_worker.queue.sql import ReportOutcome

    q = database_queue(backend, tmp_path, request)
    try:
        job_id = q.create_job(job_spec(), [task(str(n)) for n in range(1, 4)])
        q.register_worker("a", {})
        done, failed, released = (q.claim("a", 60) for _ in range(3))
        assert q.complete_outcomes([(done, None, "op-c"), (done, None, "op-c")]) == [
            ReportOutcome("done"), ReportOutcome("done", replay=True)]
        assert q.complete_outcomes([(done, None, "op-c")]) == [ReportOutcome("done", replay=True)]
        assert q.fail_outcome(failed, "boom", "op-f") == ReportOutcome("pending")
        assert q.fail_outcome(failed, "boom", "op-f") == ReportOutcome("pending", replay=True)
        assert q.release_outcome(released, "preempted", op_id="op-r") == ReportOutcome("pending")
        assert q.release_outcome(released, "preempted", op_id="op-r") == ReportOutcome("pending", replay=True)
        assert q.complete_many([(done, None, "op-c")]) == [None]
        assert q.fail(failed, "boom", "op-f") == "pending"
        assert q.release(released, "preempted", op_id="op-r") == "pending"
        [refused] = q.complete_outcomes([(done, None, "op-other")])  # a new report on the ended lease
        assert isinstance(refused, LeaseLost)
        assert sorted(a.outcome for a in q.attempts(job_id)) == ["done", "failed", "preempted"]
    finally:
        q.close()


def _open_queue_without_overrides(path: Path) -> tuple[str, str]:
    """(code, message) of the QueueError that opening ``path`` gives in a child process that file
    permissions apply to: root without the capabilities that let it ignore them."""
    import shutil
    import subprocess
    import sys

    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root ignores file permissions and setpriv (util-linux), which drops that, is missing")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    code = ("import sys\nfrom cio_worker.queue.sqlite import SqliteQueue\nfrom cio_worker.errors import QueueError\n"
            "try:\n    SqliteQueue(sys.argv[1])\nexcept QueueError as e:\n    print(e.code); print(e)\n")
    done = subprocess.run([*prefix, sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0 and done.stdout, done.stderr
    found, message = done.stdout.split("\n", 1)
    return found, message.strip()


def test_a_queue_in_a_read_only_directory_is_reported_as_read_only_not_as_no_queue(tmp_path: Path) -> None:
    shared = tmp_path / "queues"
    shared.mkdir()
    q = SqliteQueue(shared / "farm.db")
    job_id = q.create_job(job_spec(), [task("1")])
    q.close()
    for leftover in shared.glob("farm.db-*"):
        leftover.unlink()  # closed cleanly: what a reader who may not write must create
    before = (shared / "farm.db").read_bytes()
    (shared / "farm.db").chmod(0o644)
    shared.chmod(0o555)
    try:
        code, message = _open_queue_without_overrides(shared / "farm.db")
        assert code == "queue_read_only", message
        assert "read-only" in message and str(shared) in message and "farm.db-wal" in message
        assert "not a cio_worker queue" not in message and "point the queue URL at a new file" not in message
        code, message = _open_queue_without_overrides(shared / "new.db")
        assert code == "queue_read_only" and f"cannot create queue {shared / 'new.db'}" in message, message
    finally:
        shared.chmod(0o755)
    assert (shared / "farm.db").read_bytes() == before and not (shared / "new.db").exists()
    q = SqliteQueue(shared / "farm.db")
    assert [j.id for j in q.jobs()] == [job_id]  # nothing lost
    q.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_touch_workers_writes_each_workers_contact_and_status_in_groups(backend: str, tmp_path: Path, request) -> None:
    """What a coordinator gathers between writes: many workers' contact and latest status at once,
    more of them than one statement carries."""
    from cio_worker.queue.base import WorkerStatus

    clock = Clock()
    q = database_queue(backend, tmp_path, request, clock)
    try:
        q.register_many([(f"w{i:04d}", {}) for i in range(1200)])
        job_id = q.create_job(job_spec(), [task("1")])
        (lease,) = q.claim_many(["w0003"], 60)
        clock.advance(30)
        idle = WorkerStatus("idle", None, "")
        statuses = {f"w{i:04d}": idle for i in range(0, 1100)}
        statuses["w0001"] = WorkerStatus("draining", 40.0, "preempted")
        q.touch_workers([f"w{i:04d}" for i in range(1000, 1150)], statuses)
        rows = {w.id: w for w in q.workers(gone_after=1e9)}
        assert rows["w0001"].state == "draining" and rows["w0001"].progress == 40.0 and rows["w0001"].detail == "preempted"
        assert rows["w0003"].state == "idle" and rows["w0003"].task_id is None  # idle clears the task it showed
        assert all(rows[f"w{i:04d}"].last_contact == clock.now for i in range(0, 1150))
        assert all(rows[f"w{i:04d}"].last_contact == clock.now - 30 for i in range(1150, 1200))
        assert rows["w1120"].state == "idle" and rows["w1199"].state == "idle"
        assert {t.id: t.state for t in q.tasks(job_id)} == {lease.task_id: "leased"}  # a task is not a worker
    finally:
        q.close()


# -- retrying failed tasks -------------------------------------------------------------------------


def _fail_all(queue: Queue, count: int) -> None:
    for i in range(count):
        lease = queue.claim(f"w{i}", 10)
        assert queue.fail(lease, "the renderer exited with status 1") == "failed"


def test_retry_puts_every_failed_task_back_with_fresh_budgets_and_keeps_the_history(queue: Queue) -> None:
    job_id = queue.create_job(job_spec(failed=0), [task("1"), task("2"), task("3")])
    _fail_all(queue, 2)  # tasks 000 and 001 fail; 002 stays pending
    assert queue.retry_tasks(job_id) == 2
    rows = {t.id: t for t in queue.tasks(job_id)}
    assert {i: (t.state, t.attempts["failed"]) for i, t in rows.items()} == {
        "000": ("pending", 0), "001": ("pending", 0), "002": ("pending", 0)}
    assert [e.kind for e in queue.events(job_id, "000")][-2:] == ["failed", "retried"]  # history kept
    lease = queue.claim("w9", 10)
    assert lease.task_id == "000"
    assert queue.fail(lease, "again") == "failed"  # a fresh budget: the job allows 0 retries, spent once more
    assert queue.retry_tasks(job_id) == 1
    assert queue.retry_tasks(job_id) == 0  # nothing failed is left


def test_retry_of_named_tasks_only_and_a_task_that_is_not_failed_changes_nothing(queue: Queue) -> None:
    job_id = queue.create_job(job_spec(failed=0), [task("1"), task("2"), task("3")])
    _fail_all(queue, 2)
    with pytest.raises(QueueError) as refused:
        queue.retry_tasks(job_id, ["000", "002"])
    assert "002" in str(refused.value) and "pending" in str(refused.value)
    assert [t.state for t in queue.tasks(job_id)] == ["failed", "failed", "pending"]  # nothing changed
    assert queue.retry_tasks(job_id, ["001"]) == 1
    assert [t.state for t in queue.tasks(job_id)] == ["failed", "pending", "pending"]
    with pytest.raises(QueueError, match="no task"):
        queue.retry_tasks(job_id, ["042"])
    with pytest.raises(QueueError, match="no job"):
        queue.retry_tasks("99999")


def test_retry_refuses_a_killed_job(queue: Queue) -> None:
    job_id = queue.create_job(job_spec(), [task("1")])
    queue.kill_job(job_id)
    with pytest.raises(QueueError, match="killed"):
        queue.retry_tasks(job_id)
    assert [t.state for t in queue.tasks(job_id)] == ["failed"]


# -- who failed a task: distinct workers, the per-job blocklist ------------------------------------


def blocking_spec(failed: int = 1, workers: int = 2, block_after: int = 3) -> dict:
    spec = job_spec(failed=failed)
    spec["autoretry_policy"]["failed"].update(distinct_workers=workers, block_worker_after=block_after)
    return spec


def fail_on(queue: Queue, worker: str, reason: str = "cnode exited with status 1") -> tuple[str, str]:
    lease = queue.claim(worker, 10)
    assert lease is not None, f"{worker} found nothing to claim"
    return lease.task_id, queue.fail(lease, reason)


def test_a_task_whose_budget_is_spent_waits_for_a_worker_that_has_not_failed_it(queue: Queue) -> None:
    for worker in ("bad", "good"):
        queue.register_worker(worker, {})
    job_id = queue.create_job(blocking_spec(failed=1, workers=2), [task("1")])
    assert fail_on(queue, "bad") == ("000", "pending")  # retry 1 of 1: anyone may take it
    assert fail_on(queue, "bad") == ("000", "pending")  # budget spent on one worker: not final
    (row,) = queue.tasks(job_id)
    assert row.kept_from == ("bad",) and row.attempts["failed"] == 2
    assert queue.claim("bad", 10) is None  # the worker that failed it may not take it again
    assert "waits for a worker that has not failed it (not bad)" in format_status(queue, job_id)
    lease = queue.claim("good", 10)
    assert lease.task_id == "000"
    queue.complete(lease)
    assert [t.state for t in queue.tasks(job_id)] == ["done"]


def test_a_task_fails_for_real_once_its_failures_span_k_workers(queue: Queue) -> None:
    for worker in ("w1", "w2", "w3"):
        queue.register_worker(worker, {})
    job_id = queue.create_job(blocking_spec(failed=0, workers=2), [task("1")])
    assert fail_on(queue, "w1") == ("000", "pending")
    assert fail_on(queue, "w2") == ("000", "failed")
    (row,) = queue.tasks(job_id)
    assert row.attempts["failed"] == 2 and row.kept_from == ()
    final = [e for e in queue.events(job_id, "000") if e.kind == "failed"][-1]
    assert "on 2 workers" in final.detail


def test_a_farm_of_one_does_not_wait_for_a_second_worker(queue: Queue, clock: Clock) -> None:
    queue.register_worker("only", {})
    job_id = queue.create_job(blocking_spec(failed=1, workers=3), [task("1")])
    assert fail_on(queue, "only") == ("000", "pending")
    assert fail_on(queue, "only") == ("000", "failed")  # no other worker there: final, as with K = 1
    assert "no other worker was there" in [e for e in queue.events(job_id, "000") if e.kind == "failed"][-1].detail
    # A worker not heard from for longer than LIVE_WORKER_SECONDS is not there either.
    queue.register_worker("silent", {})
    clock.advance(500)
    queue.register_worker("only", {})
    other = queue.create_job(blocking_spec(failed=0, workers=2), [task("2")])
    assert fail_on(queue, "only") == ("000", "failed")
    assert queue.tasks(other)[0].state == "failed"


def test_a_worker_that_fails_m_tasks_of_a_job_is_blocked_from_it_and_retry_clears_it(queue: Queue) -> None:
    for worker in ("bad", "good"):
        queue.register_worker(worker, {})
    job_id = queue.create_job(blocking_spec(failed=0, workers=1, block_after=2), [task(str(i)) for i in range(1, 5)])
    later = queue.create_job(blocking_spec(), [task("9")])
    assert fail_on(queue, "bad") == ("000", "failed")
    assert queue.jobs()[0].blocked == ()
    assert fail_on(queue, "bad") == ("001", "failed")
    [summary, _] = queue.jobs()
    assert [(b.worker, b.failures) for b in summary.blocked] == [("bad", 2)]
    blocked = [e for e in queue.events(job_id) if e.kind == "blocked"]
    assert [(e.task_id, e.worker) for e in blocked] == [(None, "bad")]
    assert "worker bad blocked from job after 2 failures" in blocked[0].detail
    assert "worker bad blocked from job after 2 failures" in format_status(queue, job_id)
    # The blocked worker skips the job's tasks and takes the next job's; others still take them.
    lease = queue.claim("bad", 10)
    assert (lease.job_id, lease.task_id) == (later, "000")
    assert queue.claim("good", 10).task_id == "002"
    # retry: fresh budgets and a fresh start, the block gone.
    assert queue.retry_tasks(job_id) == 2
    assert queue.jobs()[0].blocked == ()
    assert [e.kind for e in queue.events(job_id) if e.task_id is None][-1] == "unblocked"
    assert queue.claim("bad", 10).task_id == "000"


def test_the_only_worker_is_not_blocked(queue: Queue) -> None:
    queue.register_worker("only", {})
    queue.create_job(blocking_spec(failed=0, workers=1, block_after=1), [task("1"), task("2")])
    assert fail_on(queue, "only") == ("000", "failed")
    assert queue.jobs()[0].blocked == ()
    assert queue.claim("only", 10).task_id == "001"


def test_claims_that_arrive_together_each_get_a_task_they_may_take(queue: Queue) -> None:
    if not hasattr(queue, "claim_many"):
        pytest.skip("claim_many is the engines' (the coordinator batches claims into it)")
    for worker in ("bad", "w1", "w2"):
        queue.register_worker(worker, {})
    job_id = queue.create_job(blocking_spec(failed=0, workers=1, block_after=1), [task(str(i)) for i in range(1, 4)])
    assert fail_on(queue, "bad") == ("000", "failed")  # bad is now blocked from the job
    leases = queue.claim_many(["bad", "w1", "bad", "w2"], 10)
    assert [lease and lease.task_id for lease in leases] == [None, "001", None, "002"]
    assert [lease.worker for lease in leases if lease] == ["w1", "w2"]
    assert [t.state for t in queue.tasks(job_id)] == ["failed", "leased", "leased"]


def strand_a_task(queue: Queue) -> str:
    """The stall a browser test found, with a third worker c that goes on to stop: a failed task
    000 (it waits for a worker that has not failed it), b failed 001 and 002 and is blocked from
    the job (c could still take 000), a then renders 001 and 002. Only 000 is left, pending."""
    for worker in ("a", "b", "c"):
        queue.register_worker(worker, {})
    job_id = queue.create_job(blocking_spec(failed=0, workers=2, block_after=2), [task("1"), task("2"), task("3")])
    leases = [queue.claim("a", 10), queue.claim("b", 10), queue.claim("b", 10)]
    assert [lease.task_id for lease in leases] == ["000", "001", "002"]
    assert [queue.fail(lease, "cnode exited with status 1") for lease in leases] == ["pending"] * 3
    assert [b.worker for b in queue.jobs()[0].blocked] == ["b"]
    for _ in range(2):
        queue.complete(queue.claim("a", 10))
    assert [(t.state, t.kept_from) for t in queue.tasks(job_id)] == [("pending", ("a",)), ("done", ()), ("done", ())]
    return job_id


def test_a_blocked_worker_gets_nothing_while_an_eligible_worker_is_there(queue: Queue) -> None:
    job_id = strand_a_task(queue)
    assert queue.claim("a", 10) is None and queue.claim("b", 10) is None  # c may take 000
    assert queue.claim("c", 10).task_id == "000"
    assert "block_overridden" not in [e.kind for e in queue.events(job_id)]


@pytest.mark.parametrize("claimer, other", [("b", "a"), ("a", "b")])
def test_a_task_no_other_live_worker_may_take_goes_to_a_blocked_worker_anyway(
        queue: Queue, claimer: str, other: str) -> None:
    from cio_worker.queue import WorkerStatus

    job_id = strand_a_task(queue)
    queue.worker_report("c", WorkerStatus("stopped"))
    # b is blocked from the job, a is kept from 000: whichever claims takes it, the other one alive
    # or not; then the other gets nothing.
    if other == "a":
        queue.worker_report("a", WorkerStatus("stopped"))
    lease = queue.claim(claimer, 10)
    assert lease is not None and (lease.job_id, lease.task_id) == (job_id, "000")
    assert queue.claim(other, 10) is None
    (event,) = [e for e in queue.events(job_id, "000") if e.kind == "block_overridden"]
    assert event.worker == claimer
    assert event.detail == f"worker {claimer} takes task 000 despite its block: no other worker may"
    queue.complete(lease)
    assert queue.is_finished(job_id)


def test_a_worker_is_not_blocked_when_that_would_leave_a_kept_task_with_no_taker(queue: Queue) -> None:
    for worker in ("a", "b"):
        queue.register_worker(worker, {})
    job_id = queue.create_job(blocking_spec(failed=0, workers=2, block_after=2), [task("1"), task("2"), task("3")])
    leases = [queue.claim("a", 10), queue.claim("b", 10), queue.claim("b", 10)]
    assert [queue.fail(lease, "cnode exited with status 1") for lease in leases] == ["pending"] * 3
    # a is kept from 000: blocking b would leave 000 to nobody, though a is not blocked from the job.
    assert queue.jobs()[0].blocked == ()
    assert [t.kept_from for t in queue.tasks(job_id)] == [("a",), ("b",), ("b",)]
    assert queue.claim("b", 10).task_id == "000"
    assert queue.claim("a", 10).task_id == "001"


def test_a_task_failing_on_every_worker_ends_failed_within_the_cap(queue: Queue) -> None:
    from cio_worker.queue import WorkerStatus

    for worker in ("a", "b", "c"):
        queue.register_worker(worker, {})
    job_id = queue.create_job(blocking_spec(failed=0, workers=3, block_after=0), [task("1")])
    assert fail_on(queue, "a") == ("000", "pending")
    assert fail_on(queue, "b") == ("000", "pending")  # on 2 of 3 workers: it waits for c
    queue.worker_report("c", WorkerStatus("stopped"))
    lease = queue.claim("a", 10)  # kept from it, but no other live worker may take it
    assert lease.task_id == "000"
    # c is back before a's attempt ends: c has not failed it, yet this is the last attempt allowed.
    queue.register_worker("c", {})
    assert [w.state for w in queue.workers() if w.id == "c"] == ["idle"]
    assert queue.fail(lease, "cnode exited with status 1") == "failed"
    (row,) = queue.tasks(job_id)
    assert row.attempts["failed"] == 3  # max_retries 0 + distinct_workers 3
    final = [e for e in queue.events(job_id, "000") if e.kind == "failed"][-1]
    assert "the most the job allows: max_retries 0 + distinct_workers 3" in final.detail
    assert queue.claim("c", 10) is None


def test_claims_that_arrive_together_take_a_task_no_other_may_take_once(queue: Queue) -> None:
    if not hasattr(queue, "claim_many"):
        pytest.skip("claim_many is the engines' (the coordinator batches claims into it)")
    from cio_worker.queue import WorkerStatus

    job_id = strand_a_task(queue)
    queue.worker_report("c", WorkerStatus("stopped"))
    leases = queue.claim_many(["b", "a", "b"], 10)
    assert [lease and (lease.worker, lease.task_id) for lease in leases] == [("b", "000"), None, None]
    assert [e.worker for e in queue.events(job_id, "000") if e.kind == "block_overridden"] == ["b"]
