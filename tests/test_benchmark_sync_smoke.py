"""benchmarks/sync.py --quick against the test fixtures' servers: it runs end to end and writes a
JSON report with positive medians. Peers that are not installed show up as skipped, not as
failures. Nothing here looks at the figures themselves (tests never assert speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sync.py"
PEERS = ("s5cmd", "aws", "rclone", "cp")


def test_the_quick_benchmark_reports_every_store_and_direction(s3_endpoint: str, gcs_endpoint: str, tmp_path: Path) -> None:
    out = tmp_path / "sync.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--backends", "file,s3,gcs", "--s3-endpoint", s3_endpoint,
         "--gcs-endpoint", gcs_endpoint, "--json", str(out), "--work-dir", str(tmp_path / "work"), "--settle", "0.01"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]

    # ours: every store, both data sets, both directions, cold and warm; all timed
    ours = {(r["backend"], r["data"], r["direction"], r["temperature"]) for r in rows if "ours" in r["median_seconds"]}
    cache_rows = {("file", d, "download", t) for d in ("large", "scale")
                  for t in ("from cache, checked", "from cache, unchecked")}  # fmt: skip
    assert ours == {(b, d, di, t) for b in ("file", "s3", "gcs") for d in ("small", "large")
                    for di in ("download", "upload") for t in ("cold", "warm")} | cache_rows | {
        ("file", "scale", "download", "cold"), ("file", "scale", "download", "warm")}  # fmt: skip
    # the many-inputs rows beside cp -r in the same run; the cache check's cost and the peak RSS
    scale = next(r for r in rows if (r["data"], r["temperature"]) == ("scale", "cold"))
    assert "cp" in scale["ratio_ours_to"]
    assert report["scale"]["scale"]["rss_mb"] and report["scale"]["scale"]["nothing_to_do_us_per_entry"] > 0
    assert report["scale"]["large"]["cache_check"]["seconds_per_gib"] is not None
    for row in rows:
        assert row["median_seconds"] and all(v > 0 for v in row["median_seconds"].values()), row
        assert all(len(runs) == report["runs"] == 1 for runs in row["runs_seconds"].values())
        assert all(v > 0 for v in row["ratio_ours_to"].values())

    # each peer either ran (cp -r always can on file://) or is listed as skipped, with a reason
    ran = {tool for r in rows for tool in r["median_seconds"]} - {"ours"}
    assert "cp" in ran
    skipped = {s["tool"]: s["reason"] for s in report["skipped"]}
    for peer in PEERS:
        assert peer in ran or peer in skipped, peer
    assert all(reason for reason in skipped.values())
    assert {s["kind"] for s in report["skipped"]} <= {"missing", "unsupported"}, report["skipped"]  # none failed

    # the goals are evaluated (met or missed, never asserted) and the table names them
    assert {g["goal"] for g in report["goals"]} and all(g["met"] in (True, False, None) for g in report["goals"])
    assert "| store | data | direction |" in done.stdout and "Goals" in done.stdout
    assert report["machine"] and report["date"]
    assert report["settle_seconds"] == 0.01 and "`sync` and 0.01 s of quiet" in done.stdout
