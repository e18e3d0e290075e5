"""Md5Cache: hashes once, notices every kind of change, persists, and is shared by processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cio_worker.job.hashing import md5_b64_of_bytes, md5_b64_of_file
from cio_worker.storage.md5cache import Md5Cache, Md5CacheError

REPO = Path(__file__).resolve().parents[1]
OLD = time.time() - 3600  # outside the racy window


class CountingHasher:
    def __init__(self) -> None:
        self.paths: list[Path] = []

    def __call__(self, path: Path) -> str:
        self.paths.append(Path(path))
        return md5_b64_of_file(path)


def write(path: Path, data: bytes, mtime: float | None = OLD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def hasher() -> CountingHasher:
    return CountingHasher()


@pytest.fixture
def cache(tmp_path: Path, hasher: CountingHasher) -> Md5Cache:
    with Md5Cache(tmp_path / "db" / "md5.db", hasher=hasher) as c:
        yield c


def test_hashes_once_then_answers_from_the_database(tmp_path, cache, hasher):
    f = write(tmp_path / "a.bin", b"alpha")
    assert cache.md5_of(f) == md5_b64_of_bytes(b"alpha")
    assert cache.md5_of(f) == md5_b64_of_bytes(b"alpha")
    assert cache.md5_of(str(f)) == md5_b64_of_bytes(b"alpha")
    assert hasher.paths == [f]
    assert (cache.computed, cache.hits) == (1, 2)


def test_a_rewrite_of_the_same_size_and_mtime_is_still_noticed(tmp_path, cache, hasher):
    f = write(tmp_path / "a.bin", b"alpha")
    cache.md5_of(f)
    write(f, b"omega")  # same size, mtime forced back to the same value: only ctime differs
    assert cache.md5_of(f) == md5_b64_of_bytes(b"omega")
    assert len(hasher.paths) == 2


def test_a_different_size_or_mtime_is_noticed(tmp_path, cache, hasher):
    f = write(tmp_path / "a.bin", b"alpha")
    cache.md5_of(f)
    write(f, b"alphabet")
    assert cache.md5_of(f) == md5_b64_of_bytes(b"alphabet")
    os.utime(f, (OLD - 50, OLD - 50))
    cache.md5_of(f)
    assert len(hasher.paths) == 3


def test_a_replaced_file_is_noticed(tmp_path, cache, hasher):
    f = write(tmp_path / "a.bin", b"alpha")
    cache.md5_of(f)
    other = write(tmp_path / "b.bin", b"omega")
    os.replace(other, f)  # new inode at the same path
    assert cache.md5_of(f) == md5_b64_of_bytes(b"omega")
    assert len(hasher.paths) == 2


def test_a_file_modified_just_now_is_not_trusted_next_time(tmp_path, cache, hasher):
    f = write(tmp_path / "a.bin", b"alpha", mtime=None)
    cache.md5_of(f)
    cache.md5_of(f)
    assert len(hasher.paths) == 2
    assert cache.lookup(f) is None


def test_record_is_trusted_until_the_file_changes(tmp_path, cache, hasher):
    f = write(tmp_path / "a.bin", b"alpha", mtime=None)
    cache.record(f, md5_b64_of_bytes(b"alpha"))
    assert cache.lookup(f) == md5_b64_of_bytes(b"alpha")
    assert cache.md5_of(f) == md5_b64_of_bytes(b"alpha")
    assert hasher.paths == []
    os.chmod(f, 0o600)  # changes ctime
    assert cache.lookup(f) is None


def test_lookup_of_a_missing_file_is_none_and_md5_of_raises(tmp_path, cache):
    assert cache.lookup(tmp_path / "nope") is None
    with pytest.raises(FileNotFoundError):
        cache.md5_of(tmp_path / "nope")


def test_persists_across_instances(tmp_path, hasher):
    f = write(tmp_path / "a.bin", b"alpha")
    with Md5Cache(tmp_path / "md5.db", hasher=hasher) as first:
        first.md5_of(f)
    with Md5Cache(tmp_path / "md5.db", hasher=hasher) as second:
        assert second.md5_of(f) == md5_b64_of_bytes(b"alpha")
    assert len(hasher.paths) == 1


def test_a_corrupt_database_is_a_clear_error(tmp_path):
    db = tmp_path / "md5.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(Md5CacheError) as info:
        Md5Cache(db)
    assert str(db) in str(info.value)


_WORKER = """
import sys
from pathlib import Path
from cio_worker.storage.md5cache import Md5Cache
db, root, start = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
cache = Md5Cache(db)
paths = sorted(root.iterdir())
for p in paths[start:] + paths[:start]:
    cache.md5_of(p)
print(cache.computed)
"""


def test_several_processes_share_one_database(tmp_path, hasher):
    root = tmp_path / "files"
    for i in range(150):
        write(root / f"f{i:03d}", f"content {i}".encode())
    db = tmp_path / "md5.db"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(db), str(root), str(k * 50)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k in range(3)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    with Md5Cache(db, hasher=hasher) as cache:
        for p in sorted(root.iterdir()):
            assert cache.md5_of(p) == md5_b64_of_file(p)
    assert hasher.paths == []


def test_lookup_many_answers_from_stats_the_caller_took_in_a_few_queries(tmp_path, cache, hasher):
    files = [write(tmp_path / "many" / f"f{i:04d}.bin", f"content {i}".encode()) for i in range(2000)]
    cache.record_many((f, md5_b64_of_bytes(f"content {i}".encode())) for i, f in enumerate(files))
    write(files[7], b"changed!!")  # its record no longer matches
    before = cache.queries
    stray = write(tmp_path / "never-recorded", b"x")
    found = cache.lookup_many((str(f), os.lstat(f)) for f in files + [stray])
    assert cache.queries - before <= 3  # batched reads, not a query per file
    assert len(found) == 1999 and str(files[7]) not in found
    assert found[str(files[3])] == md5_b64_of_bytes(b"content 3")
    assert hasher.paths == []  # never hashes


def test_record_rows_trusts_the_callers_stat_until_the_file_changes(tmp_path, cache, hasher):
    from cio_worker.storage.md5cache import FileStamp

    kept, changed = write(tmp_path / "rows" / "kept", b"kept"), write(tmp_path / "rows" / "changed", b"changed")
    before = cache.queries
    cache.record_rows((str(f), *FileStamp.row_of(os.stat(f)), md5_b64_of_bytes(f.read_bytes())) for f in (kept, changed))
    assert cache.queries - before == 1  # one transaction
    write(changed, b"CHANGED")
    found = cache.lookup_many((str(f), os.lstat(f)) for f in (kept, changed))
    assert found == {str(kept): md5_b64_of_bytes(b"kept")}
    assert hasher.paths == []
