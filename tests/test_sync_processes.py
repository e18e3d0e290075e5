"""A large download from a local store split over worker processes (node/sync_worker.py): real
processes, a real file:// store, real files; the worker processes are watched by pid."""

from __future__ import annotations

import os
import signal
import multiprocessing
import subprocess
import threading
from pathlib import Path

import pytest

from cio_worker.errors import CioError, StorageError
from cio_worker.job.document import UploadFile
from cio_worker.job.hashing import md5_b64_of_bytes
from cio_worker.node import sync as sync_module
from cio_worker.node import sync_worker
from cio_worker.node.faults import node_fault
from cio_worker.node.sync import InputSync, _Target
from cio_worker.storage.base import StorageOptions
from cio_worker.storage.common import UnnamedFiles
from cio_worker.storage.file import FileStorage
from tests.slow_store import SlowFileStorage
from tests.test_sync import Farm, assert_placed, leftovers


class Stop(CioError):
    code = "stopping"


class Started:
    """Records each worker process the sync starts (a spy on the real start)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, then=None) -> None:
        self.processes: list[subprocess.Popen] = []
        real = sync_module._start_worker

        def start():
            conn, process = real()
            self.processes.append(process)
            if then is not None:
                then(process)
            return conn, process

        monkeypatch.setattr(sync_module, "_start_worker", start)

    def all_ended(self) -> bool:
        return all(p.poll() is not None for p in self.processes)


@pytest.fixture(params=["unnamed", "named"])
def farm(tmp_path: Path, request: pytest.FixtureRequest) -> Farm:
    return Farm(tmp_path, unnamed=request.param == "unnamed")


def split_syncer(farm: Farm, storage: FileStorage | None = None, **kw) -> InputSync:
    """The farm's sync on the plain FileStorage (which splits), split from 2 contents on."""
    if not farm.unnamed:
        kw.setdefault("unnamed", lambda: None)
    return InputSync(storage or FileStorage(farm.storage.url), farm.cache, farm.md5cache, farm.path_map,
                     processes=2, split_from=2, **kw)  # fmt: skip


def many(farm: Farm, count: int, prefix: str = "C:/proj/tex") -> list[UploadFile]:
    files = [farm.put(f"{prefix}/t{i:04d}.exr", os.urandom(500 + i), mode=0o100755 if i % 7 == 0 else 0o100644)
             for i in range(count)]  # fmt: skip
    return files + [UploadFile(f"{prefix}/copy/t0001.exr", files[1].md5, files[1].size)]  # one content, two places


def test_a_split_download_places_everything_and_records_it_for_the_next_sync(farm, monkeypatch):
    started = Started(monkeypatch)
    files = many(farm, 120)
    moved: list[int] = []

    class Progress:
        def start(self, files, total_bytes):
            self.total = total_bytes

        def advance(self, nbytes):
            moved.append(nbytes)

        def file_done(self, key):
            pass

    progress = Progress()
    result = split_syncer(farm, progress=progress).sync(files)
    assert len(started.processes) == 2 and started.all_ended()
    assert [p.returncode for p in started.processes] == [0, 0]
    assert (result.placed, result.downloaded, result.already_present) == (121, 120, 0)
    assert sum(moved) == progress.total == sum(f.size for f in files[:-1])  # the workers' progress came through
    assert_placed(farm, files)
    assert all(farm.cache.has(f.md5) for f in files)
    assert leftovers(farm.root, farm.cache.root) == []
    again = split_syncer(farm).sync(files)  # the workers' MD5 records were written by the agent
    assert (again.already_present, again.placed, farm.hasher.count) == (121, 0, 0)


def test_below_the_threshold_or_from_a_store_that_does_not_split_no_process_is_started(farm, monkeypatch):
    started = Started(monkeypatch)
    files = many(farm, 20)
    InputSync(FileStorage(farm.storage.url), farm.cache, farm.md5cache, farm.path_map, processes=2,
              split_from=100).sync(files[:10])  # fmt: skip
    farm.sync(files[10:], processes=2, split_from=2)  # the farm's CountingStorage does not split
    assert started.processes == []
    assert_placed(farm, files)


