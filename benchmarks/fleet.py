"""Fleet benchmark: simulated agents (async HTTP clients) against one coordinator on PostgreSQL.

All on this machine, side by side in the same run with the engine's limit: the same claim and
complete SQL (``PostgresQueue``) sent straight to PostgreSQL from threads, no HTTP in between.

    python benchmarks/fleet.py                      # the full sizes of the goals
    python benchmarks/fleet.py --quick              # small sizes (the smoke test)

Phases (each on a fresh job in one database):
- ``raw``: ``--raw-threads`` threads claim+complete ``--tasks`` zero-length tasks straight on PostgreSQL.
- ``throughput``: ``--agents`` async agents claim+complete ``--tasks`` tasks through the coordinator,
  as the agent does: each completion claims the next task (``next_lease_seconds``), so a cycle is one
  request; ``--two-requests``: a completion, then a claim (the agent before 2026-11-30's seventh round).
  Its latency is the claim's: the round trip of the request that brought a lease.
- ``burst``: ``--burst`` agents start at once against a job of as many tasks; when does each hold one?
- ``idle``: ``--idle`` agents long-poll with no work and report every ``--heartbeat`` seconds (0: never,
  as the agent does when idle: its long poll is its contact) for
  ``--idle-seconds``: the coordinator's CPU and RSS, the database connections, and heartbeat
  latency as 20 probe agents in a process of their own see it (one report a second each).
  ``--spread-ms N``: each agent sends its next poll 0-N ms after an answer (differing round trips).
- ``cost``: 32 clients send idle reports back to back for ``--cost-seconds`` (10): the coordinator's CPU per request
  (robust to the machine's other load, unlike the rates).
- ``pollcost``: the same for an idle agent's long poll: 32 clients claim with a 50 ms wait on an empty
  queue, back to back (each poll waits on the server and ends empty, as an idle fleet's do).
``--phases idle,cost`` runs just those.

The simulated agents speak HTTP through ``loadgen.Connection``, a lean keep-alive client, so that
the load generator, which shares the cores, costs as little as it can. Prints a markdown table;
``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import Connection, run  # noqa: E402
from cio_worker.queue import NewTask  # noqa: E402
from cio_worker.queue.postgres import PostgresQueue, init_schema  # noqa: E402
from tests.pg_server import PostgresServer, find_bin_dir, postgres_available  # noqa: E402

JOB = {"title": "fleet", "project": "default", "storage": "file:///tmp/fleet-storage", "output_path": "/renders",
       "autoretry_policy": {"preempted": {"max_retries": 3}, "failed": {"max_retries": 1}}}


def tasks(n: int) -> list[NewTask]:
    return [NewTask(frames=str(i + 1), command="true") for i in range(n)]


def pct_ms(values: list[float], q: float) -> float | None:
    """The q-th percentile of ``values`` (seconds) in milliseconds; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Phase:
    name: str
    count: int = 0
    seconds: float = 0.0
    rate: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    extra: dict = field(default_factory=dict)


# -- the coordinator ---------------------------------------------------------------------------------

