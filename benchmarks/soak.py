#!/usr/bin/env python3
"""Soak: a job of many tasks through agents that are preempted and killed at random (issue 5).

``cio_worker.sim.simulate.Simulation`` runs ``--agents`` agent processes, each a cloud instance with
its own GCE metadata server: while an instance holds a task, preemption notices arrive at
``--preempt-rate`` per busy agent-minute (Poisson; the instance is powered off ``--notice-seconds``
after its notice if the agent has not exited) and deaths without notice at ``--kill-rate``. Each
lost instance is replaced by a fresh one. When the job is over, the run is audited from the
queue's events, the agents' task logs, the downloads and a psutil scan:

- tasks done exactly once (one ``done`` event), duplicate completions (more than one: must be 0),
  lost tasks (neither done nor failed at the end: must be 0), failed tasks;
- frames rendered twice (the same task, image and frame saved by more than one attempt, from the
  ``Saved image`` lines of every task log of every instance);
- orphan processes left (any process of the run alive after it: must be 0);
- corrupted files placed (a downloaded file whose MD5 differs from its record or that does not
  decode as a PNG: must be 0), and frames missing from the downloads;
- preemption reaction time: notice raised -> the render's process tree verified gone -> task
  released, median and worst, and how many reports came after their deadline.

Usage: ``python benchmarks/soak.py [--agents 4] [--tasks 200] [--preempt-rate 10] [--kill-rate 3]
[--frame-seconds 0.3] [--seed N] [--json OUT] [--work-dir DIR] [--quick]``. Prints markdown; writes JSON (default
``benchmarks/results/soak.json``). Exit status 1 when a must-be-zero count is not zero.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import textwrap
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import psutil

from cio_worker.job.hashing import md5_b64_of_file
from cio_worker.queue import open_queue
from cio_worker.sim.simulate import Simulation, SimulationConfig, SimulationSummary, instance_processes, read_drains
from cio_worker.sim.png import PngError, read_png

RESULTS = Path(__file__).resolve().parent / "results"
SAVED = re.compile(r"^Saved image '([^']+)' frame (-?\d+) to ")
LOG_NAME = re.compile(r"^(\d+)-(\d+)-a(\d+)\.log$")
MUST_BE_ZERO = ("lost", "duplicate_completions", "orphans", "corrupted_files", "missing_frames", "late_releases")


def make_shot(base: Path, tasks: int, frames_per_task: int, retries_preempted: int = 5) -> tuple[Path, Path, int]:
    """An artist root with a project (one image, one texture input) and a job spec of ``tasks``
    chunks; returns (spec, root, frame count). Like tests/shots.py, sized for a soak."""
    frames = tasks * frames_per_task
    root = base / "artist"
    (root / "proj" / "tex").mkdir(parents=True, exist_ok=True)
    (root / "proj" / "shots").mkdir(parents=True, exist_ok=True)
    (root / "proj" / "tex" / "wood.png").write_bytes(b"wood texture for the soak\n" * 64)
    project = {
        "format": "cio-project/1",
        "images": {
            "project://scene/image1": {
                "frames": f"1-{frames}",
                "save_as": "C:/proj/renders/main/beauty.####.png",
                "resolution": [32, 24],
                "inputs": ["project://scene/wood"],
            }
        },
        "references": {"project://scene/wood": {"path": "C:/proj/tex/wood.png"}},
    }
    (root / "proj" / "shots" / "shot.project").write_text(json.dumps(project), encoding="utf-8")
    spec = base / "job.toml"
    spec.write_text(textwrap.dedent(f"""\
        [job]
        title = "soak"
        project_file = "/proj/shots/shot.project"
        images = ["project://scene/image1"]
        chunk_size = {frames_per_task}
        tiles = 1
        dependency_scan = "smart"
        instance_type = "n1-standard-2"

        [autoretry_policy]
        preempted = {retries_preempted}
        failed = 1
        """), encoding="utf-8")
    return spec, root, frames


def _stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "median": None, "worst": None}
    return {"count": len(values), "median": round(statistics.median(values), 3), "worst": round(max(values), 3)}


def audit(summary: SimulationSummary, frames: int) -> dict:
    work = summary.work_dir
    with open_queue(f"sqlite:///{work / 'queue.db'}") as queue:
        tasks = queue.tasks(summary.job_id)
        events = queue.events(summary.job_id)
        records = queue.downloads(summary.job_id, state=None)
    done_events = Counter(e.task_id for e in events if e.kind == "done")
    claims = sum(1 for e in events if e.kind == "claimed")
    states = Counter(t.state for t in tasks)

    # Frames saved by more than one attempt of the same task (from every task log of every node).
    saved: Counter = Counter()
    first_saved_by: dict = {}  # (task, image, frame) -> (attempt, node) of its first save
    for log in work.glob("node-*/work/logs/*.log"):
        name = LOG_NAME.match(log.name)
        if not name:
            continue
        node = log.parents[2].name
        for line in log.read_text(errors="replace").splitlines():
            match = SAVED.match(line)
            if match:
                key = (name.group(2), match.group(1), int(match.group(2)))
                saved[key] += 1
                first_saved_by[key] = min(first_saved_by.get(key, (1 << 30, "")), (int(name.group(3)), node))
    rendered_twice = [key for key, count in saved.items() if count > 1]
    drains = {(log.parent.name, d["task"]): d for log in work.glob("node-*/agent.log") for d in read_drains(log)}
    # A frame saved by an attempt that then drained should have been kept (uploaded, not rendered
    # again); the ones an instance killed without notice saved are expected to be rendered again.
    twice_after_drain = [key for key in rendered_twice if (first_saved_by[key][1], key[0]) in drains]

    # What the artist received: every frame once, each file as recorded and a whole PNG.
    out = work / "artist" / "proj" / "renders" / "main"
    named = Counter(f.relative_path for r in records for f in r.files)
    corrupted, placed = [], 0
    for record in records:
        for entry in record.files:
            path = out / entry.relative_path
            if not path.exists():
                continue
            placed += 1
            try:
                read_png(path)
                ok = md5_b64_of_file(path) == entry.md5
            except (PngError, OSError):
                ok = False
            if not ok:
                corrupted.append(entry.relative_path)
    expected = {f"beauty.{n:04d}.png" for n in range(1, frames + 1)}
    missing = sorted(expected - {p for p in named if (out / p).exists()})

    # Anything of the run still alive: by the simulation's environment marker, or by command line.
    orphans = list(summary.orphans)
    for proc in instance_processes(str(work)):
        orphans.append(f"{proc.pid} (marked)")
    mine = {os.getpid()} | {p.pid for p in psutil.Process().parents()}  # e.g. a `timeout` wrapper
    for proc in psutil.process_iter():
        try:
            line = " ".join(proc.cmdline())
            if str(work) in line and proc.pid not in mine and proc.status() != psutil.STATUS_ZOMBIE:
                orphans.append(f"{proc.pid} {line[:120]}")
        except psutil.Error:
            continue

    salvaged = [d for d in drains.values() if d.get("by") == "drain" and d.get("files")]

    chaos = summary.chaos
    reactions = chaos.reactions
    return {
        "tasks": len(tasks),
        "tasks_done_exactly_once": sum(1 for t in tasks if done_events.get(t.id) == 1),
        "duplicate_completions": sum(1 for count in done_events.values() if count > 1),
        "lost": sum(1 for t in tasks if t.state not in ("done", "failed")),
        "failed": states.get("failed", 0),
        "failures": [f"task {t.id}: {t.reason}" for t in tasks if t.state == "failed"],
        "attempts": claims,
        "retries": claims - len(tasks),
        "frames": frames,
        "frames_saved": sum(saved.values()),
        "frames_rendered_twice": len(rendered_twice),
        "frames_rendered_twice_after_a_drain": len(twice_after_drain),
        "drains_with_frames_saved": len(salvaged),
        "files_saved_by_drains": sum(d["files"] for d in salvaged),
        "files_offered_twice": sum(1 for count in named.values() if count > 1),
        "files_placed": placed,
        "corrupted_files": len(corrupted),
        "corrupted": corrupted[:20],
        "missing_frames": len(missing),
        "orphans": len(orphans),
        "orphan_list": orphans[:20],
        "instances": chaos.instances,
        "notices": chaos.notices,
        "drained_in_time": chaos.drained,
        "powered_off_at_deadline": chaos.powered_off,
        "kills_without_notice": chaos.kills,
        "left_after_drain": chaos.left_after_drain,
        "reaction_tree_gone_s": _stats([r.tree_gone for r in reactions if r.tree_gone is not None]),
        "reaction_released_s": _stats([r.released for r in reactions if r.released is not None]),
        "drains_by": dict(Counter(r.by for r in reactions)),
        "late_releases": sum(1 for r in reactions if not r.in_time),
        "wall_s": round(summary.seconds, 1),
    }


def markdown(result: dict) -> str:
    a, c = result["audit"], result["config"]
    tree, rel = a["reaction_tree_gone_s"], a["reaction_released_s"]

    def s(v):
        return "-" if v is None else f"{v:.2f} s"

    rows = [
        ("agents / tasks / frames", f"{c['agents']} / {a['tasks']} / {a['frames']}"),
        ("chaos", f"{c['preempt_rate']:g} notices + {c['kill_rate']:g} kills per busy agent-minute, "
                  f"{c['notice_seconds']:g} s notices, lease {c['lease_seconds']:g} s"),
        ("wall time", f"{a['wall_s']} s"),
        ("instances started (replacements included)", a["instances"]),
        ("preemption notices", f"{a['notices']} ({a['drained_in_time']} drained and exited in time, "
                               f"{a['powered_off_at_deadline']} powered off at the deadline)"),
        ("kills without notice", a["kills_without_notice"]),
        ("attempts / retries", f"{a['attempts']} / {a['retries']}"),
        ("tasks done exactly once", f"{a['tasks_done_exactly_once']} of {a['tasks']}"),
        ("lost tasks (must be 0)", a["lost"]),
        ("duplicate completions (must be 0)", a["duplicate_completions"]),
        ("failed tasks", a["failed"]),
        ("frames rendered twice", f"{a['frames_rendered_twice']} (of {a['frames_saved']} saved); after a drain: "
                                  f"{a['frames_rendered_twice_after_a_drain']}, the rest after kills without notice"),
        ("drains that uploaded finished frames", f"{a['drains_with_frames_saved']} ({a['files_saved_by_drains']} files "
                                                  "kept, not rendered again)"),
        ("orphan processes left (must be 0)", a["orphans"]),
        ("corrupted files placed (must be 0)", f"{a['corrupted_files']} (of {a['files_placed']} placed)"),
        ("frames missing from the downloads (must be 0)", a["missing_frames"]),
        ("notice -> process tree gone", f"median {s(tree['median'])}, worst {s(tree['worst'])} ({tree['count']})"),
        ("notice -> task released", f"median {s(rel['median'])}, worst {s(rel['worst'])} ({rel['count']})"),
        ("released after the deadline (must be 0)", a["late_releases"]),
    ]
    lines = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--frames-per-task", type=int, default=3)
    parser.add_argument("--frame-seconds", type=float, default=0.3)
    parser.add_argument("--preempt-rate", type=float, default=10.0, help="notices per busy agent-minute")
    parser.add_argument("--kill-rate", type=float, default=3.0, help="kills without notice per busy agent-minute")
    parser.add_argument("--notice-seconds", type=float, default=5.0)
    parser.add_argument("--lease-seconds", type=float, default=4.0)
    parser.add_argument("--heartbeat-seconds", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--work-dir", default=None, help="default: a new temporary directory (kept)")
    parser.add_argument("--json", default=str(RESULTS / "soak.json"))
    parser.add_argument("--quick", action="store_true", help="2 agents, 16 tasks, high rates: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.tasks, args.frames_per_task, args.frame_seconds = 2, 16, 2, 0.1
        args.preempt_rate, args.kill_rate, args.lease_seconds = 30.0, 10.0, 3.0
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cio-soak-")).resolve()
    spec, root, frames = make_shot(work / "shot", args.tasks, args.frames_per_task)
    config = SimulationConfig(
        job_spec=spec, source_root=root, workers=args.agents, work_dir=work / "sim",
        frame_seconds=args.frame_seconds, lease_seconds=args.lease_seconds,
        heartbeat_seconds=args.heartbeat_seconds, timeout_seconds=args.timeout,
        preempt_rate=args.preempt_rate, kill_rate=args.kill_rate, notice_seconds=args.notice_seconds, seed=seed,
    )
    progress = io.StringIO()
    print(f"soak: {args.agents} agents, {args.tasks} tasks, seed {seed}, work in {work}", file=sys.stderr)
    summary = Simulation(config, out=progress).run()
    result = {
        "benchmark": "soak",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "config": {"agents": args.agents, "tasks": args.tasks, "frames_per_task": args.frames_per_task,
                   "frame_seconds": args.frame_seconds, "preempt_rate": args.preempt_rate,
                   "kill_rate": args.kill_rate, "notice_seconds": args.notice_seconds,
                   "lease_seconds": args.lease_seconds, "heartbeat_seconds": args.heartbeat_seconds,
                   "seed": seed, "quick": args.quick},
        "audit": audit(summary, frames),
        "work_dir": str(work),
    }
    bad = {k: result["audit"][k] for k in MUST_BE_ZERO if result["audit"][k]}
    result["ok"] = not bad
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result))
    print(f"\nJSON: {out}; everything else (queue, logs, node roots) in {work}")
    if bad:
        print(f"NOT ZERO: {bad}", file=sys.stderr)
        (work / "simulation.log").write_text(progress.getvalue(), encoding="utf-8")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
