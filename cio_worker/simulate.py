"""A whole job on one machine: submit, N agent processes, scouts released, download, summary.

The artist's machine and each render node get their own filesystem root under the simulation
directory, so the artist's absolute paths (``C:/proj/...``, ``/proj/...``) are re-rooted by path
maps exactly as a test VM would do it: ``artist/`` holds the sources and receives the downloads,
``node-N/`` is what agent N sees as ``/``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from .downloader import Downloader
from .frames import FrameSet
from .md5cache import Md5Cache
from .paths import PathMap
from .queue import Queue, open_queue
from .simulator.cnode import install_cnode_shim
from .storage import open_storage
from .submit import SubmitResult, submit_job


@dataclass
class SimulationConfig:
    job_spec: Path
    source_root: Path  # the artist filesystem the job's absolute paths refer to
    workers: int = 2
    work_dir: Path | None = None  # default: a new temporary directory, kept afterwards
    storage_url: str | None = None  # default: file://<work_dir>/storage
    frame_seconds: float = 0.0  # CNODE_SIM_FRAME_SECONDS for the simulator
    release_scouts: bool = True  # release the job once its scout tasks are done
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 2.0
    idle_exit_seconds: float = 600.0
    timeout_seconds: float = 900.0
    agent_env: dict[str, str] = field(default_factory=dict)  # extra environment for every agent
    agent_args: list[str] = field(default_factory=list)  # extra `cio-worker agent` arguments


@dataclass
class SimulationSummary:
    job_id: str
    work_dir: Path
    tasks: int
    done: int
    failed: int
    frames: int
    attempts: int
    seconds: float
    downloaded_files: list[Path]
    artist_root: Path
    failures: list[str]

    def lines(self) -> list[str]:
        out = [
            f"job {self.job_id}: {self.done}/{self.tasks} tasks done, {self.failed} failed, "
            f"{self.frames} frames, {self.attempts} attempts, {self.seconds:.1f} s",
            f"images downloaded: {len(self.downloaded_files)} files under {self.artist_root}",
        ]
        out += [f"  {p}" for p in self.downloaded_files[:8]]
        if len(self.downloaded_files) > 8:
            out.append(f"  ... and {len(self.downloaded_files) - 8} more")
        out += [f"failed: {f}" for f in self.failures]
        out.append(f"everything is kept in {self.work_dir} (queue, storage, node roots, agent logs)")
        return out


class Simulation:
    def __init__(self, config: SimulationConfig, out: TextIO = sys.stdout, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.out = out
        self.clock = clock
        self.work = Path(config.work_dir or tempfile.mkdtemp(prefix="cio-sim-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.artist = self.work / "artist"
        self.queue_url = f"sqlite:///{self.work / 'queue.db'}"
        self.storage_url = config.storage_url or f"file://{self.work / 'storage'}"
        self.agents: list[subprocess.Popen] = []

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self) -> SimulationSummary:
        started = self.clock()
        if self.artist.exists():
            shutil.rmtree(self.artist)
        shutil.copytree(self.config.source_root, self.artist, symlinks=True)
        bin_dir = self.work / "bin"
        bin_dir.mkdir(exist_ok=True)
        install_cnode_shim(bin_dir)
        artist_map = PathMap.rooted(str(self.artist))
        queue = open_queue(self.queue_url)
        md5cache = Md5Cache(self.work / "artist-md5cache.db")
        try:
            result = submit_job(
                self.config.job_spec,
                queue=queue,
                storage=open_storage(self.storage_url),
                storage_url=self.storage_url,
                path_map=artist_map,
                md5cache=md5cache,
                say=self.say,
            )
            job_id = result.job_id
            self.say(f"submitted job {job_id}: {result.task_count} tasks, {result.uploaded} uploads "
                     f"({result.skipped} already in storage)")
            self._start_agents(bin_dir)
            downloader = Downloader(queue, open_storage, artist_map, md5cache)
            self._watch(queue, job_id, downloader, started)
            downloader.run_once(job_id)
        finally:
            self._stop_agents()
        return self._summary(queue, job_id, started)

    def _start_agents(self, bin_dir: Path) -> None:
        env = dict(os.environ)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["CNODE_SIM_FRAME_SECONDS"] = str(self.config.frame_seconds)
        env.update(self.config.agent_env)
        for i in range(1, self.config.workers + 1):
            node = self.work / f"node-{i}"
            node.mkdir(exist_ok=True)
            argv = [
                sys.executable, "-m", "cio_worker", "agent",
                "--queue", self.queue_url,
                "--worker-id", f"node-{i}",
                "--root", str(node / "root"),
                "--work-dir", str(node / "work"),
                "--cache-dir", str(node / "cache"),
                "--lease-seconds", str(self.config.lease_seconds),
                "--heartbeat-seconds", str(self.config.heartbeat_seconds),
                "--idle-exit", str(self.config.idle_exit_seconds),
                "--poll-seconds", "0.2",
                "--preemption", "none",
                *self.config.agent_args,
            ]
            log = open(node / "agent.log", "ab")
            self.agents.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True))
            log.close()
        self.say(f"started {self.config.workers} agents (logs in {self.work}/node-*/agent.log)")

    def _watch(self, queue: Queue, job_id: str, downloader: Downloader, started: float) -> None:
        released = False
        last_line = ""
        deadline = started + self.config.timeout_seconds
        while True:
            summary = next(j for j in queue.jobs() if j.id == job_id)
            counts = summary.counts
            line = " ".join(f"{state} {counts[state]}" for state in ("holding", "pending", "leased", "done", "failed"))
            if line != last_line:
                self.say(f"[{self.clock() - started:6.1f} s] {line}")
                last_line = line
            if self.config.release_scouts and not released and counts["holding"]:
                scouts = [t for t in queue.tasks(job_id) if t.scout]
                if scouts and all(t.state in ("done", "failed") for t in scouts):
                    moved = queue.release_job(job_id)
                    released = True
                    self.say(f"scout tasks finished: released {moved} held tasks")
            downloader.run_once(job_id)
            if summary.finished:
                return
            if not any(a.poll() is None for a in self.agents):
                self.say("every agent has exited but the job is not finished")
                return
            if self.clock() > deadline:
                self.say(f"timed out after {self.config.timeout_seconds:.0f} s")
                return
            time.sleep(0.3)

    def _stop_agents(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGTERM)
        for agent in self.agents:
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()

    def _summary(self, queue: Queue, job_id: str, started: float) -> SimulationSummary:
        tasks = queue.tasks(job_id)
        done = [t for t in tasks if t.state == "done"]
        frames: set[int] = set()
        for t in done:
            frames.update(FrameSet.parse(t.frames))
        records = queue.downloads(job_id, state=None)
        artist_map = PathMap.rooted(str(self.artist))
        placed = sorted(
            Path(artist_map.local(r.output_dir)) / f.relative_path for r in records if r.state == "downloaded" for f in r.files
        )
        return SimulationSummary(
            job_id=job_id,
            work_dir=self.work,
            tasks=len(tasks),
            done=len(done),
            failed=sum(t.state == "failed" for t in tasks),
            frames=len(frames),
            attempts=sum(1 for e in queue.events(job_id) if e.kind == "claimed"),
            seconds=self.clock() - started,
            downloaded_files=placed,
            artist_root=self.artist,
            failures=[f"task {t.id}: {t.reason}" for t in tasks if t.state == "failed"],
        )
