"""Tiles become frames (issue 12, point 3): the simulator's tiles pasted into frames with
OpenImageIO, by hand and by the downloader after a real agent rendered a tiled job."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cio_worker.artist.assembly import AssemblyError, assemble_frame
from cio_worker.job.project import tile_name
from cio_worker.artist.downloader import Downloader
from cio_worker.job.paths import PathMap
from cio_worker.storage import open_storage
from tests.test_exr_previews import _submit, read_native, write_project
from tests.test_faults_node import file_farm
from tests.test_simulator import run_cnode

ITEM = "project://scene/b"


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if ".part" in p.name]


def render_tiles(directory: Path, ext: str, resolution: list[int], tiles: int, frame: int = 2) -> tuple[list[Path], Path]:
    """Every tile of ``frame`` and, for comparison, the same frame rendered whole (elsewhere)."""
    write_project(directory, {ITEM: {"frames": "1-3", "save_as": f"out/b.####.{ext}", "resolution": resolution}})
    for index in range(1, tiles + 1):
        result = run_cnode(directory, "scene.project", "-image", ITEM, "-image_frames_list", str(frame),
                           "-tile_rendering", str(tiles), str(index))
        assert result.returncode == 0, result.stdout
    (directory / "whole").mkdir()
    result = run_cnode(directory, "scene.project", "-image", ITEM, "-image_frames_list", str(frame),
                       "-output", f"whole/b.####.{ext}")
    assert result.returncode == 0, result.stdout
    name = tile_name(f"b.tilex{tiles}-{'1'.zfill(len(str(tiles)))}.{frame:04d}.{ext}")
    assert name is not None
    return [directory / "out" / t for t in name.tiles()], directory / "whole" / name.frame


def assert_frame_is_its_tiles(frame: Path, tiles: list[Path]) -> None:
    """Each tile's pixels equal the frame's region at the tile's place in the grid."""
    spec, pixels = read_native(frame)
    side = int(len(tiles) ** 0.5)
    read = [read_native(t) for t in tiles]
    widths = [read[c][0].width for c in range(side)]
    heights = [read[r * side][0].height for r in range(side)]
    assert (spec.width, spec.height) == (sum(widths), sum(heights))
    for number, (tile_spec, tile_pixels) in enumerate(read):
        row, column = divmod(number, side)
        x, y = sum(widths[:column]), sum(heights[:row])
        assert str(tile_spec.format) == str(spec.format) and tile_spec.nchannels == spec.nchannels
        region = pixels[y : y + tile_spec.height, x : x + tile_spec.width]
        assert region.tobytes() == tile_pixels.tobytes(), (frame, number + 1)


@pytest.mark.parametrize(
    ("ext", "resolution", "tiles", "pixel_type", "channels"),
    [
        ("png", [64, 48], 4, "uint8", 3),  # 2 x 2, equal tiles
        ("exr", [101, 71], 4, "half", 4),  # 2 x 2, columns 50 | 51, rows 35 | 36
        ("exr", [100, 70], 9, "half", 4),  # 3 x 3 on 100 px: 33 | 33 | 34
    ],
)
def test_tiles_paste_into_the_frame_the_whole_render_gives(tmp_path: Path, ext: str, resolution: list[int], tiles: int,
                                                            pixel_type: str, channels: int) -> None:
    tile_paths, whole = render_tiles(tmp_path, ext, resolution, tiles)
    frame = tmp_path / "out" / whole.name
    assert assemble_frame(tile_paths, frame) == tuple(resolution)
    spec, pixels = read_native(frame)
    assert (spec.width, spec.height, spec.nchannels, str(spec.format)) == (*resolution, channels, pixel_type)
    assert (spec.x, spec.y, spec.full_width, spec.full_height) == (0, 0, *resolution)
    assert_frame_is_its_tiles(frame, tile_paths)
    assert pixels.tobytes() == read_native(whole)[1].tobytes()  # the stitched frame is the untiled render
    unequal = resolution[0] % int(tiles ** 0.5) != 0
    assert (len({read_native(t)[1].shape for t in tile_paths}) > 1) == unequal
    assert no_temp_files(tmp_path) and all(t.is_file() for t in tile_paths)


def test_tiles_that_do_not_form_a_grid_leave_no_frame(tmp_path: Path) -> None:
    tile_paths, whole = render_tiles(tmp_path, "exr", [64, 48], 4)
    other = tmp_path / "other"
    write_project(other, {ITEM: {"frames": "2", "save_as": "out/b.####.exr", "resolution": [70, 48]}})
    assert run_cnode(other, "scene.project", "-image", ITEM, "-tile_rendering", "4", "2").returncode == 0
    os.replace(other / "out" / "b.tilex4-2.0002.exr", tile_paths[1])  # 35 wide where its column is 32
    frame = tmp_path / "out" / whole.name
    with pytest.raises(AssemblyError, match="do not form a grid|says it sits at"):
        assemble_frame(tile_paths, frame)
    tile_paths[1].write_bytes(b"a cut-off EXR")
    with pytest.raises(AssemblyError, match="b.tilex4-2.0002.exr cannot be read"):
        assemble_frame(tile_paths, frame)
    with pytest.raises(AssemblyError, match="3 tiles do not form a square grid"):
        assemble_frame(tile_paths[:3], frame)
    assert not frame.exists() and no_temp_files(tmp_path)


