"""EXR as Clarisse writes it (the cnode simulator) and the previews the agent uploads of each output
(issue 12, points 2 and 4): real simulator processes, real OpenImageIO, a real agent and storage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest

from cio_worker.artist.submit import submit_job
from cio_worker.job.paths import PathMap
from cio_worker.imaging import DisplayError, DisplaySettings, write_display_jpeg
from cio_worker.node.previews import PREVIEW_MAX_SIDE, PREVIEW_SETTINGS, publish_previews
from cio_worker.node.outputs import changed_since
from cio_worker.queue.base import preview_key
from cio_worker.sim.exr import SRGB_TO_LINEAR
from cio_worker.sim.png import read_png
from cio_worker.storage import open_storage
from tests.shots import make_shot
from tests.test_faults_node import create_job, file_farm
from tests.test_simulator import run_cnode

SRGB_NAMES = ("sRGB", "srgb_rec709_scene")  # OpenImageIO 3 names sRGB by its OCIO role


def write_project(directory: Path, images: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "out").mkdir(exist_ok=True)
    project = directory / "scene.project"
    project.write_text(json.dumps({"format": "cio-project/1", "images": images, "references": {}}), encoding="utf-8")
    return project


def read_native(path: Path) -> tuple[oiio.ImageSpec, np.ndarray]:
    image = oiio.ImageInput.open(str(path))
    assert image is not None, oiio.geterror()
    try:
        spec = image.spec()
        pixels = image.read_image(0, 0, 0, spec.nchannels, spec.format)
        return spec, pixels.reshape(spec.height, spec.width, spec.nchannels)
    finally:
        image.close()


def preview_facts(path: Path) -> tuple[int, int, int, str, str]:
    image = oiio.ImageInput.open(str(path))
    assert image is not None, oiio.geterror()
    spec = image.spec()
    facts = (spec.width, spec.height, spec.nchannels, str(spec.format), spec.getattribute("oiio:ColorSpace") or "")
    fmt = image.format_name()
    image.close()
    assert fmt == "jpeg"
    return facts


# -- EXR from the simulator ----------------------------------------------------------------------


def test_an_exr_save_as_is_written_as_half_rgba_with_the_picture_of_the_png(tmp_path: Path) -> None:
    write_project(tmp_path, {"project://scene/b": {"frames": "1-2", "save_as": "out/b.####.exr", "resolution": [64, 48]}})
    exr = run_cnode(tmp_path, "scene.project", "-image", "project://scene/b", "-image_frames_list", "1:2")
    assert exr.returncode == 0, exr.stdout
    png = run_cnode(tmp_path, "scene.project", "-image", "project://scene/b", "-image_frames_list", "1:2",
                    "-output", "out/p.####.png")
    assert png.returncode == 0, png.stdout
    frames = []
    for frame in (1, 2):
        spec, pixels = read_native(tmp_path / "out" / f"b.{frame:04d}.exr")
        assert (spec.width, spec.height, spec.x, spec.y, spec.full_width, spec.full_height) == (64, 48, 0, 0, 64, 48)
        assert str(spec.format) == "half" and tuple(spec.channelnames) == ("R", "G", "B", "A")
        assert pixels.dtype == np.float16 and (pixels[:, :, 3] == 1).all()
        rgb = pixels[:, :, :3]
        assert len(np.unique(rgb)) > 100 and 0 <= rgb.min() and rgb.max() <= 1  # a picture, linear
        # the same picture as the PNG the same render writes, decoded to linear light
        painted = read_png(tmp_path / "out" / f"p.{frame:04d}.png")
        srgb = np.frombuffer(painted.pixels, dtype=np.uint8).reshape(48, 64, 3)
        assert (rgb == SRGB_TO_LINEAR[srgb]).all()
        frames.append(pixels.tobytes())
    assert frames[0] != frames[1]


def test_an_exr_tile_is_its_own_data_window_inside_the_frame(tmp_path: Path) -> None:
    write_project(tmp_path, {"project://scene/b": {"frames": "1", "save_as": "out/b.####.exr", "resolution": [100, 70]}})
    result = run_cnode(tmp_path, "scene.project", "-image", "project://scene/b", "-image_frames_list", "1",
                       "-tile_rendering", "9", "5")
    assert result.returncode == 0, result.stdout
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.tilex9-5.0001.exr"]
    spec, pixels = read_native(tmp_path / "out" / "b.tilex9-5.0001.exr")
    # the middle cell of a 3 x 3 grid on 100 x 70: columns 33 | 33 | 34, rows 23 | 23 | 24
    assert (spec.x, spec.y, spec.width, spec.height) == (33, 23, 33, 23)
    assert (spec.full_x, spec.full_y, spec.full_width, spec.full_height) == (0, 0, 100, 70)
    assert str(spec.format) == "half" and pixels.shape == (23, 33, 4)


# -- previews ------------------------------------------------------------------------------------


def test_the_preview_of_a_large_exr_is_a_small_srgb_jpeg_clamped_then_srgb_encoded(tmp_path: Path) -> None:
    source = oiio.ImageBuf(oiio.ImageSpec(1000, 500, 4, "half"))
    oiio.ImageBufAlgo.fill(source, (0.18, 0.5, 4.0, 1.0))  # mid grey, a brighter green, an over-bright blue
    assert source.write(str(tmp_path / "big.exr"))
    size = write_display_jpeg(tmp_path / "big.exr", tmp_path / "big.jpg", PREVIEW_SETTINGS)
    assert size == (PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE // 2)
    width, height, channels, pixel_type, colorspace = preview_facts(tmp_path / "big.jpg")
    assert (width, height, channels, pixel_type) == (PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE // 2, 3, "uint8")
    assert colorspace in SRGB_NAMES
    _, pixels = read_native(tmp_path / "big.jpg")
    centre = pixels[height // 2, width // 2].astype(int)
    # sRGB OETF: 0.18 -> 0.461 (118), 0.5 -> 0.735 (188); 4.0 is clamped to 1.0 (255)
    assert np.abs(centre - np.array([118, 188, 255])).max() <= 2, centre


def test_the_preview_of_a_png_keeps_its_size_when_small_and_its_colours(tmp_path: Path) -> None:
    write_project(tmp_path, {"project://scene/a": {"frames": "3", "save_as": "out/a.####.png", "resolution": [64, 48]}})
    assert run_cnode(tmp_path, "scene.project", "-image", "project://scene/a").returncode == 0
    source = tmp_path / "out" / "a.0003.png"
    assert write_display_jpeg(source, tmp_path / "a.jpg", PREVIEW_SETTINGS) == (64, 48)  # never enlarged
    assert preview_facts(tmp_path / "a.jpg")[:4] == (64, 48, 3, "uint8")
    assert write_display_jpeg(source, tmp_path / "tiny.jpg", DisplaySettings(max_side=16)) == (16, 12)
    # an 8-bit image is display-referred already: resized, never encoded again
    flat = oiio.ImageBuf(oiio.ImageSpec(400, 100, 3, "uint8"))
    oiio.ImageBufAlgo.fill(flat, (100 / 255, 150 / 255, 200 / 255))
    assert flat.write(str(tmp_path / "flat.png"))
    assert write_display_jpeg(tmp_path / "flat.png", tmp_path / "flat.jpg", PREVIEW_SETTINGS) == (384, 96)
    _, preview = read_native(tmp_path / "flat.jpg")
    assert np.abs(preview.reshape(-1, 3).astype(int) - [100, 150, 200]).max() <= 2


@pytest.mark.parametrize(
    ("channels", "values", "expected"),
    [
        (("R", "G", "B", "A", "Z"), (0.5, 0.18, 0.0, 1.0, 1000.0), (188, 118, 0)),  # depth left out
        (("Y",), (0.18,), (118, 118, 118)),  # one channel: grey
    ],
)
def test_the_preview_takes_rgb_or_grey_of_any_exr(tmp_path: Path, channels: tuple, values: tuple,
                                                  expected: tuple) -> None:
    spec = oiio.ImageSpec(40, 30, len(channels), "half")
    spec.channelnames = channels
    source = oiio.ImageBuf(spec)
    oiio.ImageBufAlgo.fill(source, values)
    assert source.write(str(tmp_path / "aov.exr"))
    assert write_display_jpeg(tmp_path / "aov.exr", tmp_path / "aov.jpg", PREVIEW_SETTINGS) == (40, 30)
    _, pixels = read_native(tmp_path / "aov.jpg")
    assert np.abs(pixels[15, 20].astype(int) - np.array(expected)).max() <= 2, pixels[15, 20]


@pytest.mark.parametrize("content", [b"not an image at all\n", b"\x76\x2f\x31\x01" + b"\x00" * 40])
def test_an_unreadable_image_gives_a_preview_error_naming_why(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.exr").write_bytes(content)
    with pytest.raises(DisplayError, match="not an image OpenImageIO reads|cannot be read"):
        write_display_jpeg(tmp_path / "bad.exr", tmp_path / "bad.jpg", PREVIEW_SETTINGS)
    assert not (tmp_path / "bad.jpg").exists()


def _submit(farm, name: str, images: dict, *, tiles: int = 1, frames: str = "1-2") -> str:
    """A make_shot job whose project renders ``images`` (item -> save_as, resolution)."""
    shot = make_shot(farm.base / "jobs" / name, frames=frames, chunk_size=2, tiles=tiles)
    project = shot.root / "proj" / "shots" / "shot.project"
    data = json.loads(project.read_text(encoding="utf-8"))
    template = data["images"].pop("project://scene/image1")
    for item, (save_as, resolution) in images.items():
        data["images"][item] = {**template, "save_as": save_as, "resolution": resolution}
    project.write_text(json.dumps(data), encoding="utf-8")
    spec = shot.spec.read_text(encoding="utf-8").replace(
        'images = ["project://scene/image1"]', f"images = {json.dumps(list(images))}")
    shot.spec.write_text(spec, encoding="utf-8")
    with farm.direct() as storage:
        result = submit_job(shot.spec, queue=farm.queue, storage=storage, storage_url=farm.storage_url,
                            path_map=PathMap.rooted(str(shot.root)))
    return result.job_id


def task_log(farm, job: str) -> str:
    [log] = sorted((farm.work / "logs").glob(f"{job}-*.log"))
    return log.read_text(encoding="utf-8")


def test_the_agent_uploads_a_preview_of_every_exr_and_png_it_renders(tmp_path: Path) -> None:
    farm = file_farm(tmp_path)
    images = {"project://scene/beauty": ("C:/proj/renders/main/beauty.####.png", [64, 48]),
              "project://scene/fx": ("C:/proj/renders/main/fx/fx.####.exr", [480, 270])}
    with farm.agent() as running:
        job = _submit(farm, "previews", images)
        farm.wait_finished(job, running)
    assert farm.task(job).state == "done", farm.task(job).reason
    [record] = farm.queue.downloads(job, state=None)
    names = sorted(f.relative_path for f in record.files)
    assert names == ["beauty.0001.png", "beauty.0002.png", "fx/fx.0001.exr", "fx/fx.0002.exr"]
    keys = record.previews()
    assert keys["fx/fx.0001.exr"] == f"_previews/{job}/fx/fx.0001.exr.jpg" == preview_key(job, "fx/fx.0001.exr")
    for relative, key in keys.items():
        width, height, channels, pixel_type, colorspace = preview_facts(tmp_path / "storage" / key)
        assert max(width, height) <= PREVIEW_MAX_SIDE and channels == 3 and pixel_type == "uint8", relative
        assert colorspace in SRGB_NAMES
        if relative.endswith(".exr"):
            assert (width, height) == (384, 216)  # 480 x 270 scaled to the limit, aspect kept
    assert "previews: 4 made, 0 not made" in task_log(farm, job)
    # the artist's download is the outputs alone, never a preview
    report = farm.download(lambda url: open_storage(url), tmp_path / "artist")
    assert report.refused == [] and report.files_written == 4
    assert sorted(p.name for p in (tmp_path / "artist").rglob("*") if p.is_file()) == \
        ["beauty.0001.png", "beauty.0002.png", "fx.0001.exr", "fx.0002.exr"]
    farm.close()


def test_a_corrupt_output_still_completes_the_task_with_a_warning(tmp_path: Path) -> None:
    farm = file_farm(tmp_path)
    out = f"{farm.root}/proj/renders"
    command = f"mkdir -p {out} && echo 'half an EXR' > {out}/beauty.0001.exr && printf 'P' > {out}/notes.pgm"
    with farm.agent() as running:
        job = create_job(farm, command)
        farm.wait_finished(job, running)
    task = farm.task(job)
    assert task.state == "done", task.reason
    [record] = farm.queue.downloads(job, state=None)
    assert sorted(f.relative_path for f in record.files) == ["beauty.0001.exr", "notes.pgm"]
    log = task_log(farm, job)
    assert "WARNING: no preview of beauty.0001.exr: not an image OpenImageIO reads" in log, log
    assert "WARNING: no preview of notes.pgm:" in log
    assert "previews: 0 made, 2 not made" in log
    assert not (tmp_path / "storage" / "_previews").exists()
    farm.close()


def test_without_openimageio_no_preview_is_made_and_nothing_fails(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "out"
    write_project(tmp_path, {"project://scene/a": {"frames": "1", "save_as": "out/a.####.png", "resolution": [32, 24]}})
    assert run_cnode(tmp_path, "scene.project", "-image", "project://scene/a").returncode == 0
    scan = changed_since(root, {})
    log = tmp_path / "task.log"
    log.write_text("render output\n", encoding="utf-8")
    said: list[str] = []
    monkeypatch.setitem(sys.modules, "OpenImageIO", None)  # `import OpenImageIO` raises ImportError
    with open_storage(f"file://{tmp_path / 'storage'}") as storage:
        report = publish_previews(storage, "00007", scan.files, tmp_path / "previews", log, say=said.append)
    assert report.made == {} and list(report.failed) == ["a.0001.png"]
    assert "OpenImageIO is not installed" in report.failed["a.0001.png"]
    assert "pip install openimageio" in log.read_text() and "previews: 0 made, 1 not made" in log.read_text()
    assert said and "no preview of a.0001.png" in said[0]
    assert not (tmp_path / "storage" / "_previews").exists()
