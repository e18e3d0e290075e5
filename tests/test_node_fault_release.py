"""A failure the node causes (its renderer missing, a full disk) is not the task's: the agent gives
the task back at no cost to its failed budget, and after ``node_fault_limit`` of them in a row it
stops claiming and gives up (the CLI: the give-up command, exit status 69). Real agents on threads
(and one real ``cio-worker agent`` process) on a sqlite queue, running real commands."""

from __future__ import annotations

import os

import errno
import subprocess
import sys
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

from cio_worker.errors import CioError, RenderError
from cio_worker.job.document import JobInfo, RetryPolicy
from cio_worker.node.faults import node_fault
from cio_worker.queue import NewTask, SqliteQueue
from tests.test_agent_fleet import Fleet
from tests.waiting import wait_for

MISSING = "cnode /proj/shot.project -image a -image_frames_list '1'"  # run where no cnode is on PATH
NO_RENDERER = {"PATH": "/usr/bin:/bin"}


def project_on(root: Path) -> None:
    """The project the command names, where the node's path map puts it (so the renderer, not
    the project, is what is missing)."""
    (root / "proj").mkdir(parents=True, exist_ok=True)
    (root / "proj" / "shot.project").write_text("#Isotropix_Serial_Version 1.0\n")


def _gone(fleet: Fleet) -> bool:
    return not fleet.threads[-1][1].is_alive()


@contextmanager
def sqlite_fleet(tmp_path: Path) -> Iterator[tuple[Fleet, SqliteQueue]]:
    """A fleet whose agents poll the sqlite queue itself; everything stopped at the end."""
    fleet = Fleet(tmp_path)
    try:
        with closing(SqliteQueue(tmp_path / "queue.db")) as queue:
            yield fleet, queue
    finally:
        assert not fleet.close()


def test_a_node_without_the_renderer_gives_the_task_back_unspent_and_gives_up(tmp_path: Path) -> None:
    with sqlite_fleet(tmp_path) as (fleet, queue):
        job = fleet.command_job(MISSING)  # the job allows no failed attempt at all
        project_on(tmp_path / "node-a" / "root")
        agent = fleet.agent("node-a", queue=queue, node_fault_limit=3, env=NO_RENDERER)
        wait_for(lambda: _gone(fleet), 60, "the agent to give up")
        assert agent.summary.gave_up and agent.summary.node_faults == 3, agent.summary
        assert "3 node faults in a row" in agent.summary.exit_reason
        assert agent.summary.failed == 0 and agent.summary.released == 3
        task = fleet.task(job)
        assert task.state == "pending" and task.attempts["failed"] == 0, (task.state, task.attempts)
        released = [e for e in fleet.backend.events(job, "000") if e.kind == "released"]
        assert len(released) == 3 and all("this node's fault" in (e.detail or "") for e in released), released
        assert "cannot run 'cnode'" in released[0].detail
        assert fleet.worker("node-a").state == "stopped"


def test_a_task_that_fails_on_its_own_still_spends_its_budget(tmp_path: Path) -> None:
    with sqlite_fleet(tmp_path) as (fleet, queue):
        job = fleet.command_job("echo broken scene; exit 3")
        agent = fleet.agent("node-a", queue=queue, idle_exit_seconds=0.5)
        wait_for(lambda: _gone(fleet), 60, "the agent to exit idle")
        assert fleet.task(job).state == "failed" and fleet.task(job).attempts["failed"] == 1
        assert not agent.summary.gave_up and agent.summary.node_faults == 0


def test_what_counts_as_the_nodes_fault() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise CioError(f"could not place 1 input file: {exc}", code="place_failed")
    except CioError as wrapped:
        assert node_fault(wrapped)
    missing = RenderError("cannot run 'cnode': no such program", code="command_not_found")
    assert node_fault(missing, "cnode scene.project -image_frames_list 1")
    assert node_fault(missing, "/opt/clarisse/cnode scene.project")
    # A job whose command names a program no machine has is the job's fault, not every node's.
    assert not node_fault(RenderError("exit 127: command not found", code="command_not_found"), "rendr --scene x")
    assert not node_fault(RenderError("the renderer reported a fatal error: unable to get a licence", code="licence"))
    assert not node_fault(RenderError("the renderer exited with status 1", code="render_failed"))
    assert not node_fault(CioError("Permission denied", code="node_error"))
    assert not node_fault(None)


