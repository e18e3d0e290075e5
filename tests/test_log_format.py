"""``--log-format json``: `cio-worker serve` and `cio-worker agent` as real processes write one JSON
object a line on stderr (time, level, logger, message), uvicorn's records and the command's own
errors included, and never a token."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from cio_worker.cli.common import JsonFormatter
from cio_worker.queue import SqliteQueue
from cio_worker.queue.credentials import split
from tests.fleet import CoordinatorProcess
from tests.shots import make_shot

CLI = [sys.executable, "-m", "cio_worker"]
KEYS = {"time", "level", "logger", "message"}


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` as a JSON object with the keys a log agent reads; fails naming the line."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(record, dict) and KEYS <= record.keys(), line
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        assert datetime.fromisoformat(record["time"].replace("Z", "+00:00")).tzinfo is not None, line
        records.append(record)
    return records


def test_serve_and_agent_log_one_json_object_a_line_without_tokens(tmp_path: Path) -> None:
    from cio_worker.artist.submit import submit_job
    from cio_worker.job.paths import PathMap
    from cio_worker.sim.shim import install_cnode_shim
    from cio_worker.storage import open_storage
    from cio_worker.storage.md5cache import Md5Cache

    db = tmp_path / "queue.db"
    queue = SqliteQueue(db)
    _, agent_token = queue.create_token("fleet", ["agent"])
    _, owner_token = queue.create_token("ops", ["owner"])
    shot = make_shot(tmp_path / "shot", frames="1-2", chunk_size=2)
    storage_url = f"file://{tmp_path / 'storage'}"
    job = submit_job(shot.spec, queue=queue, storage=open_storage(storage_url), storage_url=storage_url,
                     path_map=PathMap.rooted(str(shot.root)), md5cache=Md5Cache(tmp_path / "md5.db")).job_id
    (tmp_path / "agent.token").write_text(agent_token + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    install_cnode_shim(bin_dir)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CNODE_SIM_FRAME_SECONDS="0.01")

    coordinator = CoordinatorProcess(f"sqlite:///{db}", "--log-format", "json", "--metrics-token-required")
    coordinator.start()
    try:
        import requests

        # A refused scrape and a refused claim: answered, and their tokens never logged.
        assert requests.get(coordinator.url + "/metrics", headers={"Authorization": f"Bearer {agent_token}"},
                            timeout=30).status_code == 403
        assert requests.post(coordinator.url + "/v1/claim", json={"worker": "x"}, timeout=30,
                             headers={"Authorization": f"Bearer {owner_token}"}).status_code == 403
        agent = subprocess.run(
            [*CLI, "agent", "--queue", coordinator.url, "--token-file", str(tmp_path / "agent.token"),
             "--worker-id", "json-agent", "--root", str(shot.root), "--work-dir", str(tmp_path / "work"),
             "--cache-dir", str(tmp_path / "cache"), "--poll-seconds", "0.1", "--max-tasks", "1",
             "--preemption", "none", "--log-format", "json"],
            env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
        assert agent.returncode == 0, agent.stderr[-3000:]
        assert [t.state for t in queue.tasks(job)] == ["done"], agent.stderr[-3000:]
    finally:
        coordinator.stop()
        queue.close()

    served = json_lines("\n".join(coordinator.log))
    ran = json_lines(agent.stderr)
    assert any(r["logger"].startswith("uvicorn") for r in served)  # the server's own records, in JSON too
    assert any(r["message"].startswith("coordinator at http://") for r in served)
    assert any(r["logger"].startswith("cio_worker") and "done" in r["message"] for r in ran), agent.stderr[-3000:]
    everything = "\n".join(coordinator.log) + agent.stderr + agent.stdout
    for token in (agent_token, owner_token):
        _, secret = split(token)
        assert token not in everything and secret not in everything


def test_an_error_is_a_json_line_too(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    done = subprocess.run([*CLI, "agent", "--queue", missing, "--work-dir", str(tmp_path / "w"), "--cache-dir",
                           str(tmp_path / "c")], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "CIO_LOG_FORMAT": "json"})
    assert done.returncode == 2
    record = json_lines(done.stderr)[-1]
    assert record["level"] == "ERROR" and "does not exist" in record["message"] and record["logger"] == "cio_worker.cli"
    wrong = subprocess.run([*CLI, "serve", "--queue", missing, "--log-format", "xml"], capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
    assert wrong.returncode == 2 and "--log-format" in wrong.stderr and "text or json" in wrong.stderr


def test_a_record_with_a_traceback_and_any_text_stays_one_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.getLogger("cio_worker.test").makeRecord(
            "cio_worker.test", logging.ERROR, __file__, 1, "line one\nline two \udcff é %s", ("arg",), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and line.isascii()
    data = json.loads(line)
    assert data["message"] == "line one\nline two \udcff é arg"
    assert data["level"] == data["severity"] == "ERROR" and data["logger"] == "cio_worker.test"
    assert "ValueError: bad" in data["exception"]


def test_the_text_format_is_unchanged_for_scripts(tmp_path: Path) -> None:
    """Without --log-format the coordinator's ready line stays a plain line that scripts look for."""
    db = tmp_path / "queue.db"
    SqliteQueue(db).close()
    coordinator = CoordinatorProcess(f"sqlite:///{db}")
    coordinator.start()
    coordinator.stop()
    assert any(line.startswith("coordinator at http://") for line in coordinator.log), coordinator.log
    assert not any(line.startswith("{") for line in coordinator.log)
