"""Draining on preemption, cancellation and lost leases, with real processes, signals and HTTP.

Agents run as processes (``python -m cio_worker agent``) watching our own metadata server, or
in-process on a thread when a seam must be replaced (a slow store, a hung heartbeat). Renders are
the cnode simulator with ``CNODE_SIM_FRAME_SECONDS`` so that they take a while. Every process a
test starts carries ``CIO_TEST_MARK`` in its environment; the ``farm`` fixture fails the test if
any of them is still alive at the end (and kills it).

Timings (notice -> process tree gone -> released) are printed (``pytest -s`` shows them); the only
time asserted is the deadline itself.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable

import psutil
import pytest

from cio_worker.node.agent import Agent, AgentConfig
from cio_worker.artist.downloader import Downloader
from cio_worker.node.execution import ExecutionContext
from cio_worker.job.frames import FrameSet
from cio_worker.job.hashing import md5_b64_of_file
from cio_worker.storage.md5cache import Md5Cache
from cio_worker.sim.metadata_server import MetadataServer
from cio_worker.job.paths import PathMap
from cio_worker.node.preemption import Notice
from cio_worker.queue import NewTask, open_queue
from cio_worker.node.runner import ProcessRunner
from cio_worker.sim.shim import install_cnode_shim
from cio_worker.sim.png import read_png
from cio_worker.storage import open_storage
from cio_worker.artist.submit import submit_job
from tests.shots import make_shot
from tests.waiting import wait_for

MARK = "CIO_TEST_MARK"
SIM_MODULE = "cio_worker.sim.cnode"


def marked(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == mark:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def renders(mark: str) -> list[psutil.Process]:
    out = []
    for proc in marked(mark):
        try:
            if SIM_MODULE in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.Error:
            continue
    return out


def saved_frames(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [int(line.split(" frame ")[1].split()[0]) for line in log.read_text(errors="replace").splitlines()
            if line.startswith("Saved image ")]


def command_frames(log: Path) -> FrameSet:
    """The frames the task log's command line asked cnode for (every image's spec, united)."""
    line = next(l for l in log.read_text().splitlines() if l.startswith("command: "))
    words = shlex.split(line[len("command: "):])
    frames = FrameSet()
    i = words.index("-image_frames_list") + 1
    while i < len(words) and not (words[i].startswith("-") and words[i][1:2].isalpha()):
        frames = frames | FrameSet.parse_cnode(words[i])
        i += 1
    return frames


def drains_in(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if " drain {" in line:
            out.append(json.loads(line.split(" drain ", 1)[1]))
    return out


def show(title: str, drain: dict, raised: float | None = None) -> None:
    start = raised if raised is not None else drain["stop_at"]

    def since(t):
        return "-" if t is None else f"{t - start:.2f} s"

    print(f"\n[{title}] notice -> tree gone {since(drain['tree_gone_at'])} -> released {since(drain['released_at'])}"
          f" ({drain['by']}; deadline {since(drain['deadline_at'])}; frames {drain['frames_done'] or 'none'})")


class SlowStorage:
    """A store whose transfers trickle: each item waits ``delay`` seconds (reporting zero bytes of
    progress every 50 ms, as a slow network would) before it moves."""

    def __init__(self, inner, download_delay: float = 0.0, upload_delay: float = 0.0) -> None:
        self.inner = inner
        self.url = inner.url
        self.download_delay = download_delay
        self.upload_delay = upload_delay
        self.downloads_started = threading.Event()
        self.uploads_started = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @staticmethod
    def _trickle(progress, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if progress is not None:
                progress.advance(0)
            time.sleep(0.05)

    def download_unnamed(self, items, place, progress=None) -> bool:
        return False  # not offered: every download trickles through download()

    def download(self, items, progress=None):
        self.downloads_started.set()
        for item in items:
            self._trickle(progress, self.download_delay)
            self.inner.download([item], progress)

    def upload(self, items, progress=None):
        self.uploads_started.set()
        for item in items:
            self._trickle(progress, self.upload_delay)
            self.inner.upload([item], progress)

    def upload_missing(self, items, progress=None):
        unique = {i.key: i for i in items}
        present = self.inner.exists(unique)
        missing = [i for k, i in unique.items() if k not in present]
        if missing:
            self.upload(missing, progress)
        return len(items) - len(missing)


class HeartbeatGate:
    """A queue whose heartbeats block while the gate is closed (a hung queue connection)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.open = threading.Event()
        self.open.set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def heartbeat(self, lease, lease_seconds, status=None):
        self.open.wait()
        return self.inner.heartbeat(lease, lease_seconds, status)


