"""The process runner, with real processes, signals, pipes and files."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from cio_worker.errors import RenderError
from cio_worker.node.runner import ProcessRunner, RunningProcess, RunResult, RunSpec

PY = sys.executable
MIB = 1024 * 1024

ESCAPE_PY = """
import os, signal, sys, time
if os.getsid(0) != os.getpid():
    os.setsid()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while time.process_time() < float(sys.argv[1]):
    pass
print("escaped", os.getpid(), flush=True)
time.sleep(60)
"""

SPAWNER_PY = """
import os, subprocess, sys, time
from pathlib import Path
subprocess.Popen([sys.executable, "escape.py", sys.argv[1]], start_new_session=True)
while not Path("go").exists():
    time.sleep(0.02)
os._exit(0)  # without waiting: the escaped child is orphaned
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


class Harness:
    """Starts commands and remembers everything, so teardown can prove nothing is left."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.runner = ProcessRunner()
        self.started: list[RunningProcess] = []
        self.watched: set[int] = set()
        self.lines: list[str] = []

    def spec(self, command, **kw) -> RunSpec:
        env = {"PATH": os.environ["PATH"], "PY": PY, **kw.pop("env", {})}
        kw.setdefault("log_path", self.tmp / "logs" / "task.log")
        return RunSpec(command, cwd=kw.pop("cwd", self.tmp), env=env, **kw)

    def start(self, command, on_line=None, **kw) -> RunningProcess:
        process = self.runner.start(self.spec(command, **kw), on_line=on_line or self.lines.append)
        self.started.append(process)
        self.watched.add(process.pid)
        return process

    def run(self, command, **kw) -> RunResult:
        return self.start(command, **kw).wait(timeout=60)

    def log(self) -> str:
        return (self.tmp / "logs" / "task.log").read_text()

    def wait_for_line(self, pattern: str) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            found[:] = [m for m in map(re.compile(pattern).search, list(self.lines)) if m]
            return bool(found)

        wait_until(seen, f"a line matching {pattern!r}")
        return found[0]


@pytest.fixture
def h(tmp_path):
    # Children the session already had (e.g. multiprocessing's resource tracker, test servers)
    # are not this test's to account for.
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    harness = Harness(tmp_path)
    yield harness
    for process in harness.started:
        if process.is_running():
            process.stop(0, "teardown")
    for process in harness.started:
        harness.watched.update(process.tree_pids())
    left = [pid for pid in harness.watched if alive(pid)]
    children = [c.pid for c in psutil.Process().children(recursive=True) if alive(c.pid) and c.pid not in before]
    zombies = [c.pid for c in psutil.Process().children() if not alive(c.pid) and c.pid not in before]
    threads = [t.name for t in threading.enumerate() if t.name.startswith("cio-runner")]
    for pid in set(left + children):
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    assert not left and not children, f"processes left behind: {left} {children}"
    assert not zombies, f"unreaped children: {zombies}"
    assert not threads, f"runner threads left: {threads}"


def output_section(log: str) -> list[str]:
    body = log.split("==== cio_worker: output ====\n", 1)[1].split("==== cio_worker: end ====\n", 1)[0]
    return body.splitlines()[1:]  # after "pid: N"


def footer(log: str) -> dict[str, str]:
    tail = log.split("==== cio_worker: end ====\n", 1)[1]
    return dict(line.split(": ", 1) for line in tail.splitlines())


# ---------------------------------------------------------------- exit status and output


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_propagates(h, code):
    result = h.run(f"exit {code}")
    assert result.exit_code == code and result.signal is None
    assert result.ok is (code == 0)
    assert footer(h.log())["exit"] == f"exit code {code}"


def test_missing_command_in_shell_exits_127(h):
    result = h.run("no-such-program-cio-xyz --flag")
    assert result.exit_code == 127 and not result.ok
    assert "no-such-program-cio-xyz" in "\n".join(output_section(h.log()))


def test_missing_program_in_argv_is_a_clear_error(h):
    with pytest.raises(RenderError) as err:
        h.start(["no-such-program-cio-xyz", "a"])
    assert err.value.code == "command_not_found"
    assert "no-such-program-cio-xyz" in str(err.value)
    assert "failed to start" in h.log()


def test_bad_cwd_is_refused_before_anything_starts(h, tmp_path):
    before = {c.pid for c in psutil.Process().children()}
    with pytest.raises(RenderError) as err:
        h.start("echo hi", cwd=tmp_path / "missing")
    assert err.value.code == "bad_cwd"
    assert str(tmp_path / "missing") in str(err.value)
    assert {c.pid for c in psutil.Process().children()} == before
    assert not (tmp_path / "logs" / "task.log").exists()


@pytest.mark.parametrize(
    "kw",
    [{"timeout": -1}, {"kill_grace": float("nan")}, {"log_cap_bytes": -5}, {"sample_interval": 0}, {"env": {"A=B": "1"}}],
)
def test_bad_spec_is_refused(h, kw):
    with pytest.raises(RenderError) as err:
        h.spec("true", **kw)
    assert err.value.code == "bad_run_spec"


def test_empty_command_is_refused(h):
    for command in ("  ", []):
        with pytest.raises(RenderError) as err:
            h.spec(command)
        assert err.value.code == "bad_run_spec"


def test_argv_is_exec_without_a_shell(h):
    result = h.run([PY, "-c", "import sys; print(sys.argv[1:])", "a b", "$HOME", "'q'"])
    assert result.ok
    assert h.lines == ["['a b', '$HOME', \"'q'\"]"]


def test_lines_reach_on_line_and_log_in_order(h):
    script = "for i in $(seq 1 300); do echo out-$i; if [ $((i % 50)) = 0 ]; then echo err-$i >&2; fi; done"
    result = h.run(script)
    expected = []
    for i in range(1, 301):
        expected.append(f"out-{i}")
        if i % 50 == 0:
            expected.append(f"err-{i}")
    assert result.ok
    assert h.lines == expected
    assert output_section(h.log()) == expected


def test_a_last_line_without_newline_is_kept(h):
    h.run("printf 'a\\nb'")
    assert h.lines == ["a", "b"]


def test_on_line_errors_do_not_stop_the_reader(h):
    seen = []

    def explode(line):
        seen.append(line)
        raise ValueError("parser bug")

    result = h.run("seq 1 50", on_line=explode)
    assert result.ok
    assert seen == [str(i) for i in range(1, 51)]
    assert output_section(h.log()) == seen


# ---------------------------------------------------------------- header, footer, secrets


def test_header_names_command_host_cwd_and_masks_secrets(h, tmp_path):
    command = 'echo "key=$AWS_SECRET_ACCESS_KEY lic=$RENDER_LICENCE"; echo abc123abc123; echo hunter22 >&2'
    result = h.run(
        command,
        env={"AWS_SECRET_ACCESS_KEY": "abc123", "RENDER_LICENCE": "hunter22", "VISIBLE": "plain-value"},
        secret_names=("RENDER_LICENCE",),
        header={"job": "00042 (shot A)", "task": "007"},
    )
    log = h.log()
    assert result.ok
    assert "abc123" not in log and "hunter22" not in log
    assert not any("abc123" in l or "hunter22" in l for l in h.lines)
    assert h.lines == ["key=**** lic=****", "********", "****"]
    header = log.split("==== cio_worker: output ====", 1)[0]
    shown = command.replace("abc123", "****").replace("hunter22", "****")  # secrets in the command too
    assert f"command: {shown}" in header
    assert f"host: {socket.gethostname()}" in header
    assert f"cwd: {tmp_path}" in header
    assert "job: 00042 (shot A)" in header and "task: 007" in header
    assert "  AWS_SECRET_ACCESS_KEY=****" in header
    assert "  RENDER_LICENCE=****" in header
    assert "  VISIBLE=plain-value" in header
    env_lines = [l.strip() for l in header.split("environment:\n", 1)[1].splitlines()]
    assert env_lines == sorted(env_lines)
    assert re.search(r"started: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", header)


def test_footer_reports_exit_times_and_memory(h):
    result = h.run("echo hi; sleep 0.3; exit 5", sample_interval=0.05)
    f = footer(h.log())
    assert f["exit"] == "exit code 5"
    assert f"({result.peak_rss_bytes} bytes)" in f["peak rss"]
    assert result.peak_rss_bytes > 0
    assert f["wall"].endswith(" s") and f["cpu"].startswith("user ")
    assert f["timed out"] == "no" and f["stopped"] == "no"
    assert f["leftover processes"] == "none"


def test_log_is_appended_not_truncated(h):
    h.run("echo first")
    h.run("echo second")
    log = h.log()
    assert log.count("==== cio_worker: start ====") == 2
    assert log.index("first") < log.index("second")


# ---------------------------------------------------------------- resources


def test_peak_rss_counts_a_grandchild(h):
    code = "b = bytearray(100 * 2**20); import time; time.sleep(1)"
    result = h.run(f'"$PY" -c "{code}"; echo done', sample_interval=0.05)
    assert result.ok
    assert result.peak_rss_bytes >= 80 * MIB


def test_peak_rss_is_the_sum_over_the_tree(h):
    code = "b = bytearray(60 * 2**20); import time; time.sleep(1.5)"
    result = h.run(f'"$PY" -c "{code}" & "$PY" -c "{code}" & wait', sample_interval=0.05)
    assert result.ok
    assert result.peak_rss_bytes >= 100 * MIB  # no single process ever had that much


def test_cpu_time_of_a_busy_child(h):
    code = "import time\nwhile time.process_time() < 0.3: pass"
    result = h.run(f"\"$PY\" -c '{code}'; true")
    assert result.ok
    assert result.cpu_user + result.cpu_system >= 0.25
    assert result.cpu_user > 0


# ---------------------------------------------------------------- log cap


def test_log_cap_drops_and_reports(h):
    code = "for i in range(1000): print(str(i).rjust(99, 'x'))"
    result = h.run([PY, "-c", code], log_cap_bytes=10_000)
    assert result.ok
    assert len(h.lines) == 1000  # on_line still sees everything
    written = output_section(h.log())
    assert written[:100] == [str(i).rjust(99, "x") for i in range(100)]
    assert "log cap of 10000 bytes reached" in written[100]
    assert len(written) == 101
    assert result.log_bytes_dropped == 90_000
    assert footer(h.log())["output bytes"].startswith("10000 written, 90000 dropped")


# ---------------------------------------------------------------- timeout and stop


def test_timeout_stops_the_tree_and_says_so(h):
    process = h.start("echo ready; sleep 30", timeout=0.5, kill_grace=5)
    h.wait_for_line("ready")
    wait_until(lambda: len(process.tree_pids()) >= 2, "sleep to be seen")
    pids = process.tree_pids()
    result = process.wait(timeout=30)
    assert result.timed_out and result.stopped == "timeout" and not result.ok
    assert result.signal == signal.SIGTERM and result.exit_code is None
    assert result.wall_seconds < 20  # the 30 s sleep did not run out
    assert not any(alive(pid) for pid in pids)
    assert footer(h.log())["timed out"] == "yes, after 0.5 s"


def test_stop_a_command_that_traps_sigterm_gives_its_exit_code(h):
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)"
    )
    process = h.start([PY, "-c", code])  # a shell's trap could race its own `wait`
    h.wait_for_line("ready")
    begun = time.monotonic()
    result = process.stop(30, "preempted")
    assert time.monotonic() - begun < 15  # it obeyed SIGTERM: no waiting out the 30 s grace
    assert result.exit_code == 143 and result.signal is None
    assert result.stopped == "preempted" and not result.timed_out and not result.ok
    assert result.leftover_pids == []
    assert footer(h.log())["stopped"] == "preempted"


def test_stop_a_command_that_ignores_sigterm_kills_it(h):
    process = h.start("trap '' TERM; echo ready; sleep 30; echo never")
    h.wait_for_line("ready")
    wait_until(lambda: len(process.tree_pids()) >= 2, "sleep to be seen")
    pids = process.tree_pids()
    result = process.stop(0.5, "cancelled")
    assert result.signal == signal.SIGKILL and result.exit_code is None
    assert result.stopped == "cancelled" and result.leftover_pids == []
    assert not any(alive(pid) for pid in pids)
    assert "never" not in h.lines
    assert footer(h.log())["exit"] == "killed by signal 9 (SIGKILL)"


def test_a_later_stop_shortens_the_grace(h):
    process = h.start("trap '' TERM; echo ready; sleep 60")
    h.wait_for_line("ready")
    process.request_stop(60, "lease lost")
    begun = time.monotonic()
    result = process.stop(0.2, "preempted")
    assert time.monotonic() - begun < 20  # well inside the first 60 s grace
    assert result.signal == signal.SIGKILL
    assert result.stopped == "lease lost"  # the first reason is the one reported


def test_setsid_grandchild_is_killed(h, tmp_path):
    (tmp_path / "escape.py").write_text(ESCAPE_PY)
    process = h.start('"$PY" escape.py 0 & wait')
    escaped = int(h.wait_for_line(r"escaped (\d+)").group(1))
    h.watched.add(escaped)
    assert os.getsid(escaped) != process.pid  # it really left the session
    wait_until(lambda: escaped in process.tree_pids(), "the runner to track the escaped process")
    result = process.stop(0.5, "preempted")
    assert result.leftover_pids == []
    assert not alive(escaped)
    assert result.signal == signal.SIGTERM  # the shell obeyed; the escaped one needed SIGKILL


def test_orphaned_escaped_grandchild_is_killed_and_its_cpu_counted(h, tmp_path):
    (tmp_path / "escape.py").write_text(ESCAPE_PY)
    (tmp_path / "spawner.py").write_text(SPAWNER_PY)
    process = h.start('"$PY" spawner.py 0.4; echo spawner-done; sleep 30', sample_interval=0.05)
    escaped = int(h.wait_for_line(r"escaped (\d+)").group(1))
    h.watched.add(escaped)
    wait_until(lambda: escaped in process.tree_pids(), "the runner to track the escaped process")
    (tmp_path / "go").touch()
    h.wait_for_line("spawner-done")  # its parent is gone: only the runner's tracking knows it
    assert os.getsid(escaped) != process.pid and os.getpgid(escaped) != process.pid
    result = process.stop(0.5, "preempted")
    assert result.leftover_pids == []
    assert not alive(escaped)
    assert result.cpu_user + result.cpu_system >= 0.35  # the orphan's 0.4 s is not in any rusage


def test_strays_after_a_normal_exit_are_stopped(h):
    process = h.start("sleep 30 & echo started $!", kill_grace=5)
    stray = int(h.wait_for_line(r"started (\d+)").group(1))
    h.watched.add(stray)
    result = process.wait(timeout=30)
    assert result.exit_code == 0 and result.ok
    assert stray in result.stray_pids and result.leftover_pids == []
    assert not alive(stray)
    assert str(stray) in footer(h.log())["stray processes stopped"]


def test_stop_from_another_thread_while_wait_blocks(h):
    process = h.start("echo ready; sleep 30")
    h.wait_for_line("ready")
    results: list[RunResult] = []
    waiter = threading.Thread(target=lambda: results.append(process.wait()))
    waiter.start()
    assert process.is_running()
    stopped = process.stop(5, "shutdown")
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert results == [stopped]
    assert stopped.stopped == "shutdown" and not process.is_running()


def test_request_stop_from_on_line(h):
    holder: list[RunningProcess] = []

    def on_line(line: str) -> None:
        if line == "ready":
            with pytest.raises(RenderError):
                holder[0].stop(1, "blocking from the reader")
            holder[0].request_stop(1, "fatal line")

    started = threading.Event()

    def gated(line: str) -> None:
        started.wait(10)
        on_line(line)

    process = h.start("echo ready; sleep 30", on_line=gated)
    holder.append(process)
    started.set()
    result = process.wait(timeout=30)
    assert result.stopped == "fatal line"


def test_wait_with_timeout_raises_while_running(h):
    process = h.start("echo ready; sleep 30")
    with pytest.raises(TimeoutError):
        process.wait(timeout=0.1)
    assert process.is_running()
    process.stop(5, "done testing")


def test_stop_after_a_normal_exit_returns_that_result(h):
    process = h.start("exit 4")
    first = process.wait(timeout=30)
    again = process.stop(1, "too late")
    assert again is first
    assert again.exit_code == 4 and again.stopped is None


def test_stop_needs_a_reason_and_a_sane_grace(h):
    process = h.start("echo ready; sleep 30")
    for grace, reason in ((-1, "x"), (float("inf"), "x"), (1, " ")):
        with pytest.raises(RenderError) as err:
            process.request_stop(grace, reason)
        assert err.value.code == "bad_run_spec"
    process.stop(5, "done testing")


# ---------------------------------------------------------------- the reason a task gives


def test_a_task_that_times_out_is_reported_as_a_timeout_not_a_crash(tmp_path):
    from cio_worker.job.document import JobInfo, TaskDocument, TaskInfo
    from cio_worker.job.paths import PathMap
    from cio_worker.node.execution import ExecutionContext, execute
    from cio_worker.storage import open_storage

    (tmp_path / "storage").mkdir()
    doc = TaskDocument(
        job=JobInfo(id="00001", title="slow", project="default", storage=f"file://{tmp_path / 'storage'}",
                    output_path="/proj/renders"),
        task=TaskInfo(id="000", frames="1", command="echo ready; sleep 30"),
    )
    ctx = ExecutionContext(work_root=tmp_path / "work", open_storage=open_storage, runner=ProcessRunner(),
                           path_map=PathMap.rooted(str(tmp_path / "root")),
                           base_env={"PATH": os.environ["PATH"]}, task_timeout=0.5, kill_grace=5)
    outcome = execute(doc, ctx)
    assert outcome.status == "failed"
    assert outcome.run.timed_out and outcome.run.signal == signal.SIGTERM
    assert outcome.error.code == "timeout", outcome.reason
    assert "task timeout of 0.5 s" in outcome.reason and "signal 15" in outcome.reason