@pytest.mark.parametrize(
    ("name", "frame", "count", "index"),
    [
        ("my_render.tilex16-02.0050.exr", "my_render.0050.exr", 16, 2),
        ("my_render0050.tilex16-02.exr", "my_render0050.exr", 16, 2),
        ("beauty.tilex4-3.0003.png", "beauty.0003.png", 4, 3),
        ("fx-003.tilex4-2.png", "fx-003.png", 4, 2),
        ("my_render_diffuse.tilex100-007.0050.exr", "my_render_diffuse.0050.exr", 100, 7),
    ],
)
def test_a_tile_name_says_its_frame_and_its_siblings(name: str, frame: str, count: int, index: int) -> None:
    parsed = tile_name(name)
    assert parsed is not None and (parsed.frame, parsed.count, parsed.index) == (frame, count, index)
    assert parsed.tile(index) == name and len(parsed.tiles()) == count


@pytest.mark.parametrize("name", ["beauty.0003.png", "beauty.tilex16-2.0003.png", "b.tilex4-5.0001.exr", "tilex4-1.exr"])
def test_names_that_are_not_tiles(name: str) -> None:
    assert tile_name(name) is None


# -- the downloader ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiled_job(tmp_path_factory):
    """A 2 x 2 tiled job of a PNG image and an EXR image whose size the grid does not divide,
    rendered by a real agent with the cnode simulator into file:// storage."""
    base = tmp_path_factory.mktemp("tiled")
    farm = file_farm(base)
    images = {"project://scene/beauty": ("C:/proj/renders/main/beauty.####.png", [64, 48]),
              "project://scene/fx": ("C:/proj/renders/main/fx.####.exr", [101, 71])}
    with farm.agent() as running:
        job = _submit(farm, "tiled", images, tiles=4, frames="1-2")
        farm.wait_finished(job, running)
    assert [t.state for t in farm.queue.tasks(job)] == ["done"] * 4
    yield farm, job
    farm.close()


FRAMES = ["beauty.0001.png", "beauty.0002.png", "fx.0001.exr", "fx.0002.exr"]


def downloaded(artist: Path) -> list[str]:
    return sorted(p.name for p in (artist / "proj/renders/main").iterdir())


def node_tiles(farm, frame: str) -> list[Path]:
    name = tile_name(frame.replace(".0", ".tilex4-1.0"))
    assert name is not None
    return [farm.root / "proj/renders/main" / t for t in name.tiles()]


def _fresh_records(farm, job: str) -> None:
    """Offer the job's outputs for download again (another artist's machine)."""
    db = sqlite3.connect(farm.base / "queue.db")
    db.execute("UPDATE downloads SET state = 'pending' WHERE job_number = ?", (int(job),))
    db.commit()
    db.close()


def test_the_downloader_pastes_every_frame_and_removes_its_tiles(tiled_job, tmp_path: Path) -> None:
    farm, job = tiled_job
    _fresh_records(farm, job)
    artist = tmp_path / "artist"
    report = Downloader(farm.queue, open_storage, PathMap.rooted(str(artist))).run_once(job)
    assert report.refused == [] and report.not_assembled == []
    assert sorted(p.name for p in report.assembled) == FRAMES
    assert downloaded(artist) == FRAMES  # the tiles are gone, the frames are in their place
    for frame in FRAMES:
        assert_frame_is_its_tiles(artist / "proj/renders/main" / frame, node_tiles(farm, frame))
    for key in (k for r in farm.queue.downloads(job, state=None) for k in r.previews().values()):
        assert (farm.base / "storage" / key).is_file(), key
    assert no_temp_files(artist)


def test_keep_tiles_keeps_them_beside_the_frames(tiled_job, tmp_path: Path) -> None:
    farm, job = tiled_job
    _fresh_records(farm, job)
    artist = tmp_path / "artist"
    out = subprocess.run(
        [sys.executable, "-m", "cio_worker", "download", "--queue", f"sqlite:///{farm.base / 'queue.db'}",
         "--job", job, "--root", str(artist), "--md5-cache", str(tmp_path / "md5.db"), "--keep-tiles"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "4 frames assembled from tiles" in out.stderr
    assert sorted(line.rsplit("/", 1)[1] for line in out.stdout.splitlines() if line.startswith("assembled ")) == FRAMES
    names = downloaded(artist)
    assert [n for n in names if "tilex" not in n] == FRAMES and len(names) == 4 + 16
    for frame in FRAMES:
        assert_frame_is_its_tiles(artist / "proj/renders/main" / frame,
                                  [artist / "proj/renders/main" / p.name for p in node_tiles(farm, frame)])


def test_a_missing_tile_leaves_no_frame_says_so_and_keeps_the_others(tiled_job, tmp_path: Path) -> None:
    farm, job = tiled_job
    _fresh_records(farm, job)
    tile_3 = [r for r in farm.queue.downloads(job) if r.task_id == "002"]  # task 3 renders tile 3
    assert [f.relative_path for r in tile_3 for f in r.files] == \
        ["beauty.tilex4-3.0001.png", "beauty.tilex4-3.0002.png", "fx.tilex4-3.0001.exr", "fx.tilex4-3.0002.exr"]
    farm.queue.mark_downloaded(tile_3[0].download_id)  # its tile never reaches this artist
    artist = tmp_path / "artist"
    report = Downloader(farm.queue, open_storage, PathMap.rooted(str(artist))).run_once(job)
    assert report.refused == [] and report.assembled == [] and report.files_written == 12
    assert len(report.not_assembled) == 4
    for line in report.not_assembled:
        assert f"tile 3 of 4 never arrived (job {job} is finished without it); the 3 that did are kept" in line
    names = downloaded(artist)
    assert len(names) == 12 and all(".tilex4-3." not in n and "tilex4" in n for n in names)  # no frame
