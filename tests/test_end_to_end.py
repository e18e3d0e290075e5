"""The whole path on one machine: submit, agent processes running the cnode simulator, outputs
uploaded, downloaded where the artist expects them (issue 3's "done when")."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cio_worker.sim.examples import example_job_path, example_root
from cio_worker.job.project import load_project, output_file_name
from cio_worker.queue import open_queue
from cio_worker.sim.simulate import Simulation, SimulationConfig
from cio_worker.sim.png import read_png
from tests.shots import make_shot
from tests.test_tile_assembly import assert_frame_is_its_tiles

pytestmark = pytest.mark.slow


def simulate(tmp: Path, spec: Path, root: Path, **kw) -> tuple:
    out = io.StringIO()
    config = SimulationConfig(job_spec=spec, source_root=root, work_dir=tmp, frame_seconds=kw.pop("frame_seconds", 0.02),
                              timeout_seconds=240, **kw)
    summary = Simulation(config, out=out).run()
    return summary, out.getvalue()


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("example-sim")
    summary, log = simulate(work, example_job_path(), example_root(), workers=2)
    return work, summary, log


def expected_outputs() -> dict[str, list[str]]:
    """Every frame the example job must give the artist, with the 4 tiles the agents render for
    it, computed from the project, not from the run."""
    project = load_project(example_root() / "proj/shots/shot_A/shot_A.project",
                           display_path="/proj/shots/shot_A/shot_A.project")
    frames = {}
    for item in ("project://scene/beauty", "project://scene/fx"):
        image = project.image(item)
        save_as = project.resolve(image.save_as)
        for frame in image.frames:
            frames[output_file_name(save_as, frame).replace("C:", "")] = [
                output_file_name(save_as, frame, 4, tile).replace("C:", "") for tile in range(1, 5)]
    return frames


def test_every_frame_arrives_pasted_from_the_tiles_the_agents_rendered(example_run):
    work, summary, log = example_run
    assert summary.done == summary.tasks == 20, log
    artist = work / "artist"
    placed = {"/" + p.relative_to(artist).as_posix() for p in summary.downloaded_files}
    expected = expected_outputs()
    assert placed == set(expected)
    assert {p.rsplit(".", 1)[1] for p in placed} == {"png", "exr"}  # fx is saved as OpenEXR
    assert not [p for p in artist.rglob("*") if ".tilex" in p.name]  # each tile removed once pasted
    for artist_path, tile_paths in expected.items():
        tiles = []
        for tile in tile_paths:
            rendered = [work / f"node-{i}" / "root" / tile.lstrip("/") for i in (1, 2)]
            copies = [p for p in rendered if p.exists()]
            assert copies and len({p.read_bytes() for p in copies}) == 1, tile
            tiles.append(copies[0])
        assert_frame_is_its_tiles(artist / artist_path.lstrip("/"), tiles)
        if artist_path.endswith(".png"):
            read_png(artist / artist_path.lstrip("/"))  # a whole, valid PNG
    # both agents worked, scouts ran first and the rest waited for the release
    assert "released 12 held tasks" in log
    with open_queue(f"sqlite:///{work / 'queue.db'}") as queue:
        workers = {e.worker for e in queue.events(summary.job_id) if e.kind == "claimed"}
        assert workers == {"node-1", "node-2"}
        assert all(r.state == "downloaded" for r in queue.downloads(summary.job_id, state=None))


def test_a_second_download_of_the_same_outputs_writes_nothing(example_run):
    work, summary, _ = example_run
    out = subprocess.run(
        [sys.executable, "-m", "cio_worker", "download", "--queue", f"sqlite:///{work / 'queue.db'}",
         "--root", str(work / "artist"), "--md5-cache", str(work / "dl-md5.db")],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "0 files written" in out.stderr  # every record was already downloaded


def test_a_changed_texture_changes_the_pixels(tmp_path):
    first = make_shot(tmp_path / "a", frames="1-2")
    s1, log1 = simulate(tmp_path / "sim-a", first.spec, first.root, workers=1)
    second = make_shot(tmp_path / "b", frames="1-2")
    second.texture.write_bytes(b"wood texture v2\n" * 64)
    s2, log2 = simulate(tmp_path / "sim-b", second.spec, second.root, workers=1)
    assert s1.done == s1.tasks == 1 and s2.done == s2.tasks == 1, log1 + log2
    a = {p.name: read_png(p).pixels for p in s1.downloaded_files}
    b = {p.name: read_png(p).pixels for p in s2.downloaded_files}
    assert set(a) == set(b) == {"beauty.0001.png", "beauty.0002.png"}
    assert all(a[name] != b[name] for name in a)
    # and the same inputs give the same pixels
    third = make_shot(tmp_path / "c", frames="1-2")
    s3, _ = simulate(tmp_path / "sim-c", third.spec, third.root, workers=1)
    assert {p.name: read_png(p).pixels for p in s3.downloaded_files} == a


def test_a_missing_input_fails_the_task_with_a_clear_reason(tmp_path):
    # With no dependency scan the texture is never uploaded: cnode cannot open it on the node.
    shot = make_shot(tmp_path / "shot", frames="1-2", dependency_scan="none", retries_failed=0)
    summary, log = simulate(tmp_path / "sim", shot.spec, shot.root, workers=1)
    assert summary.failed == 1 and summary.done == 0, log
    with open_queue(f"sqlite:///{tmp_path / 'sim' / 'queue.db'}") as queue:
        [task] = queue.tasks(summary.job_id)
    assert "fatal error" in task.reason and "wood.png" in task.reason
    assert task.attempts["failed"] == 1


def test_a_crashing_render_is_retried_per_policy_then_reported_failed(tmp_path):
    shot = make_shot(tmp_path / "shot", frames="1-2", chunk_size=2, retries_failed=2)
    summary, log = simulate(tmp_path / "sim", shot.spec, shot.root, workers=2, agent_env={"CNODE_SIM_FAIL": "crash"})
    assert summary.failed == 1, log
    with open_queue(f"sqlite:///{tmp_path / 'sim' / 'queue.db'}") as queue:
        [task] = queue.tasks(summary.job_id)
        events = [e.kind for e in queue.events(summary.job_id, task.id)]
        failed_on = [e.worker for e in queue.events(summary.job_id, task.id) if e.kind == "failed"]
    # The first try and two retries; one more when those three were all one worker's (the job's
    # distinct_workers, 2 by default: a task fails for real only once two workers have failed it).
    expected = 3 if len(set(failed_on[:3])) > 1 else 4
    assert task.attempts["failed"] == expected and len(set(failed_on)) == 2, failed_on
    assert events.count("claimed") == expected
    assert "exited with status 3" in task.reason


def _agent(queue_url: str, node: Path, worker: str, env: dict, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "cio_worker", "agent", "--queue", queue_url, "--worker-id", worker,
            "--root", str(node / "root"), "--work-dir", str(node / "work"), "--cache-dir", str(node / "cache"),
            "--poll-seconds", "0.1", *extra]
    return subprocess.Popen(argv, env=env, stdout=open(node / "agent.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_a_killed_agents_lease_expires_and_another_agent_finishes(tmp_path):
    from cio_worker.storage.md5cache import Md5Cache
    from cio_worker.job.paths import PathMap
    from cio_worker.sim.shim import install_cnode_shim
    from cio_worker.storage import open_storage
    from cio_worker.artist.submit import submit_job

    shot = make_shot(tmp_path / "shot", frames="1-4", chunk_size=4)
    queue_url = f"sqlite:///{tmp_path / 'queue.db'}"
    storage_url = f"file://{tmp_path / 'storage'}"
    queue = open_queue(queue_url)
    result = submit_job(shot.spec, queue=queue, storage=open_storage(storage_url), storage_url=storage_url,
                        path_map=PathMap.rooted(str(shot.root)), md5cache=Md5Cache(tmp_path / "md5.db"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    install_cnode_shim(bin_dir)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CNODE_SIM_FRAME_SECONDS="1.5")
    (tmp_path / "a").mkdir()
    a = _agent(queue_url, tmp_path / "a", "agent-a", env, "--lease-seconds", "3", "--heartbeat-seconds", "0.5")
    try:
        deadline = time.monotonic() + 60
        while queue.tasks(result.job_id)[0].state != "leased":
            assert time.monotonic() < deadline and a.poll() is None
            time.sleep(0.1)
        render = None
        while render is None:  # wait until cnode runs under agent A, then kill the whole instance
            kids = psutil.Process(a.pid).children(recursive=True)
            render = next((k for k in kids if "cio_worker.sim.cnode" in " ".join(k.cmdline())), None)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(timeout=10)
        psutil.wait_procs([render], timeout=10)
        assert not render.is_running()
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    (tmp_path / "b").mkdir()
    env_b = dict(env, CNODE_SIM_FRAME_SECONDS="0.01")
    b = _agent(queue_url, tmp_path / "b", "agent-b", env_b, "--idle-exit", "1", "--lease-seconds", "30")
    try:
        assert b.wait(timeout=120) == 0
    finally:
        if b.poll() is None:
            os.killpg(b.pid, signal.SIGKILL)
    [task] = queue.tasks(result.job_id)
    assert task.state == "done"
    assert task.attempts["preempted"] == 1  # the expired lease counted as a preemption
    kinds = [(e.kind, e.worker) for e in queue.events(result.job_id, task.id)]
    assert ("claimed", "agent-a") in kinds and ("claimed", "agent-b") in kinds
    assert [r.task_id for r in queue.downloads(result.job_id)] == ["000"]
    queue.close()
