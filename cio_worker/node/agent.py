"""The agent loop: claim -> execute -> report, with heartbeats, cancellation, notices and an idle exit.

At start the agent registers with the queue (``register_worker``, with its instance identity);
its heartbeats carry what it is doing (syncing, rendering with the render's percent, uploading,
draining) and it reports itself stopped when it exits. None of that ever stops the agent: a queue
error there is logged and the work goes on.

A queue that long-polls (the coordinator's ``HttpQueue``, whose ``claim`` takes ``wait``) is asked
to hold an idle agent's claim until work comes, for the ``long_poll_seconds`` the coordinator
gave; other queues are polled every ``poll_seconds``. The heartbeat interval and the lease length
follow what the coordinator said (``queue.settings``) over the agent's own configuration.

Every report goes through the durable outbox (``outbox.py``): written to disk before it is sent,
removed once answered, kept and sent again later (in the background, before each claim, at
start) while the queue is unavailable, always with the same operation id.

A task whose lease was lost is never reported by this agent: a heartbeat that says so, or no
successful heartbeat for a whole lease, stops the render and drops the result. Heartbeats that
fail for less than a lease (a coordinator restarting) leave the render alone. A killed job
(a heartbeat that says cancel) stops the render and fails the task. A stop (signal, preemption
notice) stops claiming, stops the render with a kill ladder fitted to the deadline, uploads the
frames already finished and releases the task with them; a hard stop releases it shortly before
the deadline whatever the drain is doing. Each drain is logged as one ``drain {json}`` line with
its wall times (notice, process tree gone, released), which benchmarks and tests read.

A task this node failed (``faults.py``: no renderer, a full disk) is released at no cost to it;
after ``node_fault_limit`` of them in a row (a success starts the count again) the agent stops
claiming and exits with ``summary.gave_up`` set (the CLI then runs the give-up command, status 69).
"""

from __future__ import annotations

import inspect
import json
import logging
import queue as queue_module
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

from cio_worker.job.document import TaskDocument
from cio_worker.errors import CioError, DocumentError, LeaseLost, QueueError
from cio_worker.job.prices import PriceTable, load_prices
from cio_worker.node.faults import node_fault
from cio_worker.node.execution import ExecutionContext, TaskControl, TaskOutcome, execute, stop_stale_renders
from cio_worker.node.figures import attempt_figures, stopped_figures
from cio_worker.node.logship import LogShipper, log_key, upload_log
from cio_worker.storage.base import object_url
from cio_worker.node.identity import InstanceIdentity, local_identity
from cio_worker.node.outbox import NextClaim, Outbox, Report, is_final
from cio_worker.queue import DownloadFile, Lease, NewDownload, Queue
from cio_worker.queue.base import WORKER_STATES, AttemptFigures, WorkerStatus

# What the agent registers with: an identity, its dict, or something that reads one when the agent starts.
IdentitySource = Union[InstanceIdentity, Mapping[str, Any], Callable[[], Any], None]
MAX_LONG_POLL = 300.0  # the coordinator's limit on a claim's wait


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
    # How long an idle claim waits on a queue that long-polls when it has not said (its
    # ``long_poll_seconds``); 0: poll every ``poll_seconds`` instead.
    long_poll_seconds: float = 20.0
    outbox_retry_seconds: float = 5.0  # how often waiting reports are sent again in the background
    # How long a report is retried in line before it is left to the outbox; None: while the lease
    # surely holds (lease minus one heartbeat).
    report_retry_seconds: float | None = None
    exit_report_seconds: float = 5.0  # the "stopped" report may hold the exit up this long at most
    # After this many node faults in a row (faults.py: no renderer, full disk...) the agent stops
    # claiming and gives up (``AgentSummary.gave_up``); 0: never.
    node_fault_limit: int = 3
    # Each attempt's cost: wall time x its instance type's hourly price in this table.
    prices: PriceTable = field(default_factory=load_prices)
    # How often a running task's new log lines go to the queue (``cio-worker logs --follow``); 0: only
    # the last ones, as the attempt ends.
    log_ship_seconds: float = 5.0
    # How long the upload of an ended attempt's log may hold its report up (a drain: what its deadline leaves).
    log_upload_seconds: float = 15.0


