"""Storage faults with figures: resets, 5xx, slow and stalled responses and corrupted objects, injected
by a proxy in front of the real test servers (moto's S3, fake-gcs-server) during an agent's input
sync, its output upload, and the artist-side downloader's download.

For every fault: a transient one is retried and the task then succeeds; a lasting one fails the
task with a reason a person can act on; the agent keeps serving (the next job is done); nothing
half-written is visible at a destination (no final name with wrong content, no temporary file
left); no corrupted file is ever placed; every process a task started is gone; every task ends
done or failed exactly once.

The helpers here (the in-process ``Farm`` with its agent thread, the counting proxy, the checks)
are shared by the other fault tests. Set ``CIO_FAULT_FIGURES=/path/figures.jsonl`` to collect
one line of figures per scenario (faults injected, retries seen, outcome).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from cio_worker.node.agent import Agent, AgentConfig, AgentSummary
from cio_worker.node.cache import ContentCache
from cio_worker.artist.downloader import Downloader
from cio_worker.node.execution import ExecutionContext
from cio_worker.job.hashing import md5_b64_of_bytes, md5_b64_of_file, md5_hex
from cio_worker.storage.md5cache import Md5Cache
from cio_worker.job.paths import PathMap
from cio_worker.queue import SqliteQueue
from cio_worker.node.runner import ProcessRunner
from cio_worker.sim.shim import install_cnode_shim
from cio_worker.storage import Storage, StorageOptions, open_storage
from cio_worker.storage.retry import RetryPolicy
from cio_worker.artist.submit import submit_job
from tests.servers import Fault, FaultProxy
from tests.shots import Shot, make_shot

FAST_RETRY = RetryPolicy(attempts=4, initial=0.01, maximum=0.05)
RETRY_LINE = re.compile(r"failed \(attempt (\d+) of (\d+)\)")
S3_ERROR = b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"
GCS_ERROR = json.dumps({"error": {"code": 503, "message": "Backend Error",
                                  "errors": [{"reason": "backendError", "message": "Backend Error"}]}}).encode()
SECRET_VALUE = "s3cr3t-Value-9f8e7d6c"


# --- figures for the closing note ------------------------------------------------------------


def record_figure(scenario: str, **fields: object) -> None:
    """One JSON line per scenario in $CIO_FAULT_FIGURES (if set): what was injected, what happened."""
    path = os.environ.get("CIO_FAULT_FIGURES")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps({"scenario": scenario, **fields}, default=str) + "\n")


# --- a proxy that also counts its faults and can answer slowly ---------------------------------


@dataclass
class Slow(Fault):
    """Forward the request, but only after ``delay`` seconds (slower than the client's read timeout
    when ``delay`` is above it: the client gives up and retries)."""

    kind: str = "slow"
    delay: float = 1.0


@dataclass
class CountingProxy(FaultProxy):
    hits: Counter = field(default_factory=Counter)

    def _take(self, method: str, path: str, range_: str | None) -> Fault | None:
        fault = super()._take(method, path, range_)
        if fault is None:
            return None
        with self.lock:
            self.hits[fault.kind] += 1
        if isinstance(fault, Slow):
            self.release.wait(fault.delay)  # stop() cuts the wait short
            return None  # then forward as usual
        return fault

    def injected(self) -> dict[str, int]:
        with self.lock:
            return dict(self.hits)


@pytest.fixture
def proxies(fault_proxy: Callable[..., FaultProxy]) -> Callable[[str], CountingProxy]:
    return lambda upstream: fault_proxy(upstream, CountingProxy)


# --- storage backends on the real test servers ---------------------------------------------------


@dataclass
class Backend:
    name: str  # s3 | gcs
    endpoint: str  # the real server
    bucket: str

    @property
    def url(self) -> str:
        return f"{'s3' if self.name == 's3' else 'gs'}://{self.bucket}/job"

    def options(self, endpoint: str | None = None, **kw) -> StorageOptions:
        target = endpoint or self.endpoint
        extra = {"endpoint_url": target} if self.name == "s3" else {"endpoint": target, "anonymous": True}
        extra["retry"] = FAST_RETRY
        extra.update(kw.pop("extra", {}))
        return StorageOptions(extra=extra, **kw)

    def storage(self, endpoint: str | None = None, **kw) -> Storage:
        return open_storage(self.url, self.options(endpoint, **kw))

    def error(self, status: int = 503) -> Fault:
        """A server error answer in this store's dialect (S3 XML, GCS JSON)."""
        if self.name == "s3":
            return Fault("status", status=status, body=S3_ERROR, content_type="application/xml")
        return Fault("status", status=status, body=GCS_ERROR, content_type="application/json")

    def upload_fault(self, fault: Fault, times: int) -> Fault:
        """Aim ``fault`` at object uploads (S3: PUT of a hashstore key; GCS: POST to /upload/, whose
        object name travels in the body)."""
        fault.method = "PUT" if self.name == "s3" else "POST"
        fault.path_contains = "hashstore" if self.name == "s3" else "/upload/"
        fault.times = times
        return fault