class Coordinator:
    def __init__(self, db_url: str, work: Path, db_threads: int, poll_seconds: float = 20.0) -> None:
        log = open(work / "coordinator.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cio_worker", "serve", "--queue", db_url, "--listen", "127.0.0.1:0",
             "--db-threads", str(db_threads), "--lease-seconds", "600", "--heartbeat-seconds", "10",
             "--long-poll-seconds", str(poll_seconds)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + 60
        while True:
            lines = (work / "coordinator.log").read_text(errors="replace").splitlines()
            found = [line for line in lines if line.startswith("coordinator at ")]
            if found:
                self.url = found[-1].split()[2]
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("coordinator did not start:\n" + "\n".join(lines[-20:]))
            time.sleep(0.05)
        self.proc = psutil.Process(self.process.pid)

    def cpu_seconds(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each live process in ``pid``'s tree."""
    out: dict[int, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for proc in procs:
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def tree_cpu_since(pid: int, before: dict[int, float]) -> float:
    """CPU seconds ``pid``'s tree used since ``before`` (processes that exited meanwhile not counted)."""
    return sum(cpu - before.get(p, 0.0) for p, cpu in tree_cpu(pid).items())


_claims = itertools.count()


def op_id() -> str:
    """A claim's op id, as the agent sends one with every claim (``HttpQueue.claim``)."""
    return f"bench-claim-{next(_claims)}"


# -- phases ------------------------------------------------------------------------------------------

def raw_phase(db_url: str, n_tasks: int, threads: int, db_pid: int) -> Phase:
    setup = PostgresQueue(db_url)
    setup.create_job(JOB, tasks(n_tasks))
    setup.close()
    latencies: list[float] = []
    lock = threading.Lock()
    done = [0]

    def worker(i: int) -> None:
        q = PostgresQueue(db_url, max_connections=1)
        mine = []
        while True:
            t0 = time.perf_counter()
            lease = q.claim(f"raw-{i}", 600)
            mine.append(time.perf_counter() - t0)
            if lease is None:
                break
            q.complete(lease)
        q.close()
        with lock:
            latencies.extend(mine)
            done[0] += len(mine) - 1

    me = psutil.Process()
    client0 = sum(me.cpu_times()[:2])
    # the threads' backends exit with their connections: sample the tree just before they close
    db0, db_used = tree_cpu(db_pid), [0.0]
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for t in pool:
        t.start()
    while any(t.is_alive() for t in pool):
        db_used[0] = max(db_used[0], tree_cpu_since(db_pid, db0))
        time.sleep(0.05)
    for t in pool:
        t.join()
    seconds = time.perf_counter() - started
    return Phase("raw SQL (PostgresQueue, threads)", done[0], seconds, done[0] / seconds,
                 pct_ms(latencies, 50), pct_ms(latencies, 99),
                 {"threads": threads, "postgres_cpu_us_per_cycle": 1e6 * db_used[0] / max(1, done[0]),
                  "client_cpu_us_per_cycle": 1e6 * (sum(me.cpu_times()[:2]) - client0) / max(1, done[0])})


async def throughput_phase(base: str, token: str, owner: str, db_url: str, n_tasks: int, agents: int,
                           coordinator: Coordinator, db_pid: int, profile: Path | None = None,
                           two_requests: bool = False) -> Phase:
    q = PostgresQueue(db_url)
    q.create_job(JOB, tasks(n_tasks))
    q.close()
    latencies: list[float] = []
    done = 0

    async def agent(i: int) -> None:
        nonlocal done
        name = f"tp-{i}"
        conn = Connection(base, token)
        lease = None
        while True:
            if lease is None:
                t0 = time.perf_counter()
                status, data = await conn.post("/v1/claim", {"worker": name, "wait_seconds": 0, "op_id": op_id()})
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    break
                lease = data["lease"]
            body = {"lease": {k: lease[k] for k in ("job_id", "task_id", "token", "worker")},
                    "op_id": f"{name}-{lease['task_id']}"}
            if not two_requests:
                body["next_lease_seconds"] = 600
            t0 = time.perf_counter()
            status, data = await conn.post("/v1/complete", body)
            if status != 200:
                break
            done += 1
            lease = data.get("next")
            if lease is not None:
                latencies.append(time.perf_counter() - t0)
            elif not two_requests and "next" not in data:
                raise SystemExit("the coordinator does not claim with completions (no 'next' in its answer)")
        conn.close()

    me = psutil.Process()
    spy = await py_spy(coordinator, profile, 600)
    cpu0, db0, client0 = coordinator.cpu_seconds(), tree_cpu(db_pid), sum(me.cpu_times()[:2])
    started = time.perf_counter()
    await asyncio.gather(*(agent(i) for i in range(agents)))
    seconds = time.perf_counter() - started
    if spy is not None:  # py-spy writes what it has on SIGINT
        if spy.returncode is None:
            try:
                spy.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass  # it ended already (e.g. it could not attach)
        await spy.wait()
    per_cycle = {"coordinator_cpu_us_per_cycle": coordinator.cpu_seconds() - cpu0,
                 "postgres_cpu_us_per_cycle": tree_cpu_since(db_pid, db0),
                 "client_cpu_us_per_cycle": sum(me.cpu_times()[:2]) - client0}
    return Phase("coordinator (HTTP, async agents)", done, seconds, done / seconds,
                 pct_ms(latencies, 50), pct_ms(latencies, 99),
                 {"agents": agents, "requests_per_cycle": 2 if two_requests else 1, **{k: 1e6 * v / max(1, done) for k, v in per_cycle.items()}})


async def burst_phase(base: str, token: str, db_url: str, agents: int) -> Phase:
    q = PostgresQueue(db_url)
    q.create_job(JOB, tasks(agents))
    q.close()
    held: list[float] = []
    failures: dict[str, int] = {}
    started = time.perf_counter()

    async def agent(i: int) -> None:
        name = f"burst-{i}"
        conn = Connection(base, token)
        try:
            status, _ = await conn.post("/v1/workers/register", {"worker": name, "info": {"provider": "bench"}})
            if status != 200:
                failures[f"register {status}"] = failures.get(f"register {status}", 0) + 1
            status, data = await conn.post("/v1/claim", {"worker": name, "wait_seconds": 30, "op_id": op_id()})
        except OSError as exc:
            failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
            return
        finally:
            conn.close()
        if status == 200:
            held.append(time.perf_counter() - started)
        else:
            failures[f"claim {status}"] = failures.get(f"claim {status}", 0) + 1

    await asyncio.gather(*(agent(i) for i in range(agents)))
    return Phase("boot burst (register + claim)", len(held), max(held) if held else 0.0, None,
                 pct_ms(held, 50), pct_ms(held, 99),
                 {"agents": agents, "every_agent_held_a_task_s": max(held) if held else None, "failures": failures})


async def py_spy(coordinator: Coordinator, profile: Path | None, seconds: float) -> Any:
    """py-spy recording the coordinator for ``seconds`` into ``profile`` (collapsed stacks), if asked."""
    if profile is None:
        return None
    return await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("py-spy")), "record", "--nonblocking", "-f", "raw", "-o", str(profile),
        "-d", str(int(seconds)), "-p", str(coordinator.process.pid), stdout=asyncio.subprocess.DEVNULL)


# What a cost phase sends: (name, path, body of worker N, the status it must answer).
COST_KINDS = {
    "cost": ("report cost (coordinator CPU per request)", "/v1/workers/report",
             lambda name: {"worker": name, "status": {"state": "idle"}}, 200),
    "pollcost": ("long-poll cost (coordinator CPU per empty 50 ms poll)", "/v1/claim",
                 lambda name: {"worker": name, "wait_seconds": 0.05, "op_id": op_id()}, 204),
}


async def cost_phase(base: str, token: str, coordinator: Coordinator, connections: int, seconds: float,
                     profile: Path | None = None, kind: str = "cost") -> Phase:
    """The coordinator's CPU for one request of an idle fleet's traffic (``kind``: an idle worker
    report, or an empty long poll): ``connections`` clients send them back to back for
    ``seconds``. CPU time per request depends little on what else the machine runs, unlike the
    rates of the other phases."""
    title, path, body_of, expected = COST_KINDS[kind]
    names = [f"{kind}-{i}" for i in range(connections)]
    conns = [Connection(base, token) for _ in names]
    for conn, name in zip(conns, names):
        await conn.post("/v1/workers/register", {"worker": name, "info": {"provider": "bench"}})
    sent = [0]
    end = [0.0]
    bodies = [json.dumps(body_of(name)).encode() for name in names]

    async def client(conn: Connection, body: bytes) -> None:
        while time.perf_counter() < end[0]:
            status, _ = await conn.post(path, body)
            if status != expected:
                raise RuntimeError(f"{path} answered {status}")
            sent[0] += 1

    spy = await py_spy(coordinator, profile, seconds)
    cpu0, t0 = coordinator.cpu_seconds(), time.perf_counter()
    end[0] = t0 + seconds
    await asyncio.gather(*(client(c, b) for c, b in zip(conns, bodies)))
    wall, cpu = time.perf_counter() - t0, coordinator.cpu_seconds() - cpu0
    if spy is not None:
        await spy.wait()
    for conn in conns:
        conn.close()
    return Phase(title, sent[0], wall, sent[0] / wall, None, None,
                 {"connections": connections, "coordinator_cpu_us_per_request": 1e6 * cpu / max(1, sent[0]),
                  "coordinator_cpu_share": cpu / wall})


async def probe(base: str, token: str, agents: int, interval: float, seconds: float) -> list[float]:
    """Heartbeat latency as a lightly loaded agent sees it: ``agents`` agents in this (separate)
    process each report every ``interval`` seconds for ``seconds``."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def agent(i: int) -> None:
        conn = Connection(base, token)
        name = f"probe-{i}"
        await conn.post("/v1/workers/register", {"worker": name, "info": {"provider": "bench-probe"}})
        await asyncio.sleep(interval * i / agents)
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            status, _ = await conn.post("/v1/workers/report", {"worker": name, "status": {"state": "idle"}})
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(interval)
        conn.close()

    await asyncio.gather(*(agent(i) for i in range(agents)))
    return latencies


async def idle_phase(base: str, token: str, coordinator: Coordinator, db_url: str, agents: int,
                     heartbeat: float, seconds: float, profile: Path | None = None, poll_seconds: float = 20.0,
                     spread: float = 0.0) -> Phase:
    """``agents`` agents long-poll and report every ``heartbeat`` seconds; heartbeat latency is
    measured by a probe process of its own (this one is saturated by the thousands it plays) and,
    for comparison, as this process sees it. Each agent sends its next poll a random 0 to
    ``spread`` seconds after the last one's answer, as agents whose round trips differ would
    (on loopback, answers that leave together come back together)."""
    import psycopg

    latencies: list[float] = []
    errors: dict[str, int] = {}
    ready = [0]  # agents registered
    sent = [0]  # reports sent in the measured window
    polled = [0]  # long polls that ended empty in the measured window
    measuring = [False]
    stop = asyncio.Event()

    def error(exc: BaseException) -> None:
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    # Each agent holds its long poll on a connection of its own; their reports share a pool of
    # connections, as a proxy in front of the coordinator would (ten thousand agents with two
    # sockets each would pass the 20,000 files a process may open here).
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(min(agents, 256)):
        pool.put_nowait(Connection(base, token))

    async def report(path: str, body: dict) -> int:
        conn = await pool.get()
        try:
            status, _ = await conn.post(path, body)
            return status
        finally:
            pool.put_nowait(conn)

    async def agent(i: int) -> None:
        name = f"idle-{i}"
        polls = Connection(base, token)
        try:
            await report("/v1/workers/register", {"worker": name, "info": {"provider": "bench"}})
        except OSError as exc:
            error(exc)
            return
        ready[0] += 1

        async def poll() -> None:
            # The first poll ends anywhere in one poll's length, as in a fleet whose instances
            # came up over time; a fleet that booted in the same second would send its polls in
            # clumps, each 30 s window holding one or two of them.
            wait = poll_seconds * (i % 1000) / 1000
            while not stop.is_set():
                try:
                    status, _ = await polls.post("/v1/claim", {"worker": name, "wait_seconds": wait, "op_id": op_id()})
                    if measuring[0] and status == 204:
                        polled[0] += 1
                    if spread:
                        await asyncio.sleep(spread * random.random())
                except OSError as exc:
                    error(exc)
                    await asyncio.sleep(1)
                wait = poll_seconds

        async def beat() -> None:
            await asyncio.sleep(heartbeat * (i % 1000) / 1000)  # spread, as real boots are
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = await report("/v1/workers/report", {"worker": name, "status": {"state": "idle"}})
                    if measuring[0]:
                        sent[0] += 1
                        if status == 200:
                            latencies.append(time.perf_counter() - t0)
                        else:
                            errors[str(status)] = errors.get(str(status), 0) + 1
                except OSError as exc:
                    error(exc)
                await asyncio.sleep(heartbeat)

        try:
            # --heartbeat 0: the agent's own idle traffic (an idle agent only long-polls; its poll
            # is its contact); the probe process still measures reports.
            await asyncio.gather(poll(), *([beat()] if heartbeat > 0 else []))
        finally:
            polls.close()

    runners = [asyncio.create_task(agent(i)) for i in range(agents)]
    # Measure once every agent has registered and begun to poll and beat.
    deadline = time.perf_counter() + 600
    while ready[0] < agents and time.perf_counter() < deadline:
        await asyncio.sleep(0.5)
    await asyncio.sleep(max(heartbeat, 2.0))
    measuring[0] = True
    me = psutil.Process()
    cpu0, t0, client0 = coordinator.cpu_seconds(), time.perf_counter(), sum(me.cpu_times()[:2])
    prober = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "--probe", base, token, str(seconds),
        stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    spy = await py_spy(coordinator, profile, seconds)
    rss_max, connections_max = 0, 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        while time.perf_counter() - t0 < seconds:
            rss_max = max(rss_max, coordinator.rss())
            n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                             " AND pid <> pg_backend_pid()").fetchone()[0]
            connections_max = max(connections_max, n)
            await asyncio.sleep(0.5)
    wall = time.perf_counter() - t0
    cpu = coordinator.cpu_seconds() - cpu0
    client_cpu = sum(me.cpu_times()[:2]) - client0
    measuring[0] = False
    probed = json.loads((await prober.communicate())[0] or b"[]")
    if spy is not None:
        await spy.wait()
    stop.set()
    for r in runners:
        r.cancel()
    await asyncio.gather(*runners, return_exceptions=True)
    while not pool.empty():
        pool.get_nowait().close()
    return Phase("idle agents (long-poll + heartbeat)", sent[0], wall, sent[0] / wall,
                 pct_ms(probed, 50), pct_ms(probed, 99),
                 {"agents": agents, "registered": ready[0], "coordinator_cpu_share": cpu / wall,
                  "polls_per_s": polled[0] / wall, "coordinator_cpu_us_per_poll_and_report": 1e6 * cpu / max(1, polled[0] + sent[0]),
                  "coordinator_rss_mb": rss_max / 2**20, "db_connections_max": connections_max,
                  "probe_reports": len(probed), "load_client_p50_ms": pct_ms(latencies, 50),
                  "load_client_p99_ms": pct_ms(latencies, 99), "load_client_cpu_share": client_cpu / wall,
                  "errors": errors})


# -- main --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--raw-threads", type=int, default=8)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--heartbeat", type=float, default=10.0,
                        help="seconds between an idle agent's reports (0: none, the agent's own idle traffic)")
    parser.add_argument("--poll-seconds", type=float, default=20.0,
                        help="the coordinator's --long-poll-seconds, and the idle agents' wait")
    parser.add_argument("--spread-ms", type=float, default=0.0,
                        help="idle agents send their next poll a random 0 to this many ms after an answer")
    parser.add_argument("--cost-seconds", type=float, default=10.0)
    parser.add_argument("--db-threads", type=int, default=8)
    parser.add_argument("--two-requests", action="store_true",
                        help="throughput: claim after each completion, not with it")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--phases", default="raw,throughput,burst,cost,pollcost,idle",
                        help="which phases to run, comma-separated (default: all)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the coordinator with py-spy (collapsed stacks) into this file during the idle phase (FILE.throughput, FILE.cost, FILE.pollcost: during those)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--probe", nargs=3, metavar=("URL", "TOKEN", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:  # the idle phase's heartbeat probe, a process of its own
        url, token, seconds = args.probe
        print(json.dumps(run(probe(url, token, 20, 1.0, float(seconds)))))
        return 0
    if args.quick:
        args.tasks, args.agents, args.burst, args.idle, args.idle_seconds, args.heartbeat = 300, 8, 50, 100, 3.0, 1.0
        args.cost_seconds = 1.0
    reason = postgres_available()
    if reason:
        print(f"fleet benchmark skipped: {reason}", file=sys.stderr)
        return 0
    server = PostgresServer(find_bin_dir()).start()  # type: ignore[arg-type]
    work = server.root
    coordinator = None
    try:
        db_url = server.create_database(initialised=False)
        init_schema(db_url)
        admin = PostgresQueue(db_url)
        _, agent_token = admin.create_token("bench agents", ["agent"])
        _, owner_token = admin.create_token("bench owner", ["owner"])
        admin.close()
        coordinator = Coordinator(db_url, Path(work), args.db_threads, args.poll_seconds)
        load0 = os.getloadavg()
        phases = []

        def ran(phase: Phase) -> None:
            phases.append(phase)
            print(f"{phase.name}: {phase.count} in {phase.seconds:.1f} s", file=sys.stderr, flush=True)

        chosen = {p.strip() for p in args.phases.split(",") if p.strip()}
        if "raw" in chosen:
            ran(raw_phase(db_url, args.tasks, args.raw_threads, server.process.pid))
        if "throughput" in chosen:
            ran(run(throughput_phase(coordinator.url, agent_token, owner_token, db_url, args.tasks, args.agents,
                                     coordinator, server.process.pid,
                                     args.profile.with_suffix(".throughput") if args.profile else None,
                                     args.two_requests)))
        if "burst" in chosen:
            ran(run(burst_phase(coordinator.url, agent_token, db_url, args.burst)))
        for kind in ("cost", "pollcost"):
            if kind in chosen:
                ran(run(cost_phase(coordinator.url, agent_token, coordinator, 32, args.cost_seconds,
                                   args.profile.with_suffix(f".{kind}") if args.profile else None, kind)))
        if "idle" in chosen:
            ran(run(idle_phase(coordinator.url, agent_token, coordinator, db_url, args.idle,
                               args.heartbeat, args.idle_seconds, args.profile, args.poll_seconds,
                               args.spread_ms / 1000)))
        load1 = os.getloadavg()
    finally:
        if coordinator is not None:
            coordinator.stop()
        server.stop()
    rates = {p.name.split()[0]: p.rate for p in phases}
    ratio = rates["coordinator"] / rates["raw"] if rates.get("raw") and rates.get("coordinator") else None
    print(f"# Fleet benchmark ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, load {load0[0]:.1f} -> {load1[0]:.1f})\n")
    print("| phase | count | seconds | per second | p50 ms | p99 ms | notes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for p in phases:
        notes = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in p.extra.items())
        rate = f"{p.rate:.0f}" if p.rate else ""
        p50 = f"{p.latency_p50_ms:.1f}" if p.latency_p50_ms is not None else ""
        p99 = f"{p.latency_p99_ms:.1f}" if p.latency_p99_ms is not None else ""
        print(f"| {p.name} | {p.count} | {p.seconds:.2f} | {rate} | {p50} | {p99} | {notes} |")
    print(f"\ncoordinator / raw SQL throughput: {ratio:.2f}" if ratio else "")
    if args.json:
        args.json.write_text(json.dumps({"phases": [asdict(p) for p in phases], "ratio": ratio,
                                         "load": [load0, load1]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
