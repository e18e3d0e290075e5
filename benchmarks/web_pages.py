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

A frame's full-size view is timed too: ``--runs + 2`` of the done tiles are real 960 x 540 half
RGBA EXRs (the tiles of a 1080p frame, each with other pixels) in the job's file:// storage; "full
size, first look" asks for a different one each time (read from storage, MD5-checked, converted),
"full size, again" the same one (the coordinator's cache). Their peer is the conversion alone
(``imaging.write_display_jpeg`` on the same file in this process): ``x alone`` is the view's
median over it.
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


TILE = (960, 540)  # a tile of a 2 x 2 tiled 1080p frame


def tile_exrs(work: Path, count: int) -> list[bytes]:
    """``count`` half RGBA EXR tiles of ``TILE``, each with other pixels (so another MD5)."""
    import numpy as np
    import OpenImageIO as oiio

    width, height = TILE
    ramp = np.linspace(0.0, 1.5, width, dtype=np.float32)
    made = []
    for i in range(count):
        pixels = np.empty((height, width, 4), dtype=np.float32)
        pixels[:, :, 0] = ramp[None, :]
        pixels[:, :, 1] = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
        pixels[:, :, 2], pixels[:, :, 3] = 0.1 + i / (count + 1), 1.0
        path = work / f"tile-{i}.exr"
        out = oiio.ImageOutput.create(str(path))
        out.open(str(path), oiio.ImageSpec(width, height, 4, oiio.HALF))
        out.write_image(pixels)
        out.close()
        made.append(path.read_bytes())
    return made


def fill(queue, tasks: int, storage: Path, shown: list[bytes]) -> tuple[str, list[str]]:
    """The job: chunks of 4 tiles, the first two chunks scouts; half done, 2 failed, 4 running. The
    first done tiles' outputs are ``shown`` (stored under their keys); their names are returned."""
    chunks = tasks // 4
    job = queue.create_job(
        {"title": "Clarisse - bench <10,000 tasks>", "project": "default", "storage": f"file://{storage}",
         "output_path": "/proj/renders", "autoretry_policy": {"failed": {"max_retries": 0, "distinct_workers": 1}}},
        [NewTask(f"{c * 2 + 1}-{c * 2 + 2}", f"cnode {c}", tile=t, tiles=4, scout=c < 2)
         for c in range(chunks) for t in range(1, 5)])
    queue.release_job(job)
    queue.register_many([(f"w-{i}", {"machine_type": "n1-standard-8", "preemptible": True}) for i in range(8)])
    done, names = 0, []
    while done < tasks // 2:
        batch = min(500, tasks // 2 - done)
        leases = [lease for lease in queue.claim_many([f"w-{i % 8}" for i in range(batch)], 3600) if lease]
        reports = []
        for lease in leases:
            name = f"renders/beauty.tilex4-{int(lease.task_id) % 4 + 1}.{int(lease.task_id) // 4 * 2 + 1:04d}.exr"
            content = name.encode()
            if len(names) < len(shown):
                content = shown[len(names)]
                names.append(name)
                (storage / "hashstore" / name).parent.mkdir(parents=True, exist_ok=True)
                (storage / "hashstore" / name).write_bytes(content)
            reports.append((lease, NewDownload("/proj/renders", (DownloadFile(name, md5_b64_of_bytes(content),
                                                                               len(content), f"hashstore/{name}"),)),
                            uuid.uuid4().hex, AttemptFigures(wall_seconds=30.0, cpu_seconds=200.0, peak_rss_bytes=2 << 30,
                                                             instance_type="n1-standard-8", cost=0.004, currency="USD",
                                                             log=f"file:///tmp/cio-web-bench/_logs/{job}/{lease.task_id}/1.log")))
        queue.complete_many(reports)
        done += len(leases)
    for _ in range(2):
        queue.fail(queue.claim("w-0", 3600), "the renderer exited with status 1", uuid.uuid4().hex)
    for i in range(4):
        queue.claim(f"w-{i}", 3600)
    return job, names


def measure(url: str, owner: str, job: str, runs: int, shown: list[str], work: Path) -> dict:
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
        "frame page /jobs/{job}/frames/{frame}": (f"/jobs/{job}/frames/{frame_of(shown[0])}", HTML),
        "full size, again /jobs/{job}/full/{output}": (f"/jobs/{job}/full/{shown[0]}", {}),
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
    times = []
    for output in shown[1:]:  # each one's first look: read, checked, converted
        started = time.perf_counter()
        answer = http.get(f"{url}/jobs/{job}/full/{output}", timeout=60)
        times.append(time.perf_counter() - started)
        assert answer.status_code == 200 and answer.content[:2] == b"\xff\xd8", (output, answer.status_code)
    medians["full size, first look /jobs/{job}/full/{output}"] = statistics.median(times[2:])
    sizes["full size, first look /jobs/{job}/full/{output}"] = len(answer.content)
    return {"medians": medians, "sizes": sizes, "alone": convert_alone(work, runs)}


def frame_of(tile: str) -> str:
    return re.sub(r"\.tilex4-\d", "", tile)


def convert_alone(work: Path, runs: int) -> float:
    """The peer of the full-size view: the same conversion of the same tile, in this process."""
    from cio_worker.imaging import DisplaySettings, write_display_jpeg

    times = []
    for i in range(runs + 2):
        started = time.perf_counter()
        write_display_jpeg(work / "tile-0.exr", work / "alone.jpg", DisplaySettings(max_side=None, quality=92))
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def run_backend(name: str, queue, db_url: str, tasks: int, runs: int, work: Path) -> dict:
    _, owner = queue.create_token("bench owner", ["owner"])
    started = time.monotonic()
    storage = work / f"storage-{name}"
    job, shown = fill(queue, tasks, storage, tile_exrs(work, runs + 3))
    print(f"{name}: {tasks} tasks filled in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    queue.close()
    coordinator = CoordinatorProcess(db_url)
    coordinator.start()
    try:
        return measure(coordinator.url, owner, job, runs, shown, work)
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
    print("\n| full size (960 x 540 half EXR tile) | " + " | ".join(f"{b} ms | x alone" for b in backends) + " |")
    print("|---|" + "---|---|" * len(backends))
    for page in ("full size, first look /jobs/{job}/full/{output}", "full size, again /jobs/{job}/full/{output}"):
        cells = [f"{results[b]['medians'][page] * 1000:.0f} | {results[b]['medians'][page] / results[b]['alone']:.2f}"
                 for b in backends]
        print(f"| {page} | " + " | ".join(cells) + " |")
    print("| the conversion alone, in process | " + " | ".join(f"{results[b]['alone'] * 1000:.0f} | 1.00"
                                                              for b in backends) + " |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"tasks": args.tasks, "runs": args.runs, "load": [load0, load1],
                                           "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
