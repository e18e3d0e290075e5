"""Nothing outlives its task: a render that forks, setsids, forks again, ignores SIGTERM (and may
clear its environment) is gone after a normal exit, a failure, a timeout, a kill and a drain,
under every containment this machine offers; a dead agent's leftovers are swept by its successor.

Real processes and real cgroups (the variants this machine lacks are skipped with the reason).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cio_worker.node.containment import detect, is_subreaper
from cio_worker.node.execution import stop_stale_renders
from cio_worker.node.runner import ProcessRunner, RunSpec
from tests.test_runner import alive, footer
from tests.waiting import wait_for

PY = sys.executable

# The escapee: ignores SIGTERM, says where it is, lives for 10 minutes.
ESCAPEE_PY = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    f.write(str(os.getpid()))
os.rename(tmp, sys.argv[1])
time.sleep(600)
"""

# fork -> setsid -> fork -> (exec with an empty environment) -> the escapee; the middle process
# exits at once, so the escapee is orphaned before any sampling can see whose it is. Then the
# command ends as ``how`` says.
RENDER_PY = """
import os, sys, time
pidfile, clear, how = sys.argv[1], sys.argv[2] == "clear", sys.argv[3]
escapee = [sys.executable, "-c", open("escapee.py").read(), pidfile]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execve(sys.executable, escapee, {} if clear else dict(os.environ))
    os._exit(0)
os.wait()
while not os.path.exists(pidfile):
    time.sleep(0.01)
print("escaped", open(pidfile).read(), flush=True)
if how == "exit0":
    sys.exit(0)
if how == "exit3":
    sys.exit(3)
time.sleep(600)
"""

VARIANTS = {
    "cgroup-v2": ("v2",),
    "cgroup-v1-freezer": ("v1:freezer",),
    "cgroup-v1-pids": ("v1:pids",),
    "subreaper-only": (),
}


def containment(variant: str):
    prefer = VARIANTS[variant]
    found = detect(prefer)
    if prefer and found.hierarchy is None:
        pytest.skip(f"{variant}: this machine has no such cgroup hierarchy we may write")
    if not found.subreaper:
        pytest.skip("the kernel refused PR_SET_CHILD_SUBREAPER")
    return found


@pytest.fixture
def scratch(tmp_path):
    (tmp_path / "escapee.py").write_text(ESCAPEE_PY)
    (tmp_path / "render.py").write_text(RENDER_PY)
    escaped: list[int] = []
    yield tmp_path, escaped
    for pid in escaped:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    for pid in escaped:
        try:
            os.waitpid(pid, os.WNOHANG)  # ours if the runner left it as a zombie
        except ChildProcessError:
            pass


