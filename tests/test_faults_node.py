"""Node faults with figures: a full disk (blocks or inodes) under the render node's inputs, work
directory and cache, under the renderer's outputs, and under the artist's download directory.

A real small filesystem is mounted for each test (tmpfs with a size and inode limit; a loop-mounted
ext4 image if tmpfs cannot be mounted); without the privilege for either the tests skip, saying so.
A full disk on the render node is the node's fault, not the task's (cio_worker.node.faults): the
task goes back to pending with a reason that names the problem and its failed budget unspent, and
the agent gives up after ``node_fault_limit`` such tasks in a row. For each: nothing half-written is
left at a destination, no temporary file is left, an agent serves again once there is room, and no
process is left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from cio_worker.job.document import JobInfo, RetryPolicy
from cio_worker.artist.downloader import Downloader
from cio_worker.job.paths import PathMap
from cio_worker.queue import NewTask
from cio_worker.storage import open_storage
from tests.test_faults_storage import (
    Farm,
    assert_farm_invariants,
    assert_downloads_identical,
    captured_logs,
    record_figure,
    temp_files,
)

KiB = 1024
MiB = 1024 * KiB


# --- a small real filesystem -------------------------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _unmount(where: Path) -> None:
    for _ in range(50):
        if _run("umount", str(where)).returncode == 0:
            return
        time.sleep(0.1)  # a process of the test still holds a file: give it a moment
    _run("umount", "-l", str(where))
    raise AssertionError(f"{where} stayed busy: something the test started still holds a file there")


@contextmanager
def small_disk(where: Path, size: int, inodes: int | None = None) -> Iterator[Path]:
    """Mount a filesystem of ``size`` bytes at ``where`` (tmpfs, else a loop ext4 image), or skip."""
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    try:
        tmpfs = _run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where))
    except FileNotFoundError:
        pytest.skip("no mount command here: a full disk cannot be made")
    if tmpfs.returncode != 0:
        if inodes:
            pytest.skip(f"cannot mount a tmpfs with an inode limit here ({tmpfs.stderr.strip()})")
        image = where.with_suffix(".img")
        with open(image, "wb") as f:
            f.truncate(max(size, 1 * MiB))
        made = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image)) if shutil.which("mkfs.ext4") else None
        loop = _run("mount", "-o", "loop", str(image), str(where)) if made and made.returncode == 0 else None
        if loop is None or loop.returncode != 0:
            image.unlink(missing_ok=True)
            why = tmpfs.stderr.strip() or "mount failed"
            pytest.skip(f"no way to make a small filesystem here: tmpfs ({why}), loop ext4 (not possible)")
    try:
        yield where
    finally:
        _unmount(where)
        where.with_suffix(".img").unlink(missing_ok=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` until about ``leave`` bytes are free; return the filler (delete it to make room)."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as out:
        try:
            out.write(b"\0" * max(0, free - leave))
            out.flush()
        except OSError:
            pass
    return filler


def file_farm(base: Path, node: Path | None = None, **kw: object) -> Farm:
    """A farm on a file:// store (no network between the node and its storage)."""
    url = f"file://{base / 'storage'}"
    return Farm(base, url, direct=lambda: open_storage(url), agent_storage=lambda u: open_storage(u), node=node,
                **kw)  # type: ignore[arg-type]


def create_job(farm: Farm, command: str, *, output_path: str = "C:/proj/renders", frames: str = "1",
               retries_failed: int = 0, environment: tuple = ()) -> str:
    """A job whose one task runs ``command`` (a shell command line) with no inputs."""
    job = JobInfo(id="00000", title="node faults", project="default", storage=farm.storage_url,
                  output_path=output_path, autoretry_policy=RetryPolicy(preempted=1, failed=retries_failed),
                  environment=environment)
    return farm.queue.create_job(job, [NewTask(frames, command)])


def wait_gave_up(running, timeout: float = 120.0):
    """The agent's summary once it gave up after node faults in a row."""
    running.thread.join(timeout)
    assert not running.thread.is_alive(), "the agent did not give up"
    assert running.error is None, running.error
    summary = running.summary
    assert summary is not None and summary.gave_up, summary
    return summary


def assert_given_back_unspent(farm: Farm, job: str):
    """The task is pending again with its failed budget whole; returns it."""
    task = farm.task(job)
    assert task.state == "pending" and task.attempts["failed"] == 0, (task.state, task.attempts)
    assert "this node's fault" in task.reason, task.reason
    return task


# --- inputs that do not fit ------------------------------------------------------------------------------


def test_inputs_that_do_not_fit_go_back_unspent_and_the_node_gives_up(tmp_path: Path) -> None:
    big = os.urandom(2200 * KiB)  # larger than the whole 2 MiB disk (the cache shares the placed copy by a link)
    with small_disk(tmp_path / "disk", 2 * MiB) as disk, closing(file_farm(tmp_path, node=disk / "node")) as farm:
        with captured_logs() as logs:
            with farm.agent(node_fault_limit=2) as running:
                job = farm.submit("big", frames="1-2", texture=big, retries_failed=0)
                assert wait_gave_up(running).node_faults == 2
            task = assert_given_back_unspent(farm, job)
            assert "C:/proj/tex/wood.png" in task.reason and "No space left on device" in task.reason, task.reason
            placed = Path(farm.local("C:/proj/tex/wood.png"))
            assert not placed.exists()  # not a partial copy of it either
            farm.queue.kill_job(job)  # it can never fit on this node
        with captured_logs(), farm.agent() as running:
            # a new agent serves: a job that fits goes through on the same full-ish disk
            good = farm.submit("small", frames="5-6", texture=b"small texture\n" * 16)
            farm.wait_finished(good, running)
            assert farm.task(good).state == "done", farm.task(good).reason
        states = assert_farm_invariants(farm)
    record_figure("disk-full/sync", injected={"enospc_blocks": 1}, outcome=states, reason=task.reason,
                  agent_log_errors=logs.text.count("ERROR"))