def test_a_missing_object_in_a_workers_share_fails_naming_it_and_the_rest_is_placed(farm, monkeypatch):
    Started(monkeypatch)
    files = many(farm, 40)
    ghost = UploadFile("C:/proj/ghost.exr", md5_b64_of_bytes(b"never uploaded"), 14)
    with pytest.raises(StorageError) as info:
        split_syncer(farm).sync(files + [ghost])
    assert "C:/proj/ghost.exr" in str(info.value) and info.value.code == "not_found"
    assert not farm.local(ghost.destination).exists()
    assert_placed(farm, files)
    assert leftovers(farm.root, farm.cache.root) == []


def test_a_worker_that_dies_fails_its_share_as_the_nodes_fault_and_the_other_share_is_placed(farm, monkeypatch):
    killed: list[int] = []

    def kill_the_first(process: subprocess.Popen) -> None:
        if not killed:
            process.send_signal(signal.SIGKILL)
            killed.append(process.pid)

    started = Started(monkeypatch, then=kill_the_first)
    files = many(farm, 30)
    with pytest.raises(CioError) as info:
        split_syncer(farm).sync(files)
    assert info.value.code == "sync_worker_died" and "killed by signal 9" in str(info.value)
    assert node_fault(info.value)  # given back at no cost to the task
    assert started.all_ended()
    placed = [f for f in files if farm.local(f.destination).exists()]
    assert 0 < len(placed) < len(files)  # the other worker's share is there, whole
    assert_placed(farm, placed)
    assert leftovers(farm.root, farm.cache.root) == []


def test_a_stop_during_a_split_download_ends_every_worker_and_leaves_nothing_half_made(farm, monkeypatch):
    started = Started(monkeypatch)
    files = many(farm, 300)

    class StopAtFirstReport:
        def start(self, files, total_bytes):
            pass

        def advance(self, nbytes):
            raise Stop("stopped: preempted")

        def file_done(self, key):
            pass

    # 150 objects a worker at 5 ms each (0.75 s): the stop, at the first report (50 ms in), lands
    # in the middle on any machine (with 1,500 fast ones a quick machine placed them all first).
    slow = SlowFileStorage(farm.storage.url, delay=0.005)
    with pytest.raises(Stop):
        split_syncer(farm, slow, progress=StopAtFirstReport()).sync(files)
    assert len(started.processes) == 2 and started.all_ended()
    assert [p.returncode for p in started.processes] == [0, 0]  # each ended on its own, not killed
    placed = [f for f in files if farm.local(f.destination).exists()]
    assert len(placed) < len(files) // 2  # 25 of 301 here: the workers stopped at their next report
    assert_placed(farm, placed)  # what is there is whole
    assert leftovers(farm.root, farm.cache.root) == []
    rest = split_syncer(farm).sync(files)  # and a later sync finishes the job
    assert rest.placed + rest.already_present == len(files)
    assert_placed(farm, files)


def test_the_worker_runs_the_agents_own_code(farm, monkeypatch, tmp_path):
    """Not whatever an installed copy elsewhere on the path holds: the worker is told where this
    cio_worker is."""
    monkeypatch.chdir(tmp_path)  # not the checkout (a -m module is looked up from the directory first)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere" / "cio_worker").mkdir(parents=True)
    (tmp_path / "elsewhere" / "cio_worker" / "__init__.py").write_text("raise ImportError('the wrong copy')\n")
    files = many(farm, 10)
    split_syncer(farm).sync(files)
    assert_placed(farm, files)


def test_the_node_option_reaches_the_tasks_context(tmp_path):
    import argparse

    from cio_worker.cli.common import add_node_arguments, node_context
    from cio_worker.job.paths import PathMap

    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    base = ["--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache")]
    assert node_context(parser.parse_args(base), PathMap()).sync_processes == 0  # automatic
    assert node_context(parser.parse_args(base + ["--sync-processes", "1"]), PathMap()).sync_processes == 1
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(base + ["--sync-processes", bad])


