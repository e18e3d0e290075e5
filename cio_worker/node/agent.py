"""The agent loop: claim -> execute -> report, with heartbeats, cancellation, notices and an idle exit.

A task whose lease was lost is never reported by this agent: a heartbeat that says so, or no
successful heartbeat for a whole lease, stops the render and drops the result. A killed job
(a heartbeat that says cancel) stops the render and fails the task. A stop (signal, preemption
notice) stops claiming, stops the render with a kill ladder fitted to the deadline, uploads the
frames already finished and releases the task with them; a hard stop releases it shortly before
the deadline whatever the drain is doing. Each drain is logged as one ``drain {json}`` line with
its wall times (notice, process tree gone, released), which benchmarks and tests read.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from cio_worker.job.document import TaskDocument
from cio_worker.errors import CioError, LeaseLost, QueueError
from cio_worker.node.execution import ExecutionContext, TaskControl, TaskOutcome, execute, stop_stale_renders
from cio_worker.queue import DownloadFile, NewDownload, Queue


@dataclass
class AgentConfig:
    worker_id: str
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    poll_seconds: float = 1.0
    idle_exit_seconds: float | None = None  # exit after this long with no work; None: never
    max_tasks: int | None = None  # stop after this many tasks (tests, benchmarks)
    stop_grace: float = 20.0  # kill-ladder grace when stopping without a notice deadline
    # Of the time a notice leaves, this share goes to the render's kill ladder; the rest is for
    # uploading the finished frames and reporting. The hard stop releases the task this long
    # before the deadline whatever the drain is doing.
    grace_share: float = 0.3
    hard_stop_margin: float = 1.5
    reap_stale_renders: bool = True  # at start, kill renders a killed predecessor left behind


@dataclass
class AgentSummary:
    tasks: int = 0
    done: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0
    outcomes: list[tuple[str, str, str]] = field(default_factory=list)  # (job, task, status)
    drains: list["DrainRecord"] = field(default_factory=list)
    stale_killed: list[int] = field(default_factory=list)  # pids of renders a killed agent left
    exit_reason: str = ""


@dataclass
class DrainRecord:
    """One stopped task, in wall-clock seconds (time.time()), for logs, tests and benchmarks."""

    job: str
    task: str
    cause: str
    reason: str
    stop_at: float | None  # the notice (or signal, or stop request) that started the drain
    deadline_at: float | None  # when the instance is gone
    tree_gone_at: float | None = None  # the render's process tree verified gone (None: none ran)
    released_at: float | None = None  # the queue has the task back (or failed, for a killed job)
    by: str = "drain"  # drain | hard stop | not reported (lease lost)
    state: str = ""  # the task's state after the report
    frames_done: str = ""
    files: int = 0
    leftover_pids: list[int] = field(default_factory=list)
    salvage_cut: bool = False

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @property
    def in_time(self) -> bool | None:
        if self.deadline_at is None or self.released_at is None:
            return None
        return self.released_at < self.deadline_at


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        queue: Queue,
        ctx: ExecutionContext,
        *,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self.queue = queue
        self.ctx = ctx
        self.log = log or logging.getLogger("cio_worker.node.agent")
        self.clock = clock
        self._wake = threading.Event()
        self._sleep = sleep or (lambda s: self._wake.wait(s))
        self._stop_reason: str | None = None
        self._stop_cause = "preempted"
        self._stop_at: float | None = None  # wall time of the first stop (notice, signal)
        self._no_new_work = False
        self._control: TaskControl | None = None
        self._deadline: float | None = None
        self._lock = threading.Lock()
        self._current: _Current | None = None
        self._hard_stop: threading.Timer | None = None
        self.summary = AgentSummary()

    # -- control from other threads (signals, notice watchers) ---------------------------------

    def shutdown(self, reason: str, grace: float | None = None, cause: str = "preempted",
                 deadline: float | None = None, *, stop_at: float | None = None) -> None:
        """Stop claiming; stop the current task (kill ladder within ``grace``) and release it.

        ``deadline`` (this agent's clock) is when the instance is gone: the grace is fitted to it
        and a hard stop releases the task ``hard_stop_margin`` before it, whatever the drain is
        doing. ``stop_at`` is the wall time the stop began (the notice), for the drain record.
        """
        if deadline is not None:
            left = max(0.0, deadline - self.clock())
            fitted = max(0.2, left * self.config.grace_share)
            grace = fitted if grace is None else min(grace, fitted)
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason, self._stop_cause = reason, cause
                self._stop_at = stop_at if stop_at is not None else time.time()
            if deadline is not None and (self._deadline is None or deadline < self._deadline):
                self._deadline = deadline
            control = self._control
            watchdog_due = self._deadline
        self._wake.set()
        if control is not None:
            control.request_stop(reason, cause=cause, grace=self.config.stop_grace if grace is None else grace,
                                 deadline=watchdog_due, report_by=self._report_by(watchdog_due))
            if watchdog_due is not None:
                self._arm_hard_stop(watchdog_due)

    def on_notice(self, notice) -> None:
        """A preemption notice (cio_worker.node.preemption.Notice): drain, or stop claiming if soft."""
        if not notice.hard:
            self.stop_claiming(f"{notice.provider} {notice.kind}: {notice.detail}")
            return
        deadline = None
        if notice.deadline is not None:  # the notice's wall-clock deadline on this agent's clock
            deadline = self.clock() + max(0.0, notice.deadline - time.time())
        person = notice.provider == "signal" and "SIGINT" in notice.detail
        self.log.warning("notice from %s: %s %s; draining%s", notice.provider, notice.kind, notice.detail,
                         f", {deadline - self.clock():.1f} s left" if deadline is not None else "")
        self.shutdown(f"{notice.provider} {notice.kind} notice: {notice.detail}",
                      cause="released" if person else "preempted", deadline=deadline,
                      stop_at=notice.received_at)

    def stop_claiming(self, reason: str) -> None:
        """A soft notice (e.g. EC2 rebalance): finish the current task, take no new one."""
        self._no_new_work = True
        self.log.info("no new tasks: %s", reason)
        self._wake.set()

    def _report_by(self, deadline: float | None) -> float | None:
        return None if deadline is None else deadline - self.config.hard_stop_margin

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> AgentSummary:
        if self.config.reap_stale_renders:
            try:
                killed = stop_stale_renders(self.ctx.work_root)
            except Exception:  # noqa: BLE001 - never keep an agent from starting
                self.log.exception("looking for renders left by an earlier agent failed")
                killed = []
            if killed:
                self.summary.stale_killed = killed
                self.log.warning("killed %d render processes an earlier agent on %s left behind: %s",
                                 len(killed), self.ctx.work_root, killed)
        idle_since = self.clock()
        while True:
            if self._stop_reason:
                self.summary.exit_reason = self._stop_reason
                break
            if self._no_new_work:
                self.summary.exit_reason = "stopped taking work after a notice"
                break
            if self.config.max_tasks is not None and self.summary.tasks >= self.config.max_tasks:
                self.summary.exit_reason = f"ran {self.summary.tasks} tasks"
                break
            try:
                lease = self.queue.claim(self.config.worker_id, self.config.lease_seconds)
            except QueueError as exc:
                self.log.error("queue unavailable: %s; retrying in %.0f s", exc, self.config.poll_seconds * 5)
                self._sleep(self.config.poll_seconds * 5)
                continue
            if lease is None:
                idle = self.clock() - idle_since
                if self.config.idle_exit_seconds is not None and idle >= self.config.idle_exit_seconds:
                    self.summary.exit_reason = f"idle for {idle:.0f} s"
                    break
                self._sleep(self.config.poll_seconds)
                continue
            self._handle(lease)
            idle_since = self.clock()
        with self._lock:
            if self._hard_stop is not None:
                self._hard_stop.cancel()
        self.log.info("agent %s exiting: %s", self.config.worker_id, self.summary.exit_reason)
        return self.summary

    def _handle(self, lease) -> None:
        doc: TaskDocument = lease.document
        control = TaskControl()
        current = _Current(lease, doc)
        with self._lock:
            self._control = control
            self._current = current
            pending_stop = self._stop_reason
        if pending_stop:
            # The claim crossed a stop: nothing ran, so give the task back at no cost to it.
            with self._lock:
                self._control = self._current = None
            self.summary.tasks += 1
            try:
                state = self._reporting(lambda: self.queue.release(
                    lease, cause="released", frames_done=doc.task.frames_done,
                    reason=f"claimed as the agent was stopping ({pending_stop})"), doc.label)
                self.summary.released += 1
                self.log.info("%s claimed while stopping: released untouched, now %s", doc.label, state)
                self.summary.outcomes.append((doc.job.id, doc.task.id, "released"))
            except CioError as exc:
                self.log.warning("%s claimed while stopping and could not be released: %s", doc.label, exc)
            return
        lost = threading.Event()
        beat_stop = threading.Event()
        beater = threading.Thread(
            target=self._heartbeat, args=(lease, control, lost, beat_stop), name="heartbeat", daemon=True
        )
        beater.start()
        self.summary.tasks += 1
        self.log.info("claimed %s frames %s tile %s/%s attempt %s%s", doc.label, doc.task.frames,
                      doc.task.tile, doc.task.tiles, doc.task.attempt,
                      f" (frames {doc.task.frames_done} already delivered)" if doc.task.frames_done else "")
        try:
            outcome = execute(doc, self.ctx, control)
        finally:
            beat_stop.set()
            with self._lock:
                self._control = None
        current.outcome = outcome
        with current.guard:
            if current.reported:
                self.summary.outcomes.append((doc.job.id, doc.task.id, "hard-stopped"))
                self.log.warning("%s: the hard stop already released it; not reporting again", doc.label)
                if current.drain is not None:
                    current.drain.tree_gone_at = outcome.tree_gone_at
                    current.drain.leftover_pids = outcome.leftover_pids
                    self._log_drain(current.drain)
            else:
                current.reported = True
                self._report(lease, doc, outcome, lost.is_set(), control)
        beater.join(timeout=max(5.0, self.config.heartbeat_seconds))  # a hung heartbeat call is left behind
        with self._lock:
            self._current = None

    def _arm_hard_stop(self, deadline: float) -> None:
        with self._lock:
            if self._hard_stop is not None:
                return
            delay = max(0.0, deadline - self.config.hard_stop_margin - self.clock())
            self._hard_stop = threading.Timer(delay, self._hard_stop_now)
            self._hard_stop.daemon = True
            self._hard_stop.start()

    def _hard_stop_now(self) -> None:
        """The deadline is near and the drain has not reported: kill the render outright and
        release the task with the frames earlier attempts delivered."""
        with self._lock:
            current, control = self._current, self._control
        if control is not None:
            control.request_stop("hard stop before the deadline", grace=0.0)
        if current is None:
            return
        with current.guard:
            if current.reported:
                return
            current.reported = True
            doc = current.doc
            drain = self._drain_record(doc, control, by="hard stop")
            try:
                drain.state = self._reporting(lambda: self.queue.release(
                    current.lease, cause="released" if self._stop_cause == "released" else "preempted",
                    frames_done=doc.task.frames_done,
                    reason="hard stop: the drain did not finish before the deadline"), doc.label)
                drain.released_at = time.time()
                drain.frames_done = doc.task.frames_done
                self.summary.released += 1
                self.log.error("%s: hard stop before the deadline; released without this attempt's frames",
                               doc.label)
            except CioError as exc:
                self.log.error("%s: hard stop could not release the task: %s", doc.label, exc)
            current.drain = drain
            self.summary.drains.append(drain)

    def _heartbeat(self, lease, control: TaskControl, lost: threading.Event, stop: threading.Event) -> None:
        """Extend the lease every heartbeat. A separate watch declares the lease lost when no
        heartbeat has succeeded for a whole lease: the queue may have given the task away."""
        expires = [self.clock() + self.config.lease_seconds]
        guard = threading.Lock()

        def watch() -> None:
            while True:
                with guard:
                    left = expires[0] - self.clock()
                if left <= 0:
                    break
                if stop.wait(left):
                    return
            if not stop.is_set():
                lost.set()
                self.log.warning("%s: no heartbeat got through for %.0f s; the lease is presumed lost",
                                 lease.label, self.config.lease_seconds)
                control.request_stop("lease lost: no heartbeat got through for a whole lease", cause="lease_lost",
                                     grace=self.config.stop_grace)

        watcher = threading.Thread(target=watch, name="lease-watch", daemon=True)
        watcher.start()
        try:
            while not stop.wait(self.config.heartbeat_seconds):
                asked = self.clock()
                try:
                    reply = self.queue.heartbeat(lease, self.config.lease_seconds)
                except LeaseLost as exc:
                    lost.set()
                    control.request_stop(f"lease lost: {exc}", cause="lease_lost", grace=self.config.stop_grace)
                    return
                except CioError as exc:  # the queue is briefly unreachable: the lease may still hold
                    self.log.warning("heartbeat failed: %s", exc)
                    continue
                with guard:
                    expires[0] = asked + self.config.lease_seconds
                if reply.cancel:
                    control.request_stop("the job was killed by its owner", cause="cancelled",
                                         grace=min(self.config.stop_grace, self.ctx.kill_grace))
        finally:
            stop.set()
            watcher.join()

    def _reporting(self, action: Callable[[], object], label: str, control: TaskControl | None = None):
        """Run a report (complete, fail, release), retrying while the queue is briefly unusable
        (e.g. locked past its busy timeout) for as long as the lease surely holds, or until the
        report is due before a deadline. LeaseLost, and the last error, go to the caller."""
        lease_left = max(1.0, self.config.lease_seconds - self.config.heartbeat_seconds)
        limit = self.clock() + lease_left
        with self._lock:
            deadline = self._deadline
        if deadline is not None:
            limit = min(limit, deadline - 0.2)
        if control is not None and control.report_by is not None:
            limit = min(limit, max(control.report_by, self.clock() + 0.5))
        pause = 0.05
        while True:
            try:
                return action()
            except LeaseLost:
                raise
            except QueueError as exc:
                if self.clock() + pause >= limit:
                    raise
                self.log.warning("%s: the queue refused the report (%s); retrying", label, exc)
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    def _drain_record(self, doc: TaskDocument, control: TaskControl | None, by: str = "drain") -> DrainRecord:
        with self._lock:
            stop_at, deadline = self._stop_at, self._deadline
        if control is not None and control.requested_at is not None and (stop_at is None or self._stop_reason is None):
            stop_at = control.requested_at
        deadline_at = None if deadline is None else time.time() + (deadline - self.clock())
        return DrainRecord(job=doc.job.id, task=doc.task.id, cause=control.cause if control else self._stop_cause,
                           reason=(control.reason if control else self._stop_reason) or "",
                           stop_at=stop_at, deadline_at=deadline_at, by=by)

    def _log_drain(self, drain: DrainRecord) -> None:
        def since(t: float | None) -> str:
            return "-" if t is None or drain.stop_at is None else f"{t - drain.stop_at:.2f} s"

        self.log.info("drain %s", json.dumps(drain.to_dict(), sort_keys=True))
        self.log.info("job %s task %s: stop -> tree gone %s -> released %s (%s%s)", drain.job, drain.task,
                      since(drain.tree_gone_at), since(drain.released_at), drain.by,
                      "" if drain.deadline_at is None or drain.released_at is None
                      else f", {drain.deadline_at - drain.released_at:.2f} s before the deadline")

    def _report(self, lease, doc: TaskDocument, outcome: TaskOutcome, lost: bool, control: TaskControl) -> None:
        label = doc.label
        status = outcome.status
        drain: DrainRecord | None = None
        if status == "stopped" or lost or control.stopping:
            drain = self._drain_record(doc, control)
            drain.tree_gone_at = outcome.tree_gone_at
            drain.leftover_pids = outcome.leftover_pids
            drain.salvage_cut = outcome.salvage_cut
            if outcome.leftover_pids:
                self.log.error("%s: processes %s survived the kill ladder", label, outcome.leftover_pids)
        try:
            if lost or (outcome.error is not None and outcome.error.code == "lease_lost"):
                self.summary.lost += 1
                status = "lost"
                if drain is not None:
                    drain.by = "not reported (lease lost)"
                self.log.warning("%s: lease lost; not reporting it", label)
            elif status == "done":
                self._reporting(lambda: self.queue.complete(lease, _download(doc, outcome)), label, control)
                self.summary.done += 1
                if drain is not None:  # finished (and uploaded) inside the notice
                    drain.by, drain.state, drain.released_at = "completed", "done", time.time()
                    drain.frames_done = doc.task.frames
                    drain.files = len(outcome.outputs.files) if outcome.outputs else 0
                self.log.info("%s done: %d outputs, log %s", label, len(outcome.outputs.files) if outcome.outputs else 0,
                              outcome.log_path)
            elif status == "stopped" and outcome.error is not None and outcome.error.code == "cancelled":
                state = self._reporting(lambda: self.queue.fail(lease, outcome.reason), label, control)
                self.summary.failed += 1
                if drain is not None:
                    drain.released_at, drain.state = time.time(), state
                self.log.warning("%s stopped: %s; now %s", label, outcome.reason, state)
            elif status == "stopped":
                # A notice spends the preempted budget; a plain shutdown ("released") spends none.
                code = outcome.error.code if outcome.error else "preempted"
                frames = str(outcome.frames_done | doc.task.frames_done_set)
                download = _download(doc, outcome)
                state = self._reporting(lambda: self.queue.release(
                    lease,
                    cause="released" if code == "released" else "preempted",
                    frames_done=frames,
                    download=download,
                    reason=outcome.reason,
                ), label, control)
                self.summary.released += 1
                if drain is not None:
                    drain.released_at, drain.state = time.time(), state
                    drain.frames_done, drain.files = frames, len(download.files) if download else 0
                self.log.info("%s released (%s), frames delivered %s, now %s", label, outcome.reason,
                              outcome.frames_done or "none", state)
            else:
                state = self._reporting(lambda: self.queue.fail(lease, outcome.reason), label, control)
                self.summary.failed += 1
                self.log.error("%s failed: %s (log %s); now %s", label, outcome.reason, outcome.log_path, state)
        except LeaseLost:
            self.summary.lost += 1
            status = "lost"
            if drain is not None:
                drain.by = "not reported (lease lost)"
            self.log.warning("%s: lease lost before the report; the queue has given it to another agent", label)
        except CioError as exc:  # the queue stayed unusable for as long as the lease could hold
            self.summary.lost += 1
            status = "unreported"
            if drain is not None:
                drain.by = "not reported (queue unavailable)"
            self.log.error("%s: could not report %s: %s; its lease will expire and it will run again",
                           label, outcome.status, exc)
        self.summary.outcomes.append((doc.job.id, doc.task.id, status))
        if drain is not None:
            self.summary.drains.append(drain)
            self._log_drain(drain)


@dataclass
class _Current:
    """The task being run, and whether it has been reported (by the loop or the hard stop)."""

    lease: object
    doc: TaskDocument
    reported: bool = False
    guard: threading.Lock = field(default_factory=threading.Lock)
    outcome: TaskOutcome | None = None
    drain: DrainRecord | None = None


def _download(doc: TaskDocument, outcome: TaskOutcome) -> NewDownload | None:
    if outcome.outputs is None or not outcome.outputs.files:
        return None
    return NewDownload(
        output_dir=doc.job.output_path,
        files=tuple(DownloadFile(f.relative_path, f.md5, f.size, f.key) for f in outcome.outputs.files),
    )
