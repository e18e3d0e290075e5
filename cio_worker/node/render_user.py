"""The unprivileged user renders run as (``--render-user``), and the file permissions that let it
do its job and nothing more.

The agent (root) starts the render as that user, with no supplementary groups. The render may
read its inputs (``readable``), write its task directory, TMPDIR and output directories
(``grant``); the agent's own directories (cache internals, logs, outbox) are ``private`` (0700,
root), its token file must be 0600, and a process of another user cannot signal the agent or read
its ``/proc`` environment.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from cio_worker.errors import CioError


class RenderUserError(CioError):
    code = "bad_render_user"


@dataclass(frozen=True)
class RenderUser:
    name: str
    uid: int
    gid: int

    @classmethod
    def resolve(cls, name: str) -> "RenderUser":
        """The user named ``name`` (or a numeric uid); the agent must be root to switch to it."""
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        except (KeyError, ValueError):
            raise RenderUserError(
                f"--render-user {name!r}: no such user on this machine; create it "
                "(e.g. `useradd --system --no-create-home render`) or name another one", code="bad_render_user") from None
        if entry.pw_uid == 0:
            raise RenderUserError(f"--render-user {name!r} is root: name an unprivileged user", code="bad_render_user")
        if os.geteuid() != 0:
            raise RenderUserError(
                f"--render-user {name!r} needs the agent to run as root (it runs as {current_user()}); "
                "start it as root or leave --render-user out", code="bad_render_user")
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    def popen_args(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def grant(self, *directories: Path) -> None:
        """Make each directory (which must exist) the render's own: owned by it, 0700."""
        for directory in directories:
            os.chown(directory, self.uid, self.gid, follow_symlinks=False)
            os.chmod(directory, 0o700)

    def readable(self, files: Iterable[Path], root: Path | None = None) -> None:
        """Let the render read ``files`` (o+r) and reach them (o+x on each directory above them,
        up to ``root`` or ``/``). Nothing is made writable."""
        seen: set[Path] = set()
        for path in files:
            _add_mode(path, stat.S_IROTH)
            for directory in path.parents:
                if directory in seen:
                    break
                seen.add(directory)
                _add_mode(directory, stat.S_IXOTH)
                if root is not None and directory == root:
                    break

    def reachable(self, *directories: Path) -> None:
        """o+x on each directory: the render may pass through it, not list it."""
        for directory in directories:
            _add_mode(directory, stat.S_IXOTH)


def private(*directories: Path) -> None:
    """The agent's own directories: 0700, so that a render user can neither list nor read them."""
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)


def exposed_secrets(*files: Path | None) -> list[Path]:
    """Those of ``files`` (a token file, a configuration) that users other than the owner may read."""
    found = []
    for path in files:
        if path is None:
            continue
        try:
            if os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH):
                found.append(path)
        except OSError:
            continue
    return found


def current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _add_mode(path: Path, bits: int) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & bits != bits:
        os.chmod(path, stat.S_IMODE(mode) | bits)


def confine(user: RenderUser, work_root: Path, cache_dir: Path | None, secrets: Iterable[Path | None] = ()) -> list[str]:
    """Set up a node whose renders run as ``user``: the agent's logs, outbox and cache are private,
    the task directories reachable. Returns warnings for a person (a token file others may read)."""
    private(work_root / "logs", work_root / "outbox", work_root / "tasks")
    if cache_dir is not None:
        private(cache_dir)
    user.reachable(work_root, work_root / "tasks")
    return [f"{path} may be read by other users, {user.name} included: chmod 600 {path}"
            for path in exposed_secrets(*secrets)]
