#!/usr/bin/env python3
"""What the agent costs, measured against the same work done without it (issue 3's benchmark).

Three measurements, each repeated ``--runs`` times and reported as medians (with the spread):

1. **Per-task added time.** A job of ``--tasks`` one-frame cnode-simulator renders
   (``CNODE_SIM_FRAME_SECONDS=0``) is run by a real in-process ``Agent`` (sqlite queue, ``file://``
   storage, content cache and MD5 cache, the node context the CLI builds), and each task is paired
   with the very same command (argv, cwd and environment captured from the agent's runner) run
   directly with ``subprocess.run``, just before or just after it (alternating), so that the load
   of a shared machine drifts as little as possible within a pair. Reported per task: claim to
   exec (``outcome.timings["claim_to_exec"]``, sync excluded), render exit to task reported done,
   the agent's wall (claim call to ``complete`` returned) minus its sync minus the paired direct
   wall, and the CPU the agent process itself spent on the task.
2. **The agent's own CPU and RSS while a render runs.** ``cio-worker agent --max-tasks 1`` runs as
   a process on a one-frame task lasting ``--render-seconds``; the agent process itself (threads
   included, children excluded) and the render process are sampled with psutil every 0.2 s.
3. **Sync of a ``--files`` x ``--file-kib`` manifest** from ``file://`` storage: cold (empty cache,
   nothing placed), warm (same manifest, files already placed: stat + MD5-cache lookups), and
   "second task" (empty destination, contents in the content cache); ``cp -r`` of the same tree is
   the physical reference: copies are run before, between and after the syncs (cp, cold, cp,
   second task, cp, warm) and each sync's ratio uses the mean of the two copies around it. Every
   timed step starts after ``os.sync()``, so that no step pays for writing back an earlier one's
   data. CPU time (the benchmark process's threads for a sync, the child's for ``cp``) is reported
   beside wall time.

Usage: ``python benchmarks/agent_overhead.py [--runs N] [--tasks N] [--files N] [--file-kib K]
[--render-seconds S] [--json OUT] [--quick]``. Prints a markdown table; writes JSON (default
``benchmarks/results/agent_overhead.json``). Timing on shared machines is noisy: compare ratios
measured in the same run, never absolute figures across machines.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import psutil

from cio_worker.node.agent import Agent, AgentConfig
from cio_worker.node.cache import ContentCache
from cio_worker.cli.common import node_context, setup_logging
from cio_worker.job.document import UploadFile
from cio_worker.node.execution import TaskOutcome
from cio_worker.job.hashing import hashstore_key
from cio_worker.storage.md5cache import Md5Cache
from cio_worker.job.paths import PathMap
from cio_worker.queue import open_queue
from cio_worker.sim.shim import install_cnode_shim
from cio_worker.storage import UploadItem, open_storage
from cio_worker.artist.submit import submit_job
from cio_worker.node.sync import InputSync

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "agent_overhead.json"
MiB = 1024 * 1024
SAMPLE_SECONDS = 0.2
now = time.monotonic

log = logging.getLogger("benchmark")


# ------------------------------------------------------------------------------------- helpers


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def spread(values: Iterable[float]) -> dict[str, float]:
    values = list(values)
    return {"median": median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min and max over runs of every numeric field the runs share."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: spread(r[k] for r in runs) for k in keys}


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    return {
        "nproc": nproc,
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
    }


def code_version() -> dict[str, Any]:
    """The commit measured, and the product files that differ from it (read-only git calls)."""
    repo = HERE.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=repo, capture_output=True,
                                  text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "cio_worker").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "unknown", "changed_product_files": changed}


def filesystem_of(path: Path) -> str:
    """The mount's filesystem type (ext4, tmpfs, overlay...) of ``path``."""
    best, kind = "", "unknown"
    try:
        real = os.path.realpath(path)
        for part in psutil.disk_partitions(all=True):
            if (real == part.mountpoint or real.startswith(part.mountpoint.rstrip("/") + "/")) \
                    and len(part.mountpoint) > len(best):
                best, kind = part.mountpoint, part.fstype
    except Exception:  # noqa: BLE001 - informative only
        pass
    return kind


