"""One task, start to finish, with no queue: sync inputs, build the environment, run the command
(with the Clarisse duties), judge it, collect and upload outputs (design.md, "The flow of one task").

The agent wraps this with claim / heartbeat / report; ``run-task`` wraps it with a terminal.
Stopping (preemption, cancellation, shutdown) comes in through ``TaskControl`` from any thread.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import psutil

from cio_worker.node.cache import ContentCache
from cio_worker.node.faults import NODE_FAULT_CODES, full_filesystem, is_disk_full
from cio_worker.node.clarisse import MONITORED_LINES, Prepared, RenderMonitor, prepare
from cio_worker.job.document import TaskDocument
from cio_worker.job.environment import is_secret_name, merge_environment
from cio_worker.errors import CioError, RenderError
from cio_worker.job.frames import FrameSet
from cio_worker.storage.md5cache import Md5Cache
from cio_worker.node.outputs import OutputScan, changed_since, snapshot, upload_outputs
from cio_worker.node.previews import PreviewReport, publish_previews
from cio_worker.job.paths import PathMap
from cio_worker.node.config import KEYS, env_name
from cio_worker.node.render_user import RenderUser
from cio_worker.node.logscan import LineFilter
from cio_worker.node.runner import ProcessRunner, RunResult, RunSpec
from cio_worker.storage import Progress, Storage
from cio_worker.node.sync import InputSync, SyncResult


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
    sync_processes: int = 0  # a large file:// download split over processes (0: automatic; 1: never)
    threads: int = 0  # CIO_THREADS for the renderer; 0: the machine's cores
    progress: Callable[[str], Progress | None] = lambda phase: None  # sync/upload progress per phase
    say: Callable[[str], None] = lambda line: None  # short status lines for a person or the log
    echo: Callable[[str], None] | None = None  # every line of the render's output, as it comes
    clock: Callable[[], float] = time.monotonic


DEFAULT_GRACE = 10.0
# Time kept back at the end of a drain for the release itself: an upload of finished frames that
# has not ended this long before the report-by time is cut short.
RELEASE_RESERVE_SECONDS = 0.5
# Causes whose finished frames nobody wants: a killed job, a lease another agent now holds.
NO_SALVAGE_CAUSES = ("cancelled", "lease_lost")


log = logging.getLogger(__name__)

AGENT_PID_ENV = "CIO_AGENT_PID"
WORK_ROOT_ENV = "CIO_WORK_ROOT"
# The agent's own credentials and settings never reach a render: its token (or the file holding
# it, or systemd's credentials directory), its configuration file and every CIO_<KEY> option.
AGENT_ONLY_ENV = frozenset({"CIO_TOKEN", "CIO_TOKEN_FILE", "CIO_CONFIG", "CREDENTIALS_DIRECTORY",
                            *(env_name(key) for key in KEYS)})


class StopRequested(CioError):
    """Raised inside a transfer (through its progress) when the task is being stopped."""

    code = "stopping"


class TaskControl:
    """Stop requests for a running task, from heartbeats, notices or signals (any thread)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.reason: str | None = None
        self.cause: str = "preempted"  # preempted | released | cancelled | lease_lost
        self.grace: float | None = None
        self.deadline: float | None = None  # when the instance is gone (the context's clock)
        self.report_by: float | None = None  # when the outcome must be reported (the hard stop)
        self.requested_at: float | None = None  # wall time of the first request
        self.log_path: Path | None = None  # the task log, once execute() has settled its name
        self._process = None
        # What the task is doing, for the agent's heartbeats: syncing, rendering, uploading; and
        # how far the render is (read when asked, from the render's own progress lines).
        self._phase = "syncing"
        self._progress: Callable[[], float] | None = None

    def set_phase(self, phase: str, progress: Callable[[], float] | None = None) -> None:
        """The task moved on (``syncing``, ``rendering``, ``uploading``); ``progress`` gives the
        percent done of this phase whenever it is asked (the render's monitor)."""
        with self._lock:
            self._phase, self._progress = phase, progress

    def phase(self) -> tuple[str, float | None]:
        """(phase, percent or None) as of now; never raises."""
        with self._lock:
            phase, progress = self._phase, self._progress
        if progress is None:
            return phase, None
        try:
            percent = float(progress())
        except Exception:  # noqa: BLE001 - a status line is never worth a failure
            return phase, None
        return phase, min(100.0, max(0.0, percent))

    def request_stop(self, reason: str, cause: str = "preempted", grace: float | None = None,
                     deadline: float | None = None, report_by: float | None = None) -> None:
        """Never blocks: the runner's kill ladder runs on its own thread. A later request with a
        shorter grace (a notice after a signal) shortens the ladder; the first reason stays."""
        with self._lock:
            if deadline is not None and (self.deadline is None or deadline < self.deadline):
                self.deadline = deadline
            if report_by is not None and (self.report_by is None or report_by < self.report_by):
                self.report_by = report_by
            first = not self._event.is_set()
            if first:
                self.requested_at = time.time()
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
    # Wall times of a stop: when the render's whole process tree was verified gone (None when no
    # render was running), and when the finished frames were uploaded.
    tree_gone_at: float | None = None
    salvaged_at: float | None = None
    salvage_cut: bool = False  # the upload of finished frames was cut short by the deadline
    upload_bytes: int = 0  # bytes of outputs this attempt moved into storage
    upload_seconds: float | None = None  # time the upload took (None: nothing was uploaded)
    previews: PreviewReport | None = None  # the outputs' previews (node/previews.py), when made

    @property
    def reason(self) -> str:
        return str(self.error) if self.error else ""

    @property
    def leftover_pids(self) -> list[int]:
        return list(self.run.leftover_pids) if self.run is not None else []


