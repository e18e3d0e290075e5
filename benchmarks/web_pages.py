"""Web view pages for a 10,000-task job (issue 12: "served in well under a second").

    .venv/bin/python benchmarks/web_pages.py             # 10,000 tasks, sqlite and PostgreSQL, 15 runs a page
    .venv/bin/python benchmarks/web_pages.py --quick     # 500 tasks, 3 runs, sqlite only

A job of ``--tasks`` tasks (4 tiles a chunk, two scout chunks) is put in a queue; half of its tasks
are done, each with a recorded attempt (figures, cost, log URL) and a download record of one tile,
two failed, a few running, the rest pending. A ``cio-worker serve`` process serves it; a client
signed in with an owner token times each page (and each live fragment the pages poll) from the
request to the last byte, ``--runs`` times after two warm-ups, and prints the medians. The peer,
measured in the same run, is the API's ``GET /v1/jobs/{job}/tasks`` (the same 10,000 task rows as
JSON): ``x API`` is a page's median over the peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from cio_worker.job.hashing import md5_b64_of_bytes  # noqa: E402
from cio_worker.queue import DownloadFile, NewDownload, NewTask, SqliteQueue  # noqa: E402
from cio_worker.queue.base import AttemptFigures  # noqa: E402
from tests.fleet import CoordinatorProcess  # noqa: E402
from tests.pg_server import PostgresServer, find_bin_dir, postgres_available  # noqa: E402

HTML = {"Accept": "text/html"}


def fill(queue, tasks: int) -> str:
    """The job: chunks of 4 tiles, the first two chunks scouts; half done, 2 failed, 4 running."""
    chunks = tasks // 4
    job = queue.create_job(
        {"title": "Clarisse - bench <10,000 tasks>", "project": "default", "storage": "file:///tmp/cio-web-bench",
         "output_path": "/proj/renders", "autoretry_policy": {"failed": {"max_retries": 0, "distinct_workers": 1}}},
        [NewTask(f"{c * 2 + 1}-{c * 2 + 2}", f"cnode {c}", tile=t, tiles=4, scout=c < 2)
         for c in range(chunks) for t in range(1, 5)])
    queue.release_job(job)
    queue.register_many([(f"w-{i}", {"machine_type": "n1-standard-8", "preemptible": True}) for i in range(8)])
    done = 0
    while done < tasks // 2:
        batch = min(500, tasks // 2 - done)
        leases = [lease for lease in queue.claim_many([f"w-{i % 8}" for i in range(batch)], 3600) if lease]
        reports = []
        for lease in leases:
            name = f"renders/beauty.tilex4-{int(lease.task_id) % 4 + 1}.{int(lease.task_id) // 4 * 2 + 1:04d}.png"
            reports.append((lease, NewDownload("/proj/renders", (DownloadFile(name, md5_b64_of_bytes(name.encode()), 100,
                                                                               f"hashstore/{name}"),)),
                            uuid.uuid4().hex, AttemptFigures(wall_seconds=30.0, cpu_seconds=200.0, peak_rss_bytes=2 << 30,
                                                             instance_type="n1-standard-8", cost=0.004, currency="USD",
                                                             log=f"file:///tmp/cio-web-bench/_logs/{job}/{lease.task_id}/1.log")))
        queue.complete_many(reports)
        done += len(leases)
    for _ in range(2):
        queue.fail(queue.claim("w-0", 3600), "the renderer exited with status 1", uuid.uuid4().hex)
    for i in range(4):
        queue.claim(f"w-{i}", 3600)
    return job


def measure(url: str, owner: str, job: str, runs: int) -> dict[str, float]:
    http = requests.Session()
    form = http.get(url + "/sign-in", headers=HTML, timeout=60)
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    assert http.post(url + "/sign-in", data={"csrf": csrf, "token": owner}, timeout=60).status_code == 200
    middle = f"{len(http.get(f'{url}/v1/jobs/{job}/tasks', headers={'Authorization': f'Bearer {owner}'}).json()['tasks']) // 2:03d}"
    targets = {
        "API GET /v1/jobs/{job}/tasks (peer)": (f"/v1/jobs/{job}/tasks", {"Authorization": f"Bearer {owner}"}),
        "jobs page /": ("/", HTML),
        "jobs live /live/jobs": ("/live/jobs", {}),
        "job page /jobs/{job}": (f"/jobs/{job}", HTML),
        "job live /live/jobs/{job}": (f"/live/jobs/{job}", {}),
        "task page /jobs/{job}/tasks/{task}": (f"/jobs/{job}/tasks/{middle}", HTML),
        "workers page /workers": ("/workers", HTML),
    }
    medians: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for name, (path, headers) in targets.items():
        times = []
        for i in range(runs + 2):
            started = time.perf_counter()
            answer = http.get(url + path, headers=headers, timeout=60)
            body = answer.content
            elapsed = time.perf_counter() - started
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
            if i >= 2:
                times.append(elapsed)
        medians[name] = statistics.median(times)
        sizes[name] = len(body)
    return {"medians": medians, "sizes": sizes}


def run_backend(name: str, queue, db_url: str, tasks: int, runs: int, work: Path) -> dict:
    _, owner = queue.create_token("bench owner", ["owner"])
    started = time.monotonic()
    job = fill(queue, tasks)
    print(f"{name}: {tasks} tasks filled in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    queue.close()
    coordinator = CoordinatorProcess(db_url)
    coordinator.start()
    try:
        return measure(coordinator.url, owner, job, runs)
    finally:
        coordinator.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "web_pages.json"))
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.runs = 500, 3
    load0 = os.getloadavg()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cio-web-bench-") as scratch:
        work = Path(scratch)
        db = work / "queue.db"
        results["sqlite"] = run_backend("sqlite", SqliteQueue(db), f"sqlite:///{db}", args.tasks, args.runs, work)
        reason = None if not args.quick else "--quick measures sqlite only"
        reason = reason or postgres_available()
        if reason:
            print(f"PostgreSQL not measured: {reason}", file=sys.stderr)
        else:
            from cio_worker.queue.postgres import PostgresQueue

            server = PostgresServer(find_bin_dir()).start()  # type: ignore[arg-type]
            try:
                url = server.create_database()
                results["postgresql"] = run_backend("postgresql", PostgresQueue(url), url, args.tasks, args.runs, work)
            finally:
                server.stop()
    load1 = os.getloadavg()
    backends = list(results)
    print(f"\nWeb view pages, a job of {args.tasks} tasks; median of {args.runs} runs "
          f"(load {load0[0]:.2f} -> {load1[0]:.2f})\n")
    print("| page | " + " | ".join(f"{b} ms | x API | KB" for b in backends) + " |")
    print("|---|" + "---|---|---|" * len(backends))
    for page in results[backends[0]]["medians"]:
        cells = []
        for b in backends:
            medians, sizes = results[b]["medians"], results[b]["sizes"]
            peer = medians["API GET /v1/jobs/{job}/tasks (peer)"]
            cells.append(f"{medians[page] * 1000:.0f} | {medians[page] / peer:.2f} | {sizes[page] / 1000:.0f}")
        print(f"| {page} | " + " | ".join(cells) + " |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"tasks": args.tasks, "runs": args.runs, "load": [load0, load1],
                                           "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
