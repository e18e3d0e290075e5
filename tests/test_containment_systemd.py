"""Where systemd is PID 1 each task is a transient scope (``systemd-run --scope``); elsewhere, and
where systemd's scopes do not work, the agent makes its own cgroups.

This machine's PID 1 is not systemd, so the detection is tested as it is here, and the scope path
with a stand-in ``systemd-run`` that does what the real one does for a scope (make the unit's
cgroup in the slice, enter it, drop to --uid/--gid, exec), over a real cgroup v2 tree.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

from cio_worker.node.containment import TASK_SLICE, detect, systemd_booted
from cio_worker.node.render_user import RenderUser
from cio_worker.node.runner import ProcessRunner, RunSpec
from tests.test_runner import alive, footer
from tests.waiting import wait_for

FAKE_SYSTEMD_RUN = """#!{python}
import os, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(repr(args) + "\\n")
if {fail!r}:
    sys.exit("Failed to connect to bus: No such file or directory")
split = args.index("--")
opts = dict(a[2:].split("=", 1) for a in args[:split] if "=" in a)
scope = os.path.join({root!r}, opts["slice"], opts["unit"])
os.makedirs(scope, exist_ok=True)
with open(os.path.join(scope, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
if "uid" in opts:
    os.setgroups([]); os.setgid(int(opts["gid"])); os.setuid(int(opts["uid"]))
os.execvp(args[split + 1], args[split + 1:])
"""


def test_here_systemd_is_not_pid_1_and_the_agent_makes_its_own_cgroups():
    pid1 = Path("/proc/1/comm").read_text().strip()
    assert systemd_booted() == (pid1 == "systemd") == Path("/run/systemd/system").is_dir()
    if systemd_booted():
        pytest.skip("systemd is PID 1 here: the scope path is what runs")
    found = detect()
    assert found.scopes is None and found.note == ""
    assert found.hierarchy == detect(("v2", "v1")).hierarchy
    assert "systemd" not in found.describe()


@pytest.fixture
def systemd_machine(tmp_path):
    """(detect's keyword arguments for a machine whose PID 1 is systemd, the stand-in's log)."""
    own = detect(("v2",)).hierarchy
    if own is None or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup v2 tree we may write, for the stand-in's scopes")
    booted = tmp_path / "run-systemd-system"
    booted.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {own.parent} cgroup2 rw,nosuid 0 0\n")
    log = tmp_path / "systemd-run.log"

    def machine(fail: bool = False) -> dict:
        program = tmp_path / ("systemd-run-failing" if fail else "systemd-run")
        program.write_text(FAKE_SYSTEMD_RUN.format(python=sys.executable, log=str(log), fail=fail, root=str(own.parent)))
        program.chmod(0o755)
        return {"mounts": mounts, "systemd_dir": booted, "systemd_run": str(program)}

    yield machine, log
    slice_dir = own.parent / TASK_SLICE
    if slice_dir.is_dir():
        for scope in slice_dir.iterdir():
            if scope.is_dir():
                scope.rmdir()
        slice_dir.rmdir()


def calls(log: Path) -> list[list[str]]:
    return [ast.literal_eval(line) for line in log.read_text().splitlines()]


def test_where_systemd_runs_each_task_is_a_scope_and_nothing_escapes_it(systemd_machine, tmp_path):
    machine, log = systemd_machine
    found = detect(**machine())
    assert found.scopes is not None and found.describe().startswith(f"systemd scope per task ({TASK_SLICE}")
    assert calls(log)[0][:4] == ["--scope", "--quiet", "--collect", f"--slice={TASK_SLICE}"]  # the probe
    runner = ProcessRunner(containment=found)
    pidfile = tmp_path / "escapee.pid"
    # The escapee leaves the session and is orphaned; the command then exits 0.
    script = (f"cat /proc/self/cgroup; setsid sh -c 'echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; "
              "trap \"\" TERM; exec sleep 600' & while [ ! -s " + str(pidfile) + " ]; do sleep 0.01; done")
    lines: list[str] = []
    spec = RunSpec(script, cwd=tmp_path, env={"PATH": os.environ["PATH"]}, log_path=tmp_path / "task.log", owner=str(tmp_path),
                   kill_grace=1)
    process = runner.start(spec, on_line=lines.append)
    result = process.wait(timeout=60)
    escapee = int(pidfile.read_text())
    try:
        assert result.exit_code == 0
        wait_for(lambda: not alive(escapee), 10, "the escapee to be gone")
        unit = next(a for a in calls(log)[-1] if a.startswith("--unit="))[len("--unit="):]
        assert unit.startswith("cio-") and unit.endswith(".scope")
        assert calls(log)[-1][-3:] == ["/bin/sh", "-c", script]
        assert any(l.startswith("0::") and l.endswith(f"/{TASK_SLICE}/{unit}") for l in lines), lines
        text = (tmp_path / "task.log").read_text()
        assert footer(text)["leftover processes"] == "none"
        assert "systemd scope per task" in footer(text)["containment"]
        assert not (found.hierarchy.parent / unit).exists()  # removed once empty
    finally:
        if alive(escapee):
            os.kill(escapee, 9)


def test_a_scope_runs_the_render_as_its_user(systemd_machine, tmp_path):
    machine, log = systemd_machine
    runner = ProcessRunner(containment=detect(**machine()), render_user=RenderUser.resolve("nobody"))
    lines: list[str] = []
    spec = RunSpec("id -u; id -g", cwd=Path("/"), env={"PATH": os.environ["PATH"]}, log_path=tmp_path / "task.log")
    assert runner.start(spec, on_line=lines.append).wait(timeout=60).exit_code == 0
    nobody = RenderUser.resolve("nobody")
    assert lines == [str(nobody.uid), str(nobody.gid)]
    assert f"--uid={nobody.uid}" in calls(log)[-1] and f"--gid={nobody.gid}" in calls(log)[-1]


def test_where_systemd_runs_but_its_scopes_fail_the_agent_makes_its_own_cgroups(systemd_machine):
    machine, log = systemd_machine
    found = detect(**machine(fail=True))
    assert found.scopes is None
    assert found.hierarchy == detect(("v2", "v1")).hierarchy
    assert "not a systemd scope: systemd-run --scope unusable (Failed to connect to bus" in found.describe()
    assert len(calls(log)) == 1  # the probe only