@dataclass
class AgentSummary:
    tasks: int = 0
    done: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0
    deferred: int = 0  # reports left in the outbox because the queue was unavailable
    redelivered: int = 0  # reports delivered from the outbox (this agent's or an earlier one's)
    dropped_reports: int = 0  # reports from the outbox the queue refused for good (lease lost)
    outcomes: list[tuple[str, str, str]] = field(default_factory=list)  # (job, task, status)
    drains: list["DrainRecord"] = field(default_factory=list)
    stale_killed: list[int] = field(default_factory=list)  # pids of renders a killed agent left
    node_faults: int = 0  # tasks given back because this node failed them (faults.py)
    gave_up: bool = False  # stopped after node_fault_limit node faults in a row
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
    by: str = "drain"  # drain | hard stop | completed | not reported (lease lost) | deferred (queue unavailable)
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


class ReportDeferred(Exception):
    """A report the queue could not take now: it waits in the outbox (``report``), see ``error``."""

    def __init__(self, report: Report, error: CioError) -> None:
        super().__init__(f"{report.describe()} deferred: {error}")
        self.report = report
        self.error = error


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
        identity: IdentitySource = None,
        outbox: Outbox | None = None,
        alive: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        # Called on every turn of the loop (and of a task's heartbeat loop): systemd's watchdog ping.
        self.alive = alive or (lambda: None)
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
        self.identity = identity  # resolved (read) when the agent starts
        self._info: dict[str, Any] | None = None
        # "is None", not "or": an empty Outbox is falsy.
        self.outbox = Outbox(ctx.work_root / "outbox", log=self.log) if outbox is None else outbox
        self._registered = False
        self._next_register = 0.0
        self._send_status = True
        self._long_polls = _accepts_wait(queue)
        self._claimer: _ClaimThread | None = None
        self._abandoned: list[_Pending] = []  # long-poll claims left behind by a stop
        self._next_lease: Lease | None = None  # the next task, claimed with the last completion
        self._node_faults_in_row = 0
        self._gave_up: str | None = None  # why the node gave up (node faults in a row)

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

    # -- what the coordinator said -------------------------------------------------------------

    def _setting(self, name: str, default: float) -> float:
        settings = getattr(self.queue, "settings", None)
        value = settings.get(name) if isinstance(settings, Mapping) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
        return default

    def _lease_seconds(self) -> float:
        return self._setting("lease_seconds", self.config.lease_seconds)

    def _heartbeat_seconds(self) -> float:
        return self._setting("heartbeat_seconds", self.config.heartbeat_seconds)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> AgentSummary:
        if self.config.reap_stale_renders:
            try:
                killed = stop_stale_renders(self.ctx.work_root, runner=self.ctx.runner)
            except Exception:  # noqa: BLE001 - never keep an agent from starting
                self.log.exception("looking for renders left by an earlier agent failed")
                killed = []
            if killed:
                self.summary.stale_killed = killed
                self.log.warning("killed %d render processes an earlier agent on %s left behind: %s",
                                 len(killed), self.ctx.work_root, killed)
        try:
            self.outbox.recover()
        except OSError as exc:
            self.log.warning("outbox %s: %s", self.outbox.directory, exc)
        self._register()
        self._flush_outbox("at start")
        sender_stop = threading.Event()
        sender = threading.Thread(target=self._send_outbox_in_background, args=(sender_stop,), name="outbox",
                                  daemon=True)
        sender.start()
        try:
            self._loop()
        finally:
            sender_stop.set()
            with self._lock:
                if self._hard_stop is not None:
                    self._hard_stop.cancel()
            sender.join(timeout=1.0)  # a delivery hung on the network is left behind
            for pending in self._abandoned:
                pending.done.wait(1.0)
            if self._claimer is not None:
                self._claimer.close()
            left = _count(self.outbox)
            if left:
                self.log.warning("%d reports wait in the outbox %s; they go when the queue answers "
                                 "(the next agent on this work dir sends them)", left, self.outbox.directory)
            self._report_stopped()
        self.log.info("agent %s exiting: %s", self.config.worker_id, self.summary.exit_reason)
        return self.summary

    def _loop(self) -> None:
        idle_since = self.clock()
        while True:
            self.alive()
            lease, self._next_lease = self._next_lease, None
            if lease is not None:  # the last completion brought the next task
                if self._gave_up or self._no_new_work:
                    self._release_untouched(lease, "claimed with a completion as the agent stopped taking work")
                else:  # (the outbox waits for the background sender: the lease runs already)
                    self._handle(lease)  # which gives it back untouched, should a stop have come
                    idle_since = self.clock()
                continue
            if self._stop_reason:
                self.summary.exit_reason = self._stop_reason
                break
            if self._gave_up:
                self.summary.gave_up, self.summary.exit_reason = True, self._gave_up
                break
            if self._no_new_work:
                self.summary.exit_reason = "stopped taking work after a notice"
                break
            if self.config.max_tasks is not None and self.summary.tasks >= self.config.max_tasks:
                self.summary.exit_reason = f"ran {self.summary.tasks} tasks"
                break
            if not self._flush_outbox("before a claim"):
                self._sleep(self.config.poll_seconds * 5)
                continue
            if not self._registered and self.clock() >= self._next_register:
                self._register()
            try:
                lease, waited = self._claim(idle_since)
            except QueueError as exc:
                lease, waited = None, True
                self.log.error("queue unavailable: %s; retrying in %.0f s", exc, self.config.poll_seconds * 5)
                self._sleep(self.config.poll_seconds * 5)
            if lease is None:
                # Idle is idle, with no work or no queue to ask: an instance whose coordinator has
                # gone still reaches its idle exit instead of billing on.
                idle = self.clock() - idle_since
                if self.config.idle_exit_seconds is not None and idle >= self.config.idle_exit_seconds:
                    self.summary.exit_reason = f"idle for {idle:.0f} s"
                    break
                if not waited:
                    self._sleep(self.config.poll_seconds)
                continue
            self._handle(lease)
            idle_since = self.clock()

    # -- registration and status ---------------------------------------------------------------

    def _identity_info(self) -> dict[str, Any]:
        if self._info is None:
            value: Any = self.identity
            try:
                if callable(value) and not isinstance(value, (InstanceIdentity, Mapping)):
                    value = value()
                if value is None:
                    value = local_identity()
                self._info = value.to_dict() if hasattr(value, "to_dict") else dict(value)
            except Exception:  # noqa: BLE001 - an identity is never worth a failed start
                self.log.exception("reading this instance's identity failed; registering with the machine's own")
                self._info = local_identity().to_dict()
        return self._info

    def _register(self) -> None:
        """Tell the queue who this worker is; a failure is logged and tried again before a later claim."""
        info = self._identity_info()
        try:
            self.queue.register_worker(self.config.worker_id, info)
        except Exception as exc:  # noqa: BLE001 - registering never stops the agent
            self._next_register = self.clock() + max(5.0, self.config.poll_seconds * 5)
            self.log.warning("registering worker %s failed: %s; working on, trying again later",
                             self.config.worker_id, _short(exc))
            return
        self._registered = True
        self.log.info("registered worker %s (%s %s %s)", self.config.worker_id, info.get("provider", "?"),
                      info.get("machine_type") or "", info.get("instance_id") or "")

    def _report_stopped(self) -> None:
        """The worker's last word; never holds the exit up for long."""
        timeout = self.config.exit_report_seconds
        with self._lock:
            deadline = self._deadline
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - self.clock() - 0.2))
        status = WorkerStatus("stopped", None, (self.summary.exit_reason or "stopped")[:500])
        _bounded(lambda: self.queue.worker_report(self.config.worker_id, status), timeout,
                 f"reporting worker {self.config.worker_id} stopped", self.log)

    def _status(self, doc: TaskDocument, control: TaskControl) -> WorkerStatus:
        phase, progress = control.phase()
        if progress is not None:
            progress = round(progress, 1)
        if control.stopping:
            return WorkerStatus("draining", progress, (control.reason or "stopping")[:500])
        if phase not in WORKER_STATES:
            phase = "rendering"
        return WorkerStatus(phase, progress, f"{doc.label} frames {doc.task.frames}"[:500])

    # -- claims --------------------------------------------------------------------------------

    def _claim_wait(self, idle_since: float) -> float:
        """Seconds the queue may hold this claim (0: a plain claim)."""
        if not self._long_polls:
            return 0.0
        wait = min(self._setting("long_poll_seconds", self.config.long_poll_seconds), MAX_LONG_POLL)
        if self.config.idle_exit_seconds is not None:  # the idle exit comes on time
            wait = min(wait, self.config.idle_exit_seconds - (self.clock() - idle_since))
        return max(0.0, wait)

    def _claim(self, idle_since: float) -> tuple[Lease | None, bool]:
        """(the lease or None, whether the claim waited on the queue)."""
        lease_seconds = self._lease_seconds()
        wait = self._claim_wait(idle_since)
        if wait <= 0:
            if self._long_polls:
                return self.queue.claim(self.config.worker_id, lease_seconds, wait=0.0), False  # type: ignore[call-arg]
            return self.queue.claim(self.config.worker_id, lease_seconds), False
        return self._long_poll(lease_seconds, wait), True

    def _long_poll(self, lease_seconds: float, wait: float) -> Lease | None:
        """A claim the queue holds until work comes, made on the claim thread (which keeps its
        connection between polls); a stop meanwhile leaves it behind, and a lease it brings after
        that is given back untouched."""
        if self._claimer is None:
            self._claimer = _ClaimThread()
        pending = self._claimer.submit(
            lambda: self.queue.claim(self.config.worker_id, lease_seconds, wait=wait))  # type: ignore[call-arg]
        while not pending.done.wait(0.1):
            self.alive()
            if self._stop_reason or self._no_new_work:
                why = self._stop_reason or "no new work"
                if pending.abandon(lambda lease: self._release_untouched(
                        lease, f"claimed as the agent was stopping ({why})")):
                    self._abandoned.append(pending)
                    return None
                break
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _next_claim(self, control: TaskControl) -> NextClaim | None:
        """Whether a completion should claim the next task with it: only when the loop would
        claim one right after (one request per task to a coordinator, not two)."""
        if self._stop_reason or self._gave_up or self._no_new_work or control.stopping or not self._registered:
            return None
        if self.config.max_tasks is not None and self.summary.tasks >= self.config.max_tasks:
            return None
        return NextClaim(self._lease_seconds())

    def _release_untouched(self, lease: Lease, reason: str) -> None:
        """Give a task back that never ran, at no cost to it (cause ``released``)."""
        doc: TaskDocument | None = getattr(lease, "document", None)
        label = doc.label if doc is not None else lease.label
        frames_done = doc.task.frames_done if doc is not None else ""
        report = Report.of("release", lease, cause="released", frames_done=frames_done, reason=reason)
        try:
            state = self._deliver(report)
            self.summary.released += 1
            self.log.info("%s claimed while stopping: released untouched, now %s", label, state)
            self.summary.outcomes.append((lease.job_id, lease.task_id, "released"))
        except ReportDeferred as deferred:
            self.summary.deferred += 1
            self.log.warning("%s claimed while stopping: its release waits in the outbox (%s)", label, deferred.error)
        except CioError as exc:
            self.log.warning("%s claimed while stopping and could not be released: %s", label, exc)

    # -- the outbox ----------------------------------------------------------------------------

    def _flush_outbox(self, when: str) -> bool:
        """Send the reports waiting in the outbox; False when the queue proved unavailable."""
        try:
            if not _count(self.outbox):
                return True
            result = self.outbox.flush(self.queue)
        except Exception:  # noqa: BLE001 - a bug here must not stop the agent's work
            self.log.exception("delivering the outbox %s failed", when)
            return True
        for report, _state in result.delivered:
            self.summary.redelivered += 1
            if report.kind == "complete":
                self.summary.done += 1
            elif report.kind == "fail":
                self.summary.failed += 1
            else:
                self.summary.released += 1
        self.summary.dropped_reports += len(result.dropped)
        if result.error is not None:
            self.log.warning("%d reports wait in the outbox (%s): %s", result.kept, when, _short(result.error))
            return False
        return True

    def _send_outbox_in_background(self, stop: threading.Event) -> None:
        while not stop.wait(max(0.05, self.config.outbox_retry_seconds)):
            self._flush_outbox("in the background")

    def _deliver(self, report: Report, control: TaskControl | None = None, next_claim: NextClaim | None = None) -> str:
        """Write ``report`` to the outbox, then send it, retrying in line while the queue is briefly
        unusable. Returns the task's state after it. LeaseLost (logged here with the op id) and
        refusals for good reach the caller with the report dropped; a queue that stays unavailable
        raises ReportDeferred with the report kept for later. ``next_claim``: see ``Report.send``."""
        # Marked as ours before its file appears: the background flush, which reads the files,
        # must never find it unmarked and send it a second time alongside this call.
        with self.outbox.sending(report.op_id):
            stored = True
            try:
                self.outbox.put(report)
            except OSError as exc:
                stored = False
                self.log.error("%s: cannot write the report to the outbox %s (%s); sending it without a copy",
                               report.label, self.outbox.directory, exc)
            try:
                return self._reporting(lambda: self.outbox.send(self.queue, report, next_claim), report.label, control)
            except LeaseLost as exc:
                self.log.warning("%s dropped: the lease is gone (%s); the task runs elsewhere", report.describe(), exc)
                raise
            except CioError as exc:
                if stored and not is_final(exc):
                    raise ReportDeferred(report, exc) from exc
                raise

    # -- one task ------------------------------------------------------------------------------

    def _handle(self, lease) -> None:
        doc: TaskDocument = lease.document
        control = TaskControl()
        current = _Current(lease, doc, self.clock())
        with self._lock:
            self._control = control
            self._current = current
            pending_stop = self._stop_reason
        if pending_stop:
            # The claim crossed a stop: nothing ran, so give the task back at no cost to it.
            with self._lock:
                self._control = self._current = None
            self.summary.tasks += 1
            self._release_untouched(lease, f"claimed as the agent was stopping ({pending_stop})")
            return
        lost = threading.Event()
        beat_stop = threading.Event()
        beater = threading.Thread(
            target=self._heartbeat, args=(lease, doc, control, lost, beat_stop), name="heartbeat", daemon=True
        )
        beater.start()
        shipper = LogShipper(self.queue, lease, lambda: control.log_path, interval=self.config.log_ship_seconds,
                             log=self.log).start()
        self.summary.tasks += 1
        self.log.info("claimed %s frames %s tile %s/%s attempt %s%s", doc.label, doc.task.frames,
                      doc.task.tile, doc.task.tiles, doc.task.attempt,
                      f" (frames {doc.task.frames_done} already delivered)" if doc.task.frames_done else "")
        figures: AttemptFigures | None = None
        try:
            outcome = execute(doc, self.ctx, control)
            # Heartbeats go on meanwhile: the lease holds while the log leaves the instance.
            figures = self._close_attempt(lease, doc, control, outcome, shipper, lost.is_set())
        finally:
            shipper.stop(final=False, timeout=1.0)
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
                self._report(lease, doc, outcome, lost.is_set(), control, figures)
        beater.join(timeout=max(5.0, self._heartbeat_seconds()))  # a hung heartbeat call is left behind
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
            figures = None
            try:
                figures = stopped_figures(doc, self.clock() - current.started, self.config.prices, self._identity_info(),
                                          drain_seconds=None if drain.stop_at is None else time.time() - drain.stop_at)
            except Exception:  # noqa: BLE001 - figures never cost the release
                self.log.exception("%s: measuring the hard-stopped attempt failed", doc.label)
            report = Report.of("release", current.lease,
                               cause="released" if self._stop_cause == "released" else "preempted",
                               frames_done=doc.task.frames_done,
                               reason="hard stop: the drain did not finish before the deadline", figures=figures)
            try:
                drain.state = self._deliver(report)
                drain.released_at = time.time()
                drain.frames_done = doc.task.frames_done
                self.summary.released += 1
                self.log.error("%s: hard stop before the deadline; released without this attempt's frames",
                               doc.label)
            except ReportDeferred as deferred:
                self.summary.deferred += 1
                drain.by = "hard stop, deferred (queue unavailable)"
                self.log.error("%s: hard stop could not release the task now (%s); the release waits in the outbox",
                               doc.label, deferred.error)
            except CioError as exc:
                self.log.error("%s: hard stop could not release the task: %s", doc.label, exc)
            current.drain = drain
            self.summary.drains.append(drain)

    def _heartbeat(self, lease, doc: TaskDocument, control: TaskControl, lost: threading.Event,
                   stop: threading.Event) -> None:
        """Extend the lease every heartbeat, with what the task is doing. A separate watch declares
        the lease lost when no heartbeat has succeeded for a whole lease (the queue may have given
        the task away); until then failing heartbeats (a coordinator restarting) change nothing."""
        expires = [self.clock() + self._lease_seconds()]
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
                                 lease.label, self._lease_seconds())
                control.request_stop("lease lost: no heartbeat got through for a whole lease", cause="lease_lost",
                                     grace=self.config.stop_grace)

        watcher = threading.Thread(target=watch, name="lease-watch", daemon=True)
        watcher.start()
        failing = 0
        try:
            while not stop.wait(self._heartbeat_seconds()):
                self.alive()  # the render may rightly take hours; a lost lease ends the pings
                if lost.is_set():
                    return  # presumed lost: a late renewal would only keep the task from running elsewhere
                asked = self.clock()
                lease_seconds = self._lease_seconds()
                try:
                    reply = self._beat(lease, lease_seconds, doc, control)
                except LeaseLost as exc:
                    lost.set()
                    control.request_stop(f"lease lost: {exc}", cause="lease_lost", grace=self.config.stop_grace)
                    return
                except CioError as exc:  # the queue is briefly unreachable: the lease may still hold
                    failing += 1
                    with guard:
                        left = expires[0] - self.clock()
                    self.log.warning("heartbeat failed (%d in a row; the lease holds %.1f s more): %s", failing,
                                     max(0.0, left), _short(exc))
                    continue
                if failing:
                    self.log.info("%s: heartbeats get through again after %d failures", lease.label, failing)
                    failing = 0
                with guard:
                    expires[0] = asked + lease_seconds
                if reply.cancel:
                    control.request_stop("the job was killed by its owner", cause="cancelled",
                                         grace=min(self.config.stop_grace, self.ctx.kill_grace))
        finally:
            stop.set()
            watcher.join()

    def _beat(self, lease, lease_seconds: float, doc: TaskDocument, control: TaskControl):
        """One heartbeat, with the worker's status while the queue takes it; a status the queue
        refuses is left out from then on (it must never cost the lease)."""
        if not self._send_status:
            return self.queue.heartbeat(lease, lease_seconds)
        status = self._status(doc, control)
        try:
            return self.queue.heartbeat(lease, lease_seconds, status=status)
        except DocumentError as exc:
            if not exc.field.startswith("status"):
                raise
            self._send_status = False
            self.log.warning("the queue refused the worker status (%s); heartbeats go on without it", exc)
            return self.queue.heartbeat(lease, lease_seconds)

    def _reporting(self, action: Callable[[], object], label: str, control: TaskControl | None = None):
        """Run a report (complete, fail, release), retrying while the queue is briefly unusable
        (e.g. locked past its busy timeout) for as long as the lease surely holds (or
        ``report_retry_seconds``), or until the report is due before a deadline. LeaseLost, and
        the last error, go to the caller."""
        if self.config.report_retry_seconds is not None:
            window = max(0.0, self.config.report_retry_seconds)
        else:
            window = max(1.0, self._lease_seconds() - self._heartbeat_seconds())
        limit = self.clock() + window
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
                if is_final(exc) or self.clock() + pause >= limit:
                    raise
                self.log.warning("%s: the queue refused the report (%s); retrying", label, exc)
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    def _count_node_fault(self, label: str, reason: str) -> None:
        """One more node fault in a row; at ``node_fault_limit`` the agent stops claiming and gives up."""
        self.summary.node_faults += 1
        self._node_faults_in_row += 1
        limit = self.config.node_fault_limit
        if limit and self._node_faults_in_row >= limit:
            self._gave_up = (f"gave up: {self._node_faults_in_row} node faults in a row, the last "
                             f"{label}: {_short(reason)}")
            self.log.error("%s; taking no more tasks", self._gave_up)

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

    def _close_attempt(self, lease: Lease, doc: TaskDocument, control: TaskControl, outcome: TaskOutcome,
                       shipper: LogShipper, lost: bool) -> AttemptFigures | None:
        """Ship the log's last lines, upload the whole log to the job's storage, and measure the
        attempt; never raises (the report goes on without what failed)."""
        try:
            window = self.config.log_upload_seconds
            if control.report_by is not None:  # a drain: the release comes first
                window = min(window, control.report_by - self.clock() - 1.0)
            shipper.stop(final=not lost, timeout=max(0.0, min(5.0, window / 2)))
            if lost or (outcome.error is not None and outcome.error.code == "lease_lost"):
                return None  # nobody will record this attempt
            location = self._upload_log(lease, doc, control, outcome, window)
            drain = None if control.requested_at is None else time.time() - control.requested_at
            return attempt_figures(doc, outcome, self.config.prices, self._identity_info(), log=location,
                                   drain_seconds=drain)
        except Exception:  # noqa: BLE001 - figures and logs never cost the report
            self.log.exception("%s: measuring the attempt or uploading its log failed", doc.label)
            return None

    def _upload_log(self, lease: Lease, doc: TaskDocument, control: TaskControl, outcome: TaskOutcome,
                    window: float) -> str:
        """The task log in the job's storage (a short one saying so when no render ran): its URL, or ""."""
        path = control.log_path or outcome.log_path
        if path is None or window <= 0:
            return ""
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"cio-worker: {doc.label} attempt {doc.task.attempt} on {self.config.worker_id}: "
                                f"no render ran\n{outcome.status}: {outcome.reason or 'nothing left to render'}\n",
                                encoding="utf-8")
        except OSError as exc:
            self.log.warning("%s: cannot write the task log %s: %s", doc.label, path, exc)
            return ""
        key = log_key(doc.job.id, doc.task.id, doc.task.attempt, lease.token)
        if not upload_log(lambda: self.ctx.open_storage(doc.job.storage), key, path, window, self.log):
            return ""
        return object_url(doc.job.storage, key)

    def _report(self, lease, doc: TaskDocument, outcome: TaskOutcome, lost: bool, control: TaskControl,
                figures: AttemptFigures | None = None) -> None:
        label = doc.label
        status = outcome.status
        where = f" (log: {figures.log})" if figures is not None and figures.log else ""
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
                self._node_faults_in_row = 0
                next_claim = self._next_claim(control)
                self._deliver(Report.of("complete", lease, download=_download(doc, outcome), figures=figures),
                              control, next_claim)
                self.summary.done += 1
                if next_claim is not None and next_claim.lease is not None:
                    self._next_lease = next_claim.lease
                if drain is not None:  # finished (and uploaded) inside the notice
                    drain.by, drain.state, drain.released_at = "completed", "done", time.time()
                    drain.frames_done = doc.task.frames
                    drain.files = len(outcome.outputs.files) if outcome.outputs else 0
                self.log.info("%s done: %d outputs, log %s", label, len(outcome.outputs.files) if outcome.outputs else 0,
                              outcome.log_path)
            elif status == "stopped" and outcome.error is not None and outcome.error.code == "cancelled":
                state = self._deliver(Report.of("fail", lease, reason=outcome.reason + where, figures=figures),
                                      control)
                self.summary.failed += 1
                if drain is not None:
                    drain.released_at, drain.state = time.time(), state
                self.log.warning("%s stopped: %s; now %s", label, outcome.reason, state)
            elif status == "stopped":
                # A notice spends the preempted budget; a plain shutdown ("released") spends none.
                code = outcome.error.code if outcome.error else "preempted"
                frames = str(outcome.frames_done | doc.task.frames_done_set)
                download = _download(doc, outcome)
                state = self._deliver(Report.of(
                    "release", lease,
                    cause="released" if code == "released" else "preempted",
                    frames_done=frames,
                    download=download,
                    reason=outcome.reason,
                    figures=figures,
                ), control)
                self.summary.released += 1
                if drain is not None:
                    drain.released_at, drain.state = time.time(), state
                    drain.frames_done, drain.files = frames, len(download.files) if download else 0
                self.log.info("%s released (%s), frames delivered %s, now %s", label, outcome.reason,
                              outcome.frames_done or "none", state)
            elif node_fault(outcome.error, doc.task.command):
                status = "node fault"
                self._count_node_fault(label, outcome.reason)
                state = self._deliver(Report.of(
                    "release", lease, cause="released", frames_done=doc.task.frames_done,
                    reason=f"this node's fault, not the task's: {outcome.reason}{where}", figures=figures), control)
                self.summary.released += 1
                self.log.error("%s: this node failed it (%s; log %s); released at no cost to the task, now %s",
                               label, outcome.reason, outcome.log_path, state)
            else:
                state = self._deliver(Report.of("fail", lease, reason=outcome.reason + where, figures=figures),
                                      control)
                self.summary.failed += 1
                self.log.error("%s failed: %s (log %s); now %s", label, outcome.reason, outcome.log_path, state)
        except LeaseLost:  # logged by _deliver, with the op id
            self.summary.lost += 1
            status = "lost"
            if drain is not None:
                drain.by = "not reported (lease lost)"
        except ReportDeferred as deferred:
            self.summary.deferred += 1
            status = "deferred"
            if drain is not None:
                drain.by = "deferred (queue unavailable)"
            self.log.error("%s: could not report %s now: %s; the report waits in the outbox (op id %s) and goes "
                           "when the queue answers", label, outcome.status, _short(deferred.error),
                           deferred.report.op_id)
        except CioError as exc:  # refused for good, or unavailable with no outbox copy
            self.summary.lost += 1
            status = "unreported"
            if drain is not None:
                drain.by = "not reported"
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
    started: float  # the agent's clock when the task was claimed
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


