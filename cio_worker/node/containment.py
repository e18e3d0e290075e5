"""Keeps every process of a task where the agent can list and kill it.

Each task gets a cgroup of its own when the machine lets the agent make one: a cgroup v2
hierarchy (``cgroup.kill``, or freeze and kill), or a v1 hierarchy (``freezer`` preferred: freeze,
kill, thaw; else ``pids``: forbid forks, kill). Membership survives ``setsid``, double forks and a
cleared environment, so the group is the truth about what is left. The agent is also a child
subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``): an orphaned descendant becomes its child instead of
init's, so it stays visible by ancestry and is reaped by the runner. Where no cgroup can be made,
the subreaper and the runner's sampling (session, group, ancestry, an environment marker) are
what is left; ``describe()`` says which containment is in use, for the task log.

Where systemd is PID 1 (``/run/systemd/system`` exists, as sd_booted(3) checks) the cgroup tree
is systemd's: each task is then a transient scope unit, ``systemd-run --scope`` in the slice
``cio-tasks.slice`` (systemd makes the cgroup and moves the command into it before exec), and
the agent lists and kills through the scope's cgroup (v2). It is used only when a probe scope
works and lands where expected; otherwise the agent's own cgroups, as without systemd.

Task cgroups are named ``cio-<owner hash>-<agent pid>-<agent start>-<n>`` (``.scope`` under
systemd) under the agent's own cgroup (the task slice), so a restarted agent finds the groups its
dead predecessor left (``stale_groups``) and leaves alone those of live agents and of other work
roots.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import psutil

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PROC_MOUNTS = Path("/proc/self/mounts")
PROC_CGROUP = Path("/proc/self/cgroup")
GROUP_PREFIX = "cio-"
V1_CONTROLLERS = ("freezer", "pids")  # in order of preference: both can stop a forking tree
SYSTEMD_RUN_DIR = Path("/run/systemd/system")
TASK_SLICE = "cio-tasks.slice"
_FREEZE_WAIT = 2.0


def become_subreaper() -> bool:
    """Make this process the child subreaper of its descendants; False where the kernel refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def is_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        flag = ctypes.c_int(0)
        return libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value != 0
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------- one task's cgroup


@dataclass(frozen=True)
class CgroupHierarchy:
    """Where task groups are made: the agent's own cgroup in one hierarchy."""

    version: int  # 1 or 2
    controller: str  # v1: freezer | pids; v2: ""
    parent: Path

    @property
    def label(self) -> str:
        return "cgroup v2" if self.version == 2 else f"cgroup v1 ({self.controller})"

    def group(self, name: str) -> "TaskGroup":
        return TaskGroup(self, self.parent / name)


