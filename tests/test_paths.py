"""Artist paths, node paths and the path map (contract.md 8)."""

from __future__ import annotations

import pytest

from cio_worker.errors import CioError, PathError
from cio_worker.job.paths import PathMap, is_within, node_path, posix_path, relative_inside


@pytest.mark.parametrize(
    ("artist", "posix"),
    [
        ("C:/proj/a.exr", "/proj/a.exr"),
        ("c:\\proj\\tex\\wood.exr", "/proj/tex/wood.exr"),
        ("/proj/a.exr", "/proj/a.exr"),
        ("relative\\dir", "relative/dir"),
        ("D:", ""),
        ("/proj/C:/x", "/proj/C:/x"),  # only a leading drive letter is stripped
    ],
)
def test_posix_path(artist: str, posix: str) -> None:
    assert posix_path(artist) == posix


@pytest.mark.parametrize(
    ("artist", "node"),
    [
        ("C:/proj/a.exr", "/proj/a.exr"),
        ("Z:\\proj\\tex\\wood.exr", "/proj/tex/wood.exr"),
        ("/proj/shots/shot A/a.exr", "/proj/shots/shot A/a.exr"),
        ("C:/proj//tex/./wood.exr", "/proj/tex/wood.exr"),
        ("/proj/renders/", "/proj/renders"),
    ],
)
def test_node_path_strips_drive_letters(artist: str, node: str) -> None:
    assert node_path(artist) == node


@pytest.mark.parametrize(
    ("artist", "says"),
    [
        ("", "is empty"),
        ("  ", "is empty"),
        ("proj/a.exr", "is relative"),
        ("C:proj/a.exr", "is relative"),
        ("./a.exr", "is relative"),
        ("/proj/../etc/passwd", "climbs with '..'"),
        ("C:\\proj\\..\\..\\etc", "climbs with '..'"),
        ("/proj/..", "climbs with '..'"),
        ("//server/share/a.exr", "network"),
        ("\\\\server\\share\\a.exr", "network"),
        ("/", "root directory"),
        ("C:/", "root directory"),
        ("/proj/a\x00b", "NUL"),
    ],
)
def test_node_path_rejects(artist: str, says: str) -> None:
    with pytest.raises(PathError, match=says) as info:
        node_path(artist, what="destination")
    assert isinstance(info.value, CioError)
    assert info.value.code == "bad_path"
    if artist.strip():
        assert str(info.value).startswith("destination ")


def test_node_path_keeps_dots_inside_names() -> None:
    assert node_path("/proj/..hidden/a..b") == "/proj/..hidden/a..b"


@pytest.mark.parametrize(
    ("relative", "result"),
    [("a.exr", "a.exr"), ("beauty/a.0001.exr", "beauty/a.0001.exr"), ("beauty\\a.exr", "beauty/a.exr"), ("x/./y", "x/y")],
)
def test_relative_inside(relative: str, result: str) -> None:
    assert relative_inside(relative) == result


@pytest.mark.parametrize(
    ("relative", "says"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("C:/x", "absolute"),
        ("c:x", "absolute"),
        ("../x", "climbs out"),
        ("a/../../x", "climbs out"),
        ("a\\..\\..\\x", "climbs out"),
        (".", "the directory itself"),
        ("a/..", "climbs out"),
        ("a\x00", "NUL"),
    ],
)
def test_relative_inside_rejects(relative: str, says: str) -> None:
    with pytest.raises(PathError, match=says):
        relative_inside(relative)


@pytest.mark.parametrize(
    ("path", "directory", "inside"),
    [
        ("/proj/renders/a.exr", "/proj/renders", True),
        ("/proj/renders", "/proj/renders", True),
        ("/proj/renders2/a.exr", "/proj/renders", False),
        ("/proj", "/proj/renders", False),
        ("/other/a.exr", "/proj", False),
        ("/proj/renders/deep/er/a.exr", "/proj", True),
    ],
)
def test_is_within_is_component_wise(path: str, directory: str, inside: bool) -> None:
    assert is_within(path, directory) is inside


