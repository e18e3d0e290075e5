"""InputSync with many inputs (issue 11, point 7): the work a sync does per entry, counted, never
timed. A sync with nothing to do confirms each input with one lstat, without hashing, without a
database round trip per entry; a cold sync holds a bounded number of objects per entry."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from cio_worker.job.document import UploadFile
from cio_worker.job.hashing import hashstore_key, md5_b64_of_bytes
from cio_worker.job.paths import PathMap
from cio_worker.node.cache import ContentCache
from cio_worker.node.sync import InputSync
from cio_worker.storage.file import FileStorage
from cio_worker.storage.md5cache import Md5Cache
from tests.test_sync import CountingHasher

ENTRIES = 2000
DIRECTORIES = 20


class StatCounter:
    """Counts os.stat and os.lstat calls made by anything in this process while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for name in ("stat", "lstat"):
            real = getattr(os, name)

            def counted(*args, _real=real, **kwargs):
                self.calls += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(os, name, counted)


@pytest.fixture
def scene(tmp_path: Path) -> tuple[FileStorage, list[UploadFile]]:
    """``ENTRIES`` distinct small textures in ``DIRECTORIES`` folders, stored in a file:// store."""
    store = tmp_path / "store"
    (store / "hashstore").mkdir(parents=True)
    manifest = []
    for i in range(ENTRIES):
        data = f"tile {i}".encode()
        md5 = md5_b64_of_bytes(data)
        (store / hashstore_key(md5)).write_bytes(data)
        manifest.append(UploadFile(f"C:/scene/tex/set{i % DIRECTORIES:02d}/tile_{i:05d}.1001.exr", md5, len(data)))
    return FileStorage(f"file://{store}"), manifest


@pytest.fixture
def synced(scene, tmp_path: Path) -> tuple[FileStorage, list[UploadFile], PathMap, ContentCache]:
    """The scene synced once into ``tmp_path / "root"``, its MD5 records in ``tmp_path / "md5.db"``."""
    storage, manifest = scene
    path_map = PathMap.rooted(str(tmp_path / "root"))
    cache = ContentCache(tmp_path / "cache", 1 << 30)
    InputSync(storage, cache, Md5Cache(tmp_path / "md5.db"), path_map).sync(manifest)
    return storage, manifest, path_map, cache


def test_a_sync_with_nothing_to_do_costs_one_stat_per_entry_no_hashing_and_batched_reads(
    synced, tmp_path, monkeypatch
):
    storage, manifest, path_map, cache = synced
    hasher = CountingHasher()
    with Md5Cache(tmp_path / "md5.db", hasher=hasher) as md5cache:  # as a new agent process would
        syncer = InputSync(storage, cache, md5cache, path_map)
        queries = md5cache.queries
        stats = StatCounter(monkeypatch)
        result = syncer.sync(manifest)
        monkeypatch.undo()
        queries = md5cache.queries - queries
    assert (result.already_present, result.placed, result.downloaded) == (ENTRIES, 0, 0)
    assert hasher.count == 0
    # one lstat per entry, plus resolving each directory once (realpath walks its components)
    depth = len((tmp_path / "root" / "scene" / "tex" / "set00").parts)
    assert stats.calls <= ENTRIES + (DIRECTORIES + 1) * (depth + 2), stats.calls
    assert queries <= ENTRIES // 500 + 2, queries  # batched: never a round trip per entry


def test_a_few_changed_destinations_among_many_are_each_looked_at_and_the_rest_confirmed_in_bulk(
    synced, tmp_path, monkeypatch
):
    storage, manifest, path_map, cache = synced
    # one change in each batch the records are compared in (900 a statement)
    rewritten, touched, deleted = (Path(path_map.local(manifest[i].destination)) for i in (7, 1000, ENTRIES - 1))
    rewritten.write_bytes(rewritten.read_bytes().upper())  # same size, other bytes
    os.utime(touched, ns=(0, 1_000_000_000))  # same bytes, another mtime
    deleted.unlink()

    hasher = CountingHasher()
    with Md5Cache(tmp_path / "md5.db", hasher=hasher) as md5cache:
        asked: list[str] = []  # paths looked up by their stamp alone (the slower way)
        lookup_many = md5cache.lookup_many

        def watched(stats):
            stats = list(stats)
            asked.extend(path for path, _ in stats)
            return lookup_many(stats)

        monkeypatch.setattr(md5cache, "lookup_many", watched)
        queries = md5cache.queries
        result = InputSync(storage, cache, md5cache, path_map).sync(manifest)
        queries = md5cache.queries - queries
    assert (result.placed, result.already_present) == (2, ENTRIES - 2)
    assert sorted(asked) == sorted(map(str, (rewritten, touched)))  # the rest confirmed in bulk
    assert hasher.count == 2  # the same-size ones; every other destination confirmed without hashing
    assert queries <= 2 * (ENTRIES // 500 + 2), queries  # never a round trip per entry
    wanted = {path_map.local(f.destination): f.md5 for f in manifest}
    for path in (rewritten, touched, deleted):
        assert md5_b64_of_bytes(path.read_bytes()) == wanted[str(path)]


def test_a_cold_sync_holds_a_bounded_amount_of_memory_per_entry(scene, tmp_path):
    storage, manifest = scene

    def peak(entries: list[UploadFile], name: str) -> int:
        syncer = InputSync(storage, ContentCache(tmp_path / name / "cache", 1 << 30), Md5Cache(tmp_path / name / "md5.db"),
                           PathMap.rooted(str(tmp_path / name / "root")))  # fmt: skip
        tracemalloc.start()
        try:
            result = syncer.sync(entries)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert result.placed == len(entries)

    small, large = ENTRIES // 4, ENTRIES
    per_entry = (peak(manifest, "large") - peak(manifest[:small], "small")) / (large - small)
    # The manifest is the caller's. What the sync adds per entry (its plan, the MD5 records and a
    # bounded window of download items and futures, not one of each per entry) stays small;
    # fixed costs (copy buffers, threads) cancel out in the difference.
    assert per_entry <= 2000, f"{per_entry:.0f} bytes per entry"
