"""Artist paths and node paths (contract.md 8), and the path map that re-roots them.

An artist path is absolute, with forward slashes, and may carry a Windows drive letter
(``C:/proj/tex/wood.exr``). On a Linux node it is placed with the drive letter stripped
(``/proj/tex/wood.exr``). A path map then lets a simulation or a test VM re-root those node
paths under a directory of its own (``/proj`` -> ``/tmp/sim/root/proj``).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from cio_worker.errors import PathError

_DRIVE = re.compile(r"^[A-Za-z]:")


def posix_path(path: str) -> str:
    """Backslashes to slashes and the drive letter stripped (the ``<posix x>`` modifier)."""
    text = path.replace("\\", "/")
    return _DRIVE.sub("", text, count=1)


def node_path(artist_path: str, *, what: str = "path") -> str:
    """The node form of an absolute artist path; reject relative paths and ``..`` climbs."""
    if not isinstance(artist_path, str) or artist_path.strip() == "":
        raise PathError(f"{what} is empty")
    if "\x00" in artist_path:
        raise PathError(f"{what} {artist_path!r} contains a NUL character")
    text = posix_path(artist_path)
    if text.startswith("//"):
        raise PathError(f"{what} {artist_path!r} is a network (UNC) path; map it to a drive or mount")
    if not text.startswith("/"):
        raise PathError(f"{what} {artist_path!r} is relative; it must be absolute")
    parts = text.split("/")
    if ".." in parts:
        raise PathError(f"{what} {artist_path!r} climbs with '..'")
    normal = posixpath.normpath(text)
    if normal in ("/", ""):
        raise PathError(f"{what} {artist_path!r} names the root directory, not a file")
    return normal


def relative_inside(relative: str, *, what: str = "relative path") -> str:
    """A relative path that must stay inside the directory it is joined to."""
    if not isinstance(relative, str) or relative.strip() == "":
        raise PathError(f"{what} is empty")
    text = relative.replace("\\", "/")
    if text.startswith("/") or _DRIVE.match(text):
        raise PathError(f"{what} {relative!r} is absolute; it must be relative")
    if "\x00" in text:
        raise PathError(f"{what} {relative!r} contains a NUL character")
    if ".." in text.split("/"):
        raise PathError(f"{what} {relative!r} climbs out with '..'")
    normal = posixpath.normpath(text)
    if normal in (".", ""):
        raise PathError(f"{what} {relative!r} names the directory itself, not a file")
    return normal


def is_within(path: str, directory: str) -> bool:
    """Whether node path ``path`` is ``directory`` or below it (both absolute, normalised)."""
    try:
        PurePosixPath(path).relative_to(PurePosixPath(directory))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class PathMap:
    """Ordered prefix rewrites applied to node paths; the longest matching prefix wins.

    ``PathMap.parse(["/proj=/tmp/root/proj"])`` or ``PathMap.rooted("/tmp/root")`` (every node
    path re-rooted under that directory). Prefixes match whole path components only.
    """

    rules: tuple[tuple[str, str], ...] = ()
    root: str | None = field(default=None)

    def __post_init__(self) -> None:
        # Longest prefix first, whatever order the rules came in (parse, from_dict, direct
        # construction); sorted once here, not on every apply. Equal lengths keep their order.
        object.__setattr__(self, "rules", tuple(sorted(self.rules, key=lambda r: -len(r[0]))))

    @classmethod
    def parse(cls, specs: list[str] | tuple[str, ...] | None, root: str | None = None) -> "PathMap":
        rules = []
        for spec in specs or ():
            if "=" not in spec:
                raise PathError(f"path map entry {spec!r} is not FROM=TO")
            source, target = spec.split("=", 1)
            source = node_path(source, what="path map source")
            if not target.startswith("/"):
                raise PathError(f"path map target {target!r} must be absolute")
            rules.append((source, posixpath.normpath(target)))
        if root is not None and not root.startswith("/"):
            raise PathError(f"path map root {root!r} must be absolute")
        return cls(tuple(rules), root)

    @classmethod
    def rooted(cls, root: str) -> "PathMap":
        return cls.parse([], root=str(root))

    def to_dict(self) -> dict:
        return {"rules": [list(r) for r in self.rules], "root": self.root}

    @classmethod
    def from_dict(cls, data: dict | None) -> "PathMap":
        if not data:
            return cls()
        return cls(tuple((str(a), str(b)) for a, b in data.get("rules", ())), data.get("root"))

    def apply(self, path: str) -> str:
        """Map a node path (already drive-stripped, absolute)."""
        for source, target in self.rules:
            if path == source or path.startswith(source.rstrip("/") + "/"):
                return posixpath.normpath(target + path[len(source.rstrip("/")) :])
        if self.root:
            return posixpath.normpath(self.root + "/" + path.lstrip("/"))
        return path

    def local(self, artist_path: str, *, what: str = "path") -> str:
        """Artist path -> node path -> mapped local path."""
        return self.apply(node_path(artist_path, what=what))

    def __bool__(self) -> bool:
        return bool(self.rules) or bool(self.root)