def write_shot(root: Path, base: Path, frames: str, spec_frames: dict[str, str]) -> dict[str, Path]:
    """A tiny artist tree (project + texture) and one job spec per entry of ``spec_frames``
    (name -> custom frame range), every frame its own task."""
    (root / "proj" / "tex").mkdir(parents=True, exist_ok=True)
    (root / "proj" / "shots").mkdir(parents=True, exist_ok=True)
    (root / "proj" / "tex" / "wood.png").write_bytes(b"wood texture v1\n" * 64)
    project = {
        "format": "cio-project/1",
        "images": {
            "project://scene/image1": {
                "frames": frames,
                "save_as": "C:/proj/renders/main/beauty.####.png",
                "resolution": [32, 24],
                "inputs": ["project://scene/wood"],
            }
        },
        "references": {"project://scene/wood": {"path": "C:/proj/tex/wood.png"}},
    }
    (root / "proj" / "shots" / "shot.project").write_text(json.dumps(project), encoding="utf-8")
    specs = {}
    for name, custom in spec_frames.items():
        spec = base / f"{name}.toml"
        spec.write_text(
            textwrap.dedent(
                f"""\
                [job]
                title = "benchmark {name}"
                project_file = "/proj/shots/shot.project"
                images = ["project://scene/image1"]
                use_custom_frames = true
                custom_frames = "{custom}"
                chunk_size = 1
                dependency_scan = "smart"
                instance_type = "n1-standard-2"
                """
            ),
            encoding="utf-8",
        )
        specs[name] = spec
    return specs


def submit(spec: Path, queue, storage, storage_url: str, artist: Path, md5cache: Md5Cache) -> str:
    return submit_job(spec, queue=queue, storage=storage, storage_url=storage_url,
                      path_map=PathMap.rooted(str(artist)), md5cache=md5cache).job_id


# ------------------------------------------------------------------- 1. per-task added time


class TimedQueue:
    """The agent's queue, with the time of every claim and complete recorded, and a hook before
    each claim and after each complete (where the paired direct runs go: outside both windows)."""

    def __init__(self, inner, before_claim: Callable[[], None], after_complete: Callable[[], None]) -> None:
        self.inner = inner
        self.before_claim = before_claim
        self.after_complete = after_complete
        self.claims: list[tuple[str, float, float, float]] = []  # (task id, call, return, process CPU at call)
        self.completes: list[tuple[str, float, float, float]] = []  # (task id, call, return, process CPU at return)

    def claim(self, worker: str, lease_seconds: float):
        self.before_claim()
        cpu, t0 = time.process_time(), now()
        lease = self.inner.claim(worker, lease_seconds)
        t1 = now()
        if lease is not None:
            self.claims.append((lease.task_id, t0, t1, cpu))
        return lease

    def complete(self, lease, download=None, op_id=None) -> None:
        t0 = now()
        self.inner.complete(lease, download, op_id=op_id)
        self.completes.append((lease.task_id, t0, now(), time.process_time()))
        self.after_complete()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class TimedRunner:
    """The agent's ProcessRunner, recording each command's spec, start call and wait return."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.records: list[dict[str, Any]] = []

    def start(self, spec, on_line=None, **options):
        record: dict[str, Any] = {"spec": spec, "start": now()}
        process = self.inner.start(spec, on_line=on_line, **options)
        self.records.append(record)
        return _TimedProcess(process, record)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class _TimedProcess:
    def __init__(self, process, record: dict[str, Any]) -> None:
        self._process = process
        self._record = record

    def wait(self, *args, **kwargs):
        result = self._process.wait(*args, **kwargs)
        self._record["waited"] = now()
        self._record["result"] = result
        return result

    def __getattr__(self, name: str):
        return getattr(self._process, name)


class RecordingAgent(Agent):
    """The product's Agent; only remembers each task's outcome before reporting it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: list[Any] = []

    def _report(self, *args, **kwargs):  # noqa: ANN002, ANN003 - whatever the agent passes, passed on
        found = [a for a in (*args, *kwargs.values()) if isinstance(a, TaskOutcome)]
        if len(found) != 1:
            raise RuntimeError("Agent._report no longer receives the task's outcome; update the benchmark")
        self.outcomes.append(found[0])
        return super()._report(*args, **kwargs)


