"""A whole job on one machine: submit, N agent processes, scouts released, download, summary.

It takes the path a fleet takes: a coordinator process (``cio-worker serve``) in front of the queue
(a sqlite file in the simulation directory, or ``queue_url``, e.g. PostgreSQL), agents that speak
HTTP to it with an agent token, and the artist's side (submit, status, release, download) with an
owner token. ``coordinator=False`` has everyone open the queue directly, as before the fleet.

The artist's machine and each render node get their own filesystem root under the simulation
directory, so the artist's absolute paths (``C:/proj/...``, ``/proj/...``) are re-rooted by path
maps exactly as a test VM would do it: ``artist/`` holds the sources and receives the downloads,
``node-N/`` is what agent N sees as ``/``.

Chaos (``preempt_rate``, ``kill_rate``): each agent process plays one cloud instance with a GCE
metadata server of its own (``MetadataServer``, a thread here). While an instance holds a task
(one that is not on the last attempt its preempted budget allows, unless ``spare_last_attempt``
is off), preemption notices arrive as a Poisson process of ``preempt_rate`` per minute; the instance is
powered off (every process it ran, SIGKILLed) ``notice_seconds`` after its notice if the agent has
not exited by then. Kills without notice (a host failure) arrive at ``kill_rate`` per busy
minute. A preempted or killed instance is replaced by a fresh one: a new node directory (empty
root, cache and work directory), as a new VM would be. The summary counts notices, drains,
power-offs, kills and retries, and the reaction of each drain (notice -> process tree gone ->
task released), read from the agents' ``drain`` log lines.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import psutil

from cio_worker.job.project import tile_name
from cio_worker.artist.downloader import Downloader
from cio_worker.job.frames import FrameSet
from cio_worker.storage.md5cache import Md5Cache
from cio_worker.sim.metadata_server import InstanceIdentity, MetadataServer
from cio_worker.job.paths import PathMap
from cio_worker.queue import Queue, open_queue
from cio_worker.sim.cnode import install_cnode_shim
from cio_worker.storage import open_storage
from cio_worker.artist.submit import submit_job


@dataclass
class SimulationConfig:
    job_spec: Path
    source_root: Path  # the artist filesystem the job's absolute paths refer to
    workers: int = 2
    work_dir: Path | None = None  # default: a new temporary directory, kept afterwards
    storage_url: str | None = None  # default: file://<work_dir>/storage
    queue_url: str | None = None  # the coordinator's database; default: sqlite:///<work_dir>/queue.db
    coordinator: bool = True  # through a coordinator process (the fleet's path), or the queue directly
    long_poll_seconds: float = 5.0
    frame_seconds: float = 0.0  # CNODE_SIM_FRAME_SECONDS for the simulator
    release_scouts: bool = True  # release the job once its scout tasks are done
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 2.0
    idle_exit_seconds: float = 600.0
    timeout_seconds: float = 900.0
    agent_env: dict[str, str] = field(default_factory=dict)  # extra environment for every agent
    agent_args: list[str] = field(default_factory=list)  # extra `cio-worker agent` arguments
    # Chaos: mean events per minute that an instance spends holding a task (Poisson).
    preempt_rate: float = 0.0  # GCE preemption notices
    kill_rate: float = 0.0  # instance deaths without notice
    notice_seconds: float = 5.0  # notice -> power-off
    seed: int | None = None
    tick_seconds: float = 0.1  # how often the chaos and the watcher look
    # Spare a task's last attempt allowed by its preempted budget: chaos alone then never fails a
    # job (a task preempted past its budget fails, as the policy says; that is not what we test).
    spare_last_attempt: bool = True


@dataclass
class Reaction:
    """One notice to a busy instance, in seconds from the notice being raised."""

    instance: str
    task: str
    tree_gone: float | None  # None: no render was running (sync, upload)
    released: float | None  # None: the instance was powered off before it reported
    by: str  # drain | hard stop | completed | powered off | ...
    in_time: bool


@dataclass
class ChaosCounts:
    instances: int = 0  # agent processes started, replacements included
    notices: int = 0
    drained: int = 0  # agents that exited by themselves before their deadline
    powered_off: int = 0  # still alive at the deadline: every process SIGKILLed
    kills: int = 0  # killed without notice
    left_after_drain: int = 0  # processes alive after their agent drained and exited (should be 0)
    reactions: list[Reaction] = field(default_factory=list)

    def stats(self, what: str) -> dict[str, float | None]:
        values = [getattr(r, what) for r in self.reactions if getattr(r, what) is not None]
        if not values:
            return {"count": 0, "median": None, "worst": None}
        return {"count": len(values), "median": statistics.median(values), "worst": max(values)}


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
    chaos: ChaosCounts = field(default_factory=ChaosCounts)
    orphans: list[str] = field(default_factory=list)  # processes of the simulation left at the end

    @property
    def retries(self) -> int:
        return self.attempts - self.tasks

    def lines(self) -> list[str]:
        out = [
            f"job {self.job_id}: {self.done}/{self.tasks} tasks done, {self.failed} failed, "
            f"{self.frames} frames, {self.attempts} attempts, {self.seconds:.1f} s",
            f"images downloaded: {len(self.downloaded_files)} files under {self.artist_root}",
        ]
        out += [f"  {p}" for p in self.downloaded_files[:8]]
        if len(self.downloaded_files) > 8:
            out.append(f"  ... and {len(self.downloaded_files) - 8} more")
        chaos = self.chaos
        if chaos.notices or chaos.kills:
            out.append(
                f"chaos: {chaos.notices} preemptions ({chaos.drained} drained and exited in time, "
                f"{chaos.powered_off} powered off at the deadline), {chaos.kills} kills without notice, "
                f"{chaos.instances} instances in all, {self.retries} retries"
            )
            late = sum(1 for r in chaos.reactions if not r.in_time)
            for what, label in (("tree_gone", "notice -> process tree gone"), ("released", "notice -> task released")):
                st = chaos.stats(what)
                if st["count"]:
                    out.append(f"  {label}: median {st['median']:.2f} s, worst {st['worst']:.2f} s ({st['count']} drains)")
            out.append(f"  released after the deadline: {late}")
        out += [f"failed: {f}" for f in self.failures]
        out += [f"orphan process left: {o}" for o in self.orphans]
        out.append(f"everything is kept in {self.work_dir} (queue, storage, node roots, agent logs)")
        return out


@dataclass
class Instance:
    """One simulated cloud instance: an agent process, its node directory, its metadata server."""

    name: str
    node: Path
    process: subprocess.Popen
    metadata: MetadataServer | None
    notice_at: float | None = None  # wall clock
    deadline_at: float | None = None
    task: str = ""  # the task it held when noticed
    ended: str = ""  # drained | powered off | killed | exited

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


SIM_RUN_ENV = "CIO_SIM_RUN"
SIM_INSTANCE_ENV = "CIO_SIM_INSTANCE"


def instance_processes(run: str, name: str | None = None) -> list[psutil.Process]:
    """Live processes whose environment marks them as the simulation's (one instance, or all)."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if env.get(SIM_RUN_ENV) == run and (name is None or env.get(SIM_INSTANCE_ENV) == name):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


