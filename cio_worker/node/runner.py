"""Runs a task's command as a process tree, logs it, measures it, and stops it completely.

The command runs in its own session and process group (a string through ``/bin/sh -c``, a
sequence exec'd directly), stdin from /dev/null, stdout and stderr merged into the task log:
a header (start time, host, cwd, command, environment with secrets masked), the output as it
comes (secret values masked, capped in size), and a footer (exit status or signal, wall and CPU
time, peak RSS of the whole tree, timeout or stop reason, bytes dropped, leftover processes).

The tree is every process of the command's cgroup (``containment.py``: one per task where the
machine allows it), its session or process group, every descendant ever seen by psutil sampling,
and every orphan reparented to the agent (a child subreaper) that carries the run's environment
marker. With a cgroup nothing escapes (a double fork out of the session with a cleared environment
stays in the group); without one, a process that is born, escapes, clears its environment and
loses its parent between two samples cannot be seen (the header and footer say which is in use).
Orphans reparented to the agent are reaped by the supervisor, only when they belong to the run.

Stopping is a ladder: SIGTERM to the group and every known member, a grace, SIGKILL to the group
and every member still alive (rescanning for new ones), then verification that none is left.
When the direct child exits on its own, members still alive ("strays", e.g. a ``cmd &`` that
keeps writing to the log) are stopped with the same ladder: nothing of a task outlives it.

Threads per running process: a waiter (reaps the direct child with ``os.wait4``), a reader
(spool to log and ``on_line``) and a supervisor (sampling, timeout, ladder, reaping, footer). All
end before the result is published.

The reader never makes the command wait: the command's stdout and stderr are a write-only,
append-only descriptor of an unnamed spool file (``spool.py``), not a pipe, so it writes at the
speed of a plain file however far behind the reader is. The reader tails the spool (polling, from
5 to 100 ms when idle) in 1 MiB chunks into one buffer, scans each once for secrets and for the
lines a ``LineFilter`` selects (``logscan.py``: Hyperscan, in C, without the GIL), writes the whole
chunk to the log (a masked copy only when it holds a secret), decodes and hands to ``on_line``
only the selected lines (every line without a filter), and frees the spool behind it. Past the cap
it stops storing and keeps scanning. Nothing unmasked has a name on disk: the spool has none.
When the command gets more than ``spool_lag_bytes`` ahead (a disk-filling flood), the reader skips
to the newest output and counts what it skipped as dropped (never stored, never scanned). Once
the tree is gone the reader finishes what is left, then the footer is written.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import psutil

from cio_worker.job.environment import masked
from cio_worker.errors import RenderError
from cio_worker.node.containment import Containment, TaskGroup, detect
from cio_worker.node.logscan import LineFilter, OutputScanner, SecretMasker
from cio_worker.node.scandb import Engine
from cio_worker.node.render_user import RenderUser, current_user
from cio_worker.node.spool import OutputSpool

log = logging.getLogger(__name__)

MiB = 1024 * 1024
SHELL = "/bin/sh"
_MAX_LINE = 1 * MiB  # a longer run of bytes without a newline is written as several lines
_TAIL_WAIT = (0.005, 0.1)  # the reader's pause when it has caught up: first, and at most (doubling)
_READ_CHUNK = 1 * MiB
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
_RELEASE_EVERY = 16 * MiB  # read spool bytes between two hole punches
_LAG_CHECK_EVERY = 64 * MiB  # read bytes between two checks of how far the command is ahead
RUN_MARK_ENV = "CIO_RUN_MARK"  # finds the run's orphans reparented to the agent (no cgroup)
# Holds the command until its pid is in its cgroup: nothing it forks can start outside.
_GATE = ("/bin/sh", "-c", 'read -r go || exit 125; exec "$@" </dev/null', "cio-gate")


# ---------------------------------------------------------------- spec and result


@dataclass(frozen=True)
class RunSpec:
    """What to run and how. A ``str`` command runs through ``/bin/sh -c``; a sequence is exec'd."""

    command: str | Sequence[str]
    cwd: Path
    env: Mapping[str, str]
    log_path: Path
    timeout: float | None = None
    log_cap_bytes: int = 64 * MiB  # output bytes written to the log; header and footer excluded
    kill_grace: float = 10.0  # used by the timeout and for strays; stop() takes its own
    secret_names: tuple[str, ...] = ()  # besides anything environment.is_secret_name matches
    header: Mapping[str, str] = field(default_factory=dict)
    sample_interval: float = 0.2
    owner: str = ""  # whose task (the agent's work root): a restarted agent finds its leftovers by it

    def __post_init__(self) -> None:
        def bad(problem: str) -> RenderError:
            return RenderError(f"run spec: {problem}", code="bad_run_spec")

        if isinstance(self.command, str):
            if not self.command.strip():
                raise bad("the command is empty; give the shell command line to run")
        else:
            argv = tuple(self.command)
            if not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
                raise bad("the command must be a non-empty string or a non-empty sequence of strings")
            object.__setattr__(self, "command", argv)
        object.__setattr__(self, "cwd", Path(self.cwd))
        object.__setattr__(self, "log_path", Path(self.log_path))
        env = dict(self.env)
        for name, value in env.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise bad(f"environment entry {name!r} must map a string to a string")
            if not name or "=" in name or "\0" in name or "\0" in value:
                raise bad(f"environment variable name {name!r} (or its value) cannot be passed to a process")
        object.__setattr__(self, "env", env)
        if self.timeout is not None and not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise bad(f"timeout must be a positive number of seconds or None, not {self.timeout!r}")
        if not isinstance(self.log_cap_bytes, int) or self.log_cap_bytes < 0:
            raise bad(f"log_cap_bytes must be an integer >= 0, not {self.log_cap_bytes!r}")
        _check_grace(self.kill_grace, "kill_grace")
        if not (self.sample_interval > 0 and math.isfinite(self.sample_interval)):
            raise bad(f"sample_interval must be a positive number of seconds, not {self.sample_interval!r}")
        object.__setattr__(self, "secret_names", tuple(self.secret_names))
        object.__setattr__(self, "header", {str(k): str(v) for k, v in dict(self.header).items()})

    @property
    def command_line(self) -> str:
        return self.command if isinstance(self.command, str) else shlex.join(self.command)

    @property
    def argv(self) -> list[str]:
        return [SHELL, "-c", self.command] if isinstance(self.command, str) else list(self.command)