def test_the_worker_started_by_hand_says_how_it_is_started():
    import sys

    done = subprocess.run([sys.executable, "-m", "cio_worker.node.sync_worker"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2 and "usage:" in done.stderr and "Traceback" not in done.stderr


class Odd(Exception):
    """Pickles, but its arguments do not rebuild it: unpickling fails."""

    def __init__(self, message: str, extra: int) -> None:
        super().__init__(message)
        self.extra = extra


def test_a_workers_error_that_does_not_come_out_of_a_pickle_reaches_the_agent_as_text_naming_its_type():
    import pickle

    from cio_worker.node.sync import _Failure, _Placed, _Target
    from cio_worker.node.sync_worker import _portable

    target = _Target("C:/a.exr", "/r/a.exr", "md5", 1, 0o644, "/r")
    kept = StorageError("gone", code="not_found")
    answer = ("done", [_Placed(placed=1, failures=[_Failure([target], None, Odd("in place", 1))])], [],
              [_Failure([target], "hashstore/k", Odd("in fetch", 2)), _Failure([target], "hashstore/j", kept)])  # fmt: skip
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(answer))
    _, outcomes, _, failures = pickle.loads(pickle.dumps(_portable(answer)))
    assert str(outcomes[0].failures[0].error) == "Odd: in place" and str(failures[0].error) == "Odd: in fetch"
    assert isinstance(failures[0].error, CioError) and failures[0].key == "hashstore/k"
    assert type(failures[1].error) is StorageError and failures[1].error.code == "not_found"  # kept as it was
    failed = pickle.loads(pickle.dumps(_portable(("failed", Odd("no share", 3)))))
    assert str(failed[1]) == "Odd: no share"


def test_a_split_worker_fetches_with_one_thread_unless_a_concurrency_was_set(tmp_path):
    store = FileStorage(f"file://{tmp_path}")
    worker = store.for_split_worker()  # a process a core already: its own threads would trade its GIL
    assert isinstance(worker, FileStorage) and worker.url == store.url and worker.options.concurrency == 1
    assert store.options.concurrency == 0  # the agent's own copy is unchanged
    told = FileStorage(f"file://{tmp_path}", StorageOptions(concurrency=3))
    assert told.for_split_worker() is told


class _AskedStorage(FileStorage):
    """Leaves a mark in its root when a split worker asks for its own copy."""

    def for_split_worker(self) -> FileStorage:
        (self.root / "asked").touch()
        return super().for_split_worker()


def test_a_split_workers_share_is_fetched_through_its_for_split_worker_copy(tmp_path):
    parent, child = multiprocessing.Pipe()
    server = threading.Thread(target=sync_worker.serve, args=(child,))
    server.start()
    try:
        parent.send((_AskedStorage(f"file://{tmp_path}"), None, [], None))
        assert parent.recv()[0] == "done"
    finally:
        server.join(30)
        parent.close()
        child.close()
    assert (tmp_path / "asked").exists()


def test_a_split_worker_takes_the_parents_probes_and_makes_none_of_its_own(tmp_path, monkeypatch):
    # A worker probing as it starts would put the probe's temporary name in the tree while the
    # other worker copies: the parent probed every destination first and tells them what it found.
    farm = Farm(tmp_path, unnamed=True)
    data = [os.urandom(1000 + i) for i in range(4)]
    files = [farm.put(f"C:/proj/tex/t{i}.exr", body) for i, body in enumerate(data)]
    probes: list[str] = []
    real_probe = UnnamedFiles._probe
    monkeypatch.setattr(UnnamedFiles, "_probe", lambda self, directory: probes.append(directory) or real_probe(self, directory))
    dest = tmp_path / "dest"
    dest.mkdir()
    names = UnnamedFiles.open()
    assert names is not None and names.usable_in(str(dest)) and probes == [str(dest)]  # the parent's probe
    names.close()
    groups = {f.md5: [_Target(f.destination, f"{dest}/t{i}.exr", f.md5, f.size, 0o644, str(dest))]
              for i, f in enumerate(files)}  # fmt: skip
    parent, child = multiprocessing.Pipe()
    server = threading.Thread(target=sync_worker.serve, args=(child,))
    server.start()
    try:
        parent.send((FileStorage(farm.storage.url), farm.cache, groups, names.decided()))
        answer = parent.recv()
        while answer[0] == "moved":
            answer = parent.recv()
    finally:
        server.join(30)
        parent.close()
        child.close()
    assert answer[0] == "done" and answer[3] == [], answer
    assert probes == [str(dest)]  # none in the worker
    assert [(dest / f"t{i}.exr").read_bytes() for i in range(4)] == data