class Simulation:
    def __init__(self, config: SimulationConfig, out: TextIO = sys.stdout, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.out = out
        self.clock = clock
        self.work = Path(config.work_dir or tempfile.mkdtemp(prefix="cio-sim-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.artist = self.work / "artist"
        self.database_url = config.queue_url or f"sqlite:///{self.work / 'queue.db'}"
        self.queue_url = self.database_url  # what agents and the artist use: the coordinator's, once it runs
        self.coordinator: subprocess.Popen | None = None
        self._owner_token = ""
        self._agent_token = ""
        self.storage_url = config.storage_url or f"file://{self.work / 'storage'}"
        self.instances: list[Instance] = []
        self.chaos = ChaosCounts()
        self.random = random.Random(config.seed)
        self._env: dict[str, str] = {}
        self._next_node = 1
        self._budget: int | None = None

    @property
    def agents(self) -> list[subprocess.Popen]:
        return [i.process for i in self.instances]

    @property
    def chaotic(self) -> bool:
        return self.config.preempt_rate > 0 or self.config.kill_rate > 0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, keep_open: Callable[[SimulationSummary], None] | None = None) -> SimulationSummary:
        """Run the job; with ``keep_open``, call it with the summary once the agents have stopped
        and before the coordinator does (the web view stays up while it runs)."""
        started = self.clock()
        summary: SimulationSummary | None = None
        if self.artist.exists():
            shutil.rmtree(self.artist)
        shutil.copytree(self.config.source_root, self.artist, symlinks=True)
        bin_dir = self.work / "bin"
        bin_dir.mkdir(exist_ok=True)
        install_cnode_shim(bin_dir)
        artist_map = PathMap.rooted(str(self.artist))
        if self.database_url.lower().startswith(("postgresql:", "postgres:")):
            from cio_worker.queue.postgres import init_schema

            init_schema(self.database_url)  # a new database gets its schema; a current one is left as it is
        if self.config.coordinator:
            self._start_coordinator()
        queue = open_queue(self.queue_url, token=self._owner_token or None)
        md5cache = Md5Cache(self.work / "artist-md5cache.db")
        orphans: list[str] = []
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
            self._read_drains()
            summary = self._summary(queue, job_id, started)
        finally:
            orphans = self._stop_agents()
            queue.close()
            try:
                if summary is not None:
                    summary.orphans = orphans
                    if keep_open is not None and self.coordinator is not None:
                        keep_open(summary)
            finally:
                self._stop_coordinator()
        return summary

    # -- the coordinator -----------------------------------------------------------------------

    def _start_coordinator(self) -> None:
        """Tokens in the database, then `cio-worker serve` on a free loopback port."""
        with open_queue(self.database_url) as database:
            _, agent_token = database.create_token("simulation agents", ["agent"])
            _, self._owner_token = database.create_token("simulation artist", ["owner"])
        self._agent_token = agent_token
        log_path = self.work / "coordinator.log"
        argv = [sys.executable, "-m", "cio_worker", "serve", "--queue", self.database_url, "--listen", "127.0.0.1:0",
                "--lease-seconds", str(self.config.lease_seconds),
                "--heartbeat-seconds", str(self.config.heartbeat_seconds),
                "--long-poll-seconds", str(self.config.long_poll_seconds)]
        with open(log_path, "ab") as log:
            self.coordinator = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            text = log_path.read_text(errors="replace")
            found = [line for line in text.splitlines() if line.startswith("coordinator at ")]
            if found:
                self.queue_url = found[-1].split()[2]
                break
            if self.coordinator.poll() is not None or time.monotonic() > deadline:
                self._stop_coordinator()
                raise RuntimeError(f"the coordinator did not start; see {log_path}:\n{text[-2000:]}")
            time.sleep(0.05)
        self.say(f"coordinator at {self.queue_url} (queue {self.database_url.split('@')[-1]}; log {log_path})")
        token_path = self.work / "owner.token"
        token_path.touch(mode=0o600)
        token_path.write_text(self._owner_token + "\n")
        self.say(f"web view at {self.web_url}/ : sign in with the owner token in {token_path}, or open "
                 f"{self.web_url}/sign-in#token={self._owner_token}")

    @property
    def web_url(self) -> str:
        """The coordinator's web view (its address; pages need an owner token's session)."""
        return self.queue_url.rstrip("/")

    def _stop_coordinator(self) -> None:
        process, self.coordinator = self.coordinator, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # -- instances -----------------------------------------------------------------------------

    def _start_agents(self, bin_dir: Path) -> None:
        env = dict(os.environ)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["CNODE_SIM_FRAME_SECONDS"] = str(self.config.frame_seconds)
        env[SIM_RUN_ENV] = str(self.work)
        if self.config.coordinator:
            env["CIO_TOKEN"] = self._agent_token
        env.update(self.config.agent_env)
        self._env = env
        for _ in range(self.config.workers):
            self._start_instance()
        self.say(f"started {self.config.workers} agents (logs in {self.work}/node-*/agent.log)")
        if self.chaotic:
            self.say(f"chaos: {self.config.preempt_rate:g} preemptions and {self.config.kill_rate:g} kills per busy "
                     f"agent-minute, {self.config.notice_seconds:g} s from notice to power-off")

    def _start_instance(self) -> Instance:
        name = f"node-{self._next_node}"
        self._next_node += 1
        node = self.work / name
        node.mkdir(exist_ok=True)
        metadata = None
        watch = ["--preemption", "none"]
        if self.config.preempt_rate > 0:
            metadata = MetadataServer(identity=InstanceIdentity(name=name), providers=("gce",)).start()
            watch = ["--preemption", "gce", "--gce-metadata-url", metadata.url,
                     "--notice-seconds", str(self.config.notice_seconds)]
        argv = [
            sys.executable, "-m", "cio_worker", "agent",
            "--queue", self.queue_url,
            "--worker-id", name,
            "--root", str(node / "root"),
            "--work-dir", str(node / "work"),
            "--cache-dir", str(node / "cache"),
            "--lease-seconds", str(self.config.lease_seconds),
            "--heartbeat-seconds", str(self.config.heartbeat_seconds),
            "--idle-exit", str(self.config.idle_exit_seconds),
            "--poll-seconds", "0.2",
            *watch,
            *self.config.agent_args,
        ]
        with open(node / "agent.log", "ab") as log:
            process = subprocess.Popen(argv, env={**self._env, SIM_INSTANCE_ENV: name}, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        instance = Instance(name, node, process, metadata)
        self.instances.append(instance)
        self.chaos.instances += 1
        return instance

    def _power_off(self, instance: Instance) -> None:
        """The instance is gone: SIGKILL the agent's group, then every process the instance ran
        (renders live in sessions of their own), until none is left."""
        if instance.alive:
            try:
                os.killpg(instance.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(5):
            left = instance_processes(str(self.work), instance.name)
            if not left:
                break
            for proc in left:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(left, timeout=2)
        instance.process.wait()
        self._stop_metadata(instance)

    @staticmethod
    def _stop_metadata(instance: Instance) -> None:
        if instance.metadata is not None:
            instance.metadata.stop()
            instance.metadata = None

    def _chaos(self, queue: Queue, job_id: str, dt: float) -> None:
        """Notices, power-offs and kills for this tick; replacements for instances gone."""
        now = time.time()
        if self._budget is None:
            self._budget = queue.job(job_id).autoretry_policy.preempted
        busy = {t.worker: t.id for t in queue.tasks(job_id) if t.state == "leased"
                and not (self.config.spare_last_attempt and t.attempts["preempted"] >= self._budget)}
        for instance in list(self.instances):
            if instance.ended:
                continue
            if instance.notice_at is not None:
                if not instance.alive:
                    instance.ended = "drained"
                    self.chaos.drained += 1
                    left = instance_processes(str(self.work), instance.name)
                    if left:  # the agent exited but left processes: the power-off takes them
                        self.chaos.left_after_drain += len(left)
                        self.say(f"{instance.name}: {len(left)} processes outlived its agent's drain")
                        self._power_off(instance)
                elif now >= instance.deadline_at:
                    self._power_off(instance)
                    instance.ended = "powered off"
                    self.chaos.powered_off += 1
                    self.say(f"{instance.name}: still running at its deadline: powered off")
                else:
                    continue
                self._stop_metadata(instance)
                self._start_instance()
                continue
            if not instance.alive:
                instance.ended = "exited"
                self._stop_metadata(instance)
                continue
            if instance.name not in busy:
                continue
            if self.config.kill_rate > 0 and self._happens(self.config.kill_rate, dt):
                self._power_off(instance)
                instance.ended = "killed"
                self.chaos.kills += 1
                self.say(f"{instance.name}: killed without notice while running task {busy[instance.name]}")
                self._start_instance()
            elif self.config.preempt_rate > 0 and self._happens(self.config.preempt_rate, dt):
                instance.notice_at = time.time()
                instance.deadline_at = instance.notice_at + self.config.notice_seconds
                instance.task = busy[instance.name]
                instance.metadata.raise_gce_preempt()
                self.chaos.notices += 1
                self.say(f"{instance.name}: preemption notice while running task {instance.task}")

    def _happens(self, rate_per_minute: float, dt: float) -> bool:
        return self.random.random() < 1.0 - math.exp(-rate_per_minute * dt / 60.0)

    def _watch(self, queue: Queue, job_id: str, downloader: Downloader, started: float) -> None:
        released = False
        last_line = ""
        deadline = started + self.config.timeout_seconds
        tick = self.config.tick_seconds if self.chaotic else 0.3
        last = self.clock()
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
            now = self.clock()
            if self.chaotic:
                self._chaos(queue, job_id, now - last)
            last = now
            if not any(i.alive for i in self.instances):
                self.say("every agent has exited but the job is not finished")
                return
            if self.clock() > deadline:
                self.say(f"timed out after {self.config.timeout_seconds:.0f} s")
                return
            time.sleep(tick)

    def _stop_agents(self) -> list[str]:
        """SIGTERM every agent (they drain and exit), power off the ones that do not, and return
        the processes of the simulation still alive after that (there should be none)."""
        for instance in self.instances:
            if instance.alive:
                try:
                    os.killpg(instance.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for instance in self.instances:
            try:
                instance.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._power_off(instance)
            self._stop_metadata(instance)
        left = instance_processes(str(self.work)) if self._env else []
        described = []
        for proc in left:
            try:
                described.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)
        return described

    def _read_drains(self) -> None:
        """Match each notice with the drain the agent logged for it."""
        for instance in self.instances:
            if instance.notice_at is None:
                continue
            drains = read_drains(instance.node / "agent.log")
            drain = next((d for d in drains if d.get("stop_at") and d["stop_at"] >= instance.notice_at - 1), None)
            limit = instance.deadline_at
            if drain is None:
                self.chaos.reactions.append(Reaction(instance.name, instance.task, None, None,
                                                     "powered off" if instance.ended == "powered off" else "no task",
                                                     instance.ended != "powered off"))
                continue
            tree = drain.get("tree_gone_at")
            released = drain.get("released_at")
            self.chaos.reactions.append(Reaction(
                instance.name, drain.get("task", instance.task),
                None if tree is None else tree - instance.notice_at,
                None if released is None else released - instance.notice_at,
                drain.get("by", ""),
                released is not None and released < limit,
            ))

    def _summary(self, queue: Queue, job_id: str, started: float) -> SimulationSummary:
        tasks = queue.tasks(job_id)
        done = [t for t in tasks if t.state == "done"]
        frames: set[int] = set()
        for t in done:
            frames.update(FrameSet.parse(t.frames))
        records = queue.downloads(job_id, state=None)
        artist_map = PathMap.rooted(str(self.artist))
        placed = sorted({
            _on_disk(Path(artist_map.local(r.output_dir)) / f.relative_path)
            for r in records if r.state == "downloaded" for f in r.files
        })
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
            chaos=self.chaos,
        )


def _on_disk(path: Path) -> Path:
    """Where a downloaded file is now: a tile pasted into its frame (and removed) is its frame."""
    name = tile_name(path.name)
    if name is None or path.exists():
        return path
    frame = path.parent / name.frame
    return frame if frame.exists() else path


def read_drains(agent_log: Path) -> list[dict]:
    """The ``drain {json}`` records an agent logged (see cio_worker.node.agent.DrainRecord)."""
    found = []
    try:
        text = agent_log.read_text(errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        head, sep, tail = line.partition(" drain {")
        if sep:
            try:
                found.append(json.loads("{" + tail))
            except ValueError:
                continue
    return found