def execute(doc: TaskDocument, ctx: ExecutionContext, control: TaskControl | None = None) -> TaskOutcome:
    control = control or TaskControl()
    job, task = doc.job, doc.task
    task_dir = ctx.work_root / "tasks" / f"{job.id}-{task.id}-a{task.attempt}"
    tmp_dir = task_dir / "tmp"
    log_path = ctx.work_root / "logs" / f"{job.id}-{task.id}-a{task.attempt}.log"
    outcome = TaskOutcome(status="failed", log_path=log_path)
    started = ctx.clock()
    try:
        shutil.rmtree(task_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)  # a full disk (no inode left) fails the task here
        log_path.parent.mkdir(parents=True, exist_ok=True)
        _keep_earlier_log(log_path)
        control.log_path = log_path
        render_user: RenderUser | None = getattr(ctx.runner, "render_user", None)
        home = None
        if render_user is not None:
            home = task_dir / "home"  # the render user's own for this task (a system user has none)
            home.mkdir()
            render_user.reachable(ctx.work_root, task_dir.parent)
            render_user.grant(task_dir, tmp_dir, home)
        storage = ctx.open_storage(job.storage)
        if control.stopping:
            return _stopped(outcome, control, FrameSet())
        ctx.say(f"syncing {len(job.upload_files)} inputs")
        sync_progress = _StopOnRequest(ctx.progress("sync"), control)
        control.set_phase("syncing", sync_progress.percent)
        syncer = InputSync(storage, ctx.cache, ctx.md5cache, ctx.path_map, progress=sync_progress,
                           processes=ctx.sync_processes)
        outcome.sync = syncer.sync(job.upload_files)
        outcome.timings["sync"] = ctx.clock() - started
        if render_user is not None:
            render_user.readable(Path(ctx.path_map.local(u.destination, what="an input")) for u in job.upload_files)
        if control.stopping:
            return _stopped(outcome, control, FrameSet())
        env = _task_env(doc, ctx, tmp_dir, render_user, home)
        try:
            prepared = prepare(task.command, env=env, path_map=ctx.path_map, work_dir=tmp_dir,
                               frames_done=task.frames_done_set)
        except RenderError as exc:
            if exc.code != "nothing_to_do":
                raise
            # Earlier attempts delivered every frame (e.g. a stop that came as the render ended):
            # the task is done, with nothing new to offer.
            ctx.say(f"every frame of {doc.label} was delivered by earlier attempts")
            outcome.status, outcome.frames_done = "done", task.frame_set
            return outcome
        output_root = Path(ctx.path_map.local(job.output_path, what="job.output_path"))
        if render_user is not None:
            _render_may_write(render_user, output_root, prepared)
        before = snapshot(output_root)
        monitor = RenderMonitor(prepared, on_percent=lambda pct: ctx.say(f"render {pct:.0f}%"))
        if control.stopping:
            return _stopped(outcome, control, FrameSet())
        outcome.exec_started = ctx.clock()
        control.set_phase("rendering", monitor.percent)
        outcome.timings["claim_to_exec"] = outcome.exec_started - started - outcome.timings["sync"]
        ctx.say(f"running {'cnode' if prepared.is_cnode else 'command'} for frames "
                f"{prepared.frames if prepared.is_cnode else task.frames} tile {task.tile}/{task.tiles}")
        result = _run(prepared, doc, ctx, control, monitor, log_path)
        outcome.run = result
        outcome.timings["render"] = ctx.clock() - outcome.exec_started
        if control.stopping:
            outcome.tree_gone_at = time.time()
        if result.timed_out:  # the runner's SIGTERM is not the renderer's crash
            error: CioError | None = RenderError(
                f"the command ran past the task timeout of {ctx.task_timeout:g} s and was stopped "
                f"({result.describe_exit()})", code="timeout")
        else:
            error = monitor.judge(result.exit_code, result.signal)
        if error is not None and error.code not in NODE_FAULT_CODES:
            full = full_filesystem(output_root, log_path.parent)
            if full is not None:  # its own words may be lost: nothing more could be written there
                error = RenderError(f"{error} — no space left on device: the filesystem of {full} is full",
                                    code="disk_full")
        if control.stopping and (error is not None or control.cause in NO_SALVAGE_CAUSES):
            # The render was stopped (or its result is no longer wanted): keep what is finished.
            finished = monitor.frames_finished()
            if control.cause in NO_SALVAGE_CAUSES or not finished:
                return _stopped(outcome, control, FrameSet())
            scan = changed_since(output_root, before, only=_files_of(prepared, finished, output_root))
            delivered = _upload_guarded(storage, scan, ctx, control, outcome)
            return _stopped(outcome, control, _frames_delivered(prepared, finished, delivered, output_root))
        if error is not None:
            outcome.error = error
            return outcome
        scan = changed_since(output_root, before)
        delivered = _upload_guarded(storage, scan, ctx, control, outcome)
        if len(delivered) == len(scan.files):
            # Every output is in storage: done, even if a stop came meanwhile.
            if not control.stopping:  # previews never fail the task; a drain has no time for them
                outcome.previews = publish_previews(storage, job.id, outcome.outputs.files, tmp_dir / "previews",
                                                    log_path, say=ctx.say)
            outcome.frames_done = task.frame_set
            outcome.status = "done"
            return outcome
        # A stop cut the upload short: keep the frames whose files all arrived.
        frames = prepared.frames if prepared.is_cnode else FrameSet()
        salvage = control.cause not in NO_SALVAGE_CAUSES
        return _stopped(outcome, control, _frames_delivered(prepared, frames, delivered, output_root) if salvage else FrameSet())
    except StopRequested:
        return _stopped(outcome, control, FrameSet())
    except CioError as exc:
        if control.stopping:
            return _stopped(outcome, control, outcome.frames_done)
        outcome.error = exc
        return outcome
    except OSError as exc:  # a full disk (the node's fault: faults.py), a permission problem; the agent lives
        if control.stopping:
            return _stopped(outcome, control, outcome.frames_done)
        code = "disk_full" if is_disk_full(exc) else "node_error"
        outcome.error = CioError(f"{type(exc).__name__}: {exc}", code=code)
        return outcome
    except Exception as exc:  # a bug, or input nobody foresaw: fail this task, keep the agent
        log.exception("task %s failed unexpectedly", doc.label)
        outcome.error = CioError(f"unexpected {type(exc).__name__} in the agent: {str(exc)[:300]}", code="internal_error")
        return outcome
    finally:
        outcome.timings["total"] = ctx.clock() - started
        shutil.rmtree(task_dir, ignore_errors=True)


