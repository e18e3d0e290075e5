"""One task, start to finish, with no queue: sync inputs, build the environment, run the command
(with the Clarisse duties), judge it, collect and upload outputs (design.md, "The flow of one task").

The agent wraps this with claim / heartbeat / report; ``run-task`` wraps it with a terminal.
Stopping (preemption, cancellation, shutdown) comes in through ``TaskControl`` from any thread.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from .cache import ContentCache
from .clarisse import Prepared, RenderMonitor, prepare
from .document import TaskDocument
from .environment import is_secret_name, merge_environment
from .errors import CioError, RenderError
from .frames import FrameSet
from .md5cache import Md5Cache
from .outputs import OutputScan, changed_since, snapshot, upload_outputs
from .paths import PathMap
from .runner import ProcessRunner, RunResult, RunSpec
from .storage import Progress, Storage
from .sync import InputSync, SyncResult


@dataclass
class ExecutionContext:
    """Everything a task needs from the machine; passed in so every seam can be replaced."""

    work_root: Path
    open_storage: Callable[[str], Storage]
    runner: ProcessRunner
    path_map: PathMap = field(default_factory=PathMap)
    cache: ContentCache | None = None
    md5cache: Md5Cache | None = None
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    kill_grace: float = 10.0
    task_timeout: float | None = None
    log_cap_bytes: int = 64 * 1024 * 1024
    threads: int = 0  # CIO_THREADS for the renderer; 0: the machine's cores
    progress: Callable[[str], Progress | None] = lambda phase: None  # sync/upload progress per phase
    say: Callable[[str], None] = lambda line: None  # short status lines for a person or the log
    echo: Callable[[str], None] | None = None  # every line of the render's output, as it comes
    clock: Callable[[], float] = time.monotonic


DEFAULT_GRACE = 10.0
MIN_SALVAGE_SECONDS = 2.0  # below this before the deadline, finished frames are not uploaded


class TaskControl:
    """Stop requests for a running task, from heartbeats, notices or signals (any thread)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.reason: str | None = None
        self.cause: str = "preempted"  # preempted | cancelled | lease_lost | shutdown
        self.grace: float | None = None
        self.deadline: float | None = None  # when the instance is gone (the context's clock)
        self._process = None

    def request_stop(self, reason: str, cause: str = "preempted", grace: float | None = None,
                     deadline: float | None = None) -> None:
        """Never blocks: the runner's kill ladder runs on its own thread. A later request with a
        shorter grace (a notice after a signal) shortens the ladder; the first reason stays."""
        with self._lock:
            if deadline is not None and (self.deadline is None or deadline < self.deadline):
                self.deadline = deadline
            first = not self._event.is_set()
            if first:
                self.reason, self.cause = reason, cause
                self._event.set()
            if grace is not None and (self.grace is None or grace < self.grace):
                self.grace = grace
            elif not first:
                return
            process = self._process
            grace_now = self.grace if self.grace is not None else DEFAULT_GRACE
        if process is not None:
            process.request_stop(grace_now, self.reason or reason)

    @property
    def stopping(self) -> bool:
        return self._event.is_set()

    def attach(self, process) -> None:
        """The render started; a stop requested before now stops it at once."""
        with self._lock:
            self._process = process
            pending = self._event.is_set()
        if pending:
            process.request_stop(self.grace if self.grace is not None else DEFAULT_GRACE, self.reason or "stop")

    def detach(self) -> None:
        with self._lock:
            self._process = None


@dataclass
class TaskOutcome:
    status: str  # done | failed | stopped
    error: CioError | None = None
    frames_done: FrameSet = FrameSet()  # frames delivered by this attempt (and earlier ones)
    outputs: OutputScan | None = None
    run: RunResult | None = None
    sync: SyncResult | None = None
    log_path: Path | None = None
    exec_started: float | None = None  # clock when the command was handed to the runner
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return str(self.error) if self.error else ""


