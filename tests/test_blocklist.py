"""Who failed a task matters (RetryPolicy.distinct_workers, block_worker_after): the settings as a
job spec and a task document carry them, the claim on PostgreSQL still reads the pending tasks'
partial index, and a farm of real agent processes behind a real coordinator where one node's
renderer crashes: the job ends done, the bad worker blocked, no task failed for real."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cio_worker.errors import DocumentError
from cio_worker.job.document import RetryPolicy, TaskDocument
from cio_worker.job.jobspec import JobSpecError, load_job_spec
from cio_worker.queue import NewTask, open_queue
from tests.fleet import CoordinatorProcess
from tests.servers import stop_process
from tests.shots import make_shot
from tests.waiting import wait_for

SPEC = """
[job]
project_file = "/proj/shot.project"
images = ["project://scene/image1"]
"""


def spec_file(tmp_path: Path, retry: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(textwrap.dedent(SPEC) + retry, encoding="utf-8")
    return path


def test_a_job_spec_sets_k_and_m_in_the_failed_table_and_defaults_them(tmp_path: Path) -> None:
    spec = load_job_spec(spec_file(tmp_path, "[autoretry_policy]\nfailed = {max_retries = 2, distinct_workers = 3,"
                                             " block_worker_after = 0}\n"))
    assert spec.autoretry_policy == RetryPolicy(preempted=1, failed=2, distinct_workers=3, block_worker_after=0)
    plain = load_job_spec(spec_file(tmp_path, "[autoretry_policy]\nfailed = 1\n")).autoretry_policy
    assert (plain.distinct_workers, plain.block_worker_after) == (2, 3)


@pytest.mark.parametrize("retry, words", [
    ("failed = {max_retries = 1, distinct_workers = 0}", "distinct_workers: 0 is below the minimum 1"),
    ("failed = {max_retries = 1, distinct_workers = 11}", "distinct_workers: 11 is above"),
    ("failed = {max_retries = 1, block_worker_after = -1}", "block_worker_after: -1 is below"),
    ("failed = {max_retries = 1, distinct_worker = 2}", "distinct_worker"),
    ("preempted = {max_retries = 1, distinct_workers = 2}", "distinct_workers"),
])
def test_a_bad_setting_is_a_clear_error(tmp_path: Path, retry: str, words: str) -> None:
    with pytest.raises(JobSpecError) as refused:
        load_job_spec(spec_file(tmp_path, f"[autoretry_policy]\n{retry}\n"))
    assert words in str(refused.value) and "[autoretry_policy]" in str(refused.value)


def document(failed: dict) -> dict:
    return {"version": 1,
            "job": {"id": "00001", "storage": "file:///s", "output_path": "/r",
                    "autoretry_policy": {"preempted": {"max_retries": 1}, "failed": failed}},
            "task": {"id": "000", "frames": "1", "command": "cnode x"}}


def test_the_task_document_carries_them_and_checks_them() -> None:
    doc = TaskDocument.from_dict(document({"max_retries": 1, "distinct_workers": 4, "block_worker_after": 7}))
    assert (doc.job.autoretry_policy.distinct_workers, doc.job.autoretry_policy.block_worker_after) == (4, 7)
    assert TaskDocument.from_dict(doc.to_dict()) == doc
    assert TaskDocument.from_dict(document({"max_retries": 1})).job.autoretry_policy.distinct_workers == 2
    with pytest.raises(DocumentError, match=r"job.autoretry_policy.failed.distinct_workers: 0 is below"):
        TaskDocument.from_dict(document({"max_retries": 1, "distinct_workers": 0}))
    with pytest.raises(DocumentError, match=r"job.autoretry_policy.failed.workers: is not a setting"):
        TaskDocument.from_dict(document({"max_retries": 1, "workers": 2}))


def test_the_claim_on_postgresql_reads_the_partial_index_and_one_key_of_the_blocks(pg_url: str) -> None:
    import psycopg

    from cio_worker.queue.postgres import PostgresQueue

    queue = PostgresQueue(pg_url)
    try:
        spec = {"title": "x", "storage": "file:///s", "output_path": "/r",
                "autoretry_policy": {"failed": {"max_retries": 0, "distinct_workers": 1, "block_worker_after": 2}}}
        for worker in ("bad", "good"):
            queue.register_worker(worker, {})
        for _ in range(3):
            queue.create_job(spec, [NewTask(str(i), "cnode x") for i in range(1, 2001)])
        for _ in range(2):
            queue.fail(queue.claim("bad", 60), "boom")
        assert queue.jobs()[0].blocked
        with psycopg.connect(pg_url) as conn:
            conn.execute("ANALYZE")
            plans = {}
            for names in (["bad"], ["bad", "good"]):
                captured: list[tuple[str, tuple]] = []

                class Tx:
                    def execute(self, sql: str, params=()):
                        captured.append((sql, params))
                        return self

                    def fetchall(self):
                        return []

                queue._pending_for(Tx(), names, 4)
                sql, params = captured[0]
                text = sql.replace("%", "%%").replace("?", "%s")
                plans[len(names)] = "\n".join(r[0] for r in conn.execute("EXPLAIN " + text, params).fetchall())
        for plan in plans.values():
            assert "tasks_pending" in plan, plan
            assert "Seq Scan on tasks" not in plan, plan
    finally:
        queue.close()


# -- a farm with one bad node ---------------------------------------------------------------------


def _agent(queue_url: str, node: Path, worker: str, env: dict) -> subprocess.Popen:
    node.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "cio_worker", "agent", "--queue", queue_url, "--worker-id", worker,
            "--root", str(node / "root"), "--work-dir", str(node / "work"), "--cache-dir", str(node / "cache"),
            "--preemption", "none", "--poll-seconds", "0.1", "--idle-exit", "3"]
    return subprocess.Popen(argv, env=env, stdout=open(node / "agent.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.slow
def test_a_node_whose_renderer_crashes_is_blocked_and_the_job_still_ends_done(tmp_path: Path) -> None:
    from cio_worker.artist.submit import submit_job
    from cio_worker.job.paths import PathMap
    from cio_worker.sim.shim import install_cnode_shim
    from cio_worker.storage import open_storage

    shot = make_shot(tmp_path / "shot", frames="1-8", chunk_size=1, retries_failed=1)  # K 2, M 3: the defaults
    db = tmp_path / "queue.db"
    storage_url = f"file://{tmp_path / 'storage'}"
    queue = open_queue(f"sqlite:///{db}")
    job = submit_job(shot.spec, queue=queue, storage=open_storage(storage_url), storage_url=storage_url,
                     path_map=PathMap.rooted(str(shot.root))).job_id
    _, token = queue.create_token("farm", ["agent"])
    coordinator = CoordinatorProcess(f"sqlite:///{db}", "--heartbeat-seconds", "0.5", "--long-poll-seconds", "1")
    bin_dir = tmp_path / "bin"
    install_cnode_shim(bin_dir)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CIO_TOKEN": token}
    env.pop("CNODE_SIM_IGNORE_SIGTERM", None)
    agents: list[subprocess.Popen] = []
    coordinator.start()
    try:
        # The good node renders slowly; the bad one's renderer crashes after its first frame.
        agents.append(_agent(coordinator.url, tmp_path / "good", "good", {**env, "CNODE_SIM_FRAME_SECONDS": "0.5"}))
        wait_for(lambda: any(w.id == "good" for w in queue.workers()), 60, "the good agent to register")
        agents.append(_agent(coordinator.url, tmp_path / "bad", "bad", {**env, "CNODE_SIM_FAIL": "crash"}))
        wait_for(lambda: queue.is_finished(job), 240, "the job to finish")
        tasks = queue.tasks(job)
        events = queue.events(job)
        summary = next(s for s in queue.jobs() if s.id == job)
    finally:
        for agent in agents:
            stop_process(agent)  # SIGTERM: the agent stops its render itself
        coordinator.stop()
        queue.close()
    logs = {name: (tmp_path / name / "agent.log").read_text(errors="replace")[-3000:] for name in ("good", "bad")}
    assert [t.state for t in tasks] == ["done"] * 8, (tasks, logs)
    assert [b.worker for b in summary.blocked] == ["bad"], summary
    blocked = [e for e in events if e.kind == "blocked"]
    assert [(e.worker, e.task_id) for e in blocked] == [("bad", None)]
    assert "worker bad blocked from job after 3 failures" in blocked[0].detail
    failed = [e for e in events if e.kind == "failed"]
    assert failed and {e.worker for e in failed} == {"bad"}  # every failure was the bad node's
    assert len({e.task_id for e in failed}) == 3  # it failed three tasks, then took none of the job's
    claimed_by_bad_after_block = [e for e in events if e.kind == "claimed" and e.worker == "bad"
                                  and e.time > blocked[0].time]
    assert claimed_by_bad_after_block == []
    done_by = {e.task_id: e.worker for e in events if e.kind == "done"}
    assert all(done_by[e.task_id] == "good" for e in failed)