def _stopped(outcome: TaskOutcome, control: TaskControl, finished: FrameSet) -> TaskOutcome:
    outcome.status = "stopped"
    outcome.frames_done = finished
    outcome.error = CioError(control.reason or "stopped", code=control.cause)
    return outcome


def _upload_guarded(storage: Storage, scan: OutputScan, ctx: ExecutionContext, control: TaskControl,
                    outcome: TaskOutcome) -> set[str]:
    """Upload ``scan``; return the relative paths whose content is in storage (``outcome.outputs``
    then lists only those).

    Without a stop this is a plain upload whose failure fails the task. Once a stop is requested
    the upload is cut short before the report-by time (or at once for a killed job or a lost
    lease), and whatever arrived is kept.
    """
    outcome.outputs = OutputScan([], list(scan.skipped))
    for skipped in scan.skipped:
        ctx.say(f"not uploaded ({skipped.reason}): {skipped.relative_path}")
    if not scan.files:
        return set()
    if control.stopping and control.report_by is not None and \
            control.report_by - RELEASE_RESERVE_SECONDS - ctx.clock() <= 0:
        ctx.say(f"{control.report_by - ctx.clock():.1f} s left before the report is due: "
                f"not uploading {len(scan.files)} files")
        outcome.salvage_cut = True
        return set()
    progress = _UploadGuard(ctx.progress("upload"), control, ctx.clock)
    control.set_phase("uploading", progress.percent)
    began = ctx.clock()
    try:
        upload_outputs(storage, scan, progress)
    except CioError as exc:
        if not control.stopping:
            raise
        outcome.salvage_cut = True
        ctx.say(f"upload cut short by the stop: {exc}")
        present = progress.done_keys | _exists(storage, {f.key for f in scan.files} - progress.done_keys)
    else:
        present = {f.key for f in scan.files}
    finally:
        outcome.upload_seconds = ctx.clock() - began
        outcome.upload_bytes = progress.moved()
    delivered = [f for f in scan.files if f.key in present]
    outcome.outputs = OutputScan(delivered, list(scan.skipped))
    if control.stopping:
        outcome.salvaged_at = time.time()
    return {f.relative_path for f in delivered}


