"""Whether this machine can take work: its work and cache directories take writes (a full or
read-only disk fails here, not in a task) and the renderer it is meant to run is installed."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from cio_worker.errors import CioError

PROBE_BYTES = 64 * 1024


class NodeNotReady(CioError):
    code = "node_not_ready"


def check_node(directories: dict[str, Path | None], renderer: str | None = None, *, search_path: str | None = None) -> None:
    """Raise NodeNotReady unless every directory (label -> path; None: not used) takes a small
    write and ``renderer`` (a name on ``search_path``, default $PATH, or a path) is executable."""
    for label, directory in directories.items():
        if directory is not None:
            _probe(label, directory)
    if renderer and shutil.which(renderer, path=search_path) is None:
        raise NodeNotReady(f"the renderer {renderer!r} is not installed on this machine (not an executable on PATH "
                           "or at that path); install it, or correct the agent's `renderer` setting")


def _probe(label: str, directory: Path) -> None:
    probe = directory / f".cio-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise NodeNotReady(f"the {label} {directory} takes no writes: {exc.strerror or exc}"
                           + ("; free some space on its disk" if full else ""), code="disk_full" if full else None) from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