class ClaimHook:
    """A queue that runs ``hook`` right after a claim returns a lease (a notice crossing a claim)."""

    def __init__(self, inner, hook) -> None:
        self.inner = inner
        self.hook = hook

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def claim(self, worker, lease_seconds):
        lease = self.inner.claim(worker, lease_seconds)
        if lease is not None and self.hook is not None:
            self.hook()
            self.hook = None
        return lease


class Farm:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mark = uuid.uuid4().hex
        self.queue_url = f"sqlite:///{tmp / 'queue.db'}"
        self.storage_url = f"file://{tmp / 'storage'}"
        self.queue = open_queue(self.queue_url)
        self.bin = tmp / "bin"
        install_cnode_shim(self.bin)
        self.env = dict(os.environ, PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", **{MARK: self.mark})
        self.env.pop("CNODE_SIM_IGNORE_SIGTERM", None)
        self.processes: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        self.servers: list[MetadataServer] = []
        self.shot = None

    # -- jobs

    def submit(self, **shot_kw) -> str:
        self.shot = make_shot(self.tmp / "shot", **shot_kw)
        result = submit_job(self.shot.spec, queue=self.queue, storage=open_storage(self.storage_url),
                            storage_url=self.storage_url, path_map=PathMap.rooted(str(self.shot.root)),
                            md5cache=Md5Cache(self.tmp / "artist-md5.db"))
        return result.job_id

    def task(self, job: str, task: str = "000"):
        return next(t for t in self.queue.tasks(job) if t.id == task)

    def events(self, job: str, task: str = "000"):
        return self.queue.events(job, task)

    def download(self, job: str):
        downloader = Downloader(self.queue, open_storage, PathMap.rooted(str(self.shot.root)))
        return downloader.run_once(job)

    def metadata(self) -> MetadataServer:
        md = MetadataServer().start()
        self.servers.append(md)
        return md

    # -- agents

    def node(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        return path

    def log_of(self, node: str, job: str, task: str = "000", attempt: int = 1) -> Path:
        return self.tmp / node / "work" / "logs" / f"{job}-{task}-a{attempt}.log"

    def agent(self, node: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
        where = self.node(node)
        argv = [sys.executable, "-m", "cio_worker", "agent", "--queue", self.queue_url, "--worker-id", node,
                "--root", str(where / "root"), "--work-dir", str(where / "work"), "--no-cache",
                "--poll-seconds", "0.1", *extra]
        with open(where / "agent.log", "ab") as log:
            proc = subprocess.Popen(argv, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(proc)
        return proc

    def agent_log(self, node: str) -> Path:
        return self.tmp / node / "agent.log"

    def inprocess(self, node: str, *, queue=None, storage: Callable | None = None, env: dict | None = None,
                  **config) -> tuple[Agent, threading.Thread]:
        where = self.node(node)
        ctx = ExecutionContext(
            work_root=where / "work",
            open_storage=storage or open_storage,
            runner=ProcessRunner(),
            path_map=PathMap.rooted(str(where / "root")),
            base_env={**self.env, **(env or {})},
            kill_grace=5.0,
        )
        config.setdefault("poll_seconds", 0.1)
        config.setdefault("idle_exit_seconds", 0.5)
        agent = Agent(AgentConfig(worker_id=node, **config), queue or self.queue, ctx)
        thread = threading.Thread(target=agent.run, name=f"agent-{node}", daemon=True)
        thread.start()
        self.threads.append(thread)
        return agent, thread

    def close(self) -> list[str]:
        problems = []
        for proc in self.processes:
            if proc.poll() is None:
                problems.append(f"agent {proc.args[7]} still running at the end")
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for thread in self.threads:
            thread.join(30)
            if thread.is_alive():
                problems.append(f"in-process {thread.name} still running at the end")
        for md in self.servers:
            md.stop()
        left = [p for p in marked(self.mark) if p.pid != os.getpid()]
        if left:
            gone, alive = psutil.wait_procs(left, timeout=5)
            for proc in alive:
                problems.append(f"orphan process {proc.pid}: {' '.join(proc.cmdline())[:120]}")
                proc.kill()
            psutil.wait_procs(alive, timeout=5)
        self.queue.close()
        return problems


@pytest.fixture
def farm(tmp_path):
    farm = Farm(tmp_path)
    try:
        yield farm
    finally:
        problems = farm.close()
    assert not problems, problems


def check_complete(farm: Farm, job: str, frames: FrameSet) -> None:
    """The job is done; every frame arrived once (one download record names it), intact."""
    assert farm.queue.is_finished(job)
    assert all(t.state == "done" for t in farm.queue.tasks(job)), [(t.id, t.state, t.reason) for t in farm.queue.tasks(job)]
    report = farm.download(job)
    assert not report.refused, report.refused
    records = farm.queue.downloads(job, state=None)
    named = [f.relative_path for r in records for f in r.files]
    assert sorted(named) == sorted(set(named)), "a frame was offered for download twice"
    assert sorted(named) == sorted(f"beauty.{n:04d}.png" for n in frames)
    out = farm.shot.root / "proj" / "renders" / "main"
    by_path = {f.relative_path: f for r in records for f in r.files}
    for relative, entry in by_path.items():
        placed = out / relative
        assert md5_b64_of_file(placed) == entry.md5
        image = read_png(placed)
        assert image.text.get("cio:frame") == str(int(relative.split(".")[-2]))


# ---------------------------------------------------------------- notices during the render


def raise_notice(provider: str, md: MetadataServer | None, agent: subprocess.Popen, seconds: float) -> float:
    """Raise the notice; return its deadline (wall clock)."""
    now = time.time()
    if provider == "gce":
        md.raise_gce_preempt()
        return now + seconds
    if provider == "ec2":
        notice = md.raise_ec2_spot(in_seconds=seconds)
        return datetime.fromisoformat(notice["time"].replace("Z", "+00:00")).timestamp()
    if provider == "azure":
        event = md.raise_azure_preempt(not_before_in=seconds)
        return parsedate_to_datetime(event["NotBefore"]).timestamp()
    os.kill(agent.pid, signal.SIGTERM)
    return now + seconds


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["gce", "ec2", "azure", "sigterm"])
def test_a_notice_during_the_render_saves_the_finished_frames_and_releases_before_the_deadline(farm, provider):
    job = farm.submit(frames="1-6", chunk_size=6)
    md = farm.metadata() if provider != "sigterm" else None
    watch = {
        "gce": ["--preemption", "gce", "--gce-metadata-url", md.url if md else ""],
        "ec2": ["--preemption", "ec2", "--ec2-metadata-url", md.url if md else "", "--metadata-poll-seconds", "0.2"],
        "azure": ["--preemption", "azure", "--azure-metadata-url", md.url if md else "", "--metadata-poll-seconds", "0.2"],
        "sigterm": ["--preemption", "none"],
    }[provider]
    notice_seconds = 10.0
    a = farm.agent("node-a", *watch, "--notice-seconds", str(notice_seconds), "--heartbeat-seconds", "1",
                   env={"CNODE_SIM_FRAME_SECONDS": "0.6"})
    log = farm.log_of("node-a", job)
    wait_for(lambda: len(saved_frames(log)) >= 2, 60, "two frames saved")
    tree = renders(farm.mark)
    assert tree, "the render is running"
    raised = time.time()
    deadline = raise_notice(provider, md, a, notice_seconds)
    assert a.wait(timeout=notice_seconds + 5) == 0
    # the whole render tree is gone, and it was stopped before the end
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    saved = FrameSet.of(saved_frames(log))
    assert 2 <= len(saved) < 6
    task = farm.task(job)
    assert task.state == "pending"
    assert task.attempts["preempted"] == 1
    done = FrameSet.parse_optional(task.frames_done)
    assert done == saved  # every finished frame, no other
    [release] = [e for e in farm.events(job) if e.kind == "preempted"]
    assert release.worker == "node-a" and release.time < deadline
    [record] = farm.queue.downloads(job)  # the finished frames, offered for download already
    assert sorted(f.relative_path for f in record.files) == [f"beauty.{n:04d}.png" for n in done]
    [drain] = drains_in(farm.agent_log("node-a"))
    assert drain["tree_gone_at"] <= drain["released_at"] < deadline
    assert drain["leftover_pids"] == []
    show(provider, drain, raised)
    if provider == "azure":  # drained: the agent lets Azure go ahead before NotBefore
        assert len(md.azure_acks()) == 1
    if provider != "gce":
        return
    # the next attempt, on another agent, renders only the missing frames
    b = farm.agent("node-b", "--preemption", "none", "--idle-exit", "0.5", env={"CNODE_SIM_FRAME_SECONDS": "0.05"})
    assert b.wait(timeout=60) == 0
    second = farm.log_of("node-b", job, attempt=2)
    assert command_frames(second) == FrameSet.parse("1-6") - done
    assert FrameSet.of(saved_frames(second)) == FrameSet.parse("1-6") - done
    check_complete(farm, job, FrameSet.parse("1-6"))


@pytest.mark.slow
def test_a_non_cnode_command_is_rerun_whole(farm):
    job0 = farm.submit(frames="1-2", chunk_size=2)
    info = farm.queue.job(job0)
    script = "for i in 1 2 3 4 5 6; do echo step $i; sleep 0.4; done"
    job = farm.queue.create_job(info, [NewTask(frames="1-3", command=script)])
    farm.queue.kill_job(job0)
    agent, thread = farm.inprocess("node-a", heartbeat_seconds=1)
    log = farm.log_of("node-a", job)
    wait_for(lambda: log.exists() and "step 2" in log.read_text(), 30, "the command to run")
    agent.on_notice(Notice("preempt", "gce", time.time(), time.time() + 10, "test notice"))
    thread.join(20)
    task = farm.task(job)
    assert task.state == "pending" and task.frames_done == "" and task.attempts["preempted"] == 1
    assert farm.queue.downloads(job) == []
    agent2, thread2 = farm.inprocess("node-b")
    thread2.join(30)
    assert farm.task(job).state == "done"
    second = farm.log_of("node-b", job, attempt=2).read_text()
    assert f"command: {script}" in second and "step 6" in second


# ---------------------------------------------------------------- notices during sync and upload


@pytest.mark.slow
def test_a_notice_during_the_sync_cuts_it_short_and_releases(farm):
    job = farm.submit(frames="1-2", chunk_size=2)
    slow = {}

    def storage(url):
        slow["s"] = SlowStorage(open_storage(url), download_delay=30)
        return slow["s"]

    agent, thread = farm.inprocess("node-a", storage=storage, heartbeat_seconds=1)
    wait_for(lambda: "s" in slow and slow["s"].downloads_started.is_set(), 20, "the sync to start")
    raised = time.time()
    deadline = raised + 8
    agent.on_notice(Notice("preempt", "gce", raised, deadline, "test notice during sync"))
    thread.join(deadline - time.time() + 2)
    assert not thread.is_alive()
    task = farm.task(job)
    assert task.state == "pending" and task.attempts["preempted"] == 1 and task.frames_done == ""
    [release] = [e for e in farm.events(job) if e.kind == "preempted"]
    assert release.time < deadline
    log = farm.log_of("node-a", job)  # no render was started: the log says so, and has no render section
    assert "no render ran" in log.read_text() and "==== cio_worker: start" not in log.read_text()
    [drain] = agent.summary.drains
    assert drain.tree_gone_at is None and drain.by == "drain"
    show("sync", drain.to_dict(), raised)


@pytest.mark.slow
def test_a_notice_during_the_upload_lets_a_short_upload_finish_and_completes(farm):
    job = farm.submit(frames="1-3", chunk_size=3)
    slow = {}

    def storage(url):
        slow["s"] = SlowStorage(open_storage(url), upload_delay=0.5)
        return slow["s"]

    agent, thread = farm.inprocess("node-a", storage=storage, heartbeat_seconds=1)
    wait_for(lambda: "s" in slow and slow["s"].uploads_started.is_set(), 30, "the upload to start")
    raised = time.time()
    agent.on_notice(Notice("preempt", "gce", raised, raised + 10, "test notice during upload"))
    thread.join(15)
    assert farm.task(job).state == "done"  # 3 files x 0.5 s fit in the notice
    [drain] = agent.summary.drains
    assert drain.by == "completed" and drain.released_at < raised + 10
    show("upload, completed", drain.to_dict(), raised)
    check_complete(farm, job, FrameSet.parse("1-3"))


@pytest.mark.slow
def test_a_notice_during_a_long_upload_cuts_it_and_releases_the_frames_that_arrived(farm):
    job = farm.submit(frames="1-4", chunk_size=4)
    slow = {}

    def storage(url):
        slow["s"] = SlowStorage(open_storage(url), upload_delay=1.5)
        return slow["s"]

    agent, thread = farm.inprocess("node-a", storage=storage, heartbeat_seconds=1)
    wait_for(lambda: "s" in slow and slow["s"].uploads_started.is_set(), 30, "the upload to start")
    raised = time.time()
    deadline = raised + 5  # the report is due 1.5 s before: about two files get through
    agent.on_notice(Notice("preempt", "gce", raised, deadline, "test notice during upload"))
    thread.join(10)
    task = farm.task(job)
    assert task.state == "pending" and task.attempts["preempted"] == 1
    [release] = [e for e in farm.events(job) if e.kind == "preempted"]
    assert release.time < deadline
    done = FrameSet.parse_optional(task.frames_done)
    assert 0 < len(done) < 4
    [record] = farm.queue.downloads(job)
    assert sorted(f.relative_path for f in record.files) == [f"beauty.{n:04d}.png" for n in done]
    storage_root = Path(farm.storage_url[len("file://"):])
    assert all((storage_root / f.key).is_file() for f in record.files)
    [drain] = agent.summary.drains
    assert drain.salvage_cut and drain.by == "drain"
    show("upload, cut", drain.to_dict(), raised)
    # the next attempt renders the rest
    agent2, thread2 = farm.inprocess("node-b")
    thread2.join(60)
    assert command_frames(farm.log_of("node-b", job, attempt=2)) == FrameSet.parse("1-4") - done
    check_complete(farm, job, FrameSet.parse("1-4"))


def test_a_notice_that_crosses_a_claim_gives_the_task_back_untouched_at_no_cost(farm):
    job = farm.submit(frames="1-2", chunk_size=2)
    holder = {}

    def notice() -> None:
        agent = wait_for(lambda: holder.get("agent"), 5, "the agent object")
        agent.on_notice(Notice("preempt", "gce", time.time(), time.time() + 10, "test notice during the claim"))

    hooked = ClaimHook(open_queue(farm.queue_url), notice)
    agent, thread = farm.inprocess("node-a", queue=hooked)
    holder["agent"] = agent
    thread.join(20)
    assert not thread.is_alive()
    task = farm.task(job)
    assert task.state == "pending"
    assert task.attempts == {"preempted": 0, "failed": 0, "released": 1}  # no budget spent
    assert not farm.log_of("node-a", job).exists()  # nothing ran
    assert agent.summary.outcomes == [(job, "000", "released")]
    hooked.inner.close()


# ---------------------------------------------------------------- hard stop, rebalance, kill, leases


@pytest.mark.slow
def test_a_render_that_ignores_sigterm_is_killed_and_the_hard_stop_releases_before_the_deadline(farm):
    job = farm.submit(frames="1-6", chunk_size=6)
    md = farm.metadata()
    notice_seconds = 4.0
    # 90% of the notice for the kill ladder: longer than the drain can afford, so the hard stop
    # (1.5 s before the deadline) must act.
    a = farm.agent("node-a", "--preemption", "gce", "--gce-metadata-url", md.url, "--notice-seconds",
                   str(notice_seconds), "--grace-share", "0.9", "--heartbeat-seconds", "1",
                   env={"CNODE_SIM_FRAME_SECONDS": "0.6", "CNODE_SIM_IGNORE_SIGTERM": "1"})
    log = farm.log_of("node-a", job)
    wait_for(lambda: len(saved_frames(log)) >= 1, 60, "a frame saved")
    tree = renders(farm.mark)
    raised = time.time()
    md.raise_gce_preempt()
    assert a.wait(timeout=notice_seconds + 10) == 0
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    task = farm.task(job)
    assert task.state == "pending" and task.attempts["preempted"] == 1
    [release] = [e for e in farm.events(job) if e.kind == "preempted"]
    assert "hard stop" in release.detail
    assert release.time < raised + notice_seconds
    [drain] = drains_in(farm.agent_log("node-a"))
    assert drain["by"] == "hard stop" and drain["released_at"] < raised + notice_seconds
    show("hard stop", drain, raised)
    # The release carries what the attempt took so far: its wall time, the machine, the cost.
    [attempt] = farm.queue.attempts(job, "000")
    assert attempt.outcome == "preempted" and "hard stop" in attempt.reason
    assert 0.6 < attempt.figures.wall_seconds < attempt.ended - attempt.started + 5
    assert attempt.figures.instance_type == "n1-standard-8"  # the metadata server's machine
    assert (attempt.figures.cost is None) == (attempt.figures.hourly_price is None)
    assert "leftover processes: none" in log.read_text()


@pytest.mark.slow
def test_a_rebalance_recommendation_finishes_the_task_and_takes_no_new_one(farm):
    job = farm.submit(frames="1-4", chunk_size=2)
    md = farm.metadata()
    a = farm.agent("node-a", "--preemption", "ec2", "--ec2-metadata-url", md.url, "--metadata-poll-seconds", "0.2",
                   env={"CNODE_SIM_FRAME_SECONDS": "0.5"})
    log = farm.log_of("node-a", job)
    wait_for(lambda: len(saved_frames(log)) >= 1, 60, "a frame saved")
    md.raise_ec2_rebalance()
    assert a.wait(timeout=30) == 0
    tasks = farm.queue.tasks(job)
    assert [t.state for t in tasks] == ["done", "pending"]
    assert [e.worker for e in farm.queue.events(job) if e.kind == "claimed"] == ["node-a"]
    assert "stopped taking work after a notice" in farm.agent_log("node-a").read_text()


@pytest.mark.slow
def test_a_killed_job_stops_the_render_within_a_heartbeat_and_fails_killed_by_owner(farm):
    job = farm.submit(frames="1-8", chunk_size=8)
    a = farm.agent("node-a", "--preemption", "none", "--heartbeat-seconds", "0.5", "--idle-exit", "1",
                   env={"CNODE_SIM_FRAME_SECONDS": "0.6"})
    log = farm.log_of("node-a", job)
    wait_for(lambda: len(saved_frames(log)) >= 1, 60, "a frame saved")
    tree = renders(farm.mark)
    killed = time.time()
    farm.queue.kill_job(job)
    wait_for(lambda: farm.task(job).state == "failed", 15, "the task to fail")
    stopped = time.time()
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    task = farm.task(job)
    assert task.reason == "killed by owner"
    assert len(saved_frames(log)) < 8
    assert "stopped: the job was killed by its owner" in log.read_text()
    assert farm.queue.downloads(job) == []
    print(f"\n[kill] job killed -> task failed {stopped - killed:.2f} s (heartbeat 0.5 s)")
    assert a.wait(timeout=30) == 0  # the agent lives on, then exits idle


@pytest.mark.slow
def test_a_lease_lost_to_a_hung_heartbeat_is_never_reported(farm):
    job = farm.submit(frames="1-8", chunk_size=8)
    gate = HeartbeatGate(open_queue(farm.queue_url))
    agent, thread = farm.inprocess("node-a", queue=gate, lease_seconds=2.0, heartbeat_seconds=0.5,
                                   env={"CNODE_SIM_FRAME_SECONDS": "0.5"})
    log = farm.log_of("node-a", job)
    wait_for(lambda: len(saved_frames(log)) >= 1, 60, "a frame saved")
    tree = renders(farm.mark)
    gate.open.clear()  # the heartbeats hang from now on
    try:
        # another agent takes the task once the lease has expired
        lease = wait_for(lambda: farm.queue.claim("node-b", 30), 10, "the lease to expire", poll=0.2)
        wait_for(lambda: agent.summary.lost == 1, 10, "agent A to give the task up")
        assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        farm.queue.complete(lease)
    finally:
        gate.open.set()
    thread.join(20)
    kinds = [(e.kind, e.worker) for e in farm.events(job)]
    assert ("lease_expired", "node-a") in kinds
    assert [k for k in kinds if k[1] == "node-a" and k[0] in ("done", "failed", "preempted", "released")] == []
    assert [k for k in kinds if k[0] == "done"] == [("done", "node-b")]
    assert agent.summary.outcomes == [(job, "000", "lost")]
    gate.inner.close()


@pytest.mark.slow
def test_a_lease_reclaimed_by_another_agent_is_never_reported_by_the_first(farm):
    job = farm.submit(frames="1-8", chunk_size=8)
    agent, thread = farm.inprocess("node-a", lease_seconds=30, heartbeat_seconds=0.5,
                                   env={"CNODE_SIM_FRAME_SECONDS": "0.5"})
    log = farm.log_of("node-a", job)
    wait_for(lambda: len(saved_frames(log)) >= 1, 60, "a frame saved")
    tree = renders(farm.mark)
    # A queue whose clock runs a minute ahead sees the lease expired: it reaps and re-claims it.
    ahead = open_queue(farm.queue_url, clock=lambda: time.time() + 60)
    lease = ahead.claim("node-b", 30)
    ahead.close()
    assert lease is not None and lease.task_id == "000"
    wait_for(lambda: agent.summary.lost == 1, 10, "agent A to learn its lease is gone")
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    thread.join(20)
    farm.queue.complete(lease)
    kinds = [(e.kind, e.worker) for e in farm.events(job)]
    assert [k for k in kinds if k[0] == "done"] == [("done", "node-b")]
    assert [k for k in kinds if k[1] == "node-a" and k[0] in ("done", "failed", "preempted", "released")] == []
    assert farm.queue.downloads(job) == []  # agent A's frames were not offered


# ---------------------------------------------------------------- agents killed outright


@pytest.mark.slow
def test_a_sigkilled_agents_orphan_render_is_stopped_by_its_successor_and_the_job_completes(farm):
    job = farm.submit(frames="1-6", chunk_size=6)
    a = farm.agent("node-a", "--preemption", "none", "--lease-seconds", "3", "--heartbeat-seconds", "0.5",
                   env={"CNODE_SIM_FRAME_SECONDS": "1.0"})
    log = farm.log_of("node-a", job)
    wait_for(lambda: len(saved_frames(log)) >= 1, 60, "a frame saved")
    tree = renders(farm.mark)
    assert tree
    os.kill(a.pid, signal.SIGKILL)  # the agent alone (OOM killer): its render lives on, orphaned
    a.wait(10)
    time.sleep(0.3)
    assert any(p.is_running() for p in tree)
    # systemd restarts the agent on the same node: it kills the orphan before claiming
    a2 = farm.agent("node-a", "--preemption", "none", "--lease-seconds", "3", "--heartbeat-seconds", "0.5",
                    "--idle-exit", "5", env={"CNODE_SIM_FRAME_SECONDS": "0.05"})
    assert a2.wait(timeout=60) == 0
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    text = farm.agent_log("node-a").read_text()
    assert "render processes an earlier agent" in text
    task = farm.task(job)
    assert task.attempts["preempted"] == 1  # the expired lease
    check_complete(farm, job, FrameSet.parse("1-6"))


@pytest.mark.slow
def test_an_instance_killed_without_notice_loses_no_task(farm):
    job = farm.submit(frames="1-6", chunk_size=3)
    a = farm.agent("node-a", "--preemption", "none", "--lease-seconds", "2", "--heartbeat-seconds", "0.5",
                   env={"CNODE_SIM_FRAME_SECONDS": "0.5"})
    log = farm.log_of("node-a", job)
    wait_for(lambda: len(saved_frames(log)) >= 1, 60, "a frame saved")
    tree = renders(farm.mark) + [psutil.Process(a.pid)]
    for proc in tree:  # the instance vanishes: every process at once
        proc.kill()
    a.wait(10)
    psutil.wait_procs(tree, timeout=10)
    # idle long enough for A's lease (2 s) to expire: B then takes A's task too
    b = farm.agent("node-b", "--preemption", "none", "--idle-exit", "5", env={"CNODE_SIM_FRAME_SECONDS": "0.05"})
    assert b.wait(timeout=60) == 0
    done = [e.task_id for e in farm.queue.events(job) if e.kind == "done"]
    assert sorted(done) == ["000", "001"]  # each exactly once
    check_complete(farm, job, FrameSet.parse("1-6"))