def _exists(storage: Storage, keys: set[str]) -> set[str]:
    if not keys:
        return set()
    try:
        return storage.exists(keys)
    except Exception:  # noqa: BLE001 - during a drain an unanswered question means "not there"
        return set()


def _frames_delivered(prepared: Prepared, frames: FrameSet, delivered: set[str], root: Path) -> FrameSet:
    """The frames of ``frames`` whose every expected file is in ``delivered``."""
    by_frame: dict[int, bool] = {}
    for (image, frame), path in prepared.expected.items():
        if frame not in frames:
            continue
        ok = _is_under(path, root) and path.relative_to(root).as_posix() in delivered
        by_frame[frame] = by_frame.get(frame, True) and ok
    return FrameSet.of(f for f, ok in by_frame.items() if ok)


class _Relay:
    """A Progress relay that counts the bytes moved (the percent a worker reports) and may end the
    transfer with StopRequested: ``_check`` runs before each piece moves."""

    CHECK_AT_START = True

    def __init__(self, inner: Progress | None, control: TaskControl) -> None:
        self._inner = inner
        self._control = control
        self._lock = threading.Lock()
        self._total = 0
        self._moved = 0

    def moved(self) -> int:
        """Bytes moved so far."""
        with self._lock:
            return self._moved

    def percent(self) -> float:
        """Bytes moved of the bytes to move, in percent (0 until the transfer says its size)."""
        with self._lock:
            return 100.0 * self._moved / self._total if self._total > 0 else 0.0

    def _check(self) -> None:
        raise NotImplementedError

    def start(self, files: int, total_bytes: int) -> None:
        if self.CHECK_AT_START:
            self._check()
        with self._lock:
            self._total, self._moved = max(0, int(total_bytes)), 0
        if self._inner is not None:
            self._inner.start(files, total_bytes)

    def advance(self, nbytes: int) -> None:
        self._check()
        with self._lock:
            self._moved = min(self._total, self._moved + max(0, int(nbytes)))
        if self._inner is not None:
            self._inner.advance(nbytes)

    def file_done(self, key: str) -> None:
        if self._inner is not None:
            self._inner.file_done(key)


class _StopOnRequest(_Relay):
    """Ends a transfer (StopRequested) once the task is asked to stop."""

    def _check(self) -> None:
        if self._control.stopping:
            raise StopRequested(f"stopped: {self._control.reason}")


class _UploadGuard(_Relay):
    """For uploads: records finished keys; once a stop is requested, ends the upload
    (StopRequested) before the report-by time, or at once when the result is unwanted."""

    CHECK_AT_START = False

    def __init__(self, inner: Progress | None, control: TaskControl, clock: Callable[[], float]) -> None:
        super().__init__(inner, control)
        self._clock = clock
        self.done_keys: set[str] = set()

    def _check(self) -> None:
        control = self._control
        if not control.stopping:
            return
        if control.cause in NO_SALVAGE_CAUSES:
            raise StopRequested(f"stopped: {control.reason}")
        if control.report_by is not None and self._clock() >= control.report_by - RELEASE_RESERVE_SECONDS:
            raise StopRequested("the report is due: upload cut short")

    def file_done(self, key: str) -> None:
        with self._lock:
            self.done_keys.add(key)
        super().file_done(key)


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


