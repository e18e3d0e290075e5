"""The benchmarks still run: ``--quick`` sizes, output shape only. Never asserts a speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

PER_TASK_POSITIVE = (
    "claim_call_ms", "claim_to_exec_ms", "claimed_to_spawn_ms", "sync_ms", "render_wall_in_agent_ms",
    "exit_to_waited_ms", "exit_to_done_ms", "agent_task_ms", "agent_minus_sync_ms", "direct_ms",
    "ratio_agent_to_direct", "agent_cpu_ms", "render_cpu_in_agent_ms", "direct_cpu_ms",
)
PER_TASK_FINITE = ("overhead_ms", "render_minus_direct_ms")  # differences: either sign is a result
DURING_POSITIVE = ("window_s", "samples", "agent_rss_peak_mib", "agent_rss_median_mib",
                   "render_rss_peak_mib", "render_rss_median_mib")
DURING_NON_NEGATIVE = ("agent_cpu_percent", "render_cpu_percent")  # a short window can round to 0
SYNC_POSITIVE = ("cold_s", "warm_s", "second_task_s", "cp_r_s", "cold_to_cp", "warm_to_cp", "second_task_to_cp",
                 "cold_cpu_s", "warm_cpu_s", "second_task_cpu_s", "cp_r_cpu_s", "cold_cpu_to_cp", "second_task_cpu_to_cp")


def _medians(section: dict, keys: tuple[str, ...], runs: int) -> dict[str, float]:
    assert len(section["runs"]) == runs
    summary = section["summary"]
    assert set(keys) <= set(summary), set(keys) - set(summary)
    for key in keys:
        assert set(summary[key]) == {"median", "min", "max"}
        assert summary[key]["min"] <= summary[key]["median"] <= summary[key]["max"]
    return {key: summary[key]["median"] for key in keys}


def test_agent_overhead_quick_writes_every_figure(tmp_path):
    out = tmp_path / "agent_overhead.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "agent_overhead.py"), "--quick", "--json", str(out),
         "--scratch", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())

    assert {"benchmark", "date", "machine", "scratch_fs", "parameters", "per_task", "during_render", "sync",
            "elapsed_s", "table"} <= set(report)
    assert report["machine"]["nproc"] > 0
    assert report["machine"]["cpu_model"] and report["machine"]["python"]
    params = report["parameters"]
    assert params["quick"] is True and params["runs"] >= 2

    per = _medians(report["per_task"], PER_TASK_POSITIVE + PER_TASK_FINITE, params["runs"])
    assert all(per[k] > 0 for k in PER_TASK_POSITIVE), per
    assert all(math.isfinite(per[k]) for k in PER_TASK_FINITE), per
    assert "cnode" in report["per_task"]["command"]

    during = _medians(report["during_render"], DURING_POSITIVE + DURING_NON_NEGATIVE, params["render_runs"])
    assert all(during[k] > 0 for k in DURING_POSITIVE), during
    assert all(during[k] >= 0 for k in DURING_NON_NEGATIVE), during

    sync = _medians(report["sync"], SYNC_POSITIVE, params["runs"])
    assert all(sync[k] > 0 for k in SYNC_POSITIVE), sync
    assert report["sync"]["files"] == params["files"]

    # the table printed and stored is the same, and names every measurement
    assert report["table"] in done.stdout
    for words in ("claim → exec", "render exit → reported done", "added time", "peak RSS", "cold", "warm",
                  "second task"):
        assert words in report["table"]
    # the scratch tree is removed
    assert not list(tmp_path.glob("cio-bench-*"))
