"""The command line, run as a real subprocess (`python -m cio_worker`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cio_worker
from cio_worker.job.document import TaskDocument
from cio_worker.sim.examples import example_dir, example_job_path, example_root
from cio_worker.job.hashing import md5_b64_of_file

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "cio_worker", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cio-worker: error: ")
    for word in words:
        assert word in lines[0]


@pytest.fixture()
def shot(tmp_path: Path) -> Path:
    """A private copy of the example shot, safe to break."""
    return Path(shutil.copytree(example_dir(), tmp_path / "shot_A"))


def test_preflight_shows_the_job(tmp_path: Path) -> None:
    result = run("preflight", str(example_job_path()), "--root", str(example_root()), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "Frames:         1-10 (10 frames, from the images' ranges)" in out
    assert "Chunks:         5 of up to 2 frames: 1-2, 3-4, 5-6, 7-8, 9-10" in out
    assert "Scout frames:   1-7x6 (8 scout tasks)" in out
    assert "Tasks:          20 (12 holding until released)" in out
    assert "Output path:    C:/proj/renders/shot_A" in out
    assert "Dependencies:   smart scan: 17 found, 0 missing" in out
    assert "  C:/proj/assets/geo/debris.0004.abc" in out and "debris.0003.abc" not in out
    assert "  012 frames 7-8 tile 1/4 scout\n" in out
    assert (
        "      cnode \"/proj/shots/shot_A/shot_A.project\" -image project://scene/beauty "
        "-image_frames_list '9:10' -tile_rendering 4 4 -license_server conductor_ilise:40500\n"
    ) in out
    assert "Missing" not in out


def test_preflight_json_gives_task_documents(tmp_path: Path) -> None:
    result = run("preflight", str(example_job_path()), "--root", str(example_root()), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    documents = [TaskDocument.from_dict(d) for d in json.loads(result.stdout)]
    assert len(documents) == 20
    assert {d.job.id for d in documents} == {"00000"}
    assert documents[0].job.storage.startswith("file:///")
    assert [d.task.id for d in documents][:5] == ["000", "001", "002", "003", "004"]
    uploads = {u.destination: u for u in documents[0].job.upload_files}
    assert len(uploads) == 17
    wood = uploads["C:/proj/assets/tex/wood.png"]
    local = example_root() / "proj/assets/tex/wood.png"
    assert wood.md5 == md5_b64_of_file(local) and wood.size == local.stat().st_size


def test_preflight_json_options(tmp_path: Path) -> None:
    result = run(
        "preflight", str(example_job_path()), "--path-map", f"/proj={example_root()}/proj", "--json",
        "--job-id", "42", "--storage", "s3://bucket/prefix", "--temp-dir", "/scratch",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = TaskDocument.from_dict(json.loads(result.stdout)[0])
    assert (document.job.id, document.job.storage) == ("00042", "s3://bucket/prefix")


def test_missing_dependencies(shot: Path) -> None:
    (shot / "root/proj/assets/plates/bg.0104.png").unlink()
    human = run("preflight", str(shot / "job.toml"), "--root", str(shot / "root"))
    assert human.returncode == 0
    assert "smart scan: 16 found, 1 missing" in human.stdout
    assert "Missing:\n  /proj/assets/plates/bg.0104.png\n" in human.stdout
    assert "1 dependency file(s) missing" in human.stderr
    as_json = run("preflight", str(shot / "job.toml"), "--root", str(shot / "root"), "--json")
    assert_one_line_error(as_json, "1 dependency file(s)", "/proj/assets/plates/bg.0104.png")
    assert as_json.stdout == ""


def test_preflight_bad_input(shot: Path, tmp_path: Path) -> None:
    # Without a path map the artist's /proj does not exist here.
    assert_one_line_error(run("preflight", str(shot / "job.toml")), "/proj/shots/shot_A/shot_A.project", "--root")
    spec = shot / "job.toml"
    spec.write_text(spec.read_text().replace("chunk_size = 2", "chunk_sise = 2"))
    assert_one_line_error(run("preflight", str(spec), "--root", str(shot / "root")), "[job] chunk_sise", "chunk_size")
    assert_one_line_error(run("preflight", str(tmp_path / "absent.toml")), "absent.toml", "does not exist")
    assert_one_line_error(run("preflight", str(spec), "--path-map", "nonsense"), "FROM=TO")


def test_traceback_flag_shows_one(shot: Path) -> None:
    for args in (("--traceback", "preflight", str(shot / "job.toml")), ("preflight", str(shot / "job.toml"), "--traceback")):
        result = run(*args)
        assert result.returncode == 2
        assert "Traceback (most recent call last)" in result.stderr
        assert "ProjectError" in result.stderr or "ExpandError" in result.stderr
        assert result.stderr.splitlines()[-1].startswith("cio-worker: error: ")


def test_frames_command() -> None:
    result = run("frames", "1-10x2", "20", "--chunk-size", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "canonical: 1-9x2,20",
        "count:     6",
        "cnode:     1:9%2;20",
        "chunks:    3 of up to 2 frames",
        "    1  1-3x2    cnode 1:3%2",
        "    2  5-7x2    cnode 5:7%2",
        "    3  9-20x11  cnode 9:20%11",
    ]
    for args in (("-5--1",), ("--", "-5--1")):  # a spec that starts with '-' needs no '--'
        negative = run("frames", *args)
        assert negative.returncode == 0, negative.stderr
        assert "cnode:     -5:-1" in negative.stdout and "chunks:    1 of up to 5 frames" in negative.stdout
    chunked = run("frames", "-5--1", "--chunk-size", "2")
    assert chunked.returncode == 0, chunked.stderr
    assert "chunks:    3 of up to 2 frames" in chunked.stdout and "    3  -1     cnode -1" in chunked.stdout
    helped = run("frames", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: cio-worker frames")


def test_frames_bad_input() -> None:
    assert_one_line_error(run("frames", "1:10"), "'1:10'", "cnode's form")
    assert_one_line_error(run("frames", "1-10", "--chunk-size", "0"), "--chunk-size", "at least 1")
    assert_one_line_error(run("frames", "5x2"), "step needs a range")


def test_usage_errors_and_version() -> None:
    assert_one_line_error(run(), "COMMAND")
    assert_one_line_error(run("bogus"), "bogus")
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"cio-worker {cio_worker.__version__}"


def test_job_spec_show_tracebacks_turns_tracebacks_on(shot: Path) -> None:
    spec = shot / "job.toml"
    spec.write_text(spec.read_text().replace('log_level = "INFO"', 'log_level = "INFO"\nshow_tracebacks = true'))
    result = run("preflight", str(spec))  # no --root: the project is not found
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr


def test_a_bug_in_a_command_is_one_line_unless_the_traceback_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import cio_worker.cli.main as cli_main

    def broken(args, streams) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli_main, "run_frames", broken)
    for argv, traceback_shown in ((["frames", "1"], False), (["--traceback", "frames", "1"], True)):
        err = io.StringIO()
        assert cli_main.main(argv, stdout=io.StringIO(), stderr=err) == 1
        assert ("Traceback (most recent call last)" in err.getvalue()) is traceback_shown
        last = err.getvalue().splitlines()[-1]
        assert last.startswith("cio-worker: internal error: RuntimeError: boom")


def test_a_project_file_named_with_a_space_is_refused_at_preflight_and_submit(shot: Path, tmp_path: Path) -> None:
    """cnode cannot open it, so every task would fail: preflight and submit say so and enqueue
    nothing. A directory with a space is fine (the node runs cnode from the project's directory)."""
    shots = shot / "root/proj/shots"
    (shots / "shot_A/shot_A.project").rename(shots / "shot_A/shot A.project")
    spec = shot / "job.toml"
    spec.write_text(spec.read_text().replace("shot_A/shot_A.project", "shot_A/shot A.project"))
    result = run("preflight", str(spec), "--root", str(shot / "root"))
    assert_one_line_error(result, "[job] project_file", "'shot A.project' holds a space", "cnode")
    queue = tmp_path / "q.db"
    result = run("submit", str(spec), "--queue", f"sqlite:///{queue}", "--storage", f"file://{tmp_path / 'store'}",
                 "--root", str(shot / "root"))
    assert_one_line_error(result, "[job] project_file", "holds a space")
    assert not queue.exists() and not (tmp_path / "store").exists()

    (shots / "shot_A/shot A.project").rename(shots / "shot_A/shot_A.project")
    (shots / "shot_A").rename(shots / "shot A")
    spec.write_text(spec.read_text().replace("shot_A/shot A.project", "shot A/shot_A.project"))
    result = run("preflight", str(spec), "--root", str(shot / "root"))
    assert result.returncode == 0, result.stderr
    assert 'cnode "/proj/shots/shot A/shot_A.project"' in result.stdout
