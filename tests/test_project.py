"""Our JSON stand-in for a Clarisse project: parsing, errors, output names, sequence paths."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cio_worker.errors import CioError
from cio_worker.job.frames import FrameSet
from cio_worker.job.project import (
    DEFAULT_RESOLUTION,
    ProjectError,
    Reference,
    has_sequence,
    load_project,
    output_file_name,
    parse_project,
    sequence_glob,
    sequence_path,
    sequence_regex,
)


def project_data() -> dict[str, Any]:
    return {
        "format": "cio-project/1",
        "images": {
            "project://scene/image1": {
                "frames": "1-10",
                "save_as": "C:/proj/renders/beauty/beauty.####.png",
                "resolution": [32, 24],
                "inputs": ["project://scene/wood"],
            },
            "project://scene/image2": {"frames": "5-13x2", "save_as": "C:/proj/renders/depth/depth$4F.png"},
        },
        "references": {
            "project://scene/wood": {"path": "C:/proj/tex/wood.png"},
            "project://scene/plate": {"path": "../plates/bg.####.png", "frame_offset": -100},
        },
    }


def write(tmp_path: Path, data: Any, name: str = "shot.project") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def test_load_project(tmp_path: Path) -> None:
    project = load_project(write(tmp_path, project_data()), display_path="C:/proj/shots/shot.project")
    assert project.path == "C:/proj/shots/shot.project"
    assert project.directory == "C:/proj/shots"
    image1 = project.image("project://scene/image1")
    assert image1.frames == FrameSet.parse("1-10")
    assert image1.resolution == (32, 24)
    assert image1.render_to_disk is True
    image2 = project.image("project://scene/image2")
    assert image2.frames == FrameSet.parse("5-13x2")
    assert image2.resolution == DEFAULT_RESOLUTION
    assert image2.inputs is None
    assert [r.item for r in project.references_of(image1)] == ["project://scene/wood"]
    assert [r.item for r in project.references_of(image2)] == ["project://scene/wood", "project://scene/plate"]
    plate = project.references["project://scene/plate"]
    assert plate.frame_offset == -100
    assert project.resolve(plate.path) == "C:/proj/plates/bg.####.png"
    assert project.resolve("C:\\proj\\tex\\wood.png") == "C:/proj/tex/wood.png"
    assert project.resolve("/abs/x.png") == "/abs/x.png"


def test_load_project_without_display_path_uses_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, project_data())
    project = load_project(path)
    assert project.directory == str(tmp_path)
    assert project.resolve("tex/a.png") == f"{tmp_path}/tex/a.png"


def test_unknown_image_and_missing_input(tmp_path: Path) -> None:
    data = project_data()
    data["images"]["project://scene/image1"]["inputs"] = ["project://scene/nothing"]
    project = load_project(write(tmp_path, data))
    with pytest.raises(ProjectError, match=r"no image 'project://scene/image9' \(images: project://scene/image1, "):
        project.image("project://scene/image9")
    with pytest.raises(ProjectError, match="reads 'project://scene/nothing', which the project does not define"):
        project.references_of(project.image("project://scene/image1"))


def _bad(change: Any) -> dict[str, Any]:
    data = project_data()
    change(data)
    return data


IMG = "project://scene/image1"
AT = re.escape(f"images['{IMG}']")
BAD_PROJECTS = [
    ("not json {", "not JSON"),
    ("[]", "format must be"),
    (json.dumps({"format": "cio-project/2", "images": {}}), "format must be"),
    (_bad(lambda d: d.pop("images")), "images: must be an object naming at least one image"),
    (_bad(lambda d: d.update(images={})), "images: must be an object naming at least one image"),
    (_bad(lambda d: d["images"].update({IMG: "x"})), f"{AT}: must be an object"),
    (_bad(lambda d: d["images"][IMG].update(frames="1:10")), f"{AT}.frames: .*cnode"),
    (_bad(lambda d: d["images"][IMG].pop("frames")), f"{AT}.frames: the frame spec is empty"),
    (_bad(lambda d: d["images"][IMG].update(frames=5)), f"{AT}.frames: a frame spec must be text"),
    (_bad(lambda d: d["images"][IMG].pop("save_as")), f"{AT}.save_as: is missing"),
    (_bad(lambda d: d["images"][IMG].update(resolution=[0, 10])), "resolution: must be \\[width, height\\]"),
    (_bad(lambda d: d["images"][IMG].update(resolution=[10])), "resolution: must be"),
    (_bad(lambda d: d["images"][IMG].update(resolution=[True, 10])), "resolution: must be"),
    (_bad(lambda d: d["images"][IMG].update(inputs="project://scene/wood")), "inputs: must be a list"),
    (_bad(lambda d: d["images"][IMG].update(render_to_disk="yes")), "render_to_disk: must be true or false"),
    (_bad(lambda d: d.update(references=[])), "references: must be an object"),
    (_bad(lambda d: d["references"].update({"project://scene/x": {}})), r"references\['project://scene/x'\].path"),
    (_bad(lambda d: d["references"]["project://scene/plate"].update(frame_offset=1.5)), "frame_offset: must be"),
]


@pytest.mark.parametrize(("content", "says"), BAD_PROJECTS)
def test_bad_projects(tmp_path: Path, content: Any, says: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ProjectError, match=says) as info:
        load_project(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, CioError) and info.value.code == "bad_project"


def test_missing_and_unreadable_project_files(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="does not exist"):
        load_project(tmp_path / "nope.project")
    (tmp_path / "bin.project").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ProjectError, match="cannot be read"):
        load_project(tmp_path / "bin.project")
    with pytest.raises(ProjectError, match="cannot be read"):
        load_project(tmp_path)  # a directory


def test_parse_project_from_text() -> None:
    project = parse_project(json.dumps(project_data()), "/proj/shot.project")
    assert sorted(project.images) == ["project://scene/image1", "project://scene/image2"]


# -- output names (contract.md 2) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("save_as", "frame", "tiles", "tile", "name"),
    [
        ("my_render.####.exr", 50, 16, 2, "my_render.tilex16-02.0050.exr"),
        ("my_render####.exr", 50, 16, 2, "my_render0050.tilex16-02.exr"),
        ("my_render.####.exr", 50, 4, 2, "my_render.tilex4-2.0050.exr"),
        ("my_render.####.exr", 50, 100, 7, "my_render.tilex100-007.0050.exr"),
        ("my_render.####.exr", 50, 100, 64, "my_render.tilex100-064.0050.exr"),
        ("my_render.####.exr", 50, 9, 9, "my_render.tilex9-9.0050.exr"),
        ("my_render.####.exr", 50, 1, 1, "my_render.0050.exr"),
        ("my_render####.exr", 7, 1, 1, "my_render0007.exr"),
        ("C:/proj/renders/beauty/beauty.####.png", 3, 4, 4, "C:/proj/renders/beauty/beauty.tilex4-4.0003.png"),
        ("/r/depth$4F.png", 12, 4, 1, "/r/depth0012.tilex4-1.png"),
        ("/r/depth.$F.png", 12, 1, 1, "/r/depth.12.png"),
        ("/r/plain.exr", 5, 1, 1, "/r/plain.0005.exr"),
        ("/r/plain.exr", 5, 4, 3, "/r/plain.tilex4-3.0005.exr"),
        ("/r/shot_####/img.exr", 5, 4, 3, "/r/shot_0005/img.tilex4-3.exr"),
        ("/r/a.####.exr", -5, 1, 1, "/r/a.-005.exr"),
    ],
)
def test_output_file_name(save_as: str, frame: int, tiles: int, tile: int, name: str) -> None:
    assert output_file_name(save_as, frame, tiles, tile) == name


def test_image_output_name(tmp_path: Path) -> None:
    image = load_project(write(tmp_path, project_data())).image(IMG)
    assert image.output_name(7) == "C:/proj/renders/beauty/beauty.0007.png"
    assert image.output_name(7, 16, 3) == "C:/proj/renders/beauty/beauty.tilex16-03.0007.png"


# -- sequence paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "frame", "result"),
    [
        ("bg.####.png", 7, "bg.0007.png"),
        ("bg.#.png", 7, "bg.7.png"),
        ("bg.##.png", 123, "bg.123.png"),
        ("bg.$4F.png", 7, "bg.0007.png"),
        ("bg.$F.png", 7, "bg.7.png"),
        ("bg.$2F.png", 7, "bg.07.png"),
        ("bg.####.png", -5, "bg.-005.png"),
        ("bg.$F.png", -5, "bg.-5.png"),
        ("bg.####.png", 0, "bg.0000.png"),
        ("v####/bg.$3F.png", 12, "v0012/bg.012.png"),
        ("static.png", 12, "static.png"),
    ],
)
def test_sequence_path(path: str, frame: int, result: str) -> None:
    assert sequence_path(path, frame) == result


def test_has_sequence() -> None:
    assert has_sequence("a.####.exr") and has_sequence("a.$F.exr") and has_sequence("a.$4F.exr")
    assert not has_sequence("a.exr") and not has_sequence("$PDIR/a.exr")


def test_frame_offset_reads_shifted_frames() -> None:
    # The seed's example: offset -100, frames 1-20 read files 0101-0120.
    plate = Reference("project://scene/plate", "/plates/bg.####.png", frame_offset=-100)
    assert plate.is_sequence
    files = [plate.path_at(f) for f in FrameSet.parse("1-20")]
    assert files[0] == "/plates/bg.0101.png"
    assert files[-1] == "/plates/bg.0120.png"
    assert files == [f"/plates/bg.{n:04d}.png" for n in range(101, 121)]
    assert Reference("x", "/a.$F.png", frame_offset=10).path_at(5) == "/a.-5.png"
    assert not Reference("x", "/a.png").is_sequence


def test_sequence_regex_matches_exactly_the_frame_files() -> None:
    pattern = sequence_regex("/plates/bg.####.png")
    match = pattern.fullmatch("/plates/bg.0101.png")
    assert match is not None and int(match.group("f0")) == 101
    assert pattern.fullmatch("/plates/bg.-005.png") is not None
    assert pattern.fullmatch("/plates/bg.12345.png") is not None
    for other in ["/plates/bg.101.png", "/plates/bg.abcd.png", "/plates/bgX0101.png", "/plates/bg.0101.pngx", "/plates/bg..png"]:
        assert pattern.fullmatch(other) is None, other
    two = sequence_regex("/v$2F/bg.$F.png").fullmatch("/v07/bg.7.png")
    assert two is not None and (two.group("f0"), two.group("f1")) == ("07", "7")


@given(st.integers(-20000, 20000), st.sampled_from(["a.####.exr", "a.#.exr", "a_$F.exr", "a.$3F.exr", "x##/a.$5F"]))
def test_sequence_regex_matches_what_sequence_path_writes(frame: int, path: str) -> None:
    match = sequence_regex(path).fullmatch(sequence_path(path, frame))
    assert match is not None
    assert all(int(v) == frame for v in match.groupdict().values())


def test_sequence_glob_finds_the_frame_files_on_disk(tmp_path: Path) -> None:
    plates = tmp_path / "plates [v1]"
    plates.mkdir()
    for frame in (1, 2, 3):
        (plates / f"bg.{frame:04d}.png").write_bytes(b"x")
    (plates / "other.0001.png").write_bytes(b"x")
    pattern = sequence_glob(f"{plates}/bg.####.png")
    assert sorted(Path(p).name for p in glob.glob(pattern)) == ["bg.0001.png", "bg.0002.png", "bg.0003.png"]
    assert sequence_glob("C:/p/bg.$4F.png") == "C:/p/bg.*.png"
    assert sequence_glob("/p/a*b?.####.png") == "/p/a[*]b[?].*.png"
