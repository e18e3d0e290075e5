"""The cnode simulator, run as real subprocesses against real project files, inputs and outputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest

import cio_worker
from cio_worker.job.paths import PathMap
from cio_worker.job.project import output_file_name
from cio_worker.sim.shim import install_cnode_shim
from cio_worker.sim.png import PngError, chunk, decode_png, encode_png, read_png
from cio_worker.sim.render import TileError, tile_region

PACKAGE_ROOT = Path(cio_worker.__file__).resolve().parent.parent
I1 = "project://scene/image1"
I2 = "project://scene/image2"
SAVED = re.compile(r"^Saved image '(?P<item>[^']+)' frame (?P<frame>-?\d+) to '(?P<path>[^']+)'$", re.M)
PROGRESS = re.compile(r"^Progress for '(?P<item>[^']+)' : (?P<pct>[\d.]+)%$", re.M)


# -- helpers ----------------------------------------------------------------------------------


def sim_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNODE_SIM_") and k != "CIO_PATH_MAP"}
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def cnode_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cio_worker.sim.cnode", *args]


def run_cnode(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cnode_command(*args), cwd=cwd, env=sim_env(**env), capture_output=True, text=True, timeout=60)


@contextmanager
def started(cwd: Path, *args: str, **env: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        cnode_command(*args), cwd=cwd, env=sim_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def read_until(process: subprocess.Popen[str], pattern: str) -> str:
    """Lines of the process's output up to and including the first one containing ``pattern``."""
    seen = []
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        if pattern in line:
            return "".join(seen)
    raise AssertionError(f"{pattern!r} never printed; output:\n{''.join(seen)}")


def wait_for(predicate, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("[ERROR]")]


def saved(output: str) -> list[tuple[str, int, str]]:
    return [(m["item"], int(m["frame"]), m["path"]) for m in SAVED.finditer(output)]