def execute(doc: TaskDocument, ctx: ExecutionContext, control: TaskControl | None = None) -> TaskOutcome:
    control = control or TaskControl()
    job, task = doc.job, doc.task
    task_dir = ctx.work_root / "tasks" / f"{job.id}-{task.id}-a{task.attempt}"
    tmp_dir = task_dir / "tmp"
    log_path = ctx.work_root / "logs" / f"{job.id}-{task.id}-a{task.attempt}.log"
    shutil.rmtree(task_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    outcome = TaskOutcome(status="failed", log_path=log_path)
    started = ctx.clock()
    try:
        storage = ctx.open_storage(job.storage)
        if control.stopping:
            return _stopped(outcome, control, FrameSet())
        ctx.say(f"syncing {len(job.upload_files)} inputs")
        syncer = InputSync(storage, ctx.cache, ctx.md5cache, ctx.path_map, progress=ctx.progress("sync"))
        outcome.sync = syncer.sync(job.upload_files)
        outcome.timings["sync"] = ctx.clock() - started
        if control.stopping:
            return _stopped(outcome, control, FrameSet())
        env = _task_env(doc, ctx, tmp_dir)
        prepared = prepare(task.command, env=env, path_map=ctx.path_map, work_dir=tmp_dir, frames_done=task.frames_done_set)
        output_root = Path(ctx.path_map.local(job.output_path, what="job.output_path"))
        before = snapshot(output_root)
        monitor = RenderMonitor(prepared)
        outcome.exec_started = ctx.clock()
        outcome.timings["claim_to_exec"] = outcome.exec_started - started - outcome.timings["sync"]
        ctx.say(f"running {'cnode' if prepared.is_cnode else 'command'} for frames {task.frames} tile {task.tile}/{task.tiles}")
        result = _run(prepared, doc, ctx, control, monitor, log_path)
        outcome.run = result
        outcome.timings["render"] = ctx.clock() - outcome.exec_started
        if control.stopping:
            finished = monitor.frames_finished()
            left = None if control.deadline is None else control.deadline - ctx.clock()
            if finished and left is not None and left < MIN_SALVAGE_SECONDS:
                ctx.say(f"{left:.1f} s left before the deadline: not uploading frames {finished}")
                return _stopped(outcome, control, FrameSet())
            scan = changed_since(output_root, before, only=_files_of(prepared, finished, output_root))
            if scan.files:
                upload_outputs(storage, scan, ctx.progress("upload"))
            outcome.outputs = scan
            return _stopped(outcome, control, finished)
        error = monitor.judge(result.exit_code, result.signal)
        if error is None and result.timed_out:
            error = RenderError(f"the command ran past the task timeout of {ctx.task_timeout:.0f} s", code="timeout")
        if error is not None:
            outcome.error = error
            return outcome
        scan = changed_since(output_root, before)
        upload_outputs(storage, scan, ctx.progress("upload"))
        outcome.outputs = scan
        outcome.frames_done = task.frame_set
        outcome.status = "done"
        return outcome
    except CioError as exc:
        if control.stopping:
            return _stopped(outcome, control, FrameSet())
        outcome.error = exc
        return outcome
    except OSError as exc:  # a full disk, a permission problem: the task fails, the agent lives
        outcome.error = CioError(f"{type(exc).__name__}: {exc}", code="node_error")
        return outcome
    finally:
        outcome.timings["total"] = ctx.clock() - started
        shutil.rmtree(task_dir, ignore_errors=True)


def _stopped(outcome: TaskOutcome, control: TaskControl, finished: FrameSet) -> TaskOutcome:
    outcome.status = "stopped"
    outcome.frames_done = finished
    outcome.error = CioError(control.reason or "stopped", code=control.cause)
    return outcome


def _files_of(prepared: Prepared, frames: FrameSet, root: Path) -> Callable[[str], bool]:
    wanted = {p.relative_to(root).as_posix() for (image, frame), p in prepared.expected.items()
              if frame in frames and _is_under(p, root)}
    return lambda relative: relative in wanted


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _task_env(doc: TaskDocument, ctx: ExecutionContext, tmp_dir: Path) -> dict[str, str]:
    env = merge_environment(ctx.base_env, doc.job.environment)
    task = doc.task
    env.update(
        {
            "CIO_JOB_ID": doc.job.id,
            "CIO_TASK_ID": task.id,
            "CIO_FRAMES": task.frames,
            "CIO_TILE": str(task.tile),
            "CIO_TILES": str(task.tiles),
            "CIO_ATTEMPT": str(task.attempt),
            "CIO_THREADS": str(ctx.threads or os.cpu_count() or 1),
            "CIO_TASK_TMPDIR": str(tmp_dir),
            "TMPDIR": str(tmp_dir),
        }
    )
    if ctx.path_map:
        env["CIO_PATH_MAP"] = json.dumps(ctx.path_map.to_dict())
    return env


def _run(prepared: Prepared, doc: TaskDocument, ctx: ExecutionContext, control: TaskControl,
         monitor: RenderMonitor, log_path: Path) -> RunResult:
    secrets = tuple(e.name for e in doc.job.environment if is_secret_name(e.name))
    spec = RunSpec(
        command=prepared.argv,
        cwd=prepared.cwd,
        env=prepared.env,
        log_path=log_path,
        timeout=ctx.task_timeout,
        log_cap_bytes=ctx.log_cap_bytes,
        kill_grace=ctx.kill_grace,
        secret_names=secrets,
        header={
            "job": f"{doc.job.id} ({doc.job.title})",
            "task": f"{doc.task.id} frames {doc.task.frames} tile {doc.task.tile}/{doc.task.tiles} attempt {doc.task.attempt}",
            "frames already delivered": doc.task.frames_done or "none",
            "agent host": socket.gethostname(),
        },
    )
    on_line = monitor.feed
    if ctx.echo is not None:
        echo = ctx.echo

        def on_line(line: str) -> None:
            monitor.feed(line)
            echo(line)

    process = ctx.runner.start(spec, on_line=on_line)
    control.attach(process)
    try:
        return process.wait()
    finally:
        control.detach()
