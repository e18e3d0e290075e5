"""benchmarks/soak.py still runs (``--quick``): the audit's keys are there and the counts that must
be zero are zero. Never asserts a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cio_worker.sim.simulate import instance_processes

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"

AUDIT_KEYS = {
    "tasks", "tasks_done_exactly_once", "duplicate_completions", "lost", "failed", "attempts", "retries",
    "frames", "frames_saved", "frames_rendered_twice", "files_placed", "corrupted_files", "missing_frames",
    "orphans", "instances", "notices", "drained_in_time", "powered_off_at_deadline", "kills_without_notice",
    "reaction_tree_gone_s", "reaction_released_s", "late_releases", "wall_s",
}


@pytest.mark.slow
def test_soak_quick_audits_a_chaotic_run(tmp_path):
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(SOAK), "--quick", "--seed", "11", "--json", str(out), "--work-dir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    audit = result["audit"]
    assert AUDIT_KEYS <= set(audit), AUDIT_KEYS - set(audit)
    assert result["ok"] is True
    assert audit["lost"] == 0 and audit["duplicate_completions"] == 0 and audit["orphans"] == 0
    assert audit["corrupted_files"] == 0 and audit["missing_frames"] == 0 and audit["late_releases"] == 0
    assert audit["tasks_done_exactly_once"] + audit["failed"] == audit["tasks"] == 16
    assert audit["files_placed"] == audit["frames"]
    assert audit["notices"] + audit["kills_without_notice"] > 0
    for key in ("reaction_tree_gone_s", "reaction_released_s"):
        stats = audit[key]
        assert set(stats) == {"count", "median", "worst"}
        if stats["count"]:
            assert 0 <= stats["median"] <= stats["worst"]
    assert "| lost tasks (must be 0) | 0 |" in done.stdout
    assert instance_processes(str(tmp_path / "w" / "sim")) == []
