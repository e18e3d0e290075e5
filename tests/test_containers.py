"""The farm in containers (images/compose/docker-compose.yml) run end to end with podman, as an
operator runs it: PostgreSQL, the setup (schema, tokens), the coordinator, three agents and the
artist's downloader, each its own container; the example shot submitted through the coordinator,
rendered by the agents with the cnode simulator, its frames downloaded; then every container and
volume removed. Skipped, saying why, where podman cannot run containers (no podman, no
podman-compose, or no local base images: no registry is reachable; `eval "$(../shared/tools/containers.sh)"`
sets all three up). Takes a few minutes; prints its figures (run with -s to see them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.containers

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "images" / "compose" / "docker-compose.yml"
PYTHON_BASE = "docker.io/library/python:3.11-slim"
DEBIAN_BASES = ("localhost/local/debian:bookworm", "docker.io/library/debian:bookworm-slim")
AGENTS = 3
SETUP = 'eval "$(../shared/tools/containers.sh)" from the repository'


def _run(argv, timeout=600, check=True, env=None, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def _podman_setup() -> tuple[str, str, str] | str:
    """(podman, podman-compose, Debian base image), or why the test cannot run here."""
    podman = shutil.which("podman")
    if podman is None:
        return f"podman is not on PATH ({SETUP} installs it)"
    compose = os.environ.get("PODMAN_COMPOSE") or shutil.which("podman-compose")
    if not compose:
        return f"podman-compose is neither in $PODMAN_COMPOSE nor on PATH ({SETUP})"
    if subprocess.run([podman, "image", "exists", PYTHON_BASE], capture_output=True).returncode != 0:
        return f"no {PYTHON_BASE} image and no registry to pull it from ({SETUP} builds a stand-in)"
    debian = os.environ.get("DEBIAN_IMAGE") or next(
        (image for image in DEBIAN_BASES if subprocess.run([podman, "image", "exists", image]).returncode == 0), None)
    if debian is None:
        return f"no Debian base image ({', '.join(DEBIAN_BASES)}) for PostgreSQL's ({SETUP} builds one)"
    trial = subprocess.run([podman, "run", "--rm", PYTHON_BASE, "true"], capture_output=True, text=True, timeout=120)
    if trial.returncode != 0:
        return f"podman cannot run a container here ({trial.stderr.strip()[-300:]}); {SETUP} writes the configuration it needs"
    return podman, compose, debian


@pytest.fixture(scope="module")
def podman():
    found = _podman_setup()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def _status_counts(text: str) -> dict[str, int]:
    """Task states from `cio-worker status JOB`: one row per task, its state in a column."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"\s*\d{3}\s+(\w+)", line)
        if match:
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


