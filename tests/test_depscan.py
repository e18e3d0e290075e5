"""Dependency scan on a real directory tree: none / smart / glob, offsets, $4F, missing files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cio_worker.job.depscan import ScanError, ScannedFile, scan_dependencies, upload_files
from cio_worker.job.frames import FrameSet
from cio_worker.job.hashing import md5_b64_of_bytes
from cio_worker.job.paths import PathMap
from cio_worker.job.project import load_project

PROJECT_ARTIST = "/proj/shots/shot.project"


def touch(root: Path, artist: str, content: bytes = b"x") -> Path:
    path = root / artist.lstrip("/").split(":", 1)[-1].lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> dict:
    """An artist filesystem under tmp_path/root; the project reads five references."""
    root = tmp_path / "root"
    project = {
        "format": "cio-project/1",
        "images": {
            "project://scene/beauty": {
                "frames": "1-5",
                "save_as": "/proj/renders/beauty.####.png",
                "inputs": ["project://scene/wood", "project://scene/plate", "project://scene/geo"],
            },
            "project://scene/fx": {
                "frames": "3-4",
                "save_as": "/proj/renders/fx.####.png",
                "inputs": ["project://scene/wood", "project://scene/sparks"],
            },
            "project://scene/unused": {
                "frames": "1-5",
                "save_as": "/proj/renders/unused.####.png",
                "inputs": ["project://scene/ghost"],
            },
        },
        "references": {
            "project://scene/wood": {"path": "C:/proj/tex/wood.png"},
            "project://scene/plate": {"path": "../plates/bg.####.png", "frame_offset": -100},
            "project://scene/geo": {"path": "C:/proj/geo/sim.$4F.abc", "frame_offset": 2},
            "project://scene/sparks": {"path": "/proj/fx/sparks_$F.bin"},
            "project://scene/ghost": {"path": "/proj/tex/ghost.png"},
        },
    }
    touch(root, PROJECT_ARTIST, json.dumps(project).encode())
    touch(root, "C:/proj/tex/wood.png", b"wood")
    for f in range(98, 110):  # plate frames 0098..0109 exist; 1-5 with offset -100 read 0101..0105
        touch(root, f"/proj/plates/bg.{f:04d}.png")
    touch(root, "/proj/plates/bg.12.png")  # wrong padding: never a frame of ####
    touch(root, "/proj/plates/bg.00103.png")  # over-padded: not what Clarisse reads
    touch(root, "/proj/plates/bg.0101.png.bak")
    for f in (-1, 0, 1, 2, 3, 7):  # geo offset 2: frames 1-5 read -1..3
        touch(root, f"C:/proj/geo/sim.{f:04d}.abc" if f >= 0 else f"C:/proj/geo/sim.-{-f:03d}.abc")
    touch(root, "/proj/fx/sparks_3.bin")  # sparks_4.bin is missing
    touch(root, "/proj/extra/notes.txt", b"notes")
    touch(root, "/proj/extra/dir/a.txt")
    touch(root, "/proj/extra/dir/sub/b.txt")
    path_map = PathMap.rooted(str(root))
    loaded = load_project(path_map.local(PROJECT_ARTIST), display_path=PROJECT_ARTIST)
    images = [("project://scene/beauty", FrameSet.parse("1-5")), ("project://scene/fx", FrameSet.parse("3-4"))]
    return {"root": root, "project": loaded, "images": images, "path_map": path_map}


def scan(tree: dict, mode: str, extra: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    return scan_dependencies(
        project=tree["project"],
        project_file=PROJECT_ARTIST,
        images=tree["images"],
        mode=mode,
        extra_uploads=extra,
        path_map=tree["path_map"],
    )


def artist_paths(result) -> list[str]:  # type: ignore[no-untyped-def]
    return [f.artist_path for f in result.files]


def test_none_scans_only_the_project_and_extra_uploads(tree: dict) -> None:
    result = scan(tree, "none", ("/proj/extra/notes.txt", "C:/proj/extra/dir"))
    assert artist_paths(result) == [
        "/proj/extra/notes.txt",
        PROJECT_ARTIST,
        "C:/proj/extra/dir/a.txt",
        "C:/proj/extra/dir/sub/b.txt",
    ]
    assert result.missing == []
    by_artist = {f.artist_path: f.local_path for f in result.files}
    assert by_artist["C:/proj/extra/dir/sub/b.txt"] == str(tree["root"] / "proj/extra/dir/sub/b.txt")


def test_smart_takes_only_the_frames_rendered(tree: dict) -> None:
    result = scan(tree, "smart")
    assert artist_paths(result) == [
        "/proj/fx/sparks_3.bin",  # $F unpadded, fx frames 3-4
        "/proj/plates/bg.0101.png",  # offset -100: frames 1-5 read 0101-0105
        "/proj/plates/bg.0102.png",
        "/proj/plates/bg.0103.png",
        "/proj/plates/bg.0104.png",
        "/proj/plates/bg.0105.png",
        PROJECT_ARTIST,
        "C:/proj/geo/sim.-001.abc",  # $4F with offset 2: frames 1-5 read -1..3
        "C:/proj/geo/sim.0000.abc",
        "C:/proj/geo/sim.0001.abc",
        "C:/proj/geo/sim.0002.abc",
        "C:/proj/geo/sim.0003.abc",
        "C:/proj/tex/wood.png",  # read by two images, listed once
    ]
    # Reported, not dropped; the unused image's texture is not asked for.
    assert result.missing == ["/proj/fx/sparks_4.bin"]
    for found in result.files:
        assert Path(found.local_path).is_file()
        assert found.local_path.startswith(str(tree["root"]))


def test_smart_uses_the_frames_given_per_image(tree: dict) -> None:
    tree["images"] = [("project://scene/beauty", FrameSet.parse("4")), ("project://scene/fx", FrameSet())]
    result = scan(tree, "smart")
    assert "/proj/plates/bg.0104.png" in artist_paths(result)
    assert "/proj/plates/bg.0101.png" not in artist_paths(result)
    assert not any("sparks" in p for p in artist_paths(result) + result.missing)  # fx renders nothing


def test_glob_takes_every_frame_file_on_disk(tree: dict) -> None:
    result = scan(tree, "glob")
    paths = artist_paths(result)
    assert [p for p in paths if "plates" in p] == [f"/proj/plates/bg.{f:04d}.png" for f in range(98, 110)]
    assert [p for p in paths if "geo" in p] == [
        "C:/proj/geo/sim.-001.abc",
        "C:/proj/geo/sim.0000.abc",
        "C:/proj/geo/sim.0001.abc",
        "C:/proj/geo/sim.0002.abc",
        "C:/proj/geo/sim.0003.abc",
        "C:/proj/geo/sim.0007.abc",  # not needed by any frame, but on disk
    ]
    assert "/proj/fx/sparks_3.bin" in paths and "C:/proj/tex/wood.png" in paths
    assert result.missing == []


def test_glob_reports_a_sequence_with_no_file(tree: dict) -> None:
    for path in (tree["root"] / "proj/fx").iterdir():
        path.unlink()
    result = scan(tree, "glob")
    assert result.missing == ["/proj/fx/sparks_$F.bin"]


def test_missing_static_texture_and_project_are_reported(tree: dict) -> None:
    (tree["root"] / "proj/tex/wood.png").unlink()
    (tree["root"] / "proj/shots/shot.project").unlink()
    result = scan(tree, "smart", ("/proj/extra/absent.txt",))
    assert result.missing == ["/proj/extra/absent.txt", "/proj/fx/sparks_4.bin", PROJECT_ARTIST, "C:/proj/tex/wood.png"]
    assert "C:/proj/tex/wood.png" not in artist_paths(result)


def test_identity_path_map_uses_artist_paths_as_local(tmp_path: Path) -> None:
    texture = tmp_path / "tex" / "a.png"
    texture.parent.mkdir()
    texture.write_bytes(b"a")
    project_path = tmp_path / "p.project"
    project_path.write_text(
        json.dumps(
            {
                "format": "cio-project/1",
                "images": {"project://scene/i": {"frames": "1", "save_as": "out/i.####.png"}},
                "references": {"project://scene/t": {"path": "tex/a.png"}},
            }
        )
    )
    project = load_project(project_path)
    result = scan_dependencies(
        project=project,
        project_file=project_path.as_posix(),
        images=[("project://scene/i", FrameSet.parse("1"))],
        mode="smart",
    )
    assert result.files == sorted(
        [ScannedFile(texture.as_posix(), texture.as_posix()), ScannedFile(project_path.as_posix(), str(project_path))]
    )


def test_bad_mode_and_bad_paths_are_errors(tree: dict) -> None:
    with pytest.raises(ScanError, match="'deep' is not one of none, smart, glob"):
        scan(tree, "deep")
    with pytest.raises(ScanError, match="extra upload.*relative"):
        scan(tree, "none", ("notes.txt",))


def test_upload_files_describe_content_and_mode(tree: dict) -> None:
    wood = tree["root"] / "proj/tex/wood.png"
    os.chmod(wood, 0o755)
    result = scan(tree, "smart")
    uploads = {u.destination: u for u in upload_files(result.files)}
    assert uploads["C:/proj/tex/wood.png"].md5 == md5_b64_of_bytes(b"wood")
    assert uploads["C:/proj/tex/wood.png"].size == 4
    assert uploads["C:/proj/tex/wood.png"].mode & 0o777 == 0o755
    assert uploads["/proj/plates/bg.0101.png"].mode & 0o111 == 0
