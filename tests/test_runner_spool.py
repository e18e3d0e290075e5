"""The renderer never waits on the agent: its output goes to an unnamed spool file the reader
tails, so a stuck or slow reader never blocks it; the spool has no name, the command cannot read
it back, its read part is freed, and a flood beyond the lag bound is skipped, never stored."""

from __future__ import annotations

import ctypes
import os
import re
import tempfile
import threading
from pathlib import Path

import pytest

from cio_worker.node.logscan import LineFilter
from cio_worker.node.runner import ProcessRunner
from tests.test_runner import MIB, PY, footer, h, output_section, wait_until  # noqa: F401  (h: the fixture)

SECRET = "hunter2-spool-secret"

# Prints "first", then MiB megabytes of lines (a secret in some), flushes, marks "flooded", waits
# for "go", prints "after the flood".
FLOOD_PY = r"""
import os, sys, time
from pathlib import Path
out = sys.stdout.buffer
out.write(b"first\n"); out.flush()
line = b"x" * 90 + b"\n"
block = (line * 100 + b"key %s here\n" % os.environ["LIC_SECRET"].encode()) * 100
for _ in range(int(sys.argv[1]) * (1 << 20) // len(block) + 1):
    out.write(block)
out.flush()
Path("flooded").touch()
deadline = time.monotonic() + 30
while not Path("go").exists() and time.monotonic() < deadline:
    time.sleep(0.01)
out.write(b"after the flood\n"); out.flush()
"""