def _accepts_wait(queue: Queue) -> bool:
    """Whether ``queue.claim`` long-polls (takes ``wait``)."""
    try:
        return "wait" in inspect.signature(queue.claim).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def _count(outbox: Outbox) -> int:
    try:
        return len(outbox)
    except OSError:
        return 0


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _bounded(action: Callable[[], object], timeout: float, what: str, log: logging.Logger) -> None:
    """Run ``action`` on a thread, waiting ``timeout`` seconds at most; failures are logged."""
    done = threading.Event()

    def call() -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - a status report never stops the agent
            log.warning("%s failed: %s", what, _short(exc))
        finally:
            done.set()

    thread = threading.Thread(target=call, name="report", daemon=True)
    thread.start()
    if not done.wait(max(0.0, timeout)):
        log.warning("%s: no answer within %.1f s; going on", what, timeout)


class _Pending:
    """One call on the claim thread: its result or error, once ``done``."""

    def __init__(self, action: Callable[[], Any]) -> None:
        self.action = action
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._guard = threading.Lock()
        self._on_late: Callable[[Any], None] | None = None

    def run(self) -> None:
        result = error = None
        try:
            result = self.action()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            error = exc
        with self._guard:
            self.result, self.error = result, error
            self.done.set()
            late = self._on_late
        if late is not None and result is not None:
            try:
                late(result)
            except Exception:  # noqa: BLE001 - on the claim thread: nobody else would see it
                logging.getLogger("cio_worker.node.agent").exception("giving back a late claim failed")

    def abandon(self, on_late: Callable[[Any], None]) -> bool:
        """Nobody waits any more: a result that comes later goes to ``on_late``. False when the
        result is already there (the caller takes it)."""
        with self._guard:
            if self.done.is_set():
                return False
            self._on_late = on_late
            return True


class _ClaimThread:
    """One daemon thread for long-poll claims, so a stop never waits for a poll to end and the
    queue's connection (per thread) is kept between polls."""

    def __init__(self) -> None:
        self._jobs: "queue_module.SimpleQueue[_Pending | None]" = queue_module.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="claim", daemon=True)
        self._thread.start()

    def submit(self, action: Callable[[], Any]) -> _Pending:
        pending = _Pending(action)
        self._jobs.put(pending)
        return pending

    def _run(self) -> None:
        while (pending := self._jobs.get()) is not None:
            pending.run()

    def close(self) -> None:
        self._jobs.put(None)
