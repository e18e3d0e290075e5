"""The renderer never waits on the agent: output is read in bulk, masked, capped and filtered
without per-line work for lines nobody reads; the benchmark still runs (tiny sizes, no speed
asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cio_worker.node.clarisse import MONITORED_LINES
from cio_worker.node.logscan import LineFilter
from cio_worker.node.runner import ProcessRunner, RunSpec
from cio_worker.node.scandb import Engine
from tests.test_scandb import ENGINES

PY = sys.executable
MiB = 1 << 20
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# 6 MiB of chatter in big writes, with a secret, progress, saved and fatal lines spread through it.
WRITER = r"""
import sys
out = sys.stdout.buffer
for i in range(60000):
    if i % 1000 == 7:
        out.write(b"Progress for 'project://scene/beauty' : %d.0 %%\n" % (i // 1000))
    elif i % 1000 == 8:
        out.write(b"key hunter2-secret-value seat %d\n" % i)
    elif i == 30001:
        out.write(b"Saved image 'project://scene/beauty' frame 3 to '/out/b.0003.exr'\n")
    elif i == 40001:
        out.write(b"ERROR: unable to get a licence\n")
    else:
        out.write(b"[render] bucket %07d of tile 3/16: 4096 samples, 0.0123 s, chatter chatter chatter\n" % i)
"""


def run(tmp_path: Path, cap: int, scan_engine: Engine = "auto", **kw):
    lines: list[str] = []
    spec = RunSpec([PY, "-c", WRITER], cwd=tmp_path, env={"PATH": os.environ["PATH"], "LIC_SECRET": "hunter2-secret-value"},
                   log_path=tmp_path / "task.log", log_cap_bytes=cap)
    result = ProcessRunner(scan_engine=scan_engine).start(spec, on_line=lines.append, **kw).wait(timeout=120)
    return result, lines, (tmp_path / "task.log").read_bytes()


@pytest.mark.parametrize("engine", ENGINES)
def test_on_line_gets_only_the_lines_the_filter_selects_in_order_and_the_log_gets_all(tmp_path, engine):
    result, lines, log = run(tmp_path, 64 * MiB, engine, line_filter=MONITORED_LINES)
    assert result.exit_code == 0 and result.log_bytes_dropped == 0
    assert len(lines) == 60 + 1 + 1  # progress x60, saved, error (the secret lines hold no hint)
    assert lines[0] == "Progress for 'project://scene/beauty' : 0.0 %"
    assert "Saved image 'project://scene/beauty' frame 3 to '/out/b.0003.exr'" in lines
    assert lines.index("ERROR: unable to get a licence") == 40 + 1  # after 40 progress lines and the save
    output = log.split(b"==== cio_worker: output ====\n", 1)[1]
    assert output.count(b"[render] bucket") == 60000 - 60 - 60 - 2
    assert b"hunter2-secret-value" not in log and output.count(b"key **** seat") == 60
    header = log.split(b"==== cio_worker: output ====\n", 1)[0]
    assert f"\noutput scan: Hyperscan, {engine}".encode() in header  # "system 5.4.9" for the system's libhs


def test_the_header_says_when_nothing_is_scanned(tmp_path):
    spec = RunSpec([PY, "-c", "print('hi')"], cwd=tmp_path, env={"PATH": os.environ["PATH"]},
                   log_path=tmp_path / "task.log")
    assert ProcessRunner().start(spec).wait(timeout=60).exit_code == 0
    assert "\noutput scan: none (no secret to mask, no line to pick)\n" in (tmp_path / "task.log").read_text()


def test_the_cap_stops_storing_but_the_pipe_is_drained_and_progress_still_parsed(tmp_path):
    result, lines, log = run(tmp_path, 1 * MiB, line_filter=MONITORED_LINES)
    assert result.exit_code == 0 and result.ok  # the render never blocked on the full log
    assert len(lines) == 62  # every monitored line, also those past the cap
    body = log.split(b"==== cio_worker: output ====\n", 1)[1].split(b"==== cio_worker: end ====\n", 1)[0]
    stored = body.split(b"\n", 1)[1].split(b"[cio_worker] log cap of", 1)[0]
    assert len(stored) <= 1 * MiB and stored.endswith(b"\n")  # whole lines only
    assert result.log_bytes_dropped > 3 * MiB
    assert b"hunter2-secret-value" not in log


def test_a_line_filter_finds_words_in_any_case_and_prefixes_at_line_starts_only():
    spans = LineFilter(prefixes=("Saved image '",), words=("fatal",))
    block = b"Saved image 'a'\nnot Saved image 'b'\nA FATAL thing\nfine\nfatal and Fatal\n"
    assert [block[s:e] for s, e in spans.spans(block)] == [b"Saved image 'a'", b"A FATAL thing", b"fatal and Fatal"]


def test_log_throughput_benchmark_quick_runs_and_reports(tmp_path):
    out = tmp_path / "lt.json"
    done = subprocess.run([PY, str(BENCHMARKS / "log_throughput.py"), "--quick", "--sizes", "1,2", "--runs", "2",
                           "--json", str(out), "--scratch", str(tmp_path), "--keep-caches"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["parameters"]["sizes_mib"] == [1, 2] and len(report["rows"]) == 4
    for row in report["rows"]:
        assert len(row["runs"]) == 2
        assert row["summary"]["ratio"]["min"] <= row["summary"]["ratio"]["median"] <= row["summary"]["ratio"]["max"]
        assert all(r["progress_lines_parsed"] > 0 for r in row["runs"])
    assert "| 2 MiB | cap on |" in done.stdout
    assert report["scan_engine"].startswith("Hyperscan, ")  # from the task log's header
    assert f"scan engine: {report['scan_engine']};" in done.stdout


def run_writer(tmp_path: Path, code: str, env: dict[str, str], **kw):
    lines: list[str] = []
    spec = RunSpec([PY, "-c", code], cwd=tmp_path, env={"PATH": os.environ["PATH"], **env},
                   log_path=tmp_path / "task.log", log_cap_bytes=kw.pop("cap", 64 * MiB))
    result = ProcessRunner().start(spec, on_line=lines.append, **kw).wait(timeout=120)
    output = (tmp_path / "task.log").read_bytes().split(b"==== cio_worker: output ====\n", 1)[1]
    return result, lines, output.split(b"==== cio_worker: end ====\n", 1)[0].split(b"\n", 1)[1]


def test_a_secret_that_arrives_in_two_reads_is_still_masked(tmp_path):
    code = ("import sys, time; o = sys.stdout.buffer\n"
            "o.write(b'ERROR: licence hunter2-se'); o.flush(); time.sleep(0.5)\n"
            "o.write(b'cret-value refused\\nnext\\n'); o.flush()")
    result, lines, output = run_writer(tmp_path, code, {"LIC_SECRET": "hunter2-secret-value"}, line_filter=MONITORED_LINES)
    assert result.ok
    assert output == b"ERROR: licence **** refused\nnext\n"
    assert lines == ["ERROR: licence **** refused"]  # a selected line reaches on_line masked too


def test_overlapping_and_multi_line_secrets_are_masked_whole(tmp_path):
    env = {"A_TOKEN": "key-1234-5678", "B_TOKEN": "1234-5678-tail", "C_PASSWORD": "first-line\nsecond-line"}
    code = ("import sys; o = sys.stdout.buffer\n"
            "o.write(b'[x] key-1234-5678-tail and key-1234-5678-tailkey-1234-5678\\n')\n"
            "o.write(b'pw first-line\\nsecond-line end\\n')")
    result, lines, output = run_writer(tmp_path, code, env)
    assert result.ok
    assert output == b"[x] **** and ********\npw ****\n**** end\n"
    assert lines == ["[x] **** and ********", "pw ****", "**** end"]  # no filter: every line, masked


def test_a_line_longer_than_the_reader_holds_is_kept_in_pieces(tmp_path):
    code = "import sys; o = sys.stdout.buffer\no.write(b'x' * (3 * 2**20 + 5) + b'Saved image \\'a\\' tail\\nError end\\n')"
    result, lines, output = run_writer(tmp_path, code, {}, line_filter=MONITORED_LINES)
    assert result.ok and result.log_bytes_dropped == 0
    pieces = output.split(b"\n")
    assert [len(p) for p in pieces[:3]] == [MiB] * 3  # cut at 1 MiB, each piece a line of its own
    assert pieces[3:] == [b"xxxxxSaved image 'a' tail", b"Error end", b""]
    assert lines == ["Error end"]  # the prefix is no longer at a line start