def test_path_map_longest_prefix_wins() -> None:
    pm = PathMap.parse(["/proj=/mnt/a", "/proj/tex=/mnt/textures", "C:/lib=/mnt/lib"])
    assert pm.apply("/proj/shot.project") == "/mnt/a/shot.project"
    assert pm.apply("/proj/tex/wood.exr") == "/mnt/textures/wood.exr"
    assert pm.apply("/proj/tex") == "/mnt/textures"
    assert pm.apply("/lib/x") == "/mnt/lib/x"
    assert pm.apply("/elsewhere/x") == "/elsewhere/x"
    # The order given does not matter.
    assert PathMap.parse(["/proj/tex=/mnt/textures", "/proj=/mnt/a"]).apply("/proj/tex/w") == "/mnt/textures/w"


def test_path_map_matches_whole_components() -> None:
    pm = PathMap.parse(["/proj=/mnt/a"])
    assert pm.apply("/project/x") == "/project/x"
    assert pm.apply("/proj2/x") == "/proj2/x"


def test_path_map_root_reroots_what_no_rule_takes() -> None:
    pm = PathMap.parse(["/proj/tex=/shared/tex"], root="/tmp/sim/root")
    assert pm.apply("/proj/a.exr") == "/tmp/sim/root/proj/a.exr"
    assert pm.apply("/proj/tex/w.exr") == "/shared/tex/w.exr"
    assert PathMap.rooted("/tmp/r").local("C:\\proj\\a.exr") == "/tmp/r/proj/a.exr"
    assert PathMap.rooted("/tmp/r/").apply("/a") == "/tmp/r/a"


def test_path_map_local_validates_the_artist_path() -> None:
    with pytest.raises(PathError, match="destination 'proj/a' is relative"):
        PathMap.rooted("/tmp/r").local("proj/a", what="destination")
    with pytest.raises(PathError, match="climbs"):
        PathMap.rooted("/tmp/r").local("/proj/../../etc/passwd")


def test_empty_path_map_is_identity_and_false() -> None:
    pm = PathMap()
    assert not pm
    assert pm.apply("/proj/a") == "/proj/a"
    assert PathMap.rooted("/r")
    assert PathMap.parse(["/a=/b"])


@pytest.mark.parametrize(
    ("specs", "root", "says"),
    [
        (["/proj"], None, "not FROM=TO"),
        (["proj=/x"], None, "relative"),
        (["/proj=relative"], None, "must be absolute"),
        (["/proj/../x=/y"], None, "climbs"),
        ([], "relative/root", "must be absolute"),
    ],
)
def test_path_map_parse_errors(specs: list[str], root: str | None, says: str) -> None:
    with pytest.raises(PathError, match=says):
        PathMap.parse(specs, root=root)


def test_path_map_dict_round_trip() -> None:
    pm = PathMap.parse(["/proj=/mnt/a", "/proj/tex=/mnt/t"], root="/r")
    again = PathMap.from_dict(pm.to_dict())
    assert again == pm
    assert again.apply("/proj/tex/x") == "/mnt/t/x"
    assert PathMap.from_dict(None) == PathMap()
    assert PathMap.from_dict({}) == PathMap()


def test_path_map_longest_prefix_wins_whatever_the_stored_order() -> None:
    pm = PathMap.from_dict({"rules": [["/proj", "/mnt/a"], ["/proj/tex", "/mnt/t"]], "root": None})
    assert pm.apply("/proj/tex/x") == "/mnt/t/x"
    assert PathMap((("/proj", "/mnt/a"), ("/proj/tex", "/mnt/t"))).apply("/proj/tex/x") == "/mnt/t/x"


def test_path_map_sorts_its_rules_once_when_built_not_on_every_apply(monkeypatch) -> None:
    pm = PathMap((("/proj", "/mnt/a"), ("/proj/tex", "/mnt/t"), ("/lib", "/mnt/l")))
    assert pm.rules == (("/proj/tex", "/mnt/t"), ("/proj", "/mnt/a"), ("/lib", "/mnt/l"))  # longest first, ties kept
    import builtins

    def no_sorting(*args, **kwargs):
        raise AssertionError("apply sorted the rules again")

    monkeypatch.setattr(builtins, "sorted", no_sorting)
    assert pm.apply("/proj/tex/x") == "/mnt/t/x" and pm.apply("/lib/y") == "/mnt/l/y"
