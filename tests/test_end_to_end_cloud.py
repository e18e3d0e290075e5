"""``cio-worker simulate --storage s3://…`` and ``gs://…`` end to end against moto's S3 server and
fake-gcs-server: the artist's submit, every agent process and the download all talk to the store
through a logging proxy, so the test sees each request (issue 4).

Checked for each store: every expected tile of the shipped example reaches the artist, identical
to what an agent rendered, and is pasted into its frame; the store holds the job's inputs and
outputs under ``hashstore/<hex>``, each content once and written once, and a preview of each tile
under ``_previews/``; and each agent fetched each input once, however many tasks it ran (its later
tasks found their inputs in place: no GETs).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote

import boto3
import pytest

from cio_worker.job.project import tile_name
from cio_worker.sim.examples import example_root
from cio_worker.job.hashing import md5_hex
from cio_worker.job.project import load_project, output_file_name
from cio_worker.queue import open_queue
from cio_worker.queue.base import preview_key
from tests.servers import FaultProxy

pytestmark = pytest.mark.slow

WORKERS = 2
PREFIX = "farm/jobs"


@dataclass
class Cloud:
    url: str  # the --storage URL
    env: dict[str, str]  # what the simulation and its agents get on top of a clean environment
    proxy: FaultProxy
    objects: Callable[[], dict[str, bytes]]  # object name -> bytes, everything in the bucket

    def downloads(self, hex_digest: str) -> int:
        """Whole-object GETs of ``hashstore/<hex>`` (not listings, not metadata probes)."""
        count = 0
        for seen in self.proxy.requests("GET"):
            path, _, query = seen.path.partition("?")
            if unquote(path).endswith(f"/hashstore/{hex_digest}") and (
                self.url.startswith("s3:") or "alt=media" in query
            ):
                count += 1
        return count

    def uploads(self) -> int:
        """Requests that create an object (S3 PUT; GCS upload POST / resumable PUT start)."""
        if self.url.startswith("s3:"):
            return len([s for s in self.proxy.requests("PUT") if "/hashstore/" in unquote(s.path)])
        return len([s for s in self.proxy.requests("POST") if s.path.startswith("/upload/")])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any store configuration of the machine's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("AWS_") and k != "AWS_CA_BUNDLE")
        and k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")
    }
    env.update(extra)
    return env


@pytest.fixture
def s3_cloud(s3_endpoint: str, fault_proxy: Callable[[str], FaultProxy], tmp_path: Path) -> Iterator[Cloud]:
    bucket = f"cio-e2e-{uuid.uuid4().hex[:10]}"
    raw = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    )  # fmt: skip
    raw.create_bucket(Bucket=bucket)
    proxy = fault_proxy(s3_endpoint)
    env = clean_env(
        AWS_ENDPOINT_URL=proxy.url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )

    def objects() -> dict[str, bytes]:
        pages = raw.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        names = [entry["Key"] for page in pages for entry in page.get("Contents", ())]
        return {name: raw.get_object(Bucket=bucket, Key=name)["Body"].read() for name in names}

    yield Cloud(f"s3://{bucket}/{PREFIX}", env, proxy, objects)
    raw.close()


@pytest.fixture
def gcs_cloud(gcs_endpoint: str, fault_proxy: Callable[[str], FaultProxy]) -> Iterator[Cloud]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    bucket = f"cio-e2e-{uuid.uuid4().hex[:10]}"
    raw = gcs.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs_endpoint})
    raw.create_bucket(bucket)
    proxy = fault_proxy(gcs_endpoint)
    env = clean_env(STORAGE_EMULATOR_HOST=proxy.url)

    def objects() -> dict[str, bytes]:
        return {blob.name: blob.download_as_bytes() for blob in raw.list_blobs(bucket)}

    yield Cloud(f"gs://{bucket}/{PREFIX}", env, proxy, objects)
    raw.close()


def expected_outputs() -> set[str]:
    """Every file the example job must produce, from its project (not from the run)."""
    project = load_project(example_root() / "proj/shots/shot_A/shot_A.project",
                           display_path="/proj/shots/shot_A/shot_A.project")  # fmt: skip
    names = set()
    for item in ("project://scene/beauty", "project://scene/fx"):
        image = project.image(item)
        for frame in image.frames:
            for tile in range(1, 5):
                names.add(output_file_name(project.resolve(image.save_as), frame, 4, tile).replace("C:", ""))
    return names


def md5_hex_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def run_simulation(cloud: Cloud, work: Path) -> str:
    argv = [sys.executable, "-m", "cio_worker", "simulate", "--workers", str(WORKERS), "--storage", cloud.url,
            "--work-dir", str(work), "--frame-seconds", "0.02", "--timeout", "240"]  # fmt: skip
    done = subprocess.run(argv, env=cloud.env, capture_output=True, text=True, timeout=300)
    agent_logs = "".join(p.read_text(errors="replace") for p in sorted(work.glob("node-*/agent.log")))
    assert done.returncode == 0, done.stdout + done.stderr + agent_logs
    return done.stdout


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_a_simulated_job_through_a_cloud_store(store: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    cloud: Cloud = request.getfixturevalue(f"{store}_cloud")
    work = tmp_path / "sim"
    out = run_simulation(cloud, work)
    assert "20/20 tasks done, 0 failed" in out, out

    # Every expected output was rendered alike wherever it was, and its frame reached the artist.
    artist = work / "artist"
    expected = expected_outputs()
    outputs = set()
    for artist_path in expected:
        relative = artist_path.lstrip("/")
        rendered = {p.read_bytes() for p in (work / f"node-{i}" / "root" / relative for i in range(1, WORKERS + 1))
                    if p.exists()}  # fmt: skip
        assert len(rendered) == 1, artist_path
        outputs.add(md5_hex_of(rendered.pop()))
        tile = tile_name(Path(relative).name)
        assert tile is not None and (artist / relative).with_name(tile.frame).is_file(), relative

    # The store holds each input and each output once, content-addressed, and nothing else.
    with open_queue(f"sqlite:///{work / 'queue.db'}") as queue:
        [job] = queue.jobs()
        info = queue.job(job.id)
        claims = Counter(e.worker for e in queue.events(job.id) if e.kind == "claimed")
    assert info.storage == cloud.url
    inputs = {md5_hex(f.md5) for f in info.upload_files}
    assert inputs and not inputs & outputs
    stored = cloud.objects()
    names = {f"{PREFIX}/hashstore/{h}" for h in inputs | outputs}
    previews = {f"{PREFIX}/{preview_key(job.id, p.split('/renders/shot_A/')[1])}" for p in expected}
    assert {n for n in stored if "/_previews/" in n} == previews
    logs = {n for n in stored if f"/_logs/{job.id}/" in n}  # each attempt's task log
    assert len(logs) >= 20
    assert set(stored) - previews - logs == names
    for name, data in stored.items():
        if name in names:
            assert md5_hex_of(data) == name.rsplit("/", 1)[1], name
    # Written once each: the submit skipped nothing it had not sent, no agent re-sent an output
    # (GCS's count has each preview's and each log's upload too).
    assert cloud.uploads() == len(names) + (len(previews) + len(logs) if store == "gcs" else 0)

    # Each agent fetched each input exactly once, though it ran several tasks: the later ones,
    # warm, found their inputs in place and downloaded nothing.
    assert set(claims) == {f"node-{i}" for i in range(1, WORKERS + 1)}
    assert sum(claims.values()) == 20 and max(claims.values()) >= 2
    fetched = {h: cloud.downloads(h) for h in sorted(inputs)}
    assert fetched == {h: WORKERS for h in sorted(inputs)}
    # and the artist fetched each output once
    assert {h: cloud.downloads(h) for h in sorted(outputs)} == {h: 1 for h in sorted(outputs)}
