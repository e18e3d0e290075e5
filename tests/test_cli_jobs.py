"""The job commands as a person runs them: submit, status, release, kill, run-task, download."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cio_worker.job.hashing import hashstore_key
from cio_worker.queue import open_queue
from cio_worker.sim.shim import install_cnode_shim
from tests.shots import make_shot


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cio_worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def farm(tmp_path):
    shot = make_shot(tmp_path / "shot", frames="1-4", chunk_size=2, scouts="1")
    queue = f"sqlite:///{tmp_path / 'queue.db'}"
    storage = f"file://{tmp_path / 'storage'}"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    install_cnode_shim(bin_dir)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CNODE_SIM_FRAME_SECONDS="0")
    return tmp_path, shot, queue, storage, env


def submit(farm) -> str:
    tmp, shot, queue, storage, env = farm
    out = cli("submit", str(shot.spec), "--queue", queue, "--storage", storage, "--root", str(shot.root),
              "--md5-cache", str(tmp / "md5.db"))
    assert out.returncode == 0, out.stderr
    assert "job 00001: 2 tasks, 1 holding until `cio-worker release 00001`" in out.stdout
    return "00001"


def test_submit_uploads_what_storage_lacks_and_enqueues(farm):
    tmp, shot, queue, storage, env = farm
    submit(farm)
    stored = sorted(p.name for p in (tmp / "storage" / "hashstore").iterdir())
    assert len(stored) == 2  # the project and the texture, by MD5
    again = cli("submit", str(shot.spec), "--queue", queue, "--storage", storage, "--root", str(shot.root),
                "--md5-cache", str(tmp / "md5.db"))
    assert again.returncode == 0 and "uploaded 0 contents, 2 already in storage" in again.stdout
    status = cli("status", "--queue", queue)
    assert "00001" in status.stdout and "00002" in status.stdout


def test_status_release_and_kill(farm):
    tmp, shot, queue, storage, env = farm
    job = submit(farm)
    tasks = cli("status", job, "--queue", queue).stdout
    assert "holding" in tasks and "pending" in tasks
    out = cli("release", job, "--queue", queue)
    assert out.returncode == 0 and "released 1 held tasks" in out.stdout
    out = cli("kill", job, "--queue", queue)
    assert out.returncode == 0
    with open_queue(queue) as q:
        assert {t.state for t in q.tasks(job)} == {"failed"}
        assert all("killed by owner" in t.reason for t in q.tasks(job))
    missing = cli("release", "00042", "--queue", queue)
    assert missing.returncode == 2 and missing.stderr.startswith("cio-worker: error:") and "00042" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_run_task_renders_one_document_by_hand(farm):
    tmp, shot, queue, storage, env = farm
    submit(farm)
    with open_queue(queue) as q:
        lease = q.claim("by-hand", 60)
    doc = tmp / "task.json"
    doc.write_text(lease.document.to_json())
    node = tmp / "vm"
    out = cli("run-task", str(doc), "--root", str(node), "--work-dir", str(tmp / "work"),
              "--cache-dir", str(tmp / "cache"), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Progress for 'project://scene/image1'" in out.stdout  # the renderer's log, echoed
    assert "job 00001 task 000 done: frames 1-2" in out.stdout
    rendered = [node / "proj/renders/main/beauty.0001.png", node / "proj/renders/main/beauty.0002.png"]
    assert all(p.is_file() for p in rendered)
    for line in out.stdout.splitlines():
        if line.startswith("cio-worker: output "):
            md5 = line.rsplit("md5 ", 1)[1].rstrip(")")
            assert (tmp / "storage" / hashstore_key(md5)).is_file()  # uploaded, content-addressed


def test_run_task_fails_with_a_reason_when_an_input_is_missing(farm):
    tmp, shot, queue, storage, env = farm
    submit(farm)
    with open_queue(queue) as q:
        document = json.loads(q.claim("by-hand", 60).document.to_json())
    document["job"]["upload_files"] = [f for f in document["job"]["upload_files"] if "wood" not in f["destination"]]
    (tmp / "task.json").write_text(json.dumps(document))
    out = cli("run-task", str(tmp / "task.json"), "--root", str(tmp / "vm"), "--work-dir", str(tmp / "work"),
              "--no-cache", "--quiet", env=env)
    assert out.returncode == 1
    assert "FAILED [missing_input]" in out.stdout and "wood.png" in out.stdout


def test_run_task_rejects_a_malformed_document_in_one_line(tmp_path):
    (tmp_path / "task.json").write_text(json.dumps({"version": 1, "job": {}, "task": {}}))
    out = cli("run-task", str(tmp_path / "task.json"), "--work-dir", str(tmp_path / "w"), "--no-cache")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "job.id: is missing" in out.stderr


def test_download_refuses_a_record_that_climbs_out(farm):
    import sqlite3
    import time

    from cio_worker.job.hashing import md5_b64_of_bytes

    tmp, shot, queue, storage, env = farm
    job = submit(farm)
    md5 = md5_b64_of_bytes(b"evil")
    key = hashstore_key(md5)
    (tmp / "storage" / key).write_bytes(b"evil")
    files = [{"relative_path": "../../escape.png", "md5": md5, "size": 4, "key": key}]
    # A record written by something other than our agent (the queue's own API refuses it).
    db = sqlite3.connect(tmp / "queue.db")
    db.execute("INSERT INTO downloads VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
               ("evil-1", int(job), 0, "C:/proj/renders", 4, json.dumps(files), time.time(), time.time()))
    db.commit()
    db.close()
    artist = tmp / "artist-dl"
    out = cli("download", "--queue", queue, "--root", str(artist), "--md5-cache", str(tmp / "dl.db"))
    assert out.returncode == 2
    assert "refused download evil-1" in out.stderr and "climbs out" in out.stderr
    assert not list(tmp.rglob("escape.png"))
    with open_queue(queue) as q:
        assert [r.download_id for r in q.downloads(job)] == ["evil-1"]  # still pending, not marked done


def assert_one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, out
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cio-worker: error: "), out.stderr
    for word in words:
        assert word in lines[0], lines[0]


def task_rows(status_text: str) -> dict[str, list[str]]:
    """TASK -> the cells of its row in `status JOB` (cells are two or more spaces apart)."""
    import re

    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in status_text.splitlines())
            if cells[0].isdigit() and len(cells[0]) == 3}  # fmt: skip


def test_status_ends_with_a_newline_and_counts_a_first_time_success_as_one_attempt(farm):
    tmp, shot, queue, storage, env = farm
    job = submit(farm)
    with open_queue(queue) as q:
        q.release_job(job)
        q.complete(q.claim("w-1", 60))  # task 000: done at its first attempt
        q.fail(q.claim("w-2", 60), "cnode exited with status 3")  # task 001: failed once, pending again
        q.claim("w-3", 60)  # task 001: its second attempt running
    for args in (("status",), ("status", job)):
        out = cli(*args, "--queue", queue)
        assert out.returncode == 0 and out.stdout.endswith("\n") and not out.stdout.endswith("\n\n"), out
    rows = task_rows(cli("status", job, "--queue", queue).stdout)
    assert rows["000"][1].startswith("done") and rows["000"][4] == "1"
    assert rows["001"][1].startswith("leased") and rows["001"][4] == "2 (failed 1 running 1)"


def test_run_task_takes_the_list_preflight_prints(farm):
    tmp, shot, queue, storage, env = farm
    submit(farm)  # uploads the inputs into storage
    listed = cli("preflight", str(shot.spec), "--root", str(shot.root), "--storage", storage, "--json")
    assert listed.returncode == 0, listed.stderr
    documents = json.loads(listed.stdout)
    assert [d["task"]["id"] for d in documents] == ["000", "001"]
    (tmp / "tasks.json").write_text(listed.stdout)
    node = tmp / "vm"
    common = ["--root", str(node), "--work-dir", str(tmp / "work"), "--cache-dir", str(tmp / "cache"), "--quiet"]

    several = cli("run-task", str(tmp / "tasks.json"), *common, env=env)
    assert_one_line_error(several, "tasks.json", "2 task documents", "--task", "000, 001")
    unknown = cli("run-task", str(tmp / "tasks.json"), "--task", "9", *common, env=env)
    assert_one_line_error(unknown, "no task with id 9", "000, 001")

    chosen = cli("run-task", str(tmp / "tasks.json"), "--task", "1", *common, env=env)  # 1 is task 001
    assert chosen.returncode == 0, chosen.stdout + chosen.stderr
    assert "job 00000 task 001 done: frames 3-4" in chosen.stdout
    last = chosen.stdout.splitlines()[-1]
    assert last == f"cio-worker: outputs: 2 files in {node / 'proj/renders/main'} on this machine, uploaded to {storage}"
    assert (node / "proj/renders/main/beauty.0003.png").is_file()

    (tmp / "one.json").write_text(json.dumps(documents[:1]))
    one = cli("run-task", str(tmp / "one.json"), *common, env=env)
    assert one.returncode == 0, one.stdout + one.stderr
    assert "job 00000 task 000 done: frames 1-2" in one.stdout


def test_run_task_help_names_only_what_a_clone_has():
    out = cli("run-task", "--help")
    assert out.returncode == 0
    assert "design.md" not in out.stdout and "preflight" in out.stdout and "--task" in out.stdout


def test_a_mistyped_queue_creates_nothing(tmp_path):
    for url in (f"sqlite:///{tmp_path / 'typo.db'}", f"sqlite:///{tmp_path / 'nodir' / 'q.db'}"):
        commands = [
            ("status",), ("status", "00001"), ("release", "00001"), ("kill", "00001"),
            ("download", "--md5-cache", str(tmp_path / "md5" / "dl.db"), "--root", str(tmp_path / "artist")),
            ("agent", "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"),
             "--idle-exit", "0", "--preemption", "none"),
        ]  # fmt: skip
        for command in commands:
            out = cli(*command, "--queue", url)
            assert_one_line_error(out, url, "does not exist")
            assert list(tmp_path.iterdir()) == [], (command, list(tmp_path.iterdir()))


def test_a_mistyped_store_is_not_created_by_run_task(farm):
    tmp, shot, queue, storage, env = farm
    submit(farm)
    with open_queue(queue) as q:
        (tmp / "task.json").write_text(q.claim("by-hand", 60).document.to_json())
    typo = f"file://{tmp / 'storage-typo'}"
    out = cli("run-task", str(tmp / "task.json"), "--storage", typo, "--root", str(tmp / "vm"),
              "--work-dir", str(tmp / "work"), "--no-cache", env=env)
    assert_one_line_error(out, typo, "does not exist")
    assert not (tmp / "storage-typo").exists() and not (tmp / "work").exists() and not (tmp / "vm").exists()
    bad_scheme = cli("run-task", str(tmp / "task.json"), "--storage", "bucket/prefix", "--work-dir", str(tmp / "work"))
    assert_one_line_error(bad_scheme, "bucket/prefix")


def test_a_submit_that_fails_leaves_no_queue_and_no_store(tmp_path):
    shot = make_shot(tmp_path / "shot")
    queue_file, store = tmp_path / "queue.db", tmp_path / "store"
    bad_spec = tmp_path / "bad.toml"
    bad_spec.write_text(shot.spec.read_text().replace("chunk_size", "chunk_sise"))
    shot.texture.unlink()  # a missing dependency of the good spec
    cases = [
        ((str(bad_spec), "--storage", f"file://{store}"), "chunk_sise"),
        ((str(shot.spec), "--storage", f"file://{store}"), "wood.png"),
        ((str(shot.spec), "--storage", "file://relative/store"), "file://relative/store"),
        ((str(shot.spec), "--storage", "ftp://host/store"), "ftp://host/store"),
    ]
    for args, word in cases:
        out = cli("submit", *args, "--queue", f"sqlite:///{queue_file}", "--root", str(shot.root),
                  "--md5-cache", str(tmp_path / "md5.db"))
        assert_one_line_error(out, word)
        assert not queue_file.exists() and not store.exists(), args
    no_dir = cli("submit", str(shot.spec), "--queue", f"sqlite:///{tmp_path / 'nodir' / 'q.db'}", "--storage",
                 f"file://{store}", "--root", str(shot.root), "--allow-missing")
    assert_one_line_error(no_dir, "nodir")
    assert not (tmp_path / "nodir").exists() and not store.exists()


def test_run_task_twice_on_one_document_starts_a_fresh_log_and_keeps_the_earlier_one(farm):
    tmp, shot, queue, storage, env = farm
    submit(farm)
    with open_queue(queue) as q:
        lease = q.claim("by-hand", 60)
    doc = tmp / "task.json"
    doc.write_text(lease.document.to_json())
    args = ["run-task", str(doc), "--root", str(tmp / "vm"), "--work-dir", str(tmp / "work"), "--no-cache", "--quiet"]
    logs = tmp / "work" / "logs"
    for run in (1, 2, 3):
        out = cli(*args, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"cio-worker: log: {logs / '00001-000-a1.log'}" in out.stdout
        assert {p.name for p in logs.iterdir()} == {"00001-000-a1.log"} | {f"00001-000-a1.{n}.log" for n in range(1, run)}
    for name in ("00001-000-a1.log", "00001-000-a1.1.log", "00001-000-a1.2.log"):
        text = (logs / name).read_text()
        assert text.count("==== cio_worker: start ====") == 1 and text.count("==== cio_worker: end ====") == 1, name
        assert "exit code 0" in text, text[-400:]


def test_retry_puts_failed_tasks_back_with_fresh_budgets(tmp_path):
    from cio_worker.job.document import JobInfo, RetryPolicy
    from cio_worker.queue import NewTask, SqliteQueue

    db = tmp_path / "queue.db"
    backend = SqliteQueue(db)
    info = JobInfo(id="00000", title="retry", project="default", storage=f"file://{tmp_path / 'storage'}",
                   output_path="C:/proj/renders", autoretry_policy=RetryPolicy(preempted=1, failed=0))
    job = backend.create_job(info, [NewTask("1", "exit 1"), NewTask("2", "exit 1"), NewTask("3", "exit 1")])
    for worker in ("w1", "w2"):
        assert backend.fail(backend.claim(worker, 10), "the renderer exited with status 1") == "failed"
    queue = f"sqlite:///{db}"
    refused = cli("retry", job, "--task", "000", "--task", "002", "--queue", queue)
    assert_one_line_error(refused, "002", "pending", "nothing was retried")
    assert [t.state for t in backend.tasks(job)] == ["failed", "failed", "pending"]
    out = cli("retry", job, "--task", "001", "--queue", queue)
    assert out.returncode == 0, out.stderr
    assert f"job {job}: retried 1 failed tasks" in out.stdout
    out = cli("retry", job, "--queue", queue)
    assert out.returncode == 0 and "retried 1 failed tasks" in out.stdout, out.stderr
    rows = backend.tasks(job)
    assert [(t.state, t.attempts["failed"]) for t in rows] == [("pending", 0)] * 3
    assert [e.kind for e in backend.events(job, "000")][-1] == "retried"
    backend.close()