def make_backend(request: pytest.FixtureRequest, name: str) -> Backend:
    bucket = f"cio-faults-{uuid.uuid4().hex[:10]}"
    if name == "s3":
        import boto3

        request.getfixturevalue("aws_env")
        endpoint = request.getfixturevalue("s3_endpoint")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    else:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        request.getfixturevalue("gcs_env")
        endpoint = request.getfixturevalue("gcs_endpoint")
        client = gcs.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
        client.create_bucket(bucket)
    return Backend(name, endpoint, bucket)


@pytest.fixture(params=["s3", "gcs"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request, request.param)


@pytest.fixture
def s3_backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request, "s3")


# --- logs ----------------------------------------------------------------------------------------


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        with self._guard:
            self.lines.append(text)

    @property
    def text(self) -> str:
        with self._guard:
            return "\n".join(self.lines)

    def retries(self) -> int:
        """Storage requests retried (the retry layer logs each one)."""
        return len(RETRY_LINE.findall(self.text))


@contextmanager
def captured_logs() -> Iterator[LogCapture]:
    logger = logging.getLogger("cio_worker")
    handler = LogCapture()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --- a render node with an agent on a thread ------------------------------------------------------


class Farm:
    """One queue, one storage, one render node (root, work dir, cache) and its agent, in-process.

    The agent is the real loop (claim, heartbeat, execute, report) with the real runner, the cnode
    simulator and real storage; only the process boundary of ``cio-worker agent`` is left out, so
    storage options (retry pace, timeouts) can be set and the logs read.
    """

    def __init__(
        self,
        base: Path,
        storage_url: str,
        direct: Callable[[], Storage],
        agent_storage: Callable[[str], Storage],
        *,
        node: Path | None = None,
        env: dict[str, str] | None = None,
        cache_budget: int = 1 << 30,
        queue_busy_timeout: float = 60.0,
    ) -> None:
        self.base = base
        self.storage_url = storage_url
        self.direct = direct
        self.agent_storage = agent_storage
        self.queue = SqliteQueue(base / "queue.db", busy_timeout=queue_busy_timeout)
        self.node = node or base / "node"
        self.root = self.node / "root"
        self.work = self.node / "work"
        self.cache_dir = self.node / "cache"
        self.bin = base / "bin"
        install_cnode_shim(self.bin)
        self.env = {**os.environ, "PATH": f"{self.bin}:{os.environ.get('PATH', '')}", "CNODE_SIM_FRAME_SECONDS": "0",
                    **(env or {})}
        self.cache_budget = cache_budget
        self._md5caches: list[Md5Cache] = []
        self.shots: dict[str, Shot] = {}
        self.inputs: dict[str, set[str]] = {}  # node path -> every MD5 a job placed there

    # jobs

    def submit(self, name: str, *, texture: bytes | None = None, env_lines: str = "", **shot: object) -> str:
        made = make_shot(self.base / "jobs" / name, **shot)  # type: ignore[arg-type]
        if texture is not None:
            made.texture.write_bytes(texture)
        if env_lines:
            with open(made.spec, "a", encoding="utf-8") as spec:
                spec.write("\n" + env_lines)
        with self.direct() as storage:
            result = submit_job(made.spec, queue=self.queue, storage=storage, storage_url=self.storage_url,
                                path_map=PathMap.rooted(str(made.root)))
        self.shots[result.job_id] = made
        for upload in result.upload_files:
            self.inputs.setdefault(self.local(upload.destination), set()).add(upload.md5)
        return result.job_id

    def local(self, artist_path: str) -> str:
        return PathMap.rooted(str(self.root)).local(artist_path)

    def texture_key(self, job_id: str) -> str:
        """The hex digest in the storage key of a job's texture (what faults aim at)."""
        return md5_hex(md5_b64_of_file(self.shots[job_id].texture))

    def task(self, job_id: str, index: int = 0):
        return self.queue.tasks(job_id)[index]

    # the agent

    def context(self) -> ExecutionContext:
        for directory in (self.root, self.work, self.cache_dir):
            directory.mkdir(parents=True, exist_ok=True)
        return ExecutionContext(
            work_root=self.work,
            open_storage=self.agent_storage,
            runner=ProcessRunner(),
            path_map=PathMap.rooted(str(self.root)),
            cache=ContentCache(self.cache_dir / "contents", self.cache_budget),
            md5cache=self._md5cache(),
            base_env=self.env,
            kill_grace=2.0,
            task_timeout=120.0,
        )

    @contextmanager
    def agent(self, worker: str = "node-1", **config: object) -> Iterator["AgentThread"]:
        settings = {"lease_seconds": 30, "heartbeat_seconds": 0.5, "poll_seconds": 0.05, **config}
        running = AgentThread(Agent(
            AgentConfig(worker_id=worker, **settings),  # type: ignore[arg-type]
            self.queue, self.context(), log=logging.getLogger("cio_worker.node.agent"),
        ))
        try:
            yield running
        finally:
            running.finish()

    def wait_finished(self, job_id: str, running: "AgentThread", timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.queue.is_finished(job_id):
            running.check()
            assert time.monotonic() < deadline, f"job {job_id} not finished: {self.queue.tasks(job_id)}"
            time.sleep(0.05)

    # the artist's side

    def download(self, endpoint_storage: Callable[[str], Storage], artist: Path, job_id: str | None = None):
        downloader = Downloader(self.queue, endpoint_storage, PathMap.rooted(str(artist)))
        return downloader.run_once(job_id)

    def _md5cache(self) -> Md5Cache:
        cache = Md5Cache(self.cache_dir / "md5cache.db")
        self._md5caches.append(cache)
        return cache

    def close(self) -> None:
        """Let go of every file the farm holds open (the queue, the node's MD5 cache)."""
        self.queue.close()
        for cache in self._md5caches:
            cache.close()


class AgentThread:
    """``Agent.run`` on a thread; ``finish`` stops it taking work and waits for it to end."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.summary: AgentSummary | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="agent", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.agent.run()
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.error = exc

    def check(self) -> None:
        """Fail the test if the agent loop died: an agent must survive any one task."""
        if self.error is not None:
            raise AssertionError(f"the agent loop died: {type(self.error).__name__}: {self.error}") from self.error
        assert self.thread.is_alive(), f"the agent exited: {self.agent.summary.exit_reason}"

    def finish(self, timeout: float = 60.0) -> AgentSummary:
        self.agent.stop_claiming("the test is over")
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the agent did not stop"
        if self.error is not None:
            raise AssertionError(f"the agent loop died: {type(self.error).__name__}: {self.error}") from self.error
        assert self.summary is not None
        return self.summary


def farm_for(backend: Backend, base: Path, proxy: CountingProxy, **storage_kw: object) -> Farm:
    return Farm(
        base,
        backend.url,
        direct=lambda: backend.storage(),
        agent_storage=lambda url: open_storage(url, backend.options(proxy.url, **storage_kw)),
    )


# --- what must hold after every fault ------------------------------------------------------------


def temp_files(*roots: Path) -> list[Path]:
    """Write-then-rename leftovers: ``.name.part-*`` files, downloads in the cache's tmp/."""
    found = []
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            if ".part-" in path.name or (path.parent.name == "tmp" and path.parent.parent.name == "contents"):
                found.append(path)
    return found


def processes_under(base: Path) -> list[psutil.Process]:
    """Live processes (other than this one) whose command line names a path under ``base``."""
    mine = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.pid == mine or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(str(base) in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def assert_no_orphans(base: Path, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while (left := processes_under(base)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


def assert_farm_invariants(farm: Farm) -> dict[str, int]:
    """Zero lost, zero duplicate completions, no half-written or wrong file, no temp file, no orphan."""
    states: Counter = Counter()
    for job in farm.queue.jobs():
        records = farm.queue.downloads(job.id, state=None)
        for task in farm.queue.tasks(job.id):
            states[task.state] += 1
            assert task.state in ("done", "failed"), f"job {job.id} task {task.id} left {task.state}"
            events = farm.queue.events(job.id, task.id)
            assert sum(e.kind == "done" for e in events) <= 1, f"job {job.id} task {task.id} completed twice"
            mine = [r for r in records if r.task_id == task.id]
            if task.state == "failed":
                assert not mine, f"a failed task offered downloads: {mine}"
            else:
                assert len(mine) <= 1, f"job {job.id} task {task.id} offered its outputs twice"
    for node_path, md5s in farm.inputs.items():
        if os.path.lexists(node_path):
            assert md5_b64_of_file(node_path) in md5s, f"{node_path} holds content no job placed there"
    assert temp_files(farm.node, farm.base / "artist-download") == []
    tasks_dir = farm.work / "tasks"
    assert not tasks_dir.exists() or list(tasks_dir.iterdir()) == [], "per-task directories left behind"
    assert_no_orphans(farm.base)
    return dict(states)


def rendered_file(farm: Farm, artist_output_dir: str, relative: str) -> Path:
    return Path(farm.local(artist_output_dir)) / relative


def assert_downloads_identical(farm: Farm, artist: Path, job_id: str) -> int:
    """Every output of the job is at the artist's place, byte for byte what the node rendered."""
    count = 0
    artist_map = PathMap.rooted(str(artist))
    for record in farm.queue.downloads(job_id, state=None):
        for entry in record.files:
            placed = Path(artist_map.local(record.output_dir)) / entry.relative_path
            assert placed.read_bytes() == rendered_file(farm, record.output_dir, entry.relative_path).read_bytes()
            assert md5_b64_of_file(placed) == entry.md5
            count += 1
    return count


DEFAULT_TEXTURE = b"wood texture v1\n" * 64  # what make_shot writes
# A slow answer: the client's read timeout (only in the slow-response cases) and the proxy's delay.
READ_TIMEOUT, SLOW_DELAY = 1.5, 3.0


def timeouts(kind: str) -> dict:
    return {"extra": {"read_timeout": READ_TIMEOUT}} if kind == "slow_response" else {}
OTHER_TEXTURE = b"another texture, for the job that must go through\n" * 64


def hex_of(data: bytes) -> str:
    """The hex digest in the storage key of a content (what faults aim at)."""
    return md5_hex(md5_b64_of_bytes(data))


# --- sync: transient faults are retried and the task succeeds -----------------------------------


TRANSIENT = {
    # kind: (fault, times)
    "reset": (lambda b: Fault("reset"), 2),
    "reset_mid_body": (lambda b: Fault("reset_body"), 2),
    "server_error": (lambda b: b.error(503), 2),
    "slow_response": (lambda b: Slow(delay=SLOW_DELAY), 1),  # past the read timeout: the client retries
    "corrupted_in_transit": (lambda b: Fault("corrupt"), 1),  # verified, fetched again once
}


@pytest.mark.parametrize("kind", sorted(TRANSIENT))
def test_sync_retries_a_transient_storage_fault_and_the_task_succeeds(
    backend: Backend, proxies, tmp_path: Path, kind: str
) -> None:
    proxy = proxies(backend.endpoint)
    farm = farm_for(backend, tmp_path, proxy, **timeouts(kind))
    make_fault, times = TRANSIENT[kind]
    fault = make_fault(backend)
    fault.method, fault.path_contains, fault.times = "GET", hex_of(DEFAULT_TEXTURE), times
    proxy.add(fault)
    with captured_logs() as logs, farm.agent() as running:
        job = farm.submit("faulted", frames="1-2", retries_failed=0)
        farm.wait_finished(job, running)
        task = farm.task(job)
        assert task.state == "done", task.reason
        assert task.attempts["failed"] == 0  # the storage layer absorbed it: no task retry needed
        assert proxy.injected()[fault.kind] == times
        texture = Path(farm.local("C:/proj/tex/wood.png"))
        assert texture.read_bytes() == farm.shots[job].texture.read_bytes()
        gets = len(proxy.requests("GET", farm.texture_key(job)))
        if kind == "slow_response":  # on a loaded machine a healthy answer may also miss the timeout
            assert gets >= times + 1
        else:
            assert gets == times + 1  # each fault cost exactly one more request, then it arrived
        # the agent keeps serving
        good = farm.submit("good", frames="5-6", texture=OTHER_TEXTURE)
        farm.wait_finished(good, running)
        assert farm.task(good).state == "done"
        retries = logs.retries()
    if kind != "corrupted_in_transit":  # a corrupted body is re-fetched by the verifier, not the retrier
        assert retries >= times
    states = assert_farm_invariants(farm)
    artist = tmp_path / "artist-download"
    report = farm.download(lambda url: backend.storage(proxy.url), artist)
    assert report.refused == [] and report.files_written == 4
    assert assert_downloads_identical(farm, artist, job) == 2
    record_figure(f"sync/{backend.name}/{kind}", injected=proxy.injected(), storage_retries=retries,
                  task_attempts=1, outcome=dict(states))
    farm.close()


# --- sync: a lasting fault fails the task with a reason, places nothing, and the agent goes on -----


LASTING = {
    # kind: (fault, what the reason must say)
    "server_error": (lambda b: b.error(503), ["C:/proj/tex/wood.png", "still failed after 4 attempts"]),
    "reset": (lambda b: Fault("reset"), ["C:/proj/tex/wood.png", "still failed after 4 attempts"]),
    "corrupted_in_transit": (lambda b: Fault("corrupt"), ["C:/proj/tex/wood.png", "corrupt", "fetched twice"]),
    "stalled": (lambda b: Fault("stall"), ["C:/proj/tex/wood.png", "no progress for", "stopped answering"]),
}


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k == "stalled" else k
                                  for k in sorted(LASTING)])  # a stall costs the stall window per attempt
def test_sync_fails_the_task_on_a_lasting_storage_fault_and_the_agent_goes_on(
    backend: Backend, proxies, tmp_path: Path, kind: str
) -> None:
    proxy = proxies(backend.endpoint)
    farm = farm_for(backend, tmp_path, proxy, stall_seconds=1.5)
    make_fault, phrases = LASTING[kind]
    fault = make_fault(backend)
    fault.method, fault.path_contains, fault.times = "GET", hex_of(DEFAULT_TEXTURE), -1
    proxy.add(fault)
    with captured_logs() as logs, farm.agent() as running:
        job = farm.submit("faulted", frames="1-2", retries_failed=1)
        farm.wait_finished(job, running)
        task = farm.task(job)
        assert task.state == "failed"
        assert task.attempts["failed"] == 2  # the first try and the one retry the job allows
        for phrase in phrases:
            assert phrase in task.reason, task.reason
        texture = Path(farm.local("C:/proj/tex/wood.png"))
        assert not texture.exists()  # nothing placed, not even a part of it
        assert farm.queue.downloads(job, state=None) == []
        proxy.clear()
        good = farm.submit("good", frames="5-6", texture=OTHER_TEXTURE)
        farm.wait_finished(good, running)
        assert farm.task(good).state == "done", farm.task(good).reason
        retries = logs.retries()
    states = assert_farm_invariants(farm)
    record_figure(f"sync-lasting/{backend.name}/{kind}", injected={fault.kind: fault_hits(proxy, fault)},
                  storage_retries=retries, task_attempts=2, outcome=dict(states), reason=task.reason)
    farm.close()


def fault_hits(proxy: CountingProxy, fault: Fault) -> int:
    return proxy.injected().get(fault.kind, 0)


def test_an_object_corrupted_in_the_store_fails_its_task_and_is_never_placed(
    backend: Backend, proxies, tmp_path: Path
) -> None:
    """Not a glitch on the wire: the stored bytes themselves are wrong. Every read is verified."""
    proxy = proxies(backend.endpoint)
    farm = farm_for(backend, tmp_path, proxy)
    job = farm.submit("faulted", frames="1-2", retries_failed=0)
    key = f"hashstore/{farm.texture_key(job)}"
    with backend.storage() as store:
        store.write_bytes(key, b"rotten bytes where the texture was\n" * 64)
    with captured_logs(), farm.agent() as running:
        farm.wait_finished(job, running)
        task = farm.task(job)
        assert task.state == "failed"
        assert "C:/proj/tex/wood.png" in task.reason and "corrupt" in task.reason and key in task.reason
        assert not Path(farm.local("C:/proj/tex/wood.png")).exists()
        assert not (farm.cache_dir / "contents" / "objects" / key[10:12] / key[10:]).exists()  # not cached either
        good = farm.submit("good", frames="5-6", texture=OTHER_TEXTURE)
        farm.wait_finished(good, running)
        assert farm.task(good).state == "done"
    states = assert_farm_invariants(farm)
    record_figure(f"sync-stored-corruption/{backend.name}", injected={"corrupt_object": 1}, outcome=dict(states),
                  reason=task.reason)
    farm.close()


def test_a_wrong_file_already_at_a_destination_is_replaced_never_trusted(
    s3_backend: Backend, proxies, tmp_path: Path
) -> None:
    """A half-written input from a crashed earlier run (right size, wrong bytes) is fetched again."""
    proxy = proxies(s3_backend.endpoint)
    farm = farm_for(s3_backend, tmp_path, proxy)
    job = farm.submit("job", frames="1-2", retries_failed=0)
    texture = Path(farm.local("C:/proj/tex/wood.png"))
    texture.parent.mkdir(parents=True)
    good_bytes = farm.shots[job].texture.read_bytes()
    texture.write_bytes(good_bytes[: len(good_bytes) // 2] + b"\0" * (len(good_bytes) - len(good_bytes) // 2))
    with farm.agent() as running:
        farm.wait_finished(job, running)
    assert farm.task(job).state == "done"
    assert texture.read_bytes() == good_bytes
    assert len(proxy.requests("GET", farm.texture_key(job))) == 1
    assert_farm_invariants(farm)
    farm.close()


# --- upload of outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["reset", "server_error"])
def test_output_upload_retries_transient_faults_and_the_task_succeeds(
    backend: Backend, proxies, tmp_path: Path, kind: str
) -> None:
    proxy = proxies(backend.endpoint)
    farm = farm_for(backend, tmp_path, proxy)
    fault = backend.upload_fault(Fault("reset") if kind == "reset" else backend.error(503), 3)
    with captured_logs() as logs, farm.agent() as running:
        proxy.add(fault)
        job = farm.submit("faulted", frames="1-2", retries_failed=0)
        farm.wait_finished(job, running)
        task = farm.task(job)
        assert task.state == "done", task.reason
        retries = logs.retries()
    assert proxy.injected()[fault.kind] == 3 and retries >= 3
    states = assert_farm_invariants(farm)
    artist = tmp_path / "artist-download"
    report = farm.download(lambda url: backend.storage(), artist)
    assert report.refused == [] and assert_downloads_identical(farm, artist, job) == 2
    record_figure(f"upload/{backend.name}/{kind}", injected=proxy.injected(), storage_retries=retries,
                  outcome=dict(states))
    farm.close()


def test_output_upload_that_keeps_failing_fails_the_task_and_offers_nothing(
    backend: Backend, proxies, tmp_path: Path
) -> None:
    proxy = proxies(backend.endpoint)
    farm = farm_for(backend, tmp_path, proxy)
    fault = backend.upload_fault(backend.error(503), -1)
    with captured_logs() as logs, farm.agent() as running:
        proxy.add(fault)
        job = farm.submit("faulted", frames="1-2", retries_failed=1)
        farm.wait_finished(job, running)
        task = farm.task(job)
        assert task.state == "failed" and task.attempts["failed"] == 2
        assert "upload" in task.reason and "still failed after 4 attempts" in task.reason, task.reason
        assert farm.queue.downloads(job, state=None) == []  # nothing offered for download
        with backend.storage() as store:  # and no output object in the store
            rendered = sorted(Path(farm.local("C:/proj/renders/main")).glob("beauty.*.png"))
            assert len(rendered) == 2
            keys = {f"hashstore/{md5_hex(md5_b64_of_file(p))}" for p in rendered}
            assert store.exists(keys) == set()
        proxy.clear()
        good = farm.submit("good", frames="5-6", texture=OTHER_TEXTURE)
        farm.wait_finished(good, running)
        assert farm.task(good).state == "done"
        retries = logs.retries()
    states = assert_farm_invariants(farm)
    record_figure(f"upload-lasting/{backend.name}/server_error", injected={"status": fault_hits(proxy, fault)},
                  storage_retries=retries, task_attempts=2, outcome=dict(states), reason=task.reason)
    farm.close()


# --- the artist's downloader -------------------------------------------------------------------


@pytest.fixture
def finished_job(s3_backend: Backend, proxies, tmp_path: Path):
    """A job rendered and uploaded without faults; its downloads are pending."""
    proxy = proxies(s3_backend.endpoint)
    farm = farm_for(s3_backend, tmp_path, proxy)
    with farm.agent() as running:
        job = farm.submit("job", frames="1-3", chunk_size=3)
        farm.wait_finished(job, running)
    assert farm.task(job).state == "done"
    yield farm, job, proxy, s3_backend
    farm.close()


def _outputs(farm: Farm, job: str) -> list[tuple[str, str]]:
    [record] = farm.queue.downloads(job, state=None)
    return [(f.relative_path, f.key) for f in record.files]


@pytest.mark.parametrize("kind", sorted(TRANSIENT))
def test_downloader_retries_transient_faults_and_places_verified_files(finished_job, tmp_path: Path, kind: str) -> None:
    farm, job, proxy, backend = finished_job
    make_fault, times = TRANSIENT[kind]
    outputs = _outputs(farm, job)
    for _, key in outputs:
        fault = make_fault(backend)
        fault.method, fault.path_contains, fault.times = "GET", key, times
        proxy.add(fault)
    artist = tmp_path / "artist-download"
    with captured_logs() as logs:
        report = farm.download(lambda url: open_storage(url, backend.options(proxy.url, **timeouts(kind))), artist)
    assert report.refused == [] and report.files_written == 3
    assert assert_downloads_identical(farm, artist, job) == 3
    assert [r.state for r in farm.queue.downloads(job, state=None)] == ["downloaded"]
    assert temp_files(artist) == []
    assert sum(proxy.injected().values()) == 3 * times
    record_figure(f"download/s3/{kind}", injected=proxy.injected(), storage_retries=logs.retries(),
                  outcome={"files_placed": report.files_written, "refused": len(report.refused)})


@pytest.mark.parametrize("kind", ["corrupted_in_transit", "server_error", "stalled"])
def test_downloader_places_nothing_on_a_lasting_fault_and_finishes_later(finished_job, tmp_path: Path, kind: str) -> None:
    farm, job, proxy, backend = finished_job
    outputs = _outputs(farm, job)
    artist = tmp_path / "artist-download"
    [record] = farm.queue.downloads(job, state=None)
    out_dir = Path(PathMap.rooted(str(artist)).local(record.output_dir))
    out_dir.mkdir(parents=True)
    stale = out_dir / outputs[0][0]
    stale.write_bytes(b"an older render the artist still has")
    faulted_key = outputs[-1][1]
    fault = {"corrupted_in_transit": Fault("corrupt"), "server_error": backend.error(503),
             "stalled": Fault("stall")}[kind]
    fault.method, fault.path_contains, fault.times = "GET", faulted_key, -1
    proxy.add(fault)
    report = farm.download(lambda url: open_storage(url, backend.options(proxy.url, stall_seconds=1.5)), artist)
    assert report.files_written == 0 and len(report.refused) == 1
    reason = report.refused[0]
    assert faulted_key in reason and {"corrupted_in_transit": "corrupt", "server_error": "still failed",
                                      "stalled": "no progress"}[kind] in reason, reason
    # all or nothing per record: no file of it placed, the artist's older file untouched, no temp file
    assert sorted(p.name for p in out_dir.iterdir()) == [stale.name]
    assert stale.read_bytes() == b"an older render the artist still has"
    assert temp_files(artist) == []
    assert [r.state for r in farm.queue.downloads(job, state=None)] == ["pending"]  # not lost: still to do
    # the store recovers: the next run places every file, verified
    proxy.clear()
    report = farm.download(lambda url: backend.storage(proxy.url), artist)
    assert report.refused == [] and report.files_written == 3
    assert assert_downloads_identical(farm, artist, job) == 3
    assert [r.state for r in farm.queue.downloads(job, state=None)] == ["downloaded"]
    record_figure(f"download-lasting/s3/{kind}", injected={fault.kind: fault_hits(proxy, fault)},
                  outcome={"first_run_refused": 1, "second_run_placed": report.files_written}, reason=reason)


# --- the real thing: `cio-worker agent` and `cio-worker download` as processes, through the proxy ---


class AgentProcess(subprocess.Popen):
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def agent_process(farm: Farm, *extra: str, env: dict[str, str] | None = None, worker: str = "node-1",
                  idle_exit: float = 1.0) -> Iterator[AgentProcess]:
    """``cio-worker agent`` on the farm's queue and node, in its own session; killed (whole group) if
    the test leaves it running. Its combined output goes to ``<base>/<worker>.log``."""
    for directory in (farm.root, farm.work, farm.cache_dir):
        directory.mkdir(parents=True, exist_ok=True)
    log_path = farm.base / f"{worker}.log"
    argv = [sys.executable, "-m", "cio_worker", "agent", "--queue", f"sqlite:///{farm.queue.path}",
            "--worker-id", worker, "--root", str(farm.root), "--work-dir", str(farm.work),
            "--cache-dir", str(farm.cache_dir), "--poll-seconds", "0.1", "--idle-exit", str(idle_exit),
            "--heartbeat-seconds", "1", "--preemption", "none", "--kill-grace", "2", *extra]
    with open(log_path, "wb") as log:
        process = AgentProcess(argv, env=env or farm.env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    process.log_path = log_path
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cio_worker", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_agent_process_rides_out_faults_and_fails_only_the_broken_job(s3_backend: Backend, proxies, tmp_path: Path) -> None:
    """Three jobs for one `cio-worker agent` process talking to S3 through the proxy: resets and 503s
    on the first (retried, done), a corrupted stored input on the second (failed, with the reason),
    a clean third (done). Then `cio-worker download` through resets places every output."""
    proxy = proxies(s3_backend.endpoint)
    farm = farm_for(s3_backend, tmp_path, proxy)
    secret_env = (f'[[environment]]\nname = "MY_API_TOKEN"\nvalue = "{SECRET_VALUE}"\nexclusive = true\n')
    first = farm.submit("first", frames="1-2", retries_failed=0, env_lines=secret_env)
    second = farm.submit("second", frames="3-4", retries_failed=0, texture=b"second texture\n" * 64)
    third = farm.submit("third", frames="5-6", retries_failed=0, texture=OTHER_TEXTURE)
    with s3_backend.storage() as store:
        store.write_bytes(f"hashstore/{farm.texture_key(second)}", b"not the texture" * 64)
    proxy.add(Fault("reset", method="GET", path_contains=farm.texture_key(first), times=2))
    proxy.add(Fault("status", method="PUT", path_contains="hashstore", status=503, body=S3_ERROR, times=2))
    env = {**farm.env, "AWS_ENDPOINT_URL": proxy.url, "MY_API_TOKEN": SECRET_VALUE}
    with agent_process(farm, env=env) as agent:
        assert agent.wait(timeout=240) == 0, agent.log_text()
    agent_log = agent.log_text()
    assert [farm.task(j).state for j in (first, second, third)] == ["done", "failed", "done"], agent_log
    reason = farm.task(second).reason
    assert "C:/proj/tex/wood.png" in reason and "corrupt" in reason
    retries = len(RETRY_LINE.findall(agent_log))
    assert retries >= 4  # two resets on a GET, two 503s on PUTs, each logged with its object
    assert "tasks 3: done 2, failed 1" in agent_log
    states = assert_farm_invariants(farm)
    # the artist downloads through a flaky connection too
    proxy.add(Fault("reset", method="GET", path_contains="hashstore", times=3))
    artist = tmp_path / "artist-download"
    out = _cli("download", "--queue", f"sqlite:///{tmp_path / 'queue.db'}", "--root", str(artist),
               "--md5-cache", str(tmp_path / "artist-md5.db"), env=env)
    assert out.returncode == 0, out.stderr
    assert "4 files written" in out.stderr
    assert assert_downloads_identical(farm, artist, first) + assert_downloads_identical(farm, artist, third) == 4
    # the secret the first job carried is in no log and no status
    status = _cli("status", first, "--queue", f"sqlite:///{tmp_path / 'queue.db'}", env=env)
    logs = [agent_log, status.stdout, status.stderr, out.stdout, out.stderr]
    logs += [p.read_text(errors="replace") for p in (farm.work / "logs").iterdir()]
    assert not [text for text in logs if SECRET_VALUE in text]
    assert "MY_API_TOKEN=****" in (farm.work / "logs" / f"{first}-000-a1.log").read_text()
    assert_no_orphans(tmp_path)
    record_figure("agent-process/s3", injected=proxy.injected(), storage_retries=retries,
                  outcome=dict(states), reason=reason)
    farm.close()
