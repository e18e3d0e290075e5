"""benchmarks/fleet.py --quick: a coordinator process on a real PostgreSQL, async agents through
every phase, a JSON report whose counts add up. Never looks at a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pg_server import postgres_available

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fleet.py"


def test_the_quick_fleet_benchmark_runs_every_phase(tmp_path: Path) -> None:
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "fleet.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    phases = {p["name"].split(" (")[0]: p for p in report["phases"]}
    assert set(phases) == {"raw SQL", "coordinator", "boot burst", "report cost", "long-poll cost", "idle agents"}
    assert phases["raw SQL"]["count"] == 300 and phases["coordinator"]["count"] == 300  # every task claimed and done once
    burst = phases["boot burst"]
    assert burst["count"] == burst["extra"]["agents"] == 50 and burst["extra"]["failures"] == {}
    idle = phases["idle agents"]
    assert idle["count"] > 0 and idle["extra"]["errors"] == {} and idle["extra"]["db_connections_max"] >= 1
    assert idle["extra"]["probe_reports"] > 0 and idle["latency_p99_ms"] is not None  # the probe process answered
    assert report["ratio"] > 0
    for name in ("report cost", "long-poll cost"):  # each request answered as it should be (200 / 204)
        cost = phases[name]
        assert cost["count"] > 0 and cost["extra"]["coordinator_cpu_us_per_request"] > 0
    assert "| phase |" in done.stdout