def test_the_agent_command_runs_the_give_up_command_and_exits_69(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    backend = SqliteQueue(db)
    info = JobInfo(id="00000", title="faults", project="default", storage=f"file://{tmp_path / 'storage'}",
                   output_path="C:/proj/renders", autoretry_policy=RetryPolicy(preempted=2, failed=0))
    job = backend.create_job(info, [NewTask("1", MISSING)])
    marker = tmp_path / "gave-up"
    project_on(tmp_path / "root")
    out = subprocess.run(
        [sys.executable, "-m", "cio_worker", "agent", "--queue", f"sqlite:///{db}", "--root", str(tmp_path / "root"),
         "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"), "--preemption", "none",
         "--poll-seconds", "0.1", "--node-fault-limit", "2",
         "--give-up-command", f'echo "$CIO_GIVE_UP_REASON" > {marker}'],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": "/usr/bin:/bin"})  # no cnode here
    assert out.returncode == 69, out.stderr
    assert "2 node faults in a row" in marker.read_text()
    [task] = backend.tasks(job)
    assert task.state == "pending" and task.attempts["failed"] == 0
    backend.close()


# -- the licence server this node cannot reach -----------------------------------------------------


def test_a_licence_server_that_does_not_answer_is_the_nodes_fault_and_a_denied_licence_the_tasks() -> None:
    from cio_worker.node.clarisse import Prepared, RenderMonitor

    def judged(*lines: str):
        monitor = RenderMonitor(Prepared(argv=["cnode"], cwd=Path("."), env={}))
        for line in lines:
            monitor.feed(line + "\n")
        return monitor.judge(1, None)

    # RLM's words, as the simulator prints them: the checkout line first, then why it failed.
    unreachable = judged("[ERROR] License: unable to check out a cnode license from server conductor_ilise:40500",
                         "[ERROR] RLM: Communications error with license server (-17)",
                         "[ERROR] RLM: Connection refused at server (-111)")
    assert unreachable.code == "licence_unreachable" and "(-17)" in str(unreachable)
    assert node_fault(unreachable, "cnode shot.project -image_frames_list 1")
    assert judged("[ERROR] Connection refused at server (-111)").code == "licence_unreachable"
    denied = judged("[ERROR] License: unable to get a license from server conductor_ilise:40500")
    assert denied.code == "licence" and not node_fault(denied)


def _shot_fleet(fleet: Fleet, frames: str) -> str:
    return fleet.shot_job(frames=frames, chunk_size=1, retries_failed=0)


def test_a_node_that_cannot_reach_the_licence_server_gives_the_task_back_unspent_and_gives_up(tmp_path: Path) -> None:
    with sqlite_fleet(tmp_path) as (fleet, queue):
        job = _shot_fleet(fleet, "1")  # the job allows no failed attempt at all
        agent = fleet.agent("node-a", queue=queue, node_fault_limit=2, env={"CNODE_SIM_FAIL": "license_unreachable"})
        wait_for(lambda: _gone(fleet), 60, "the agent to give up")
        assert agent.summary.gave_up and agent.summary.node_faults == 2, agent.summary
        task = fleet.task(job)
        assert task.state == "pending" and task.attempts == {"preempted": 0, "failed": 0, "released": 2}, task
        released = [e for e in fleet.backend.events(job, "000") if e.kind == "released"]
        assert all("this node's fault" in e.detail and "Communications error with license server" in e.detail
                   for e in released), released


def test_a_success_starts_the_node_fault_count_again(tmp_path: Path) -> None:
    """node_fault_limit 3: two licence faults, a success, two more faults: the node still serves."""
    with sqlite_fleet(tmp_path) as (fleet, queue):
        job = _shot_fleet(fleet, "1-3")
        # Runs 1, 2, 4 and 5 of the renderer on this node cannot reach the licence server.
        wrap = tmp_path / "wrap"
        wrap.mkdir()
        counter = tmp_path / "runs"
        (wrap / "cnode").write_text(
            "#!/bin/sh\n"
            f'n=$(( $(cat "{counter}" 2>/dev/null || echo 0) + 1 )); echo "$n" > "{counter}"\n'
            'case "$n" in 1|2|4|5) CNODE_SIM_FAIL=license_unreachable; export CNODE_SIM_FAIL ;; esac\n'
            f'exec "{fleet.bin / "cnode"}" "$@"\n')
        (wrap / "cnode").chmod(0o755)
        agent = fleet.agent("node-a", queue=queue, node_fault_limit=3, idle_exit_seconds=1.0,
                            env={"PATH": f"{wrap}{os.pathsep}{fleet.env['PATH']}"})
        wait_for(lambda: _gone(fleet), 120, "the agent to finish the job and exit idle")
        assert int(counter.read_text()) == 7
        assert not agent.summary.gave_up and agent.summary.node_faults == 4, agent.summary
        tasks = fleet.backend.tasks(job)
        assert [t.state for t in tasks] == ["done"] * 3
        assert [t.attempts["released"] for t in tasks] == [2, 2, 0] and all(t.attempts["failed"] == 0 for t in tasks)
