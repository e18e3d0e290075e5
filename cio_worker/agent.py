"""The agent loop: claim -> execute -> report, with heartbeats, cancellation, notices and an idle exit.

A task whose lease was lost is never reported done by this agent. A stop (signal, preemption
notice) stops the render, uploads the frames already finished and releases the task with them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .document import TaskDocument
from .errors import CioError, LeaseLost, QueueError
from .execution import ExecutionContext, TaskControl, TaskOutcome, execute
from .queue import DownloadFile, NewDownload, Queue


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


@dataclass
class AgentSummary:
    tasks: int = 0
    done: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0
    outcomes: list[tuple[str, str, str]] = field(default_factory=list)  # (job, task, status)
    exit_reason: str = ""


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
        self.log = log or logging.getLogger("cio_worker.agent")
        self.clock = clock
        self._wake = threading.Event()
        self._sleep = sleep or (lambda s: self._wake.wait(s))
        self._stop_reason: str | None = None
        self._no_new_work = False
        self._control: TaskControl | None = None
        self._deadline: float | None = None
        self._lock = threading.Lock()
        self._current: _Current | None = None
        self._hard_stop: threading.Timer | None = None
        self.summary = AgentSummary()

    # -- control from other threads (signals, notice watchers) ---------------------------------

    def shutdown(self, reason: str, grace: float | None = None, cause: str = "preempted",
                 deadline: float | None = None) -> None:
        """Stop claiming; stop the current task (kill ladder within ``grace``) and release it.

        ``deadline`` (this agent's clock) is when the instance is gone: the grace is fitted to it
        and a hard stop releases the task just before it, whatever the drain is doing.
        """
        if deadline is not None:
            left = max(0.0, deadline - self.clock())
            fitted = max(0.2, left * self.config.grace_share)
            grace = fitted if grace is None else min(grace, fitted)
        with self._lock:
            self._stop_reason = self._stop_reason or reason
            if deadline is not None and (self._deadline is None or deadline < self._deadline):
                self._deadline = deadline
            control = self._control
            watchdog_due = self._deadline
        self._wake.set()
        if control is not None:
            control.request_stop(reason, cause=cause, grace=self.config.stop_grace if grace is None else grace,
                                 deadline=watchdog_due)
            if watchdog_due is not None:
                self._arm_hard_stop(watchdog_due)

    def on_notice(self, notice) -> None:
        """A preemption notice (cio_worker.preemption.Notice): drain, or stop claiming if soft."""
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
                      cause="released" if person else "preempted", deadline=deadline)

    def stop_claiming(self, reason: str) -> None:
        """A soft notice (e.g. EC2 rebalance): finish the current task, take no new one."""
        self._no_new_work = True
        self.log.info("no new tasks: %s", reason)
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> AgentSummary:
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
            deadline = self._deadline
        if pending_stop:
            control.request_stop(pending_stop, grace=self.config.stop_grace, deadline=deadline)
            if deadline is not None:
                self._arm_hard_stop(deadline)
        lost = threading.Event()
        beat_stop = threading.Event()
        beater = threading.Thread(
            target=self._heartbeat, args=(lease, control, lost, beat_stop), name="heartbeat", daemon=True
        )
        beater.start()
        self.summary.tasks += 1
        self.log.info("claimed %s frames %s tile %s/%s attempt %s", doc.label, doc.task.frames,
                      doc.task.tile, doc.task.tiles, doc.task.attempt)
        try:
            outcome = execute(doc, self.ctx, control)
        finally:
            beat_stop.set()
            beater.join()
            with self._lock:
                self._control = None
        with current.guard:
            if current.reported:
                self.summary.lost += 1
                self.summary.outcomes.append((doc.job.id, doc.task.id, "hard-stopped"))
                self.log.warning("%s: the hard stop already released it; not reporting again", doc.label)
            else:
                current.reported = True
                self._report(lease, doc, outcome, lost.is_set())
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
        """The deadline is near and the drain has not reported: release the task as it stands."""
        with self._lock:
            current = self._current
        if current is None:
            return
        with current.guard:
            if current.reported:
                return
            current.reported = True
            try:
                self.queue.release(current.lease, cause="preempted", frames_done=current.doc.task.frames_done,
                                   reason="hard stop: the drain did not finish before the deadline")
                self.log.error("%s: hard stop before the deadline; released without this attempt's frames",
                               current.doc.label)
            except CioError as exc:
                self.log.error("%s: hard stop could not release the task: %s", current.doc.label, exc)

    def _heartbeat(self, lease, control: TaskControl, lost: threading.Event, stop: threading.Event) -> None:
        while not stop.wait(self.config.heartbeat_seconds):
            try:
                reply = self.queue.heartbeat(lease, self.config.lease_seconds)
            except LeaseLost as exc:
                lost.set()
                control.request_stop(f"lease lost: {exc}", cause="lease_lost", grace=self.config.stop_grace)
                return
            except CioError as exc:  # the queue is briefly unreachable: the lease may still hold
                self.log.warning("heartbeat failed: %s", exc)
                continue
            if reply.cancel:
                control.request_stop("the job was killed by its owner", cause="cancelled", grace=self.config.stop_grace)

    def _report(self, lease, doc: TaskDocument, outcome: TaskOutcome, lost: bool) -> None:
        label = doc.label
        status = outcome.status
        try:
            if lost or (outcome.error is not None and outcome.error.code == "lease_lost"):
                self.summary.lost += 1
                status = "lost"
                self.log.warning("%s: lease lost; not reporting it", label)
            elif status == "done":
                self.queue.complete(lease, _download(doc, outcome))
                self.summary.done += 1
                self.log.info("%s done: %d outputs, log %s", label, len(outcome.outputs.files) if outcome.outputs else 0,
                              outcome.log_path)
            elif status == "stopped":
                # A notice spends the preempted budget; a plain shutdown ("released") spends none.
                # A cancelled task ends failed in the queue whatever the cause.
                code = outcome.error.code if outcome.error else "preempted"
                state = self.queue.release(
                    lease,
                    cause="released" if code == "released" else "preempted",
                    frames_done=str(outcome.frames_done | doc.task.frames_done_set),
                    download=_download(doc, outcome),
                    reason=outcome.reason,
                )
                self.summary.released += 1
                self.log.info("%s released (%s), frames delivered %s, now %s", label, outcome.reason,
                              outcome.frames_done or "none", state)
            else:
                state = self.queue.fail(lease, outcome.reason)
                self.summary.failed += 1
                self.log.error("%s failed: %s (log %s); now %s", label, outcome.reason, outcome.log_path, state)
        except LeaseLost:
            self.summary.lost += 1
            status = "lost"
            self.log.warning("%s: lease lost before the report; the queue has given it to another agent", label)
        self.summary.outcomes.append((doc.job.id, doc.task.id, status))


@dataclass
class _Current:
    """The task being run, and whether it has been reported (by the loop or the hard stop)."""

    lease: object
    doc: TaskDocument
    reported: bool = False
    guard: threading.Lock = field(default_factory=threading.Lock)


def _download(doc: TaskDocument, outcome: TaskOutcome) -> NewDownload | None:
    if outcome.outputs is None or not outcome.outputs.files:
        return None
    return NewDownload(
        output_dir=doc.job.output_path,
        files=tuple(DownloadFile(f.relative_path, f.md5, f.size, f.key) for f in outcome.outputs.files),
    )