def _prepare_direct(spec) -> None:
    """What the agent's task directory held for the command (it is removed after each task)."""
    env = spec.env
    for name in ("TMPDIR", "CIO_TASK_TMPDIR"):
        if env.get(name):
            Path(env[name]).mkdir(parents=True, exist_ok=True)
    argv = spec.argv
    for i, word in enumerate(argv[:-1]):
        if word == "-config_file":
            config = Path(argv[i + 1])
            config.parent.mkdir(parents=True, exist_ok=True)
            if not config.exists():
                config.write_text("# written by cio-worker for cnode\n", encoding="utf-8")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_direct(spec, log_path: Path) -> tuple[float, float]:
    """The same command run by plain ``subprocess.run`` (output to a file): its wall and CPU seconds."""
    _prepare_direct(spec)
    with open(log_path, "wb") as out:
        cpu0, t0 = _children_cpu(), now()
        done = subprocess.run(spec.argv, cwd=spec.cwd, env=dict(spec.env), stdin=subprocess.DEVNULL,
                              stdout=out, stderr=subprocess.STDOUT, check=False)
        wall, cpu = now() - t0, _children_cpu() - cpu0
    tmp = spec.env.get("CIO_TASK_TMPDIR")
    if tmp:
        shutil.rmtree(Path(tmp).parent, ignore_errors=True)  # the task directory, as the agent leaves it
    if done.returncode != 0:
        raise RuntimeError(f"direct run of {spec.command_line} exited {done.returncode}; see {log_path}")
    return wall, cpu


def run_agent(ctx, queue, job_id: str, tasks: int, runner: TimedRunner, log_dir: Path) -> dict[str, Any]:
    """Run a job of ``tasks`` tasks with an in-process agent, each task paired with a direct run of
    its command. The machine's load drifts: a pair is measured within a fraction of a second, and
    the order alternates (even tasks: agent then direct; odd tasks: direct, with the previous
    task's command, then agent)."""
    runner.records.clear()
    direct: list[tuple[float, float]] = []

    def run_pair_direct() -> None:
        spec = runner.records[-1]["spec"]  # the command of the task just done
        direct.append(run_direct(spec, log_dir / f"{job_id}-direct-{len(direct):03d}.log"))

    def before_claim() -> None:
        task = len(timed.claims)  # the index of the task about to be claimed
        if task % 2 == 1 and task < tasks and len(direct) == task:
            run_pair_direct()

    def after_complete() -> None:
        task = len(timed.completes) - 1  # the index of the task just reported
        if task % 2 == 0 and len(direct) == task:
            run_pair_direct()

    timed = TimedQueue(queue, before_claim, after_complete)
    agent = RecordingAgent(
        AgentConfig(worker_id="bench-agent", max_tasks=tasks, poll_seconds=0.1, idle_exit_seconds=20.0),
        timed, ctx, log=logging.getLogger("cio_worker.node.agent"),
    )
    summary = agent.run()
    if summary.done != tasks or len(timed.completes) != tasks:
        reasons = [o.reason for o in agent.outcomes if o.status != "done"]
        raise RuntimeError(f"job {job_id}: {summary.done} of {tasks} tasks done ({summary.exit_reason}); {reasons[:3]}")
    if len(direct) != tasks:
        raise RuntimeError(f"job {job_id}: {len(direct)} direct runs for {tasks} tasks; the pairing is broken")
    return {"claims": timed.claims, "completes": timed.completes, "records": list(runner.records),
            "outcomes": agent.outcomes, "direct": direct}