def flood_lines(mib: int) -> int:
    """How many lines FLOOD_PY prints in all."""
    block = (91 * 100 + len(f"key {SECRET} here\n")) * 100
    return 1 + (mib * MIB // block + 1) * 101 * 100 + 1


def output_bytes(log: str) -> tuple[int, int, str]:
    """(written, dropped, the rest) from the footer's "output bytes" line."""
    line = footer(log)["output bytes"]
    written, dropped, rest = re.fullmatch(r"(\d+) written, (\d+) dropped (.*)", line).groups()
    return int(written), int(dropped), rest


def _punch_supported(directory: Path) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    with tempfile.TemporaryFile(dir=directory) as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        return libc.fallocate(f.fileno(), 3, 0, 1 << 20) == 0


def _blocked_on_line(lines: list[str], release: threading.Event, first: str):
    def on_line(line: str) -> None:
        lines.append(line)
        if line == first:
            release.wait(60)
    return on_line


def test_the_command_finishes_while_the_reader_is_stuck_and_nothing_is_lost(h, tmp_path):
    """With a pipe the command would block once the pipe is full (1 MiB): here it writes 24 MiB and
    exits while on_line holds the reader on the first line."""
    lines: list[str] = []
    release = threading.Event()
    command = [PY, "-c", FLOOD_PY, "24"]
    (tmp_path / "go").touch()
    process = h.start(command, on_line=_blocked_on_line(lines, release, "first"),
                      env={"LIC_SECRET": SECRET}, log_cap_bytes=64 * MIB)
    try:
        wait_until(lambda: lines == ["first"], "the reader to hold on the first line")
        wait_until(lambda: process._reaped, "the command to exit while the reader is stuck", limit=60)
    finally:
        release.set()
    result = process.wait(timeout=60)
    assert result.exit_code == 0 and result.log_bytes_dropped == 0
    assert lines[-1] == "after the flood" and len(lines) == flood_lines(24)
    log = h.log()
    assert SECRET not in log and "key **** here" in log
    assert output_section(log)[-1] == "after the flood"


def test_the_spool_has_no_name_and_the_command_cannot_read_it_back(h, tmp_path):
    probe = (
        "import os\n"
        "print('target', os.readlink('/proc/self/fd/1'), flush=True)\n"
        "try:\n    os.read(1, 10)\nexcept OSError as e:\n    print('read', e.errno, flush=True)\n"
        "try:\n    os.lseek(1, 0, 0); os.write(1, b'overwrite? ')\nexcept OSError as e:\n    print('seek', e.errno)\n"
        "print('appended', flush=True)\n"
    )
    result = h.run([PY, "-c", probe], env={"LIC_SECRET": SECRET})
    assert result.exit_code == 0
    target = next(l for l in h.lines if l.startswith("target "))
    assert target.endswith("(deleted)") and str(h.tmp / "logs") in target, target
    assert f"read {9}" in h.lines  # EBADF: the descriptor is write-only
    assert h.lines[-1] == "overwrite? appended"  # a seek does not move an append-only write
    assert sorted(p.name for p in (h.tmp / "logs").iterdir()) == ["task.log"]


def test_a_render_user_cannot_reopen_the_spool(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the command as nobody")
    from cio_worker.node.render_user import RenderUser
    from cio_worker.node.runner import RunSpec

    # dash applies a command's redirections in the shell itself: fd 3 keeps the spool for cat.
    script = "exec 3>&1; if cat /proc/$$/fd/3 >/dev/null 2>&1; then echo reopened; else echo refused; fi"

    def probe(runner: ProcessRunner) -> list[str]:
        lines: list[str] = []
        spec = RunSpec(script, cwd=Path("/"), env={"PATH": os.environ["PATH"]}, log_path=tmp_path / "logs" / "task.log")
        assert runner.start(spec, on_line=lines.append).wait(timeout=60).exit_code == 0
        return lines

    assert probe(ProcessRunner()) == ["reopened"]  # the probe works: the agent's own user may
    assert probe(ProcessRunner(render_user=RenderUser.resolve("nobody"))) == ["refused"]


def test_the_read_part_of_the_spool_is_freed_while_the_command_runs(h, tmp_path):
    if not _punch_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} cannot punch holes")
    process = h.start([PY, "-c", FLOOD_PY, "48"], env={"LIC_SECRET": SECRET}, log_cap_bytes=4 * MIB)
    wait_until(lambda: (tmp_path / "flooded").exists(), "the flood to be written", limit=60)
    spool = f"/proc/{process.pid}/fd/1"
    size = os.stat(spool).st_size
    assert size > 48 * MIB
    # The reader catches up with the waiting command; then at most 16 MiB + a chunk are still held.
    wait_until(lambda: os.stat(spool).st_blocks * 512 < 20 * MIB, "the read part of the spool to be freed", limit=60)
    (tmp_path / "go").touch()
    result = process.wait(timeout=60)
    assert result.exit_code == 0
    assert "after the flood" in h.log() and SECRET not in h.log()


def test_a_flood_beyond_the_lag_bound_is_skipped_never_stored_and_said(tmp_path):
    runner = ProcessRunner(spool_lag_bytes=2 * MIB)
    lines: list[str] = []
    flooded = tmp_path / "flooded"

    def on_line(line: str) -> None:
        lines.append(line)
        if line == "first":
            wait_until(flooded.exists, "the flood to be written", limit=60)

    from cio_worker.node.runner import RunSpec

    log_path = tmp_path / "logs" / "task.log"
    spec = RunSpec([PY, "-c", FLOOD_PY, "16"], cwd=tmp_path, env={"PATH": os.environ["PATH"], "LIC_SECRET": SECRET},
                   log_path=log_path, log_cap_bytes=64 * MIB)
    process = runner.start(spec, on_line=on_line, line_filter=LineFilter(prefixes=("first", "after", "key")))
    try:
        wait_until(lambda: b"faster than the agent reads" in log_path.read_bytes(), "the skip to be noted", limit=60)
    finally:
        (tmp_path / "go").touch()
    result = process.wait(timeout=60)
    log = log_path.read_text()
    assert result.exit_code == 0
    assert lines[0] == "first" and lines[-1] == "after the flood"
    assert len(lines) < 1000  # of the 16,000 secret lines, at most the first chunk's were read
    assert SECRET not in log and output_section(log)[-1] == "after the flood"
    assert len(log) < 4 * MIB
    written, dropped, rest = output_bytes(log)
    assert written < 3 * MIB and dropped > 13 * MIB
    assert rest.endswith("of them unread: the command outran the reader by more than 2.0 MiB")