def _keep_earlier_log(log_path: Path) -> None:
    """A run of a document that ran here before (``run-task`` twice) starts a fresh log: the
    earlier one moves to ``NAME.1.log``, ``NAME.2.log``, ... (in the order they ran)."""
    if not log_path.exists():
        return
    n = 1
    while (kept := log_path.with_name(f"{log_path.stem}.{n}{log_path.suffix}")).exists():
        n += 1
    log_path.rename(kept)


def _render_may_write(user: RenderUser, output_root: Path, prepared: Prepared) -> None:
    """The output directories (prepare made those cnode needs) become the render user's."""
    output_root.mkdir(parents=True, exist_ok=True)
    directories = {output_root} | {p.parent for p in prepared.expected.values()}
    user.grant(*sorted(d for d in directories if d.is_dir() and not d.is_symlink()))
    user.readable([output_root])


def _task_env(doc: TaskDocument, ctx: ExecutionContext, tmp_dir: Path, render_user: RenderUser | None = None,
              home: Path | None = None) -> dict[str, str]:
    base = {k: v for k, v in ctx.base_env.items() if k not in AGENT_ONLY_ENV}
    if render_user is not None and home is not None:
        # Who the render is, and a HOME it may write (the agent's is root's); the job may still set its own.
        base.update(HOME=str(home), USER=render_user.name, LOGNAME=render_user.name)
    env = merge_environment(base, doc.job.environment)
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
            # Which agent runs it, and on which work root: a restarted agent finds the renders
            # its killed predecessor left behind (stale_renders).
            AGENT_PID_ENV: str(os.getpid()),
            WORK_ROOT_ENV: str(ctx.work_root),
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
        owner=str(ctx.work_root),
        header={
            "job": f"{doc.job.id} ({doc.job.title})",
            "task": f"{doc.task.id} frames {doc.task.frames} tile {doc.task.tile}/{doc.task.tiles} attempt {doc.task.attempt}",
            "frames already delivered": doc.task.frames_done or "none",
            "agent host": socket.gethostname(),
        },
    )
    on_line: Callable[[str], None] = monitor.feed
    line_filter: LineFilter | None = MONITORED_LINES  # the monitor reads a few lines; skip the rest
    if ctx.echo is not None:
        echo = ctx.echo
        line_filter = None

        def feed_and_echo(line: str) -> None:
            monitor.feed(line)
            echo(line)

        on_line = feed_and_echo

    process = ctx.runner.start(spec, on_line=on_line, line_filter=line_filter)
    control.attach(process)
    try:
        return process.wait()
    finally:
        control.detach()


def stale_renders(work_root: Path) -> list[psutil.Process]:
    """Processes of tasks started on ``work_root`` by an agent that is gone (SIGKILLed, OOM-killed):
    found by the ``CIO_WORK_ROOT`` / ``CIO_AGENT_PID`` their environment carries; a process whose
    agent is still among its ancestors is not stale."""
    root, me = str(work_root), os.getpid()
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if env.get(WORK_ROOT_ENV) != root:
                continue
            owner = int(env.get(AGENT_PID_ENV) or 0)
            if owner == me or owner in {p.pid for p in proc.parents()}:
                continue
        except (psutil.Error, OSError, ValueError):
            continue
        found.append(proc)
    return found


def stop_stale_renders(work_root: Path, timeout: float = 5.0, runner: ProcessRunner | None = None) -> list[int]:
    """SIGKILL every stale render of ``work_root`` (see stale_renders; and, with ``runner``, every
    process left in the task cgroups of a dead agent of ``work_root``, which finds those that
    cleared their environment too), wait for them, and return their pids. Their results are
    worthless: the lease of their task has expired or will."""
    sweep = getattr(runner, "stop_stale", None)
    killed: list[int] = sweep(str(work_root)) if sweep is not None else []
    for _ in range(3):  # a stale tree may still be forking: look again until nothing is found
        procs = stale_renders(work_root)
        if not procs:
            break
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
            except psutil.Error:
                continue
        psutil.wait_procs(procs, timeout=timeout)
    return sorted(set(killed))