def write_project(path: Path, images: dict, references: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": "cio-project/1", "images": images, "references": references}))
    return path


@dataclass
class Scene:
    directory: Path  # the project's directory
    project: Path
    renders: Path
    wood: Path
    plates: Path

    def plate(self, file_frame: int) -> Path:
        return self.plates / f"bg.{file_frame:04d}.png"

    def output(self, name: str) -> Path:
        return self.renders / name


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    directory = tmp_path / "proj"
    renders = directory / "renders"
    renders.mkdir(parents=True)
    wood = directory / "tex" / "wood.png"
    wood.parent.mkdir()
    wood.write_bytes(b"wood texture v1")
    plates = tmp_path / "plates"
    plates.mkdir()
    for file_frame in range(101, 106):
        (plates / f"bg.{file_frame:04d}.png").write_bytes(f"plate {file_frame}".encode())
    project = write_project(
        directory / "shot.project",
        images={
            I1: {"frames": "1-5", "save_as": f"{renders}/beauty.####.png", "inputs": ["wood", "plate"]},
            I2: {"frames": "1-5", "save_as": "renders/other####.png", "inputs": ["wood"]},
        },
        references={
            "wood": {"path": str(wood)},
            "plate": {"path": "../plates/bg.####.png", "frame_offset": -100},
        },
    )
    return Scene(directory, project, renders, wood, plates)


# -- writing the right files ------------------------------------------------------------------


def test_renders_every_frame_to_valid_distinct_pngs_with_progress(scene: Scene) -> None:
    result = run_cnode(scene.directory, "shot.project", "-image", I1, "-image_frames_list", "1:3")
    assert result.returncode == 0, result.stdout
    expected = [scene.output(f"beauty.{f:04d}.png") for f in (1, 2, 3)]
    assert saved(result.stdout) == [(I1, f, str(p)) for f, p in zip((1, 2, 3), expected)]
    assert sorted(scene.renders.iterdir()) == expected
    images = [read_png(p) for p in expected]
    assert all((im.width, im.height, im.channels) == (64, 48, 3) for im in images)
    assert len({im.pixels for im in images}) == 3
    percents = [float(m["pct"]) for m in PROGRESS.finditer(result.stdout)]
    assert percents == sorted(percents) and percents[-1] == 100.0 and len(percents) > 3
    assert "Subprogress for '" in result.stdout


def test_two_images_one_spec_each_with_options_in_any_order(scene: Scene) -> None:
    result = run_cnode(
        scene.directory,
        "shot.project",
        "-license_server", "conductor_ilise:40500",
        "-image_frames_list", "4:5", "1:5%2",
        "-log_width", "0",
        "-image", I1, I2,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert [(item, frame) for item, frame, _ in saved(result.stdout)] == [(I1, 4), (I1, 5), (I2, 1), (I2, 3), (I2, 5)]
    names = {p.name for p in scene.renders.iterdir()}
    assert names == {"beauty.0004.png", "beauty.0005.png", "other0001.png", "other0003.png", "other0005.png"}
    assert "conductor_ilise:40500" in result.stdout


def test_negative_frames_in_cnode_form(scene: Scene) -> None:
    result = run_cnode(scene.directory, "shot.project", "-image", I2, "-image_frames_list", "-2:-1")
    assert result.returncode == 0, result.stdout
    paths = [Path(output_file_name(str(scene.renders / "other####.png"), f)) for f in (-2, -1)]
    assert [(frame, path) for _, frame, path in saved(result.stdout)] == [(-2, str(paths[0])), (-1, str(paths[1]))]
    assert read_png(paths[0]).pixels != read_png(paths[1]).pixels


@pytest.mark.parametrize(
    ("image", "frames", "tiles", "name"),
    [
        (I1, "3", ("16", "2"), "beauty.tilex16-02.0003.png"),
        (I2, "50", ("16", "2"), "other0050.tilex16-02.png"),
        (I1, "3", ("4", "3"), "beauty.tilex4-3.0003.png"),
        (I1, "3", ("1", "1"), "beauty.tilex1-1.0003.png"),  # cnode's tile noise with one tile
    ],
)
def test_tile_file_names(scene: Scene, image: str, frames: str, tiles: tuple[str, str], name: str) -> None:
    result = run_cnode(scene.directory, "shot.project", "-image", image, "-image_frames_list", frames, "-tile_rendering", *tiles)
    assert result.returncode == 0, result.stdout
    assert [p.name for p in scene.renders.iterdir()] == [name]
    side = int(tiles[0]) ** 0.5
    png = read_png(scene.output(name))
    assert (png.width, png.height) == (64 // side, 48 // side)


def test_tiles_are_distinct_crops_that_stitch_into_the_untiled_frame(scene: Scene) -> None:
    whole = run_cnode(scene.directory, "shot.project", "-image", I1, "-image_frames_list", "2")
    assert whole.returncode == 0, whole.stdout
    full = read_png(scene.output("beauty.0002.png"))
    stitched = [bytearray(full.stride) for _ in range(full.height)]
    tiles = []
    for index in range(1, 5):
        result = run_cnode(scene.directory, "shot.project", "-image", I1, "-image_frames_list", "2", "-tile_rendering", "4", str(index))
        assert result.returncode == 0, result.stdout
        tile = read_png(scene.output(f"beauty.tilex4-{index}.0002.png"))
        region = tile_region(64, 48, 4, index)
        assert (tile.width, tile.height) == (region.width, region.height)
        for y in range(tile.height):
            stitched[region.y + y][3 * region.x : 3 * (region.x + region.width)] = tile.row(y)
        tiles.append(tile.pixels)
    assert len(set(tiles)) == 4
    assert b"".join(stitched) == full.pixels


def test_pixels_follow_inputs_and_are_reproducible(scene: Scene) -> None:
    args = ("shot.project", "-image", I1, "-image_frames_list", "1:2")
    frame1, frame2 = scene.output("beauty.0001.png"), scene.output("beauty.0002.png")

    assert run_cnode(scene.directory, *args).returncode == 0
    first = (frame1.read_bytes(), frame2.read_bytes())
    assert run_cnode(scene.directory, *args).returncode == 0
    assert (frame1.read_bytes(), frame2.read_bytes()) == first

    scene.plate(101).write_bytes(b"a different plate for frame 1")  # only frame 1 reads it
    assert run_cnode(scene.directory, *args).returncode == 0
    assert decode_png(first[0]).pixels != read_png(frame1).pixels
    assert frame2.read_bytes() == first[1]

    scene.wood.write_bytes(b"wood texture v2")  # every frame reads it
    assert run_cnode(scene.directory, *args).returncode == 0
    assert decode_png(first[1]).pixels != read_png(frame2).pixels


# -- failures cnode reports -------------------------------------------------------------------


def test_missing_texture_names_the_file(scene: Scene) -> None:
    scene.wood.unlink()
    result = run_cnode(scene.directory, "shot.project", "-image", I2, "-image_frames_list", "1:2")
    assert result.returncode == 1
    assert error_lines(result.stdout) == [f"[ERROR] Cannot open file '{scene.wood}': No such file or directory"]
    assert list(scene.renders.iterdir()) == []


def test_missing_sequence_frame_at_its_offset(scene: Scene) -> None:
    scene.plate(103).unlink()
    result = run_cnode(scene.directory, "shot.project", "-image", I1, "-image_frames_list", "1:4")
    assert result.returncode == 1
    assert error_lines(result.stdout) == [f"[ERROR] Cannot open file '{scene.plate(103)}': No such file or directory"]
    assert sorted(p.name for p in scene.renders.iterdir()) == ["beauty.0001.png", "beauty.0002.png"]


def test_missing_output_directory_fails_and_is_not_created(scene: Scene) -> None:
    shutil.rmtree(scene.renders)
    result = run_cnode(scene.directory, "shot.project", "-image", I1, "-image_frames_list", "1")
    assert result.returncode == 1
    [line] = error_lines(result.stdout)
    assert str(scene.renders) in line and "does not exist" in line
    assert not scene.renders.exists()


def test_project_path_with_a_space_fails_but_its_base_name_works(tmp_path: Path) -> None:
    directory = tmp_path / "my shot"
    (directory / "out").mkdir(parents=True)
    write_project(directory / "shot.project", {I1: {"frames": "1", "save_as": "out/b.####.png"}}, {})
    result = run_cnode(tmp_path, str(directory / "shot.project"), "-image", I1, "-image_frames_list", "1")
    assert result.returncode == 1
    [line] = error_lines(result.stdout)
    assert line.startswith("[ERROR] Cannot open project") and "spaces" in line
    assert not (directory / "out" / "b.0001.png").exists()

    result = run_cnode(directory, "shot.project", "-image", I1, "-image_frames_list", "1")
    assert result.returncode == 0, result.stdout
    read_png(directory / "out" / "b.0001.png")


def test_licence_failure(scene: Scene) -> None:
    result = run_cnode(
        scene.directory, "shot.project", "-image", I1, "-image_frames_list", "1:2",
        "-license_server", "conductor_ilise:40500", CNODE_SIM_FAIL="license",
    )  # fmt: skip
    assert result.returncode == 1
    assert error_lines(result.stdout) == ["[ERROR] License: unable to get a license from server conductor_ilise:40500"]
    assert "Progress for" not in result.stdout
    assert list(scene.renders.iterdir()) == []


def test_crash_exits_3_after_the_first_frame(scene: Scene) -> None:
    result = run_cnode(scene.directory, "shot.project", "-image", I1, "-image_frames_list", "1:3", CNODE_SIM_FAIL="crash")
    assert result.returncode == 3
    assert "License" not in "".join(error_lines(result.stdout))
    assert [p.name for p in scene.renders.iterdir()] == ["beauty.0001.png"]
    read_png(scene.output("beauty.0001.png"))


def test_failure_at_a_given_frame(scene: Scene) -> None:
    result = run_cnode(scene.directory, "shot.project", "-image", I1, "-image_frames_list", "1:3", CNODE_SIM_FAIL="frame:2")
    assert result.returncode == 1
    [line] = error_lines(result.stdout)
    assert "frame 2" in line
    assert [p.name for p in scene.renders.iterdir()] == ["beauty.0001.png"]


def test_segfault_after_the_first_frame(scene: Scene) -> None:
    result = run_cnode(scene.directory, "shot.project", "-image", I1, "-image_frames_list", "1:3", CNODE_SIM_FAIL="segfault")
    assert result.returncode == -signal.SIGSEGV
    assert [p.name for p in scene.renders.iterdir()] == ["beauty.0001.png"]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("-image", I1, I2, "-image_frames_list", "1:2"), "give one per image"),
        (("-image", "project://scene/nope", "-image_frames_list", "1"), "does not exist"),
        (("-image", I1, "-image_frames_list", "1-3"), "Invalid frame list"),
        (("-image", I1, "-image_frames_list", "1:x"), "Invalid frame list"),
        (("-image", I1, "-image_frames_list", "1", "-tile_rendering", "4", "0"), "outside 1..4"),
        (("-image", I1, "-image_frames_list", "1", "-tile_rendering", "4", "5"), "outside 1..4"),
        (("-image", I1, "-image_frames_list", "1", "-tile_rendering", "5", "1"), "not a square"),
        (("-image", I1, "-image_frames_list", "1", "-tile_rendering", "4"), "needs 2 values"),
        (("-image", I1, "-image_frames_list", "1", "-bogus"), "Unknown option '-bogus'"),
        (("-image_frames_list", "1"), "No image to render"),
    ],
)
def test_command_line_errors(scene: Scene, args: tuple[str, ...], complaint: str) -> None:
    result = run_cnode(scene.directory, "shot.project", *args)
    assert result.returncode == 1
    [line] = error_lines(result.stdout)
    assert complaint in line
    assert list(scene.renders.iterdir()) == []