@pytest.mark.timeout(2400)  # a first build installs the dependencies from PyPI into the image
def test_compose_farm_renders_and_downloads_a_job(podman, tmp_path):
    podman_bin, compose, debian = podman
    project = f"cio-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DEBIAN_IMAGE": debian, "CIO_AGENTS": str(AGENTS), "CNODE_SIM_FRAME_SECONDS": "0.2"}
    base = [compose, "-p", project, "-f", str(COMPOSE_FILE)]
    figures: dict[str, object] = {"project": project, "agents": AGENTS}
    started = time.monotonic()
    try:
        _run([*base, "build"], timeout=1800, env=env)
        figures["build_s"] = round(time.monotonic() - started, 1)
        up_at = time.monotonic()
        _run([*base, "up", "-d"], timeout=900, env=env)
        figures["up_s"] = round(time.monotonic() - up_at, 1)
        names = _run([podman_bin, "ps", "-a", "--filter", f"label=io.podman.compose.project={project}",
                      "--format", "{{.Names}}"]).stdout.split()
        assert sum(n.startswith(f"{project}_agent_") for n in names) == AGENTS, names
        for service in ("db", "setup", "coordinator", "submit", "download"):
            assert f"{project}_{service}_1" in names, names

        # the downloader exits once the job is finished and every frame is placed
        waited = _run([podman_bin, "wait", f"{project}_download_1"], timeout=900)
        figures["up_to_downloaded_s"] = round(time.monotonic() - up_at, 1)
        download_log = _run([podman_bin, "logs", f"{project}_download_1"]).stdout \
            + _run([podman_bin, "logs", f"{project}_download_1"]).stderr
        assert waited.stdout.strip() == "0", download_log[-3000:]

        submitted = _run([podman_bin, "logs", f"{project}_submit_1"]).stdout
        job = re.search(r"^job (\d+): (\d+) tasks", submitted, re.M)
        assert job, submitted
        job_id, tasks = job.group(1), int(job.group(2))
        artist = ["exec", f"{project}_coordinator_1", "env", "CIO_QUEUE=http://127.0.0.1:8700",
                  "CIO_TOKEN_FILE=/secrets/owner.token", "cio-worker"]
        status = _run([podman_bin, *artist, "status", job_id]).stdout
        counts = _status_counts(status)
        assert counts == {"done": tasks}, status
        workers = _run([podman_bin, *artist, "workers"]).stdout
        per_agent = [int(line.split()[-2]) for line in workers.splitlines()[1:] if line.strip()]
        assert len(per_agent) == AGENTS and sum(per_agent) >= tasks, workers

        # the frames, on the artist's volume where the job's output path is re-rooted
        mount = _run([podman_bin, "volume", "inspect", f"{project}_artist", "--format", "{{.Mountpoint}}"]).stdout.strip()
        renders = Path(mount) / "shot_A" / "root" / "proj" / "renders" / "shot_A"
        files = sorted(p for p in renders.rglob("*") if p.is_file())
        placed = [line for line in download_log.splitlines() if line.startswith("downloaded ")]
        assembled = [line for line in download_log.splitlines() if line.startswith("assembled ")]
        assert len(placed) == 4 * len(assembled)  # 2 x 2 tiles a frame, pasted together, then removed
        assert files and len(assembled) == len(files), (assembled[:5], files[:5])
        frames = {int(m.group(1)) for p in files if (m := re.search(r"(\d+)\.\w+$", p.name))}
        assert frames == set(range(1, 11)), sorted(frames)  # the example shot renders frames 1-10
        figures.update(job=job_id, tasks=tasks, tasks_per_agent=per_agent, files=len(files), frames=len(frames))
    finally:
        down_at = time.monotonic()
        down = _run([*base, "down", "-v", "-t", "30"], timeout=600, check=False, env=env)
        figures["down_s"] = round(time.monotonic() - down_at, 1)
        label = f"label=io.podman.compose.project={project}"
        left = _run([podman_bin, "ps", "-a", "-q", "--filter", label], check=False).stdout.split()
        volumes = _run([podman_bin, "volume", "ls", "-q", "--filter", label], check=False).stdout.split()
        for _ in range(5):  # what `down` left, only this project's, by id (dependents first, hence passes)
            ids = _run([podman_bin, "ps", "-a", "-q", "--filter", label], check=False).stdout.split()
            if not ids:
                break
            for container in ids:
                _run([podman_bin, "rm", "-f", "-t", "5", container], check=False)
        for volume in volumes:
            _run([podman_bin, "volume", "rm", "-f", volume], check=False)
        _run([podman_bin, "pod", "rm", "-f", f"pod_{project}"], check=False)
        _run([podman_bin, "network", "rm", "-f", f"{project}_default"], check=False)
        figures["total_s"] = round(time.monotonic() - started, 1)
        print("\ncompose figures:", json.dumps(figures))
    assert down.returncode == 0, down.stderr[-2000:]
    assert not left, f"containers left after `down`: {left}"
    assert not volumes, f"volumes left after `down -v`: {volumes}"