def per_task_figures(agent: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for (tid, c0, c1, cpu0), (tid2, _d0, d1, cpu1), rec, outcome, (direct, direct_cpu) in zip(
            agent["claims"], agent["completes"], agent["records"], agent["outcomes"], agent["direct"]):
        assert tid == tid2, (tid, tid2)
        result = rec["result"]
        exited = rec["start"] + result.wall_seconds  # runner.start call + Popen-to-reap wall
        sync = outcome.timings["sync"]
        task_wall = d1 - c0
        rows.append({
            "claim_call": c1 - c0,
            "claim_to_exec": outcome.timings["claim_to_exec"],
            "claimed_to_spawn": rec["start"] - c1 - sync,
            "sync": sync,
            "render_wall": result.wall_seconds,
            "exit_to_waited": rec["waited"] - exited,
            "exit_to_done": d1 - exited,
            "agent_task_wall": task_wall,
            "agent_minus_sync": task_wall - sync,
            "direct": direct,
            "overhead": task_wall - sync - direct,
            "render_minus_direct": result.wall_seconds - direct,
            "ratio": (task_wall - sync) / direct,
            "agent_cpu": cpu1 - cpu0,
            "render_cpu_in_agent": result.cpu_user + result.cpu_system,
            "direct_cpu": direct_cpu,
        })

    def ms(key: str) -> float:
        return 1000 * median(r[key] for r in rows)

    return {
        "tasks": len(rows),
        "claim_call_ms": ms("claim_call"),
        "claim_to_exec_ms": ms("claim_to_exec"),
        "claimed_to_spawn_ms": ms("claimed_to_spawn"),
        "sync_ms": ms("sync"),
        "render_wall_in_agent_ms": ms("render_wall"),
        "render_minus_direct_ms": ms("render_minus_direct"),
        "exit_to_waited_ms": ms("exit_to_waited"),
        "exit_to_done_ms": ms("exit_to_done"),
        "agent_task_ms": ms("agent_task_wall"),
        "agent_minus_sync_ms": ms("agent_minus_sync"),
        "direct_ms": ms("direct"),
        "overhead_ms": ms("overhead"),
        "ratio_agent_to_direct": median(r["ratio"] for r in rows),
        "agent_cpu_ms": ms("agent_cpu"),
        "render_cpu_in_agent_ms": ms("render_cpu_in_agent"),
        "direct_cpu_ms": ms("direct_cpu"),
    }


def bench_per_task(scratch: Path, runs: int, tasks: int) -> dict[str, Any]:
    base = scratch / "per-task"
    base.mkdir(parents=True)
    artist = base / "artist"
    specs = write_shot(artist, base, f"1-{max(tasks, 2)}", {"warmup": "1-2", "job": f"1-{tasks}"})
    bin_dir = base / "bin"
    install_cnode_shim(bin_dir)
    queue = open_queue(f"sqlite:///{base / 'queue.db'}")
    storage_url = f"file://{base / 'storage'}"
    storage = open_storage(storage_url)
    artist_md5 = Md5Cache(base / "artist-md5.db")
    node = base / "node"
    args = argparse.Namespace(work_dir=str(node / "work"), cache_dir=str(node / "cache"), cache_budget_gb=20.0,
                              no_cache=False, storage_concurrency=0, sync_processes=0, kill_grace=10.0,
                              task_timeout=None, log_cap_mb=64.0)
    agent_log = setup_logging("INFO", open(base / "agent.log", "a", encoding="utf-8"))
    try:
        from cio_worker.storage.progress import LoggingProgress  # as `cio-worker agent` does, when it exists

        progress: Callable = lambda phase: LoggingProgress(agent_log, phase)  # noqa: E731
    except ImportError:
        progress = lambda phase: None  # noqa: E731
    ctx = node_context(args, PathMap.rooted(str(node / "root")), say=lambda line: agent_log.info("%s", line),
                       progress=progress)
    ctx.base_env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                        CNODE_SIM_FRAME_SECONDS="0")
    runner = TimedRunner(ctx.runner)
    ctx.runner = runner
    direct_logs = base / "direct-logs"
    direct_logs.mkdir()
    try:
        # Warm-up (not reported): places the inputs, fills the caches, loads every module.
        run_agent(ctx, queue, submit(specs["warmup"], queue, storage, storage_url, artist, artist_md5), 2, runner,
                  direct_logs)
        results = []
        for k in range(runs):
            job_id = submit(specs["job"], queue, storage, storage_url, artist, artist_md5)
            agent = run_agent(ctx, queue, job_id, tasks, runner, direct_logs)
            figures = per_task_figures(agent)
            results.append(figures)
            log.info("per-task run %d: added %.1f ms per task (agent %.1f ms - sync vs direct %.1f ms), "
                     "claim->exec %.1f ms, exit->done %.1f ms", k + 1, figures["overhead_ms"],
                     figures["agent_minus_sync_ms"], figures["direct_ms"], figures["claim_to_exec_ms"],
                     figures["exit_to_done_ms"])
        command = agent["records"][0]["spec"].command_line
    finally:
        queue.close()
        artist_md5.close()
        if ctx.md5cache is not None:
            ctx.md5cache.close()
        for handler in agent_log.handlers:
            handler.close()
    return {"command": command, "runs": results, "summary": summarise(results)}