# -- signals and resources --------------------------------------------------------------------


def test_sigterm_exits_143_and_removes_the_half_written_file(scene: Scene) -> None:
    frame2 = scene.output("beauty.0002.png")
    with started(scene.directory, "shot.project", "-image", I1, "-image_frames_list", "1:2", CNODE_SIM_FRAME_SECONDS="1.6") as process:
        read_until(process, "frame 1 to")
        wait_for(frame2.exists, "frame 2 to be opened for writing")
        with pytest.raises(PngError):
            read_png(frame2)  # the renderer is still writing it
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30)
    assert process.returncode == 143
    assert "Interrupted by SIGTERM" in rest
    assert not frame2.exists()
    read_png(scene.output("beauty.0001.png"))


def test_ignoring_sigterm_leaves_only_sigkill(scene: Scene) -> None:
    env = {"CNODE_SIM_FRAME_SECONDS": "30", "CNODE_SIM_IGNORE_SIGTERM": "1"}
    with started(scene.directory, "shot.project", "-image", I1, "-image_frames_list", "1", **env) as process:
        read_until(process, "Rendering image")
        process.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.5)
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def test_memory_is_held_during_the_render(scene: Scene) -> None:
    env = {"CNODE_SIM_FRAME_SECONDS": "30", "CNODE_SIM_MEMORY_MB": "96"}
    with started(scene.directory, "shot.project", "-image", I1, "-image_frames_list", "1", **env) as process:
        read_until(process, "Rendering image")
        rss = psutil.Process(process.pid).memory_info().rss
    assert rss >= 96 * 1024 * 1024