def test_a_full_inode_table_gives_the_task_back_and_it_runs_once_there_is_room(tmp_path: Path) -> None:
    """No inode left: even the per-task directory cannot be made. That task goes back unspent, the
    agent gives up; once there is room a new agent runs the same task."""
    with small_disk(tmp_path / "disk", 4 * MiB, inodes=64) as disk, \
            closing(file_farm(tmp_path, node=disk / "node")) as farm:
        with farm.agent(node_fault_limit=2) as running:
            warm = create_job(farm, "echo warm")  # the node's directories exist
            farm.wait_finished(warm, running)
            assert farm.task(warm).state == "done"
            fillers = disk / "fillers"
            fillers.mkdir()
            made = 0
            try:
                while True:
                    (fillers / str(made)).touch()
                    made += 1
            except OSError:
                pass
            job = create_job(farm, "echo hello")
            wait_gave_up(running)
        task = assert_given_back_unspent(farm, job)
        assert "No space left on device" in task.reason, task.reason
        shutil.rmtree(fillers)
        with farm.agent() as running:
            farm.wait_finished(job, running)
            assert farm.task(job).state == "done"
        states = assert_farm_invariants(farm)
    record_figure("disk-full/inodes", injected={"enospc_inodes": 1}, outcome=states, reason=task.reason)


# --- outputs that do not fit ------------------------------------------------------------------------------


def test_a_render_that_fills_the_disk_goes_back_unspent_and_nothing_is_offered(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 2 * MiB) as disk, closing(file_farm(tmp_path, node=disk / "node")) as farm:
        out = f"{farm.root}/proj/renders"
        command = f"mkdir -p {out} && head -c 3000000 /dev/zero > {out}/big.0001.exr"
        with captured_logs():
            with farm.agent(node_fault_limit=1) as running:
                job = create_job(farm, command)
                wait_gave_up(running)
            task = assert_given_back_unspent(farm, job)
            assert "exited with status 1" in task.reason, task.reason
            assert farm.queue.downloads(job, state=None) == []  # the partial frame is never offered
            stored = [p.relative_to(tmp_path / "storage") for p in (tmp_path / "storage").rglob("*") if p.is_file()]
            assert all(p.parts[0] == "_logs" for p in stored), stored  # nor uploaded (the task log is)
            farm.queue.kill_job(job)  # it can never fit on this node
            Path(out, "big.0001.exr").unlink()  # what an operator (or a disk-aware agent) does
        with captured_logs(), farm.agent() as running:
            good = create_job(farm, f"echo frame > {out}/small.0001.exr")
            farm.wait_finished(good, running)
            assert farm.task(good).state == "done", farm.task(good).reason
            [record] = farm.queue.downloads(good, state=None)
            assert [f.relative_path for f in record.files] == ["small.0001.exr"]
        states = assert_farm_invariants(farm)
    record_figure("disk-full/render-outputs", injected={"enospc_blocks": 1}, outcome=states, reason=task.reason)


def test_a_render_that_fills_the_disk_says_so_in_its_reason(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 2 * MiB) as disk, closing(file_farm(tmp_path, node=disk / "node")) as farm:
        out = f"{farm.root}/proj/renders"
        with farm.agent(node_fault_limit=1) as running:
            job = create_job(farm, f"mkdir -p {out} && head -c 3000000 /dev/zero > {out}/big.0001.exr")
            wait_gave_up(running)
        reason = assert_given_back_unspent(farm, job).reason
        farm.queue.kill_job(job)
        assert_farm_invariants(farm)
    assert "no space left on device" in reason.lower(), reason


# --- the artist's disk ---------------------------------------------------------------------------------------


def test_a_download_onto_a_full_disk_places_nothing_and_finishes_when_there_is_room(tmp_path: Path) -> None:
    farm = file_farm(tmp_path)
    out = f"{farm.root}/proj/renders"
    command = " && ".join([f"mkdir -p {out}"] + [f"head -c 307200 /dev/urandom > {out}/f{i}.exr" for i in range(3)])
    with farm.agent() as running:
        job = create_job(farm, command)
        farm.wait_finished(job, running)
    assert farm.task(job).state == "done"
    with small_disk(tmp_path / "artist-disk", 1 * MiB) as disk:
        artist = disk / "artist"
        filler = fill(disk, leave=500 * KiB)  # room for one file of three, not all
        downloader = Downloader(farm.queue, open_storage, PathMap.rooted(str(artist)))
        report = downloader.run_once(job)
        assert report.files_written == 0 and len(report.refused) == 1
        assert "No space left on device" in report.refused[0], report.refused
        placed = list(artist.rglob("*.exr")) if artist.exists() else []
        assert placed == [] and temp_files(artist) == []  # all or nothing, nothing half-written
        assert [r.state for r in farm.queue.downloads(job, state=None)] == ["pending"]
        filler.unlink()
        report = Downloader(farm.queue, open_storage, PathMap.rooted(str(artist))).run_once(job)
        assert report.refused == [] and report.files_written == 3
        assert assert_downloads_identical(farm, artist, job) == 3
        assert [r.state for r in farm.queue.downloads(job, state=None)] == ["downloaded"]
    assert_farm_invariants(farm)
    record_figure("disk-full/download", injected={"enospc_blocks": 1},
                  outcome={"first_run_refused": 1, "second_run_placed": 3})
    farm.close()
