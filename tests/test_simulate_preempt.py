"""``cio-worker simulate --preempt-rate R --kill-rate K``: instances preempted (GCE notices from
their own metadata servers) and killed at random, replaced by fresh ones, and the job still
finishes with every frame downloaded once, byte-identical to what was rendered."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from cio_worker.job.hashing import md5_b64_of_file
from cio_worker.queue import open_queue
from cio_worker.sim.simulate import Simulation, SimulationConfig, SimulationSummary, instance_processes
from cio_worker.sim.png import PngError, read_png
from tests.shots import make_shot

pytestmark = pytest.mark.slow


def check_frames(summary: SimulationSummary, frames: range) -> None:
    """Every frame arrived once (one download record names it), intact and identical to every
    complete copy an agent rendered; nothing of the simulation is left running."""
    work = summary.work_dir
    assert summary.failed == 0 and summary.done == summary.tasks, summary.failures
    assert summary.orphans == []
    assert instance_processes(str(work)) == []
    with open_queue(f"sqlite:///{work / 'queue.db'}") as queue:
        records = queue.downloads(summary.job_id, state=None)
        events = queue.events(summary.job_id)
    assert all(r.state == "downloaded" for r in records)
    named = [f.relative_path for r in records for f in r.files]
    assert sorted(named) == sorted(f"beauty.{n:04d}.png" for n in frames)  # each once
    done = [e.task_id for e in events if e.kind == "done"]
    assert len(done) == len(set(done)) == summary.tasks  # each task completed exactly once
    out = work / "artist" / "proj" / "renders" / "main"
    entries = {f.relative_path: f for r in records for f in r.files}
    for relative, entry in entries.items():
        placed = out / relative
        assert md5_b64_of_file(placed) == entry.md5
        read_png(placed)
        copies = 0
        for node in work.glob("node-*"):
            rendered = node / "root" / "proj" / "renders" / "main" / relative
            if not rendered.exists():
                continue
            try:
                read_png(rendered)
            except PngError:
                continue  # cut off mid-write by a power-off: never uploaded
            assert rendered.read_bytes() == placed.read_bytes(), rendered
            copies += 1
        assert copies >= 1, relative


def simulate(tmp_path: Path, **kw) -> tuple[SimulationSummary, str]:
    shot = make_shot(tmp_path / "shot", frames="1-24", chunk_size=4, retries_preempted=5)
    out = io.StringIO()
    config = SimulationConfig(job_spec=shot.spec, source_root=shot.root, work_dir=tmp_path / "sim",
                              timeout_seconds=240, seed=7, **kw)
    summary = Simulation(config, out=out).run()
    return summary, out.getvalue()


def test_a_job_finishes_through_frequent_preemptions(tmp_path):
    summary, log = simulate(tmp_path, workers=2, frame_seconds=0.25, preempt_rate=40, notice_seconds=5)
    print("\n".join(summary.lines()[-5:]))
    chaos = summary.chaos
    assert chaos.notices > 0, log
    # Every notice that stopped a task costs a retry; one that came as the task was completing, or
    # to an agent between tasks, does not.
    assert summary.retries >= sum(1 for r in chaos.reactions if r.by in ("drain", "hard stop"))
    # Each preempted instance was replaced once it was gone; one noticed as the job ended may still
    # have been draining when the simulation stopped (at most the two running then).
    ended = chaos.drained + chaos.powered_off
    assert chaos.instances == 2 + ended and 0 <= chaos.notices - ended <= 2, chaos
    assert all(r.in_time for r in chaos.reactions), chaos.reactions
    assert chaos.left_after_drain == 0
    check_frames(summary, range(1, 25))


def test_a_job_finishes_through_kills_without_notice(tmp_path):
    summary, log = simulate(tmp_path, workers=2, frame_seconds=0.25, preempt_rate=10, kill_rate=20,
                            notice_seconds=5, lease_seconds=3, heartbeat_seconds=0.5)
    print("\n".join(summary.lines()[-5:]))
    assert summary.chaos.kills + summary.chaos.notices > 0, log
    check_frames(summary, range(1, 25))


def test_the_command_line_runs_a_chaotic_simulation(tmp_path):
    shot = make_shot(tmp_path / "shot", frames="1-8", chunk_size=4, retries_preempted=5)
    done = subprocess.run(
        [sys.executable, "-m", "cio_worker", "simulate", str(shot.spec), "--root", str(shot.root),
         "--work-dir", str(tmp_path / "sim"), "--workers", "2", "--frame-seconds", "0.3",
         "--preempt-rate", "60", "--notice-seconds", "4", "--seed", "3", "--timeout", "120"],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2/2 tasks done, 0 failed" in done.stdout
    assert "chaos: " in done.stdout and "released after the deadline: 0" in done.stdout
    assert instance_processes(str(tmp_path / "sim")) == []
