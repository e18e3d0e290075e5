"""Expanding a job spec into tasks: per-image frames, scouts, tiles, output path, tokens."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cio_worker.job.depscan import upload_files
from cio_worker.job.document import TaskDocument
from cio_worker.errors import CioError, TokenError
from cio_worker.sim.examples import example_job_path, example_root
from cio_worker.job.expand import expand_job
from cio_worker.job.jobspec import JobSpecError, load_job_spec
from cio_worker.job.paths import PathMap

IMAGES = {
    "project://scene/image1": {"frames": "1-10", "save_as": "C:/proj/renders/layerA/a.####.png"},
    "project://scene/image2": {"frames": "4-7", "save_as": "C:/proj/renders/layerB/sub/b.####.png"},
}


def make_job(tmp_path: Path, job: str = "", images: dict | None = None, references: dict | None = None) -> Path:
    """A project under tmp_path/root/proj and a job spec naming it by its artist path."""
    project = {"format": "cio-project/1", "images": images or IMAGES, "references": references or {}}
    project_path = tmp_path / "root/proj/shot.project"
    project_path.parent.mkdir(parents=True, exist_ok=True)
    project_path.write_text(json.dumps(project))
    names = json.dumps(list((images or IMAGES).keys()))
    spec = tmp_path / "shot_X.toml"
    spec.write_text(f'[job]\nproject_file = "/proj/shot.project"\nimages = {names}\n{job}')
    return spec


def expand(tmp_path: Path, spec_path: Path, **kwargs):  # type: ignore[no-untyped-def]
    return expand_job(load_job_spec(spec_path), path_map=PathMap.rooted(str(tmp_path / "root")), **kwargs)


def test_chunk_without_intersection_drops_the_image(tmp_path: Path) -> None:
    job = expand(tmp_path, make_job(tmp_path, "chunk_size = 2\n"))
    assert job.frames.canonical() == "1-10"  # the union of the images' ranges
    assert [c.canonical() for c in job.chunks] == ["1-2", "3-4", "5-6", "7-8", "9-10"]
    commands = [t.command for t in job.tasks]
    assert commands[0] == (
        'cnode "/proj/shot.project" -image project://scene/image1 -image_frames_list \'1:2\' '
        "-tile_rendering 1 1 -license_server conductor_ilise:40500"
    )
    assert "-image project://scene/image1 project://scene/image2 -image_frames_list '3:4' '4' " in commands[1]
    assert "-image project://scene/image1 project://scene/image2 -image_frames_list '5:6' '5:6' " in commands[2]
    assert "-image_frames_list '7:8' '7' " in commands[3]
    assert "image2" not in commands[4] and "-image_frames_list '9:10' -tile" in commands[4]
    assert [t.frames for t in job.tasks] == ["1-2", "3-4", "5-6", "7-8", "9-10"]


def test_custom_frames_apply_to_every_image(tmp_path: Path) -> None:
    job = expand(tmp_path, make_job(tmp_path, 'use_custom_frames = true\ncustom_frames = "1-3"\nchunk_size = 5\n'))
    assert job.frames.canonical() == "1-3"
    assert dict(job.image_frames) == {"project://scene/image1": job.frames, "project://scene/image2": job.frames}
    assert len(job.tasks) == 1
    assert "-image project://scene/image1 project://scene/image2 -image_frames_list '1:3' '1:3' " in job.tasks[0].command


def test_tiles_times_chunks_chunk_major(tmp_path: Path) -> None:
    job = expand(tmp_path, make_job(tmp_path, "chunk_size = 5\ntiles = 4\n"))
    assert [(t.id, t.frames, t.tile, t.tiles) for t in job.tasks] == [
        ("000", "1-5", 1, 4), ("001", "1-5", 2, 4), ("002", "1-5", 3, 4), ("003", "1-5", 4, 4),
        ("004", "6-10", 1, 4), ("005", "6-10", 2, 4), ("006", "6-10", 3, 4), ("007", "6-10", 4, 4),
    ]  # fmt: skip
    assert [t.command.split("-tile_rendering ")[1].split(" -")[0] for t in job.tasks[:4]] == ["4 1", "4 2", "4 3", "4 4"]


def test_scout_tasks_and_holding(tmp_path: Path) -> None:
    job = expand(tmp_path, make_job(tmp_path, 'chunk_size = 3\ntiles = 4\nuse_scout_frames = true\nscout_frames = "2, 10-12"\n'))
    # chunks 1-3, 4-6, 7-9, 10: frames 2 and 10 make chunks 0 and 3 scouts, all their tiles.
    assert job.scout_tasks == (0, 1, 2, 3, 12, 13, 14, 15)
    assert [t.scout for t in job.tasks] == [True] * 4 + [False] * 8 + [True] * 4
    assert job.holding
    assert job.values["scout"] == "2-10x8" and job.values["scoutcount"] == "2"  # within the job's frames


def test_scouts_outside_the_frames_are_an_error(tmp_path: Path) -> None:
    spec = make_job(tmp_path, 'use_scout_frames = true\nscout_frames = "50"\n')
    with pytest.raises(JobSpecError, match=r"\[job\] scout_frames: none of the scout frames 50"):
        expand(tmp_path, spec)


def test_no_scouts_no_holding(tmp_path: Path) -> None:
    job = expand(tmp_path, make_job(tmp_path))
    assert job.scout_tasks == () and not job.holding


def test_output_path_is_the_common_directory_with_the_drive_kept(tmp_path: Path) -> None:
    job = expand(tmp_path, make_job(tmp_path))
    assert job.output_path == "C:/proj/renders"
    assert job.values["directories"] == '"/proj/renders/layerA" "/proj/renders/layerB/sub"'
    job = expand(tmp_path, make_job(tmp_path, 'output_path = "D:/elsewhere"\n'))
    assert job.output_path == "D:/elsewhere"


def test_output_path_on_different_drives_needs_an_override(tmp_path: Path) -> None:
    images = {
        "project://scene/a": {"frames": "1", "save_as": "C:/proj/a/a.####.png"},
        "project://scene/b": {"frames": "1", "save_as": "D:/proj/b/b.####.png"},
    }
    with pytest.raises(JobSpecError, match=r"output_path: the images save to different drives \(C:, D:\)"):
        expand(tmp_path, make_job(tmp_path, images=images))
    images["project://scene/b"]["save_as"] = "C:/other/b.####.png"
    with pytest.raises(JobSpecError, match="share only the root directory; set output_path"):
        expand(tmp_path, make_job(tmp_path, images=images))


def test_tokens_in_a_custom_template(tmp_path: Path) -> None:
    template = (
        "echo <job>|<project>|<sequence>|<sequencelength>|<sequencemin>|<sequencemax>|<chunksize>|"
        "<chunkcount>|<scout>|<scoutcount>|<cores>|<flavor>|<instance>|<preemptible>|<retries>|"
        "<sources>|<directories>|<tiles>|<render_package>|<pdir>|<temp_dir>|<chunks>|<chunklength>|"
        "<chunkstart>|<chunkend>|<tile_number>|<pad chunkstart 4>|<<"
    )
    spec = make_job(
        tmp_path,
        "chunk_size = 4\ntiles = 1\nproject = \"harry_potter\"\ninstance_type = \"n1-standard-2\"\n"
        "preemptible = false\nretries = 3\nuse_scout_frames = true\nscout_frames = \"3-8x5\"\n"
        f"task_template = {json.dumps(template)}\n",
    )
    job = expand(tmp_path, spec, temp_dir="/tmp/render temp")
    fields = job.tasks[1].command.removeprefix("echo ").split("|")
    assert fields == [
        "shot_X", "harry_potter", "1-10", "10", "1", "10", "4",
        "3", "3-8x5", "2", "2", "standard", "2 core, 7.50GB Mem", "non-preemptible", "3",
        "project://scene/image1 project://scene/image2",
        '"/proj/renders/layerA" "/proj/renders/layerB/sub"', "1",
        '"/proj/shot.project"', "/proj", '"/tmp/render temp"', "'5:8' '5:7'", "4",
        "5", "8", "1", "0005", "<",
    ]  # fmt: skip


def test_chunk_size_token_is_clamped(tmp_path: Path) -> None:
    job = expand(tmp_path, make_job(tmp_path, "chunk_size = 50\n"))
    assert job.values["chunksize"] == "10" and job.values["chunkcount"] == "1"


def test_unknown_token_in_the_template_is_named(tmp_path: Path) -> None:
    spec_path = make_job(tmp_path)
    with pytest.raises(JobSpecError, match=r"task_template: .*unknown token <frame_start>"):
        load_job_spec(_with_template(spec_path, "cnode <frame_start>"))
    # A spec built in code (not read from a file) is checked when it is expanded.
    spec = dataclasses.replace(load_job_spec(spec_path), task_template="cnode <render_package> <chunk>")
    with pytest.raises(TokenError) as caught:
        expand_job(spec, path_map=PathMap.rooted(str(tmp_path / "root")))
    assert "<chunk>" in str(caught.value) and "column 24" in str(caught.value)
    assert "did you mean <chunks>" in str(caught.value)
    assert str(spec_path) in str(caught.value)


def _with_template(spec_path: Path, template: str) -> Path:
    bad = spec_path.with_name("bad.toml")
    bad.write_text(spec_path.read_text() + f"task_template = {json.dumps(template)}\n")
    return bad


def test_negative_frames_reach_cnode_as_numbers(tmp_path: Path) -> None:
    images = {"project://scene/a": {"frames": "-5--1", "save_as": "/proj/out/a.####.png"}}
    job = expand(tmp_path, make_job(tmp_path, "chunk_size = 2\n", images=images))
    assert [t.frames for t in job.tasks] == ["-5--4", "-3--2", "-1"]
    assert "-image_frames_list '-5:-4' " in job.tasks[0].command


def test_project_problems_are_errors(tmp_path: Path) -> None:
    spec = make_job(tmp_path)
    with pytest.raises(CioError, match="project file .* does not exist.*project_file /proj/shot.project"):
        expand_job(load_job_spec(spec), path_map=PathMap.rooted(str(tmp_path / "elsewhere")))
    spec.write_text(spec.read_text().replace("image2", "image9"))
    with pytest.raises(JobSpecError, match=r"\[job\] images: .*no image 'project://scene/image9'"):
        expand(tmp_path, spec)
    images = {"project://scene/a": {"frames": "1", "save_as": "/proj/out/a.####.png", "render_to_disk": False}}
    with pytest.raises(JobSpecError, match="Render to Disk"):
        expand(tmp_path, make_job(tmp_path, images=images))


def test_upload_only_has_no_tasks_but_scans(tmp_path: Path) -> None:
    job = expand(tmp_path, make_job(tmp_path, "upload_only = true\n"))
    assert job.upload_only and job.tasks == ()
    assert job.documents("00001", "file:///tmp/s", []) == []
    assert [f.artist_path for f in job.scan.files] == ["/proj/shot.project"]


def test_example_shot_documents(tmp_path: Path) -> None:
    job = expand_job(load_job_spec(example_job_path()), path_map=PathMap.rooted(str(example_root())))
    assert len(job.tasks) == 20 and job.scout_tasks == (0, 1, 2, 3, 12, 13, 14, 15)
    assert job.output_path == "C:/proj/renders/shot_A"
    assert job.scan.missing == [] and len(job.scan.files) == 17
    documents = job.documents("00042", "file:///tmp/storage", upload_files(job.scan.files))
    assert [d.task.id for d in documents] == [f"{i:03d}" for i in range(20)]
    first = TaskDocument.from_json(documents[0].to_json())
    assert first.job.id == "00042" and first.job.instance_type == "n1-standard-8"
    assert [(e.name, e.merge_policy) for e in first.job.environment] == [
        ("PATH", "append"), ("ILISE_SERVER", "exclusive"), ("OCIO", "exclusive"), ("PYTHONPATH", "append"),
    ]  # fmt: skip
    assert first.job.environment[0].value == "/opt/isotropix/clarisse/5.0.sp8/bin"
    assert {u.destination for u in first.job.upload_files} >= {
        "/proj/shots/shot_A/shot_A.project",
        "C:/proj/assets/tex/wood.png",
        "/proj/assets/plates/bg.0101.png",
        "C:/proj/assets/geo/debris.0004.abc",
        "C:/proj/config/ocio/config.ocio",
    }
    assert (first.task.frames, first.task.tile, first.task.tiles) == ("1-2", 1, 4)
    with pytest.raises(CioError, match="job id"):
        job.documents("42", "file:///tmp/storage", [])