# ------------------------------------------------------------- 2. agent CPU and RSS during a render


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system  # the process and its threads; never its children


def _find_render(agent: psutil.Process, popen: subprocess.Popen, deadline: float) -> psutil.Process:
    while now() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"the agent exited ({popen.returncode}) before its render was seen")
        try:
            for child in agent.children(recursive=True):
                try:
                    if "cio_worker.sim.cnode" in " ".join(child.cmdline()):
                        return child
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        time.sleep(0.02)
    raise RuntimeError("no render process appeared under the agent")


def sample_render(popen: subprocess.Popen) -> dict[str, Any]:
    agent = psutil.Process(popen.pid)
    render = _find_render(agent, popen, now() + 60)
    samples: list[tuple[float, float, int, float, int]] = []  # t, agent cpu, agent rss, render cpu, render rss
    next_at = now()
    while True:
        try:
            with agent.oneshot():
                a_cpu, a_rss = _cpu(agent), agent.memory_info().rss
            with render.oneshot():
                if render.status() == psutil.STATUS_ZOMBIE:
                    break
                r_cpu, r_rss = _cpu(render), render.memory_info().rss
        except psutil.Error:
            break  # the render (or the agent) is gone: the window ends at the last full sample
        samples.append((now(), a_cpu, a_rss, r_cpu, r_rss))
        next_at += SAMPLE_SECONDS
        time.sleep(max(0.0, next_at - now()))
    if len(samples) < 2:
        raise RuntimeError("the render ended before two samples could be taken; raise --render-seconds")
    (t0, a0, _, r0, _), (t1, a1, _, r1, _) = samples[0], samples[-1]
    window = t1 - t0
    return {
        "window_s": window,
        "samples": len(samples),
        "agent_cpu_percent": 100 * (a1 - a0) / window,
        "agent_rss_peak_mib": max(s[2] for s in samples) / MiB,
        "agent_rss_median_mib": median(s[2] for s in samples) / MiB,
        "render_cpu_percent": 100 * (r1 - r0) / window,
        "render_rss_peak_mib": max(s[4] for s in samples) / MiB,
        "render_rss_median_mib": median(s[4] for s in samples) / MiB,
    }