ENDINGS = ("success", "failure", "timeout", "kill", "drain")


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("clear", ["keep-env", "clear-env"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_double_forked_sigterm_ignoring_escapee_does_not_outlive_its_task(scratch, variant, clear, ending):
    if variant == "subreaper-only" and clear == "clear-env":
        pytest.skip("without a cgroup an orphan that cleared its environment is not ours to know (the header says so)")
    tmp, escaped = scratch
    runner = ProcessRunner(containment=containment(variant))
    how = {"success": "exit0", "failure": "exit3"}.get(ending, "sleep")
    log_path = tmp / "task.log"
    spec = RunSpec([PY, "render.py", str(tmp / "escapee.pid"), "clear" if clear == "clear-env" else "keep", how],
                   cwd=tmp, env={"PATH": os.environ["PATH"]}, log_path=log_path, kill_grace=0.5,
                   timeout=2.0 if ending == "timeout" else None)
    lines: list[str] = []
    process = runner.start(spec, on_line=lines.append)
    wait_for(lambda: any(l.startswith("escaped ") for l in lines), 20, "the escapee")
    pid = int(next(l for l in lines if l.startswith("escaped ")).split()[1])
    escaped.append(pid)
    assert os.getsid(pid) != process.pid
    if ending in ("kill", "drain"):
        result = process.stop(0.5, "cancelled" if ending == "kill" else "preempted")
    else:
        result = process.wait(timeout=60)
    assert not alive(pid), f"the escapee {pid} outlived its task ({ending}, {variant}, {clear})"
    assert result.leftover_pids == []
    f = footer(log_path.read_text())
    assert f["leftover processes"] == "none"
    assert f["containment"].startswith("cgroup" if VARIANTS[variant] else "no cgroup")
    assert "subreaper" in f["containment"]
    if ending == "success":
        assert result.exit_code == 0 and pid in result.stray_pids
    elif ending == "failure":
        assert result.exit_code == 3
    elif ending == "timeout":
        assert result.timed_out
    else:
        assert result.stopped == ("cancelled" if ending == "kill" else "preempted")
    # reaped by the runner: not a zombie child of this (subreaper) process either
    assert pid not in [c.pid for c in psutil.Process().children()]
    if VARIANTS[variant]:
        assert not Path(f["containment"].rsplit(": ", 1)[1]).exists()  # the task's cgroup is removed


def test_the_agent_is_a_child_subreaper_and_the_log_says_what_contains_the_task(tmp_path):
    runner = ProcessRunner()
    assert is_subreaper()
    spec = RunSpec("echo hi", cwd=tmp_path, env={"PATH": os.environ["PATH"]}, log_path=tmp_path / "t.log")
    runner.start(spec).wait(timeout=30)
    text = (tmp_path / "t.log").read_text()
    header = text.split("==== cio_worker: output ====", 1)[0]
    assert f"containment: {runner.containment.describe()}" in header
    assert f"containment: {runner.containment.describe()}" in text.split("==== cio_worker: end ====", 1)[1]


def test_an_unwritable_cgroup_tree_falls_back_to_the_subreaper(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {tmp_path / 'nowhere'} cgroup2 rw 0 0\n")
    own = tmp_path / "cgroup"
    own.write_text("0::/\n")
    found = detect(("v2", "v1"), mounts=mounts, own=own)
    assert found.hierarchy is None and found.new_group("x") is None
    assert found.describe().startswith("no cgroup")


AGENT_PY = """
import os, sys
from pathlib import Path
from cio_worker.node.containment import detect
from cio_worker.node.runner import ProcessRunner, RunSpec
tmp = Path(sys.argv[1])
runner = ProcessRunner(containment=detect((sys.argv[2],)))
spec = RunSpec([sys.executable, "render.py", str(tmp / "escapee.pid"), "clear", "sleep"], cwd=tmp,
               env={"PATH": os.environ["PATH"]}, log_path=tmp / "task.log", owner=sys.argv[3])
runner.start(spec)
while not (tmp / "escapee.pid").exists():
    pass
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("variant", ["cgroup-v2", "cgroup-v1-freezer"])
def test_a_dead_agents_escapee_that_cleared_its_environment_is_swept_by_its_successor(scratch, variant):
    tmp, escaped = scratch
    containment(variant)
    work_root = tmp / "work"
    (tmp / "agent.py").write_text(AGENT_PY)
    agent = subprocess.Popen([PY, "agent.py", str(tmp), VARIANTS[variant][0], str(work_root)], cwd=tmp,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    render: list[psutil.Process] = []
    try:
        assert agent.stdout.readline() == b"ready\n"
        pid = int((tmp / "escapee.pid").read_text())
        escaped.append(pid)
        render = [p for p in psutil.Process(agent.pid).children()]
        os.kill(agent.pid, signal.SIGKILL)  # the OOM killer: its render lives on
        agent.wait(10)
        time.sleep(0.2)
        assert alive(pid)
        assert psutil.Process(pid).environ() == {}  # invisible to the environment-based sweep
        # another agent's sweep (another work root) leaves it alone
        successor = ProcessRunner(containment=detect(VARIANTS[variant]))
        assert stop_stale_renders(tmp / "other-work", runner=successor) == []
        assert alive(pid)
        killed = stop_stale_renders(work_root, runner=successor)
        assert pid in killed
        wait_for(lambda: not alive(pid), 20, "the escapee to die")
        assert successor.containment.stale_groups(str(work_root)) == []
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        for proc in render:
            if proc.is_running():
                proc.kill()


def test_a_live_agents_groups_are_not_stale(tmp_path):
    found = detect(("v2", "v1"))
    if found.hierarchy is None:
        pytest.skip("no writable cgroup hierarchy on this machine")
    group = found.new_group(str(tmp_path))
    try:
        assert found.stale_groups(str(tmp_path)) == []
    finally:
        group.remove()


def test_an_empty_group_of_another_work_roots_dead_agent_is_removed_and_a_busy_one_kept(tmp_path):
    found = detect(("v2", "v1"))
    if found.hierarchy is None:
        pytest.skip("no writable cgroup hierarchy on this machine")
    dead = found.hierarchy.group(f"cio-0123456789-{2**22 + 7}-1-1")  # no such pid: its agent is gone
    dead.create()
    live = found.new_group(str(tmp_path / "other"))
    try:
        assert found.stop_stale(str(tmp_path / "mine")) == []
        assert not dead.path.exists()
        assert live.path.exists()  # its agent (this process) lives
    finally:
        dead.remove()
        live.remove()
