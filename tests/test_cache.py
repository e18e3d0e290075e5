"""ContentCache: content by MD5, real copies out, LRU within a budget, shared by processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cio_worker.node.cache import CacheError, ContentCache, DamagedObject
from cio_worker.job.hashing import md5_b64_of_bytes, md5_hex

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 10.0) -> None:
        self.now += seconds


def put(cache: ContentCache, data: bytes) -> str:
    md5 = md5_b64_of_bytes(data)
    temp = cache.temp_path(md5)
    temp.write_bytes(data)
    cache.adopt(md5, temp)
    return md5


def test_adopt_files_the_content_by_md5_read_only(tmp_path):
    cache = ContentCache(tmp_path / "c", 10_000)
    md5 = put(cache, b"hello")
    hex_digest = md5_hex(md5)
    where = tmp_path / "c" / "objects" / hex_digest[:2] / hex_digest
    assert cache.has(md5) and cache.path(md5) == where
    assert where.read_bytes() == b"hello"
    assert stat.S_IMODE(where.stat().st_mode) == 0o444
    assert list((tmp_path / "c" / "tmp").iterdir()) == []
    assert not cache.has(md5_b64_of_bytes(b"other")) and cache.path(md5_b64_of_bytes(b"other")) is None


def test_adopt_moves_a_file_from_elsewhere(tmp_path):
    cache = ContentCache(tmp_path / "c", 10_000)
    source = tmp_path / "download.part"
    source.write_bytes(b"payload")
    md5 = md5_b64_of_bytes(b"payload")
    assert cache.adopt(md5, source).read_bytes() == b"payload"
    assert not source.exists()


def test_copy_out_is_an_independent_copy(tmp_path):
    cache = ContentCache(tmp_path / "c", 10_000)
    data = os.urandom(3 * 1024 * 1024 + 17)
    md5 = put(cache, data)
    dest = tmp_path / "out" / "x.bin"
    dest.parent.mkdir()
    assert cache.copy_out(md5, dest) is True
    assert dest.read_bytes() == data
    assert dest.stat().st_ino != cache.path(md5).stat().st_ino
    dest.chmod(0o755)
    with open(dest, "r+b") as handle:  # a renderer writing to its input
        handle.write(b"XXXX")
    assert cache.path(md5).read_bytes() == data
    assert stat.S_IMODE(cache.path(md5).stat().st_mode) == 0o444


def test_copy_out_of_a_missing_content_is_false_and_writes_nothing(tmp_path):
    cache = ContentCache(tmp_path / "c", 10_000)
    dest = tmp_path / "x.bin"
    assert cache.copy_out(md5_b64_of_bytes(b"absent"), dest) is False
    assert not dest.exists()


def test_eviction_keeps_the_most_recently_used_within_budget(tmp_path):
    clock = FakeClock()
    cache = ContentCache(tmp_path / "c", 250, grace_seconds=0, clock=clock)
    md5s = []
    for i in range(5):  # 5 x 100 bytes, each used later than the one before
        md5s.append(put(cache, bytes([i]) * 100))
        clock.tick()
    assert cache.usage() == 500
    assert cache.path(md5s[0]) is not None  # the oldest is used again: now the newest
    clock.tick()
    assert cache.evict_to_budget() == 3
    assert cache.usage() == 200
    assert [cache.has(m) for m in md5s] == [True, False, False, False, True]
    assert cache.evict_to_budget() == 0


def test_copy_out_counts_as_use(tmp_path):
    clock = FakeClock()
    cache = ContentCache(tmp_path / "c", 100, grace_seconds=0, clock=clock)
    a = put(cache, b"a" * 100)
    clock.tick()
    b = put(cache, b"b" * 100)
    clock.tick()
    assert cache.copy_out(a, tmp_path / "a.out")
    clock.tick()
    cache.evict_to_budget()
    assert cache.has(a) and not cache.has(b)


def test_pinned_and_recently_used_contents_are_never_evicted(tmp_path):
    clock = FakeClock()
    cache = ContentCache(tmp_path / "c", 0, grace_seconds=30, clock=clock)
    old = put(cache, b"o" * 10)
    pinned = put(cache, b"p" * 10)
    clock.tick(60)
    recent = put(cache, b"r" * 10)
    with cache.pinned([pinned]):
        assert cache.evict_to_budget() == 1
        assert not cache.has(old) and cache.has(pinned) and cache.has(recent)
    clock.tick(60)
    assert cache.evict_to_budget() == 2
    assert cache.usage() == 0


def test_eviction_clears_downloads_abandoned_long_ago(tmp_path):
    clock = FakeClock()
    cache = ContentCache(tmp_path / "c", 0, stale_temp_seconds=3600, clock=clock)
    md5 = md5_b64_of_bytes(b"x")
    abandoned, live = cache.temp_path(md5), cache.temp_path(md5)
    abandoned.write_bytes(b"half")
    live.write_bytes(b"half")
    os.utime(abandoned, (clock.now - 7200, clock.now - 7200))
    os.utime(live, (clock.now - 60, clock.now - 60))
    cache.evict_to_budget()
    assert not abandoned.exists() and live.exists()


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


def test_eviction_waits_for_another_process_evicting(tmp_path):
    clock = FakeClock()
    cache = ContentCache(tmp_path / "c", 0, grace_seconds=0, clock=clock)
    md5 = put(cache, b"x" * 10)
    clock.tick()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "c" / "evict.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        done = threading.Event()
        worker = threading.Thread(target=lambda: (cache.evict_to_budget(), done.set()))
        worker.start()
        assert not done.wait(0.3)  # cannot finish while the other process holds the lock
        assert cache.has(md5)
    finally:
        holder.communicate(b"\n", timeout=10)
    worker.join(10)
    assert done.is_set() and not cache.has(md5)


def test_bad_budget_is_refused(tmp_path):
    with pytest.raises(CacheError):
        ContentCache(tmp_path / "c", -1)


_WORKER = """
import sys, os
from pathlib import Path
from cio_worker.node.cache import ContentCache
from cio_worker.job.hashing import md5_b64_of_bytes
root, which = Path(sys.argv[1]), int(sys.argv[2])
cache = ContentCache(root, 20 * 1000, grace_seconds=0)
for i in range(60):
    data = bytes([(which * 7 + i) % 40]) * 1000  # overlapping contents across processes
    md5 = md5_b64_of_bytes(data)
    if not cache.has(md5):
        temp = cache.temp_path(md5)
        temp.write_bytes(data)
        cache.adopt(md5, temp)
    out = root.parent / f"out-{which}"
    if cache.copy_out(md5, out):
        assert out.read_bytes() == data
    cache.evict_to_budget()