@dataclass(frozen=True)
class TaskGroup:
    """One task's cgroup: add the first process, list the members, kill them all, remove it."""

    hierarchy: CgroupHierarchy
    path: Path

    def create(self) -> None:
        self.path.mkdir()

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> list[int]:
        """Live members (zombies are not listed); empty once the group is gone."""
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def signal(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL every member so that none can fork a new one meanwhile."""
        if not self.path.exists():
            return
        if self.hierarchy.version == 2 and (self.path / "cgroup.kill").exists():
            (self.path / "cgroup.kill").write_text("1\n")
            return
        if self.hierarchy.version == 2:
            self._frozen_kill(self.path / "cgroup.freeze", "1", "0", lambda: _read(self.path / "cgroup.events", "frozen 1"))
        elif self.hierarchy.controller == "freezer":
            self._frozen_kill(self.path / "freezer.state", "FROZEN", "THAWED",
                              lambda: (self.path / "freezer.state").read_text().strip() == "FROZEN")
        else:  # pids: no fork succeeds at 0, so the loop ends
            (self.path / "pids.max").write_text("0\n")
            for _ in range(100):
                if not self.pids():
                    break
                self.signal(signal.SIGKILL)

    def _frozen_kill(self, control: Path, freeze: str, thaw: str, frozen) -> None:
        control.write_text(freeze + "\n")
        deadline = time.monotonic() + _FREEZE_WAIT
        while not frozen() and time.monotonic() < deadline:
            time.sleep(0.005)
        try:
            self.signal(signal.SIGKILL)
        finally:
            control.write_text(thaw + "\n")  # a frozen process cannot die

    def remove(self) -> bool:
        """Remove the group once it is empty; False while a member lives (or it is busy)."""
        try:
            self.path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                log.warning("cannot remove the task cgroup %s: %s", self.path, exc)
            return False


def _read(path: Path, needle: str) -> bool:
    try:
        return needle in path.read_text()
    except OSError:
        return False


# ---------------------------------------------------------------- systemd scopes


@dataclass(frozen=True)
class SystemdScopes:
    """Tasks as transient scope units: ``command`` wraps a task's argv so that systemd puts it
    into the group's scope before it runs; ``slice_dir`` is the task slice's cgroup (v2)."""

    program: str  # systemd-run
    slice_dir: Path

    def command(self, group: TaskGroup, argv: Sequence[str], ids: tuple[int, int] | None = None) -> list[str]:
        """``ids``: (uid, gid) to run as; systemd-run itself must run as root to ask for a scope."""
        user = [f"--uid={ids[0]}", f"--gid={ids[1]}"] if ids is not None else []
        return [self.program, "--scope", "--quiet", "--collect", f"--slice={self.slice_dir.name}",
                f"--unit={group.path.name}", *user, "--", *argv]


def systemd_booted(run_dir: Path = SYSTEMD_RUN_DIR) -> bool:
    """Whether systemd is this machine's init (sd_booted(3))."""
    return run_dir.is_dir()


def _systemd_scopes(run_dir: Path, program: str | None, mounts: Path) -> tuple[SystemdScopes | None, str]:
    """Scopes if systemd runs and a probe scope lands in the task slice; else None and why not."""
    if not systemd_booted(run_dir):
        return None, "systemd is not PID 1"
    program = program or shutil.which("systemd-run")
    if program is None:
        return None, "systemd-run not found"
    try:
        unified = next(Path(f[1]) for f in map(str.split, mounts.read_text().splitlines())
                       if len(f) > 2 and f[2] == "cgroup2")
    except (OSError, StopIteration):
        return None, "no cgroup v2 hierarchy"
    scopes = SystemdScopes(program, unified / TASK_SLICE)
    probe = TaskGroup(CgroupHierarchy(2, "", scopes.slice_dir), scopes.slice_dir / f"{GROUP_PREFIX}probe-{os.getpid()}-{time.monotonic_ns()}.scope")
    try:
        done = subprocess.run(scopes.command(probe, ["cat", "/proc/self/cgroup"]), capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"systemd-run failed: {exc}"
    where = f"/{TASK_SLICE}/{probe.path.name}"
    if done.returncode != 0 or not any(l.startswith("0::") and l.rstrip().endswith(where) for l in done.stdout.splitlines()):
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return None, f"systemd-run --scope unusable ({why})"
    return scopes, ""


# ---------------------------------------------------------------- the machine's containment


@dataclass
class Containment:
    """How this agent contains its tasks. ``hierarchy`` None: subreaper and sampling only.
    ``scopes``: tasks are systemd scopes (``hierarchy`` is then the task slice); ``note``: why a
    better containment was not used."""

    hierarchy: CgroupHierarchy | None
    subreaper: bool
    scopes: SystemdScopes | None = None
    note: str = ""
    _seq: "itertools.count[int]" = field(default_factory=lambda: itertools.count(1), repr=False)

    def describe(self) -> str:
        if self.scopes is not None:
            parts = [f"systemd scope per task ({TASK_SLICE}, cgroup v2)"]
        else:
            parts = [f"{self.hierarchy.label} per task" if self.hierarchy else "no cgroup (none usable)"]
        parts.append("agent is child subreaper" if self.subreaper else "agent is not a subreaper")
        if self.hierarchy is None:
            parts.append("process sampling")
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)

    def new_group(self, owner: str) -> TaskGroup | None:
        """A fresh cgroup for one task of ``owner`` (the agent's work root); None without one.
        A scope's cgroup is made by systemd when the task starts (``scopes.command``)."""
        if self.hierarchy is None:
            return None
        name = f"{_owner_prefix(owner)}{os.getpid()}-{_start_stamp(os.getpid())}-{next(self._seq)}"
        if self.scopes is not None:
            return self.hierarchy.group(name + ".scope")
        group = self.hierarchy.group(name)
        try:
            group.create()
        except OSError as exc:
            log.warning("cannot create the task cgroup %s (%s): containment falls back to the subreaper", group.path, exc)
            return None
        return group

    def stale_groups(self, owner: str | None) -> list[TaskGroup]:
        """Groups of ``owner`` (None: of anyone) whose agent process is gone."""
        if self.hierarchy is None:
            return []
        prefix = _owner_prefix(owner) if owner is not None else GROUP_PREFIX
        found = []
        try:
            entries = list(self.hierarchy.parent.iterdir())
        except OSError:
            return []
        for entry in entries:
            if not entry.name.startswith(prefix) or not entry.is_dir():
                continue
            try:
                pid, stamp, _ = entry.name[len(prefix):].split("-")[-3:]
                alive = _start_stamp(int(pid)) == stamp
            except ValueError:
                continue
            if not alive:
                found.append(self.hierarchy.group(entry.name))
        return found

    def stop_stale(self, owner: str, timeout: float = 5.0) -> list[int]:
        """SIGKILL every member of ``owner``'s stale groups, remove the groups; their pids."""
        killed: list[int] = []
        for group in self.stale_groups(owner):
            members = group.pids()
            procs = []
            for pid in members:
                try:
                    procs.append(psutil.Process(pid))
                except psutil.Error:
                    continue
            try:
                group.kill()
            except OSError as exc:
                log.warning("cannot kill the stale task cgroup %s: %s", group.path, exc)
                continue
            psutil.wait_procs(procs, timeout=timeout)
            killed += members
            group.remove()
        for group in self.stale_groups(None):
            group.remove()  # an empty group of another work root's dead agent: nothing to kill
        return sorted(set(killed))


def _owner_prefix(owner: str) -> str:
    return f"{GROUP_PREFIX}{hashlib.sha1(owner.encode()).hexdigest()[:10]}-"


def _start_stamp(pid: int) -> str:
    """The process's start time in clock ticks since boot: with the pid, names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return "gone"


def detect(prefer: Sequence[str] = ("systemd", "v2", "v1"), *, subreaper: bool = True,
           mounts: Path = PROC_MOUNTS, own: Path = PROC_CGROUP, systemd_dir: Path = SYSTEMD_RUN_DIR,
           systemd_run: str | None = None) -> Containment:
    """The best containment this process may use: the first of ``prefer`` ("systemd": scopes
    where systemd is PID 1; "v2", "v1", or one v1 controller: "v1:freezer", "v1:pids") whose
    hierarchy is mounted and lets us make a child of our own cgroup. ``prefer=()``: no cgroup."""
    reaper = become_subreaper() if subreaper else is_subreaper()
    note = ""
    if "systemd" in prefer:
        scopes, why = _systemd_scopes(systemd_dir, systemd_run, mounts)
        if scopes is not None:
            return Containment(CgroupHierarchy(2, "", scopes.slice_dir), reaper, scopes)
        if systemd_booted(systemd_dir):
            log.warning("systemd runs but its scopes cannot hold tasks (%s): the agent makes its own cgroups", why)
            note = f"not a systemd scope: {why}"
    hierarchy = None
    for kind in (k for k in prefer if k != "systemd"):
        for candidate in _candidates(kind, mounts, own):
            if _writable(candidate):
                hierarchy = candidate
                break
        if hierarchy is not None:
            break
    return Containment(hierarchy, reaper, note=note)


def _candidates(kind: str, mounts: Path, own: Path) -> Iterable[CgroupHierarchy]:
    try:
        mount_lines = mounts.read_text().splitlines()
        own_lines = own.read_text().splitlines()
    except OSError:
        return []
    paths: dict[str, str] = {}  # "" for v2, else each controller -> our cgroup path
    for line in own_lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0":
            paths[""] = path
        for name in filter(None, controllers.split(",")):
            paths[name] = path
    found = []
    for line in mount_lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        where, fstype, options = fields[1], fields[2], set(fields[3].split(","))
        version, _, only = kind.partition(":")
        if version == "v2" and fstype == "cgroup2" and "" in paths:
            found.append(CgroupHierarchy(2, "", Path(where) / paths[""].lstrip("/")))
        elif version == "v1" and fstype == "cgroup":
            for controller in (only,) if only else V1_CONTROLLERS:
                if controller in V1_CONTROLLERS and controller in options and controller in paths:
                    found.append(CgroupHierarchy(1, controller, Path(where) / paths[controller].lstrip("/")))
    found.sort(key=lambda h: V1_CONTROLLERS.index(h.controller) if h.controller else 0)
    return found


def _writable(hierarchy: CgroupHierarchy) -> bool:
    probe = hierarchy.parent / f"{GROUP_PREFIX}probe-{os.getpid()}-{time.monotonic_ns()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        probe.rmdir()
    except OSError:
        pass
    return os.access(hierarchy.parent / "cgroup.procs", os.W_OK)