@dataclass
class RunResult:
    """How it ended. ``exit_code`` is what the direct child returned (a shell's 143 stays 143);
    ``signal`` is set only when the direct child itself was killed by a signal.

    CPU times are the direct child's ``wait4`` rusage (itself plus every descendant that was
    waited for inside the tree) plus the last sampled times of descendants that were orphaned or
    escaped and so never waited for inside the tree (slightly low: time after their last sample
    is lost). ``peak_rss_bytes`` is the highest sum of RSS over the tree at one sample (shared
    pages count once per process); a process living less than a sample interval may be missed.
    rusage ``maxrss`` is not used: after a fork it includes the parent's (the agent's) memory.
    """

    exit_code: int | None
    signal: int | None
    wall_seconds: float
    cpu_user: float
    cpu_system: float
    peak_rss_bytes: int
    timed_out: bool = False
    stopped: str | None = None
    log_bytes_dropped: int = 0
    leftover_pids: list[int] = field(default_factory=list)
    stray_pids: list[int] = field(default_factory=list)  # outlived a normal exit; stopped by the runner

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.stopped is None and not self.timed_out

    def describe_exit(self) -> str:
        if self.exit_code is not None:
            return f"exit code {self.exit_code}"
        if self.signal is not None:
            return f"killed by signal {self.signal} ({_signal_name(self.signal)})"
        return "unknown (the process could not be reaped)"


@dataclass(frozen=True)
class TreeUsage:
    """The latest sample of a running tree."""

    pids: tuple[int, ...]
    rss_bytes: int
    peak_rss_bytes: int


def _check_grace(grace: float, what: str) -> None:
    if not isinstance(grace, (int, float)) or not (grace >= 0 and math.isfinite(grace)):
        raise RenderError(f"{what} must be a number of seconds >= 0, not {grace!r}", code="bad_run_spec")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ---------------------------------------------------------------- secrets


# ---------------------------------------------------------------- the log