print("ok")
"""


def test_processes_adopting_and_evicting_at_once_stay_consistent(tmp_path):
    root = tmp_path / "c"
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(k)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for k in range(4)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    cache = ContentCache(root, 20 * 1000, grace_seconds=0)
    assert cache.usage() <= 20 * 1000
    for shard in (root / "objects").iterdir():
        for obj in shard.iterdir():  # every survivor is whole and named by its content
            data = obj.read_bytes()
            assert md5_hex(md5_b64_of_bytes(data)) == obj.name
    assert list((root / "tmp").iterdir()) == []


def _damage_in_place(path: Path) -> None:
    """Flip one byte, keeping size and inode (a disk fault, or a write through a hard link)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 0xFF]))


def test_a_cached_copy_with_other_bytes_is_never_copied_out(tmp_path):
    cache = ContentCache(tmp_path / "c", 10_000_000)
    data = os.urandom(2 * 1024 * 1024 + 5)
    md5 = put(cache, data)
    _damage_in_place(cache.object_path(md5))
    dest = tmp_path / "x.bin"
    with pytest.raises(DamagedObject) as info:
        cache.copy_out(md5, dest)
    assert md5 in str(info.value)
    assert not dest.exists()  # nothing of the wrong bytes is left where the caller would place it
    assert not cache.has(md5) and cache.damaged == 1  # evicted and counted
    assert cache.copy_out(md5, dest) is False  # now simply absent: the caller fetches it again


def test_the_check_can_be_switched_off_to_measure_it(tmp_path):
    cache = ContentCache(tmp_path / "c", 10_000_000, verify=False)
    md5 = put(cache, b"x" * 1000)
    _damage_in_place(cache.object_path(md5))
    assert cache.copy_out(md5, tmp_path / "x.bin") is True  # unchecked: copied as it is
    assert cache.damaged == 0


def test_adopt_link_shares_the_file_or_copies_one_not_readable_by_all(tmp_path):
    cache = ContentCache(tmp_path / "c", 10_000_000)
    placed = tmp_path / "placed.bin"
    placed.write_bytes(b"texture")
    md5 = md5_b64_of_bytes(b"texture")
    cache.adopt_link(md5, placed)
    assert cache.object_path(md5).stat().st_ino == placed.stat().st_ino  # written once
    cache.adopt_link(md5, placed)  # already held: nothing to do
    private = tmp_path / "private.key"
    private.write_bytes(b"secret")
    private.chmod(0o600)
    secret = md5_b64_of_bytes(b"secret")
    cache.adopt_link(secret, private, shareable=False)
    assert cache.object_path(secret).stat().st_ino != private.stat().st_ino
    assert cache.object_path(secret).read_bytes() == b"secret"
    assert stat.S_IMODE(cache.object_path(secret).stat().st_mode) == 0o444
    assert list((tmp_path / "c" / "tmp").iterdir()) == []


def test_eviction_counts_only_bytes_the_cache_alone_holds(tmp_path):
    """An object hard-linked into a task directory (adopt_link) frees nothing when removed: it is not
    counted against the budget nor evicted while the link lives; once the task's copy is gone it is."""
    clock = FakeClock()
    cache = ContentCache(tmp_path / "c", 150, grace_seconds=0, clock=clock)
    placed = tmp_path / "task" / "tex.0001.exr"
    placed.parent.mkdir()
    placed.write_bytes(b"L" * 100)
    os.utime(placed, (clock.now, clock.now))  # a link shares the placed file's times
    linked = md5_b64_of_bytes(b"L" * 100)
    cache.adopt_link(linked, placed)  # the oldest
    clock.tick()
    copies = []
    for i in range(2):
        copies.append(put(cache, bytes([i]) * 100))
        clock.tick()
    assert cache.usage() == 200  # the linked 100 bytes are the task's too
    assert cache.evict_to_budget() == 1  # the oldest copy, not the older linked object
    assert cache.has(linked) and not cache.has(copies[0]) and cache.has(copies[1])
    placed.unlink()  # the task directory is cleaned: the object is the cache's alone now
    assert cache.usage() == 200
    assert cache.evict_to_budget() == 1
    assert not cache.has(linked) and cache.has(copies[1])


def test_held_answers_the_same_by_stats_and_by_listing_the_shards(tmp_path):
    cache = ContentCache(tmp_path / "c", 1 << 30)
    stored = [put(cache, f"object {i}".encode()) for i in range(40)]
    absent = [md5_b64_of_bytes(f"absent {i}".encode()) for i in range(40)]
    cache.discard(stored[0])  # gone again
    wanted = stored + absent
    expected = set(stored[1:])
    assert cache.held(wanted) == expected  # a stat each
    assert cache.held(wanted, list_from=1) == expected  # the shard directories listed
    assert ContentCache(tmp_path / "empty", 1).held(wanted, list_from=1) == set()
