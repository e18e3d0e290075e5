"""The wrapper's duties for cnode (contract.md 1, 2) and the honest judgement of a render."""

from __future__ import annotations

import json

import pytest

from cio_worker.node.clarisse import CnodeCall, RenderMonitor, prepare
from cio_worker.errors import RenderError
from cio_worker.job.frames import FrameSet
from cio_worker.job.paths import PathMap

COMMAND = ("cnode \"/proj/shots/shot A/shot.project\" -image project://scene/image1 project://scene/image2 "
           "-image_frames_list '5:8' '-3:-1' -tile_rendering 4 2 -license_server conductor_ilise:40500")


def test_a_cnode_command_is_understood():
    call = CnodeCall.parse(COMMAND)
    assert call is not None
    assert call.project == "/proj/shots/shot A/shot.project"
    assert call.images == ("project://scene/image1", "project://scene/image2")
    assert [str(f) for _, f in call.image_frames()] == ["5-8", "-3--1"]
    assert (call.tile_count, call.tile_index) == (4, 2)
    assert call.other == ("-license_server", "conductor_ilise:40500")


@pytest.mark.parametrize("command", ["echo cnode", "cnode a.project -image x -image_frames_list 1 | tee log",
                                     "sh -c 'cnode a'", "cnode a.project -image x -image_frames_list 1 && echo"])
def test_other_commands_run_as_given(command):
    assert CnodeCall.parse(command) is None


@pytest.mark.parametrize("command, words", [
    ("cnode -image x", "no project"),
    ("cnode a.project -image x y -image_frames_list 1", "2 images but 1 frame specs"),
    ("cnode a.project -image x -image_frames_list 1-3", "frame spec"),
    ("cnode a.project -image x -image_frames_list 1 -tile_rendering 4 5", "index must be 1 to the count"),
    ("cnode a.project -image x -image_frames_list 1 -tile_rendering 4", "tile count and a tile index"),
])
def test_a_broken_cnode_command_is_a_clear_error(command, words):
    with pytest.raises(RenderError) as info:
        CnodeCall.parse(command)
    assert words in str(info.value) and info.value.code == "bad_command"


def test_one_tile_leaves_tile_rendering_out_and_frames_done_are_not_rendered_again():
    call = CnodeCall.parse("cnode a.project -image i1 i2 -image_frames_list '1:4' '3:4' -tile_rendering 1 1")
    assert "-tile_rendering" not in call.argv()
    rest = call.without_frames(FrameSet.parse("1-2,4"))
    assert rest.argv() == ["cnode", "a.project", "-image", "i1", "i2", "-image_frames_list", "3", "3"]
    assert rest.without_frames(FrameSet.parse("3")).images == ()


@pytest.fixture
def node(tmp_path):
    root = tmp_path / "node"
    project_dir = root / "proj" / "shots" / "shot A"
    project_dir.mkdir(parents=True)
    project = {
        "format": "cio-project/1",
        "images": {
            "project://scene/image1": {"frames": "1-10", "save_as": "C:/proj/renders/a/beauty.####.png"},
            "project://scene/image2": {"frames": "-5-10", "save_as": "../../renders/b/fx####.png"},
        },
    }
    (project_dir / "shot.project").write_text(json.dumps(project))
    return root, PathMap.rooted(str(root)), tmp_path / "work"


def test_prepare_does_the_wrappers_duties(node):
    root, path_map, work = node
    work.mkdir()
    prepared = prepare(COMMAND, env={"A": "1"}, path_map=path_map, work_dir=work)
    assert prepared.cwd == root / "proj/shots/shot A"  # run from the project's directory...
    assert prepared.argv[1] == "shot.project"  # ...with its base name (cnode fails on spaces)
    assert prepared.argv[prepared.argv.index("-config_file") + 1] == str(work / "clarisse.cfg")
    assert prepared.argv[prepared.argv.index("-log_width") + 1] == "0"
    assert (root / "proj/renders/a").is_dir() and (root / "proj/renders/b").is_dir()  # Clarisse won't
    expected = {k: v.relative_to(root).as_posix() for k, v in prepared.expected.items()}
    assert expected[("project://scene/image1", 5)] == "proj/renders/a/beauty.tilex4-2.0005.png"
    assert expected[("project://scene/image2", -3)] == "proj/renders/b/fx-003.tilex4-2.png"
    assert len(expected) == 4 + 3
    assert prepared.frames == FrameSet.parse("-3--1,5-8")


def test_a_project_that_is_not_on_the_node_is_a_missing_input(node):
    root, path_map, work = node
    work.mkdir()
    with pytest.raises(RenderError) as info:
        prepare("cnode /proj/elsewhere.project -image i -image_frames_list 1", env={}, path_map=path_map,
                work_dir=work)
    assert info.value.code == "missing_input" and "/proj/elsewhere.project" in str(info.value)


def test_the_monitor_reads_progress_saved_frames_and_fatal_lines(node):
    root, path_map, work = node
    work.mkdir()
    prepared = prepare(COMMAND, env={}, path_map=path_map, work_dir=work)
    told: list[float] = []
    monitor = RenderMonitor(prepared, on_percent=told.append)
    for pct in (5, 12, 14, 55, 100):
        monitor.feed(f"Progress for 'project://scene/image1' : {pct}%\n")
    monitor.feed("Subprogress for 'project://scene/image1' : 99%\n")
    assert monitor.percent() == 50.0  # image2 has not started
    assert told == [2.5, 27.5, 50.0]  # once per 10 % step of the whole task crossed
    path = prepared.expected[("project://scene/image1", 5)]
    path.write_bytes(b"png")
    monitor.feed(f"Saved image 'project://scene/image1' frame 5 to '{path}'\n")
    monitor.feed("Saved image 'project://scene/image1' frame 6 to '/nowhere'\n")  # announced, not on disk
    assert monitor.frames_finished() == FrameSet.parse("5")  # only image1 renders 5; 6 is not on disk
    assert monitor.judge(0, None).code == "missing_output"
    assert monitor.judge(1, None).code == "render_failed"
    assert monitor.judge(None, 9).code == "render_crashed"
    monitor.feed("[ERROR] License: unable to get a license from server conductor_ilise:40500\n")
    assert monitor.judge(0, None).code == "licence"


def test_frames_are_finished_only_when_every_image_saved_them(node):
    root, path_map, work = node
    work.mkdir()
    prepared = prepare("cnode '/proj/shots/shot A/shot.project' -image project://scene/image1 "
                       "project://scene/image2 -image_frames_list 1:3 2:3", env={}, path_map=path_map, work_dir=work)
    monitor = RenderMonitor(prepared)
    for (image, frame), path in prepared.expected.items():
        if (image, frame) != ("project://scene/image2", 3):
            path.write_bytes(b"png")
            monitor.feed(f"Saved image '{image}' frame {frame} to '{path}'")
    assert monitor.frames_finished() == FrameSet.parse("1-2")
    assert monitor.judge(0, None).code == "missing_output"