# -- paths ------------------------------------------------------------------------------------


def test_path_map_reroots_artist_inputs_and_outputs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    directory = root / "proj"
    (directory / "renders").mkdir(parents=True)
    (directory / "tex").mkdir()
    (directory / "tex" / "wood.png").write_bytes(b"wood")
    (directory / "tex" / "rel.png").write_bytes(b"relative")
    write_project(
        directory / "shot.project",
        {I1: {"frames": "1", "save_as": "C:/proj/renders/beauty.####.png"}},
        {"wood": {"path": "C:/proj/tex/wood.png"}, "rel": {"path": "tex/rel.png"}},
    )
    args = ("shot.project", "-image", I1, "-image_frames_list", "7")
    path_map = json.dumps(PathMap.rooted(str(root)).to_dict())

    result = run_cnode(directory, *args, CIO_PATH_MAP=path_map)
    assert result.returncode == 0, result.stdout
    target = directory / "renders" / "beauty.0007.png"
    assert saved(result.stdout) == [(I1, 7, str(target))]
    first = read_png(target).pixels

    (directory / "tex" / "rel.png").write_bytes(b"relative v2")  # read from the project's real directory
    assert run_cnode(directory, *args, CIO_PATH_MAP=path_map).returncode == 0
    assert read_png(target).pixels != first

    (directory / "tex" / "wood.png").unlink()
    result = run_cnode(directory, *args, CIO_PATH_MAP=path_map)
    assert error_lines(result.stdout) == [f"[ERROR] Cannot open file '{directory}/tex/wood.png': No such file or directory"]

    result = run_cnode(directory, *args)  # no map: the drive-stripped node path
    assert error_lines(result.stdout) == ["[ERROR] Cannot open file '/proj/tex/wood.png': No such file or directory"]