def bench_during_render(scratch: Path, runs: int, render_seconds: float) -> dict[str, Any]:
    base = scratch / "during-render"
    base.mkdir(parents=True)
    artist = base / "artist"
    specs = write_shot(artist, base, "1-2", {"one": "1"})
    bin_dir = base / "bin"
    install_cnode_shim(bin_dir)
    queue_url = f"sqlite:///{base / 'queue.db'}"
    queue = open_queue(queue_url)
    storage_url = f"file://{base / 'storage'}"
    storage = open_storage(storage_url)
    artist_md5 = Md5Cache(base / "artist-md5.db")
    node = base / "node"
    node.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               CNODE_SIM_FRAME_SECONDS=str(render_seconds))
    results = []
    try:
        for k in range(runs):
            job_id = submit(specs["one"], queue, storage, storage_url, artist, artist_md5)
            argv = [sys.executable, "-m", "cio_worker", "agent", "--queue", queue_url, "--worker-id", f"bench-{k}",
                    "--root", str(node / "root"), "--work-dir", str(node / "work"), "--cache-dir", str(node / "cache"),
                    "--max-tasks", "1", "--poll-seconds", "0.1", "--idle-exit", "30"]
            with open(base / f"agent-{k}.log", "wb") as out:
                popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                figures = sample_render(popen)
                rc = popen.wait(timeout=60)
            finally:
                if popen.poll() is None:
                    os.killpg(popen.pid, signal.SIGKILL)
                    popen.wait()
            [task] = queue.tasks(job_id)
            if rc != 0 or task.state != "done":
                raise RuntimeError(f"agent run {k}: exit {rc}, task {task.state} {task.reason}; see {out.name}")
            results.append(figures)
            log.info("during render run %d: agent %.2f%% CPU, %.1f MiB peak RSS; render %.2f%% CPU, %.1f MiB",
                     k + 1, figures["agent_cpu_percent"], figures["agent_rss_peak_mib"],
                     figures["render_cpu_percent"], figures["render_rss_peak_mib"])
    finally:
        queue.close()
        artist_md5.close()
    return {"runs": results, "summary": summarise(results)}


# ------------------------------------------------------------------------- 3. sync of a manifest


def make_tree(root: Path, files: int, kib: int) -> list[tuple[Path, str, str, int]]:
    """``files`` files of ``kib`` KiB of random bytes, 100 to a directory; (path, artist path, md5, size)."""
    entries = []
    for i in range(files):
        relative = f"bench/assets/d{i // 100:03d}/f{i:05d}.bin"
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(kib * 1024)
        path.write_bytes(data)
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        entries.append((path, f"C:/{relative}", md5, len(data)))
    return entries


def bench_sync(scratch: Path, runs: int, files: int, kib: int) -> dict[str, Any]:
    base = scratch / "sync"
    base.mkdir(parents=True)
    source = base / "artist"
    entries = make_tree(source, files, kib)
    storage = open_storage(f"file://{base / 'storage'}")
    storage.upload([UploadItem(hashstore_key(md5), path, md5, size) for path, _, md5, size in entries])
    manifest = [UploadFile(destination=artist, md5=md5, size=size, mode=0o100644)
                for _, artist, md5, size in entries]
    results = []
    for k in range(runs):
        run = base / f"run-{k}"
        cache = ContentCache(run / "cache" / "contents", 20 * 1024**3)
        md5cache = Md5Cache(run / "cache" / "md5cache.db")

        def sync(root: Path):
            syncer = InputSync(storage, cache, md5cache, PathMap.rooted(str(root)))
            os.sync()  # start with nothing of ours left to write back
            cpu0, t0 = time.process_time(), now()
            result = syncer.sync(manifest)
            return now() - t0, time.process_time() - cpu0, result

        def cp(n: int) -> tuple[float, float]:
            os.sync()
            cpu0, t0 = _children_cpu(), now()
            subprocess.run(["cp", "-r", str(source / "bench"), str(run / f"cp-{n}")], check=True)
            return now() - t0, _children_cpu() - cpu0

        # Each sync between two copies: its reference is their mean, measured within seconds of it.
        try:
            cp1 = cp(1)
            cold_s, cold_cpu, cold = sync(run / "root-a")
            cp2 = cp(2)
            second_s, second_cpu, second = sync(run / "root-b")
            cp3 = cp(3)
            warm_s, warm_cpu, warm = sync(run / "root-a")
        finally:
            md5cache.close()
        if not (cold.placed == files and cold.downloaded == files and warm.already_present == files
                and second.placed == files and second.from_cache == files and second.downloaded == 0):
            raise RuntimeError(f"sync run {k} did not take the expected paths: {cold}, {warm}, {second}")
        cp_cold, cp_later = (cp1[0] + cp2[0]) / 2, (cp2[0] + cp3[0]) / 2
        cp_cpu = (cp1[1] + cp2[1] + cp3[1]) / 3
        results.append({
            "cold_s": cold_s, "warm_s": warm_s, "second_task_s": second_s,
            "cp_r_s": median([cp1[0], cp2[0], cp3[0]]),
            "cold_to_cp": cold_s / cp_cold, "warm_to_cp": warm_s / cp_later, "second_task_to_cp": second_s / cp_later,
            "cold_cpu_s": cold_cpu, "warm_cpu_s": warm_cpu, "second_task_cpu_s": second_cpu, "cp_r_cpu_s": cp_cpu,
            "cold_cpu_to_cp": cold_cpu / cp_cpu, "second_task_cpu_to_cp": second_cpu / cp_cpu,
            "cp_r_each_s": [cp1[0], cp2[0], cp3[0]],
        })
        log.info("sync run %d: cold %.2f s, warm %.3f s, second task %.2f s, cp -r %.2f/%.2f/%.2f s",
                 k + 1, cold_s, warm_s, second_s, cp1[0], cp2[0], cp3[0])
        shutil.rmtree(run, ignore_errors=True)
    return {"files": files, "file_kib": kib, "total_mib": files * kib / 1024, "runs": results,
            "summary": summarise(results)}


