"""The durable outbox on its own, against real queues: a report is on disk before it is sent and
gone once answered; a report whose answer was lost is applied once; a report on a lost lease is
dropped with one line; an unavailable queue keeps it; files that are not reports are set aside."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from cio_worker.errors import LeaseLost, QueueError
from cio_worker.job.document import JobInfo, RetryPolicy
from cio_worker.job.hashing import md5_b64_of_bytes
from cio_worker.node.outbox import Outbox, Report
from cio_worker.queue import DownloadFile, NewDownload, NewTask, SqliteQueue
from cio_worker.queue.http import HttpQueue
from tests.coordinator_faults import Coordinator


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def one_task_job(queue, tasks: int = 1) -> str:
    job = JobInfo(id="00000", title="outbox", project="default", storage="file:///tmp/storage",
                  output_path="C:/proj/renders", autoretry_policy=RetryPolicy(preempted=2, failed=1))
    return queue.create_job(job, [NewTask(str(i + 1), "echo hi") for i in range(tasks)])


def a_download(name: str = "beauty.0001.png") -> NewDownload:
    return NewDownload("C:/proj/renders", (DownloadFile(name, md5_b64_of_bytes(name.encode()), len(name),
                                                        "hashstore/" + "0" * 32),))


def kinds(queue, job: str) -> list[tuple[str, str]]:
    return [(e.kind, e.worker) for e in queue.events(job, "000")]


@pytest.fixture
def queue(tmp_path: Path):
    q = SqliteQueue(tmp_path / "queue.db")
    yield q
    q.close()


class Watching:
    """A queue that records whether the report's file was on disk when each report came."""

    def __init__(self, inner, outbox: Outbox) -> None:
        self.inner = inner
        self.outbox = outbox
        self.seen: list[tuple[str, bool]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def complete(self, lease, download=None, op_id=None):
        self.seen.append((op_id, self.outbox.path_of(op_id).exists()))
        return self.inner.complete(lease, download, op_id=op_id)


def test_a_report_is_on_disk_before_it_is_sent_and_gone_once_answered(tmp_path: Path, queue) -> None:
    job = one_task_job(queue)
    lease = queue.claim("node-a", 30)
    outbox = Outbox(tmp_path / "outbox")
    report = Report.of("complete", lease, download=a_download())
    path = outbox.put(report)
    assert path == tmp_path / "outbox" / f"{report.op_id}.json"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    watching = Watching(queue, outbox)
    assert outbox.send(watching, report) == "done"
    assert watching.seen == [(report.op_id, True)]
    assert not path.exists() and len(outbox) == 0
    assert kinds(queue, job) == [("claimed", "node-a"), ("done", "node-a")]
    [record] = queue.downloads(job)
    assert [f.relative_path for f in record.files] == ["beauty.0001.png"]


@pytest.mark.parametrize("kind", ["complete", "fail", "release"])
def test_a_report_reads_back_as_written(tmp_path: Path, queue, kind: str) -> None:
    one_task_job(queue)
    lease = queue.claim("node-a", 30)
    values = {"complete": {"download": a_download()},
              "fail": {"reason": "cnode exited 3"},
              "release": {"cause": "preempted", "frames_done": "1", "download": a_download(), "reason": "notice"}}[kind]
    report = Report.of(kind, lease, **values)
    outbox = Outbox(tmp_path / "outbox")
    outbox.put(report)
    assert outbox.entries() == [report]
    assert (report.job_id, report.task_id, report.token, report.worker) == \
        (lease.job_id, lease.task_id, lease.token, "node-a")


def test_a_report_whose_answer_was_lost_is_applied_once(tmp_path: Path, queue) -> None:
    job = one_task_job(queue)
    lease = queue.claim("node-a", 30)
    outbox = Outbox(tmp_path / "outbox")
    report = Report.of("complete", lease, download=a_download())
    outbox.put(report)
    queue.complete(report.lease, report.download, op_id=report.op_id)  # applied; its answer never arrived
    result = outbox.flush(queue)  # sent again, with the same op id
    assert [(r.op_id, state) for r, state in result.delivered] == [(report.op_id, "done")]
    assert len(outbox) == 0
    assert [k for k in kinds(queue, job) if k[0] == "done"] == [("done", "node-a")]
    assert len(queue.downloads(job, state=None)) == 1


def test_a_report_on_a_lost_lease_is_dropped_with_one_line(tmp_path: Path, caplog) -> None:
    clock = Clock()
    queue = SqliteQueue(tmp_path / "queue.db", clock=clock)
    job = one_task_job(queue)
    lease = queue.claim("node-a", 30)
    outbox = Outbox(tmp_path / "outbox")
    report = Report.of("complete", lease, download=a_download())
    outbox.put(report)
    clock.now += 60  # the lease expired; another node takes the task
    other = queue.claim("node-b", 30)
    assert other is not None and other.task_id == lease.task_id
    caplog.set_level(logging.INFO, logger="cio_worker.node.outbox")
    result = outbox.flush(queue)
    assert [r.op_id for r, _ in result.dropped] == [report.op_id] and not result.delivered
    assert len(outbox) == 0
    [line] = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert f"job {job} task 000" in line and report.op_id in line and "lease" in line
    with pytest.raises(LeaseLost):  # and the queue still holds node-b's lease, untouched
        queue.complete(lease)
    assert ("done", "node-a") not in kinds(queue, job)
    queue.close()


def test_an_unavailable_queue_keeps_the_reports_and_they_go_when_it_answers(tmp_path: Path) -> None:
    backend = SqliteQueue(tmp_path / "queue.db")
    _, token = backend.create_token("tests", ["agent", "owner"])
    job = one_task_job(backend, tasks=2)
    leases = [backend.claim("node-a", 300), backend.claim("node-a", 300)]
    outbox = Outbox(tmp_path / "outbox")
    reports = [Report.of("complete", leases[0], download=a_download()),
               Report.of("release", leases[1], cause="released", reason="the agent stopped")]
    for report in reports:
        outbox.put(report)
    coordinator = Coordinator(backend).start()
    client = HttpQueue(coordinator.url, token, retry_seconds=0.3)
    try:
        coordinator.stop()
        result = outbox.flush(client)
        assert result.unavailable and isinstance(result.error, QueueError) and result.kept == 2
        assert len(outbox) == 2 and [t.state for t in backend.tasks(job)] == ["leased", "leased"]
        coordinator.start()  # the same address answers again
        result = outbox.flush(client)
        assert sorted(state for _, state in result.delivered) == ["done", "pending"]
        assert len(outbox) == 0
        assert [t.state for t in backend.tasks(job)] == ["done", "pending"]
        assert backend.tasks(job)[1].attempts["released"] == 1
    finally:
        client.close()
        coordinator.stop()
        backend.close()


def test_files_that_are_not_reports_are_set_aside_and_leftovers_removed(tmp_path: Path, queue, caplog) -> None:
    job = one_task_job(queue)
    lease = queue.claim("node-a", 30)
    outbox = Outbox(tmp_path / "outbox")
    good = Report.of("fail", lease, reason="bad frame")
    outbox.put(good)
    box = tmp_path / "outbox"
    (box / "garbage.json").write_text("{not json")
    (box / "binary.json").write_bytes(b"\xff\xfe\x00")
    (box / "wrongkind.json").write_text(json.dumps({**good.to_dict(), "op_id": "wrongkind", "kind": "explode"}))
    (box / "renamed.json").write_text(json.dumps(good.to_dict()))  # op id does not match the name
    (box / "list.json").write_text("[]")
    (box / ".half-written.json.tmp").write_text("{")
    caplog.set_level(logging.INFO, logger="cio_worker.node.outbox")
    assert outbox.recover() == 1
    assert outbox.entries() == [good]
    bad = sorted(p.name for p in box.iterdir() if p.name.endswith(".bad"))
    assert bad == ["binary.json.bad", "garbage.json.bad", "list.json.bad", "renamed.json.bad", "wrongkind.json.bad"]
    assert sum("moved aside" in r.getMessage() for r in caplog.records) == 5
    result = outbox.flush(queue)
    assert [state for _, state in result.delivered] == ["pending"]
    assert sorted(os.listdir(box)) == bad
    assert [k for k in kinds(queue, job) if k[0] == "failed"] == [("failed", "node-a")]