def test_shim_runs_the_simulator_as_cnode_from_path(scene: Scene, tmp_path: Path) -> None:
    from cio_worker.sim.cnode import install_cnode_shim as from_cnode  # where simulate.py takes it

    assert from_cnode is install_cnode_shim
    shim = install_cnode_shim(tmp_path / "bin")
    assert shim == tmp_path / "bin" / "cnode" and os.access(shim, os.X_OK)
    env = sim_env()
    env.pop("PYTHONPATH")
    env["PATH"] = f"{shim.parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["/bin/sh", "-c", f"cnode shot.project -image {I1} -image_frames_list '2:3'"],
        cwd=scene.directory, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in scene.renders.iterdir()) == ["beauty.0002.png", "beauty.0003.png"]


# -- the PNG codec and tile grid, in process --------------------------------------------------


def test_png_round_trip_and_metadata() -> None:
    rows = [bytes((x * 7 + y * 13 + c) & 0xFF for x in range(5) for c in range(3)) for y in range(3)]
    png = decode_png(encode_png(5, 3, rows, {"cio:frame": "12"}))
    assert (png.width, png.height, png.color_type) == (5, 3, 2)
    assert [png.row(y) for y in range(3)] == rows
    assert png.pixel(1, 2) == tuple(rows[2][3:6])
    assert png.text == {"cio:frame": "12"}


def test_png_reader_rejects_corruption_and_truncation() -> None:
    data = encode_png(4, 4, [bytes(12)] * 4)
    corrupted = bytearray(data)
    corrupted[-20] ^= 0xFF  # inside the last IDAT chunk
    for bad, reason in [(b"GIF89a" + data[6:], "signature"), (bytes(corrupted), "CRC"), (data[:-12], "IEND"), (data[:40], "truncated")]:
        with pytest.raises(PngError, match=reason):
            decode_png(bad)


def test_png_reader_undoes_every_filter_type() -> None:
    width, bpp = 4, 3
    rows = [bytes((x * 29 + y * 71 + 5) & 0xFF for x in range(width * bpp)) for y in range(5)]

    def filtered(kind: int, row: bytes, previous: bytes) -> bytes:
        out = bytearray()
        for i, value in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = previous[i]
            c = previous[i - bpp] if i >= bpp else 0
            p = a + b - c
            paeth = min((abs(p - a), 0, a), (abs(p - b), 1, b), (abs(p - c), 2, c))[2]
            predictor = [0, a, b, (a + b) // 2, paeth][kind]
            out.append((value - predictor) & 0xFF)
        return bytes([kind]) + bytes(out)

    raw = b"".join(filtered(y, rows[y], rows[y - 1] if y else bytes(width * bpp)) for y in range(5))
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", width.to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0]))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    assert [decode_png(data).row(y) for y in range(5)] == rows


def test_tile_grid_covers_every_pixel_once() -> None:
    covered = [[0] * 65 for _ in range(47)]
    for index in range(1, 10):
        region = tile_region(65, 47, 9, index)
        for y in range(region.y, region.y + region.height):
            for x in range(region.x, region.x + region.width):
                covered[y][x] += 1
    assert all(count == 1 for row in covered for count in row)
    assert (tile_region(64, 48, 4, 2).x, tile_region(64, 48, 4, 2).y) == (32, 0)  # row-major
    with pytest.raises(TileError):
        tile_region(2, 2, 9, 1)