# ------------------------------------------------------------------------------------- report


def _m(section: dict[str, Any], key: str) -> float:
    return section["summary"][key]["median"]


def _range(section: dict[str, Any], key: str, fmt: str) -> str:
    s = section["summary"][key]
    return f"{format(s['min'], fmt)}–{format(s['max'], fmt)}"


def markdown(report: dict[str, Any]) -> str:
    m, p = report["machine"], report["parameters"]
    per, dur, syn = report["per_task"], report["during_render"], report["sync"]
    lines = [
        f"agent_overhead — {report['date']} — {m['nproc']} cores ({m['cpu_model']}), "
        f"Python {m['python']}, scratch on {report['scratch_fs']}, commit {report['code']['commit']}"
        + (f" + {len(report['code']['changed_product_files'])} changed product files"
           if report["code"]["changed_product_files"] else ""),
        f"runs {p['runs']}, tasks {p['tasks']}, files {p['files']} × {p['file_kib']} KiB, "
        f"render {p['render_seconds']:g} s; medians over runs (range in brackets); load average "
        f"{report['load_average_1m']['before']:.1f} before, {report['load_average_1m']['after']:.1f} after",
        "",
        "| measure | cio_worker | reference | ratio |",
        "|---|---|---|---|",
    ]

    def row(measure: str, mine: str, ref: str = "", ratio: str = "") -> None:
        lines.append(f"| {measure} | {mine} | {ref} | {ratio} |")

    def ms(key: str) -> str:
        return f"{_m(per, key):.1f} ms ({_range(per, key, '.1f')})"

    row("per task: claim → exec, sync excluded", ms("claim_to_exec_ms"))
    row("per task: render exit → reported done", ms("exit_to_done_ms"))
    row("per task: the render's own wall, in the agent vs direct", ms("render_wall_in_agent_ms"),
        f"direct {_m(per, 'direct_ms'):.1f} ms", f"{_m(per, 'render_minus_direct_ms'):+.1f} ms paired")
    row("per task: agent wall − sync vs the command run directly", ms("agent_minus_sync_ms"),
        f"direct {_m(per, 'direct_ms'):.1f} ms", f"{_m(per, 'ratio_agent_to_direct'):.2f}×")
    row("per task: added time (agent wall − sync − direct)", ms("overhead_ms"))
    row("per task: CPU of the agent process itself vs the command's", ms("agent_cpu_ms"),
        f"command {_m(per, 'direct_cpu_ms'):.1f} ms", f"{_m(per, 'agent_cpu_ms') / _m(per, 'direct_cpu_ms'):.2f}×")
    row("while rendering: CPU, % of one core", f"agent {_m(dur, 'agent_cpu_percent'):.2f} % "
        f"({_range(dur, 'agent_cpu_percent', '.2f')})", f"render {_m(dur, 'render_cpu_percent'):.2f} %")
    row("while rendering: peak RSS", f"agent {_m(dur, 'agent_rss_peak_mib'):.1f} MiB",
        f"render {_m(dur, 'render_rss_peak_mib'):.1f} MiB",
        f"{_m(dur, 'agent_rss_peak_mib') / _m(dur, 'render_rss_peak_mib'):.2f}×")
    row("while rendering: median RSS", f"agent {_m(dur, 'agent_rss_median_mib'):.1f} MiB",
        f"render {_m(dur, 'render_rss_median_mib'):.1f} MiB")
    cp = f"cp -r {_m(syn, 'cp_r_s'):.3f} s"
    cp_cpu = f"cp -r {_m(syn, 'cp_r_cpu_s'):.3f} s"
    size = f"{syn['files']} × {syn['file_kib']} KiB"
    row(f"sync {size}: cold (empty cache), wall", f"{_m(syn, 'cold_s'):.3f} s ({_range(syn, 'cold_s', '.3f')})",
        cp, f"{_m(syn, 'cold_to_cp'):.2f}×")
    row(f"sync {size}: cold, CPU time", f"{_m(syn, 'cold_cpu_s'):.3f} s", cp_cpu, f"{_m(syn, 'cold_cpu_to_cp'):.2f}×")
    row(f"sync {size}: second task (from the content cache), wall",
        f"{_m(syn, 'second_task_s'):.3f} s ({_range(syn, 'second_task_s', '.3f')})", cp,
        f"{_m(syn, 'second_task_to_cp'):.2f}×")
    row(f"sync {size}: second task, CPU time", f"{_m(syn, 'second_task_cpu_s'):.3f} s", cp_cpu,
        f"{_m(syn, 'second_task_cpu_to_cp'):.2f}×")
    row(f"sync {size}: warm (already placed), wall", f"{_m(syn, 'warm_s'):.3f} s ({_range(syn, 'warm_s', '.3f')})",
        cp, f"{_m(syn, 'warm_to_cp'):.2f}×")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="repetitions of each measurement (default %(default)s)")
    parser.add_argument("--tasks", type=int, default=20, help="tasks per job for the per-task figures (default %(default)s)")
    parser.add_argument("--files", type=int, default=2000, help="files in the sync manifest (default %(default)s)")
    parser.add_argument("--file-kib", type=int, default=64, help="size of each manifest file (default %(default)s)")
    parser.add_argument("--render-seconds", type=float, default=10.0,
                        help="length of the render sampled for CPU and RSS (default %(default)s)")
    parser.add_argument("--render-runs", type=int, default=None,
                        help="repetitions of the CPU/RSS measurement (default: --runs)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results (default %(default)s)")
    parser.add_argument("--scratch", type=Path, default=None, help="directory for the scratch tree (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch tree (logs, queue) for inspection")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.tasks, args.files, args.file_kib, args.render_seconds = 2, 2, 20, 4, 1.0
    render_runs = args.render_runs or args.runs
    if args.runs < 1 or args.tasks < 1 or args.files < 1 or args.file_kib < 1 or render_runs < 1:
        parser.error("--runs, --tasks, --render-runs, --files and --file-kib must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    scratch = Path(tempfile.mkdtemp(prefix="cio-bench-", dir=args.scratch)).resolve()
    started = now()
    load_before = os.getloadavg()[0]
    try:
        per_task = bench_per_task(scratch, args.runs, args.tasks)
        during = bench_during_render(scratch, render_runs, args.render_seconds)
        sync = bench_sync(scratch, args.runs, args.files, args.file_kib)
        report = {
            "benchmark": "agent_overhead",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "scratch_fs": filesystem_of(scratch),
            "code": code_version(),
            "parameters": {"runs": args.runs, "render_runs": render_runs, "tasks": args.tasks, "files": args.files,
                           "file_kib": args.file_kib, "render_seconds": args.render_seconds, "quick": args.quick},
            "per_task": per_task,
            "during_render": during,
            "sync": sync,
            "elapsed_s": now() - started,
            "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
        }
    finally:
        if args.keep:
            print(f"scratch kept at {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    table = markdown(report)
    report["table"] = table
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten {args.json} in {report['elapsed_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