class TaskLog:
    """The per-task log file: header, capped output, footer; written straight to the file (no
    buffer to flush), output as the pieces the masking left (one ``writev``, no copy)."""

    def __init__(self, path: Path, cap_bytes: int, masker: SecretMasker) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise RenderError(
                f"cannot open the task log {path}: {exc.strerror or exc}; check the log directory exists and is writable",
                code="bad_log_path",
            ) from exc
        self.path = path
        self._cap = cap_bytes
        self._mask = masker
        self.written = 0
        self.dropped = 0
        self.skipped = 0  # part of dropped: never read (the command outran the reader)
        self._full = False
        self._broken = False

    def section(self, title: str, lines: Iterable[str]) -> None:
        text = f"==== cio_worker: {title} ====\n" + "".join(f"{self._mask(_one_line(l))}\n" for l in lines)
        _write_all(self._fd, [text.encode("utf-8", "surrogateescape")])

    def output(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Whole lines of (masked) output, as consecutive pieces; past the cap, whole lines are
        dropped and counted."""
        size = sum(map(len, pieces))
        if self._full or self._broken:
            self.dropped += size
            return
        room = self._cap - self.written
        if size <= room:
            if self._write(pieces):
                self.written += size
            else:
                self.dropped += size
            return
        data = b"".join(pieces)  # once per task: where the cap falls
        keep = data.rfind(b"\n", 0, room) + 1
        if keep and self._write([memoryview(data)[:keep]]):
            self.written += keep
        elif keep:
            self.dropped += size
            return
        self._full = True
        self._write([f"[cio_worker] log cap of {self._cap} bytes reached: further output is dropped "
                     "(the footer says how much)\n".encode()])
        self.dropped += size - keep

    def skip(self, size: int) -> None:
        """``size`` bytes of output the reader jumped over: counted, noted once, never stored."""
        if not self.skipped and not self._full:
            self._write(["[cio_worker] the command is writing faster than the agent reads: unread output is "
                         "skipped (the footer says how much)\n".encode()])
        self.skipped += size
        self.dropped += size

    def _write(self, pieces: Sequence[bytes | memoryview]) -> bool:
        # A full disk must not stop the reader: on_line still needs the lines, the spool its release.
        if self._broken:
            return False
        try:
            _write_all(self._fd, pieces)
            return True
        except OSError:
            self._broken = True
            log.exception("writing the task log %s failed; further output is dropped", self.path)
            return False

    def close(self) -> None:
        os.close(self._fd)


def _write_all(fd: int, pieces: Sequence[bytes | memoryview]) -> None:
    """Write every byte of ``pieces`` (one ``writev`` unless the kernel takes less)."""
    size = sum(map(len, pieces))
    done = os.writev(fd, pieces) if len(pieces) <= _IOV_MAX else 0
    if done < size:
        rest = memoryview(b"".join(pieces))[done:]
        while rest:
            rest = rest[os.write(fd, rest):]


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------- the process tree


@dataclass
class _Sample:
    cpu_user: float
    cpu_system: float
    orphan: bool  # its parent was not in the tree: its times never reach the root's rusage


class ProcessTree:
    """The live members of one command's tree, found by cgroup, session, process group, ancestry
    and (for orphans reparented to the agent) the run's environment marker.

    Used by one thread (the supervisor); ``usage`` is a snapshot safe to read from any thread.
    """

    def __init__(self, root: psutil.Process, group: TaskGroup | None = None, mark: str | None = None) -> None:
        self.root = root
        self.group = group
        self._mark = mark
        self._me = os.getpid()
        self.members: dict[int, psutil.Process] = {root.pid: root}
        self.ever: set[int] = {root.pid}
        self._not_ours: set[int] = set()
        self._samples: dict[int, _Sample] = {}
        self.root_reaped = False
        try:  # a command that ends before the first full sample still gets a peak
            rss = root.memory_info().rss
        except psutil.Error:
            rss = 0
        self.usage = TreeUsage((root.pid,), rss, rss)

    def scan(self) -> None:
        """Drop members that are gone and adopt new processes that belong to the tree."""
        current = set(psutil.pids())
        self.members = {pid: p for pid, p in self.members.items() if pid in current}
        sid = self.root.pid
        if self.root_reaped:
            self.members.pop(sid, None)
        self._not_ours &= current
        # Once the root is reaped its pid may be reused; a live process with that pid means the
        # number no longer names our session (while any member lives, the kernel keeps it ours).
        match_session = not (self.root_reaped and sid in current)
        in_group = set(self.group.pids()) if self.group is not None else set()
        parents: dict[int, tuple[psutil.Process, int]] = {}
        for pid in current - self.members.keys() - self._not_ours:
            try:
                proc = psutil.Process(pid)
                ppid = proc.ppid()
                if pid in in_group or (match_session and (os.getsid(pid) == sid or os.getpgid(pid) == sid)):
                    self._adopt(proc)
                    continue
                if ppid == self._me and pid != sid and self._marked(proc):
                    self._adopt(proc)  # an orphan of ours, reparented to the agent
                    continue
            except (psutil.Error, OSError):
                continue
            parents[pid] = (proc, ppid)
        adopted = True
        while adopted:
            adopted = False
            for pid, (proc, ppid) in list(parents.items()):
                if ppid in self.members:
                    self._adopt(proc)
                    del parents[pid]
                    adopted = True
        self._not_ours.update(parents)

    def _adopt(self, proc: psutil.Process) -> None:
        self.members[proc.pid] = proc
        self.ever.add(proc.pid)

    def _marked(self, proc: psutil.Process) -> bool:
        try:
            return self._mark is not None and proc.environ().get(RUN_MARK_ENV) == self._mark
        except (psutil.Error, OSError):
            return False

    def reap(self) -> list[int]:
        """Collect the zombies of this tree that were reparented to the agent (a subreaper), and
        keep their final CPU times. Never waits for a process that is not the tree's: another
        part of the agent may be waiting for its own children."""
        reaped = []
        for pid, proc in list(self.members.items()):
            if pid == self.root.pid:
                continue  # the waiter's
            try:
                if proc.ppid() != self._me or proc.status() != psutil.STATUS_ZOMBIE or not proc.is_running():
                    continue
            except psutil.Error:
                continue
            if self._wait(pid):
                reaped.append(pid)
        if self.group is not None and self.group.hierarchy.version == 2:
            # A member that died unseen: v2 still names its cgroup while it is a zombie.
            for proc in psutil.Process(self._me).children():
                if proc.pid != self.root.pid and proc.pid not in self.members and self._zombie_of_group(proc.pid):
                    if self._wait(proc.pid):
                        reaped.append(proc.pid)
        return reaped

    def _wait(self, pid: int) -> bool:
        try:
            got, _, rusage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            return False
        if got != pid:
            return False
        self._samples[pid] = _Sample(rusage.ru_utime, rusage.ru_stime, orphan=True)
        self.members.pop(pid, None)
        return True

    def _zombie_of_group(self, pid: int) -> bool:
        assert self.group is not None
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return False
            with open(f"/proc/{pid}/cgroup") as f:
                line = next((l for l in f if l.startswith("0::")), "")
        except (OSError, IndexError):
            return False
        return line.strip().endswith("/" + self.group.path.name)

    def sample(self) -> None:
        self.scan()
        total = 0
        for pid, proc in list(self.members.items()):
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                    ppid = proc.ppid()
            except (psutil.Error, OSError):
                continue
            total += rss
            self._samples[pid] = _Sample(
                times.user + times.children_user,
                times.system + times.children_system,
                orphan=pid != self.root.pid and ppid not in self.members,
            )
        peak = max(self.usage.peak_rss_bytes, total)
        self.usage = TreeUsage(tuple(sorted(self.members)), total, peak)

    def unwaited_cpu(self) -> tuple[float, float]:
        """CPU of members whose time cannot be in the root's rusage (orphaned or escaped)."""
        user = sum(s.cpu_user for s in self._samples.values() if s.orphan)
        system = sum(s.cpu_system for s in self._samples.values() if s.orphan)
        return user, system

    def alive(self) -> list[psutil.Process]:
        """Members still running; zombies are dead (they hold no resources, only a pid)."""
        alive = []
        for proc in self.members.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        return alive


def _signal_each(procs: Iterable[psutil.Process], sig: int) -> list[int]:
    sent = []
    for proc in procs:
        try:
            proc.send_signal(sig)  # checks the pid was not reused
            sent.append(proc.pid)
        except psutil.Error:
            continue
    return sent


# ---------------------------------------------------------------- running


class RunningProcess:
    """A started command. ``wait``, ``stop`` and ``request_stop`` are safe from any thread."""

    def __init__(
        self,
        spec: RunSpec,
        popen: subprocess.Popen[bytes],
        task_log: TaskLog,
        masker: SecretMasker,
        on_line: Callable[[str], None] | None,
        *,
        clock: Callable[[], float],
        started: float,
        wall_clock: Callable[[], datetime],
        verify_timeout: float,
        spool: OutputSpool,
        spool_lag_bytes: int,
        scanner: OutputScanner,
        line_filter: LineFilter | None = None,
        group: TaskGroup | None = None,
        mark: str | None = None,
        containment: str = "",
    ) -> None:
        self.spec = spec
        self.pid = popen.pid
        self._popen = popen
        self._log = task_log
        self._mask = masker
        self._on_line = on_line
        self._line_filter = line_filter
        self._scanner = scanner
        self._group = group
        self._containment = containment
        self._clock = clock
        self._started = started
        self._wall_clock = wall_clock
        self._verify_timeout = verify_timeout
        self._spool = spool
        self._spool_lag_bytes = spool_lag_bytes
        self._tree = ProcessTree(psutil.Process(popen.pid), group, mark)  # not yet reaped: the pid is ours

        self._cond = threading.Condition(threading.RLock())  # re-entrant: stop() may run in a signal handler
        self._wake = False
        self._reaped = False
        self._wait_status: int | None = None
        self._rusage: resource.struct_rusage | None = None
        self._ended: float | None = None
        self._stop_reason: str | None = None
        self._timed_out = False
        self._term_requested = False
        self._term_round_pending = False
        self._kill_deadline: float | None = None
        self._termed: set[int] = set()
        self._group_termed = False
        self._stray_pids: list[int] = []
        self._tree_gone = threading.Event()  # set once no member can write more output
        self._on_line_failed = False

        self._result: RunResult | None = None
        self._done = threading.Event()
        name = f"cio-runner-{self.pid}"
        self._waiter = threading.Thread(target=self._wait_child, name=f"{name}-wait", daemon=True)
        self._reader = threading.Thread(target=self._read_output, name=f"{name}-read", daemon=True)
        self._supervisor = threading.Thread(target=self._supervise, name=f"{name}-supervise", daemon=True)
        for thread in (self._waiter, self._reader, self._supervisor):
            thread.start()

    # ---- public

    def is_running(self) -> bool:
        """True until the whole tree is gone and the result is ready."""
        return not self._done.is_set()

    def usage(self) -> TreeUsage:
        return self._tree.usage

    def tree_pids(self) -> tuple[int, ...]:
        return self._tree.usage.pids

    def wait(self, timeout: float | None = None) -> RunResult:
        """The result; raises TimeoutError if it is not ready within ``timeout`` seconds."""
        self._refuse_from_own_threads("wait")
        if not self._done.wait(timeout):
            raise TimeoutError(f"process {self.pid} still running after {timeout} s")
        self._supervisor.join()
        assert self._result is not None
        return self._result

    def request_stop(self, grace: float, reason: str) -> None:
        """Start the kill ladder and return at once. A later call may shorten the grace."""
        _check_grace(grace, "grace")
        if not isinstance(reason, str) or not reason.strip():
            raise RenderError("a stop needs a reason (e.g. 'preempted'), for the log and the result", code="bad_run_spec")
        with self._cond:
            self._request_stop_locked(grace, reason, timed_out=False)

    def stop(self, grace: float, reason: str) -> RunResult:
        """Kill ladder: SIGTERM, up to ``grace`` seconds, SIGKILL, verify; then the result.

        If the process already ended on its own, returns that result (``stopped`` stays None).
        """
        self._refuse_from_own_threads("stop")
        self.request_stop(grace, reason)
        return self.wait()

    # ---- stop requests

    def _request_stop_locked(self, grace: float, reason: str | None, *, timed_out: bool) -> None:
        if self._done.is_set():
            return
        deadline = self._clock() + grace
        if self._kill_deadline is None or deadline < self._kill_deadline:
            self._kill_deadline = deadline
        if reason is not None and self._stop_reason is None and not self._reaped:
            self._stop_reason, self._timed_out = reason, timed_out
        if not self._term_requested:
            self._term_requested = True
            self._term_round_pending = True
            self._signal_group_locked(signal.SIGTERM)
        self._notify_locked()

    def _signal_group_locked(self, sig: int) -> None:
        # Only while the leader is unreaped is the group id certainly ours.
        if self._reaped:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        self._termed.add(self.pid)
        self._group_termed = self._group_termed or sig == signal.SIGTERM

    def _notify_locked(self) -> None:
        self._wake = True
        self._cond.notify_all()

    def _refuse_from_own_threads(self, what: str) -> None:
        if threading.current_thread() in (self._reader, self._supervisor, self._waiter):
            raise RenderError(
                f"{what}() cannot be called from on_line (it would wait for itself); use request_stop()",
                code="runner_misuse",
            )

    # ---- threads

    def _wait_child(self) -> None:
        status, rusage = None, None
        try:
            # Wait without reaping, then reap under the lock: killpg never races a reused pid.
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
            with self._cond:
                _, status, rusage = os.wait4(self.pid, 0)
        except ChildProcessError:
            log.warning("process %s was reaped by someone else; its exit status is unknown", self.pid)
        with self._cond:
            self._popen.returncode = os.waitstatus_to_exitcode(status) if status is not None else -1
            self._wait_status, self._rusage = status, rusage
            self._reaped = True
            self._ended = self._clock()
            self._notify_locked()

    def _read_output(self) -> None:
        spool = self._spool
        # Reads land after the unfinished last line of the previous read; only whole lines go on.
        buf = bytearray(_MAX_LINE + _READ_CHUNK)
        have = 0
        offset = 0  # spool bytes read
        resync = False  # after a skip into a line: its rest is dropped too
        check_every = max(_READ_CHUNK, min(_LAG_CHECK_EVERY, self._spool_lag_bytes // 4))
        next_check = next_release = 0
        stop_at: int | None = None  # the spool's size once the tree is gone: a leftover cannot keep us
        pause = _TAIL_WAIT[0]
        try:
            with memoryview(buf) as view:
                while True:
                    if stop_at is None and self._tree_gone.is_set():
                        stop_at = spool.size()
                    if stop_at is not None and offset >= stop_at:
                        break
                    with view[have:have + _READ_CHUNK] as room:
                        n = spool.read_into(room, offset)
                    if not n:
                        if stop_at is not None:
                            break
                        offset = min(offset, spool.size())  # the command truncated its own output
                        self._tree_gone.wait(pause)
                        pause = min(2 * pause, _TAIL_WAIT[1])
                        continue
                    pause = _TAIL_WAIT[0]
                    offset += n
                    end = have + n
                    if resync:
                        newline = buf.find(b"\n", 0, end)
                        drop = end if newline < 0 else newline + 1
                        self._log.skip(drop)
                        resync = newline < 0
                        end -= drop
                        buf[:end] = bytes(view[drop:drop + end])
                    cut = buf.rfind(b"\n", have, end) + 1
                    if cut:
                        self._lines(buf, cut)
                    while end - cut >= _MAX_LINE:  # a line too long to hold: it goes on in pieces
                        self._lines(bytes(view[cut:cut + _MAX_LINE]) + b"\n")
                        cut += _MAX_LINE
                    have = end - cut
                    if have and cut:
                        buf[:have] = bytes(view[cut:end])  # a copy: the regions may overlap
                    if offset >= next_check:
                        next_check = offset + check_every
                        ahead = spool.size() - offset
                        if ahead > self._spool_lag_bytes:
                            self._log.skip(ahead + have)
                            offset += ahead
                            resync = spool.read_into(view[:1], offset - 1) == 1 and buf[0] != ord("\n")
                            have = 0
                    if offset >= next_release:
                        next_release = offset + _RELEASE_EVERY
                        spool.release(offset)
                if have:
                    self._lines(bytes(view[:have]) + b"\n")
        except Exception:
            log.exception("reading the output of process %s failed", self.pid)

    def _lines(self, data: bytes | bytearray, end: int | None = None) -> None:
        """``data[:end]``, whole lines of output each ending in a newline: mask, log, hand to ``on_line``."""
        end = len(data) if end is None else end
        found = self._scanner.scan(data, end)
        with memoryview(data) as view, view[:end] as block:
            shown = self._scanner.pieces(view, found.secrets, 0, end) if found.secrets else [block]
            self._log.output(shown)
            if self._on_line is None:
                return
            if self._line_filter is None:
                texts = [line.decode("utf-8", "replace").rstrip("\r") for line in b"".join(shown).split(b"\n")[:-1]]
            else:
                texts = self._scanner.line_texts(view, found)
        for text in texts:
            try:
                self._on_line(text)
            except Exception:
                if not self._on_line_failed:
                    self._on_line_failed = True
                    log.exception("on_line failed for process %s (later failures are not logged)", self.pid)

    def _supervise(self) -> None:
        try:
            self._ladder_loop()
        except Exception:
            log.exception("supervising process %s failed; killing its group", self.pid)
            with self._cond:
                self._signal_group_locked(signal.SIGKILL)
        finally:
            self._finish()

    def _ladder_loop(self) -> None:
        spec, tree = self.spec, self._tree
        timeout_at = self._started + spec.timeout if spec.timeout is not None else None
        kill_sent_at: float | None = None
        while True:
            with self._cond:
                # Only a scan that starts after the reap can prove that nothing is left.
                reaped = tree.root_reaped = self._reaped
            tree.sample()
            tree.reap()
            next_sample = self._clock() + spec.sample_interval
            with self._cond:
                now = self._clock()
                if timeout_at is not None and now >= timeout_at and self._stop_reason is None and not self._reaped:
                    self._request_stop_locked(spec.kill_grace, "timeout", timed_out=True)
                alive = tree.alive()
                if reaped and not alive:
                    return
                if reaped and self._kill_deadline is None:
                    # The command ended on its own and left processes behind.
                    self._stray_pids = sorted(p.pid for p in alive)
                    self._request_stop_locked(spec.kill_grace, None, timed_out=False)
                if self._term_round_pending:
                    self._term_round_pending = False
                    self._terminate(alive)
                if self._kill_deadline is not None and now >= self._kill_deadline:
                    self._signal_group_locked(signal.SIGKILL)
                    self._kill_cgroup()
                    _signal_each(alive, signal.SIGKILL)
                    kill_sent_at = now if kill_sent_at is None else kill_sent_at
                    if now - kill_sent_at >= self._verify_timeout:
                        return  # unkillable (e.g. stuck in the kernel): reported as leftovers
                    pause = 0.05
                elif self._kill_deadline is not None:
                    pause = min(next_sample - now, self._kill_deadline - now, 0.05 if self._reaped else math.inf)
                else:
                    pause = min(next_sample - now, timeout_at - now if timeout_at is not None else math.inf)
                if not self._wake:
                    self._cond.wait(max(0.0, pause))
                self._wake = False

    def _terminate(self, alive: list[psutil.Process]) -> None:
        """SIGTERM every member the group signal did not reach (escaped, or after the leader died)."""
        for proc in alive:
            if proc.pid in self._termed:
                continue
            try:
                in_group = self._group_termed and os.getpgid(proc.pid) == self.pid
            except OSError:
                continue
            if not in_group:
                _signal_each([proc], signal.SIGTERM)
            self._termed.add(proc.pid)

    def _kill_cgroup(self) -> None:
        if self._group is not None:
            try:
                self._group.kill()
            except OSError as exc:
                log.warning("killing the cgroup %s of process %s failed: %s", self._group.path, self.pid, exc)

    def _finish(self) -> None:
        with self._cond:
            reaped = self._reaped
        self._tree.scan()
        self._tree.reap()
        in_group = self._group.pids() if self._group is not None else []
        leftovers = sorted({p.pid for p in self._tree.alive()} | set(in_group))
        if not reaped and self.pid not in leftovers:
            leftovers = sorted([*leftovers, self.pid])
        if self._group is not None and not in_group and not self._group.remove():
            log.warning("the empty cgroup %s could not be removed", self._group.path)
        self._tree_gone.set()
        self._reader.join()
        self._spool.close()
        if reaped:
            self._waiter.join()
        with self._cond:
            result = self._build_result(leftovers)
        try:
            self._log.section("end", self._footer(result))
        except OSError:
            log.exception("writing the footer of %s failed", self._log.path)
        finally:
            self._log.close()
        self._result = result
        self._done.set()

    def _build_result(self, leftovers: list[int]) -> RunResult:
        status, rusage = self._wait_status, self._rusage
        exit_code = sig = None
        if status is not None:
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
            else:
                exit_code = os.waitstatus_to_exitcode(status)
        extra_user, extra_system = self._tree.unwaited_cpu()
        user = (rusage.ru_utime if rusage else 0.0) + extra_user
        system = (rusage.ru_stime if rusage else 0.0) + extra_system
        ended = self._ended if self._ended is not None else self._clock()
        return RunResult(
            exit_code=exit_code,
            signal=sig,
            wall_seconds=ended - self._started,
            cpu_user=user,
            cpu_system=system,
            peak_rss_bytes=self._tree.usage.peak_rss_bytes,
            timed_out=self._timed_out,
            stopped=self._stop_reason,
            log_bytes_dropped=self._log.dropped,
            leftover_pids=leftovers,
            stray_pids=list(self._stray_pids),
        )

    def _footer(self, r: RunResult) -> list[str]:
        return [
            f"ended: {self._wall_clock().isoformat(timespec='seconds')}",
            f"exit: {r.describe_exit()}",
            f"wall: {r.wall_seconds:.3f} s",
            f"cpu: user {r.cpu_user:.3f} s, system {r.cpu_system:.3f} s",
            f"peak rss: {_human_bytes(r.peak_rss_bytes)} ({r.peak_rss_bytes} bytes)"
            if r.peak_rss_bytes else "peak rss: not sampled (the command ended at once)",
            f"timed out: {'yes, after ' + format(self.spec.timeout, 'g') + ' s' if r.timed_out else 'no'}",
            f"stopped: {r.stopped or 'no'}",
            f"output bytes: {self._log.written} written, {r.log_bytes_dropped} dropped (cap {self.spec.log_cap_bytes})"
            + (f", {self._log.skipped} of them unread: the command outran the reader by more than "
               f"{_human_bytes(self._spool_lag_bytes)}" if self._log.skipped else ""),
            f"stray processes stopped: {', '.join(map(str, r.stray_pids)) or 'none'}",
            f"leftover processes: {', '.join(map(str, r.leftover_pids)) or 'none'}",
            f"containment: {self._containment}",
        ]


# ---------------------------------------------------------------- the runner


class ProcessRunner:
    """Starts commands as supervised process trees.

    ``clock`` is monotonic seconds that track real time (deadlines are waited for in real
    time); ``wall_clock`` gives the UTC times written in the log. ``containment`` is how tasks
    are kept together (default: detected, which also makes this process a child subreaper);
    ``render_user`` runs commands as that unprivileged user (the agent must be root);
    ``spool_lag_bytes`` is how far a command's output may run ahead of the reader (on the log's
    disk) before the reader skips to the newest output.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        hostname: str | None = None,
        verify_timeout: float = 10.0,
        spool_lag_bytes: int = 1 << 30,
        containment: Containment | None = None,
        render_user: RenderUser | None = None,
        scan_engine: Engine = "auto",
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._hostname = hostname
        self._verify_timeout = verify_timeout  # after SIGKILL, how long to wait for the tree to vanish
        self._spool_lag_bytes = spool_lag_bytes  # unread output the disk may hold before the reader skips it
        self.containment = containment if containment is not None else detect()
        self.render_user = render_user
        self._scan_engine = scan_engine  # which Hyperscan build scans the output (scandb.py)
        self._runs = 0
        self._lock = threading.Lock()

    def stop_stale(self, owner: str) -> list[int]:
        """Kill what is left in the task cgroups of ``owner`` whose agent is gone; their pids."""
        return self.containment.stop_stale(owner)

    def start(self, spec: RunSpec, on_line: Callable[[str], None] | None = None,
              line_filter: LineFilter | None = None) -> RunningProcess:
        """Write the log header and start the command. ``on_line`` gets each output line
        (secrets masked, no newline), or only those ``line_filter`` selects, on the reader thread;
        its exceptions are logged and ignored."""
        if not spec.cwd.is_dir():
            raise RenderError(
                f"the working directory {spec.cwd} does not exist or is not a directory; "
                "create it (or fix the task's cwd) before running the command",
                code="bad_cwd",
            )
        with self._lock:
            self._runs += 1
            mark = f"{os.getpid()}-{self._runs}"
        env = {**spec.env, RUN_MARK_ENV: mark}
        masker = SecretMasker.for_env(spec.env, spec.secret_names)
        # One pass per read finds the secrets and the lines on_line wants (every line without a
        # filter). Compiled before anything starts: the header names its engine.
        scanner = OutputScanner(masker.needles, line_filter if on_line is not None else None, self._scan_engine)
        task_log = TaskLog(spec.log_path, spec.log_cap_bytes, masker)
        group = self.containment.new_group(spec.owner)
        spool: OutputSpool | None = None
        try:
            task_log.section("start", self._header(spec, self._wall_clock(), self._describe(group), scanner.engine))
            spool = OutputSpool(spec.log_path.parent)
            writer = spool.writer()
        except OSError as exc:
            task_log.close()
            if spool is not None:
                spool.close()
            if group is not None:
                group.remove()
            raise RenderError(f"cannot write the task log {spec.log_path} or its output spool beside it: "
                              f"{exc.strerror or exc}", code="bad_log_path") from exc
        assert spool is not None
        try:
            if group is not None:
                _check_program(spec)  # behind the gate an exec failure would only be a status 127
            scopes = self.containment.scopes if group is not None else None
            gated = group is not None and scopes is None
            user = self.render_user
            if scopes is not None:  # systemd-run (as root) enters the scope, then becomes the user
                argv = scopes.command(group, spec.argv, (user.uid, user.gid) if user is not None else None)
            else:
                argv = [*_GATE, *spec.argv] if gated else spec.argv
            started = self._clock()
            popen = subprocess.Popen(
                argv,
                cwd=spec.cwd,
                env=env,
                stdin=subprocess.PIPE if gated else subprocess.DEVNULL,
                stdout=writer,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                bufsize=0,
                **(user.popen_args() if user is not None and scopes is None else {}),
            )
        except OSError as exc:
            error = _start_error(spec, exc)
            try:
                task_log.section("end", [f"failed to start: {error}"])
            except OSError:
                pass
            finally:
                task_log.close()
                spool.close()
                if group is not None:
                    group.remove()
            raise error from exc
        except BaseException:
            task_log.close()
            spool.close()
            if group is not None:
                group.remove()
            raise
        finally:
            os.close(writer)
        if gated:
            group = self._enter(group, popen)
        try:
            task_log.section("output", [f"pid: {popen.pid}"])
        except OSError:
            log.exception("writing the task log %s failed", spec.log_path)
        return RunningProcess(
            spec,
            popen,
            task_log,
            masker,
            on_line,
            clock=self._clock,
            started=started,
            wall_clock=self._wall_clock,
            verify_timeout=self._verify_timeout,
            spool=spool,
            spool_lag_bytes=self._spool_lag_bytes,
            scanner=scanner,
            line_filter=line_filter,
            group=group,
            mark=mark,
            containment=self._describe(group),
        )

    def _enter(self, group: TaskGroup, popen: subprocess.Popen[bytes]) -> TaskGroup | None:
        """Put the gated command into its cgroup, then let it exec."""
        assert popen.stdin is not None
        entered: TaskGroup | None = group
        try:
            group.add(popen.pid)
        except OSError as exc:
            log.warning("cannot put process %s into the cgroup %s (%s): the subreaper and sampling contain it",
                        popen.pid, group.path, exc)
            group.remove()
            entered = None
        try:
            popen.stdin.write(b"go\n")
        except OSError:
            pass  # it died already: the waiter reports how
        finally:
            popen.stdin.close()
        return entered

    def _describe(self, group: TaskGroup | None) -> str:
        if group is not None:
            return f"{self.containment.describe()}: {group.path}"
        return self.containment.describe() + ("" if self.containment.hierarchy is None else " (this task: none)")

    def _header(self, spec: RunSpec, started_at: datetime, containment: str, scan_engine: str) -> list[str]:
        env = masked(spec.env, spec.secret_names)
        lines = [
            f"started: {started_at.isoformat(timespec='seconds')}",
            f"host: {self._hostname or socket.gethostname()}",
            f"cwd: {spec.cwd}",
            f"command: {spec.command_line}",
            f"run by: {SHELL} -c" if isinstance(spec.command, str) else "run by: exec",
            f"run as: {self.render_user.name if self.render_user is not None else current_user() + ' (the agent)'}",
            f"containment: {containment}",
            f"output scan: {scan_engine}",
            f"timeout: {format(spec.timeout, 'g') + ' s' if spec.timeout is not None else 'none'}",
        ]
        lines += [f"{key}: {value}" for key, value in spec.header.items()]
        lines.append("environment:")
        lines += [f"  {name}={env[name]}" for name in sorted(env)]
        return lines


def _check_program(spec: RunSpec) -> None:
    """Raise what exec would for a missing or non-executable program (FileNotFoundError, PermissionError)."""
    program = spec.argv[0]
    if "/" in program:
        path = spec.cwd / program
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if path.is_dir() or not os.access(path, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        return
    for directory in spec.env.get("PATH", os.defpath).split(os.pathsep):
        path = Path(directory or ".") / program
        if path.is_file() and os.access(path, os.X_OK):
            return
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


def _start_error(spec: RunSpec, exc: OSError) -> RenderError:
    program = spec.argv[0]
    if isinstance(exc, FileNotFoundError):
        return RenderError(
            f"cannot run {program!r}: no such program (PATH is {spec.env.get('PATH', 'unset')!r}); "
            "install it or give its full path",
            code="command_not_found",
        )
    if isinstance(exc, PermissionError):
        return RenderError(f"cannot run {program!r}: permission denied; make it executable", code="command_not_executable")
    return RenderError(f"cannot start {program!r}: {exc.strerror or exc}", code="command_failed_to_start")
