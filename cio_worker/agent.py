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
        self._lock = threading.Lock()
        self.summary = AgentSummary()

    # -- control from other threads (signals, notice watchers) ---------------------------------

    def shutdown(self, reason: str, grace: float | None = None, cause: str = "preempted") -> None:
        """Stop claiming; stop the current task (kill ladder within ``grace``) and release it."""
        with self._lock:
            self._stop_reason = self._stop_reason or reason
            control = self._control
        self._wake.set()
        if control is not None:
            control.request_stop(reason, cause=cause, grace=self.config.stop_grace if grace is None else grace)

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
        self.log.info("agent %s exiting: %s", self.config.worker_id, self.summary.exit_reason)
        return self.summary

    def _handle(self, lease) -> None:
        doc: TaskDocument = lease.document
        control = TaskControl()
        with self._lock:
            self._control = control
            pending_stop = self._stop_reason
        if pending_stop:
            control.request_stop(pending_stop, grace=self.config.stop_grace)
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
        self._report(lease, doc, outcome, lost.is_set())

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


def _download(doc: TaskDocument, outcome: TaskOutcome) -> NewDownload | None:
    if outcome.outputs is None or not outcome.outputs.files:
        return None
    return NewDownload(
        output_dir=doc.job.output_path,
        files=tuple(DownloadFile(f.relative_path, f.md5, f.size, f.key) for f in outcome.outputs.files),
    )
