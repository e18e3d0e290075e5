"""Which task failures are the node's fault, not the task's: a renderer this machine lacks (or
cannot run), a full disk or an exhausted quota while syncing, rendering or writing, a licence
server this node cannot reach. The agent gives such a task back at no cost to its failed budget
and counts them: a node that keeps failing this way stops taking work (agent.py).

A licence server that answered and gave no licence (none free, expired, denied: clarisse.py's
"licence" code) is left to the task. One that did not answer ("licence_unreachable": RLM's
"Communications error with license server (-17)", "Connection refused at server (-111)", ...) is
this node's network; a job whose ``-license_server`` names a wrong host fails alike on every node,
each giving it back, so such a job waits unspent while the nodes give up (node_fault_limit)."""

from __future__ import annotations

import errno
import os
import shlex
from pathlib import Path, PurePath

from cio_worker.errors import CioError

# Error codes (the runner's start errors, the render monitor's fatal lines, execution's own).
NODE_FAULT_CODES = frozenset({
    "command_not_found",  # the program is not on this machine (or a shell said status 127)
    "command_not_executable",  # it is there but cannot be run (status 126)
    "disk_full",  # no space / quota left on this machine's disk
    "licence_unreachable",  # the licence server did not answer this node (clarisse.py)
    "sync_worker_died",  # an input sync worker process was killed (out of memory, a signal): sync.py
})
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException | None) -> bool:
    """``exc`` (or an error it wraps, or a sync failure it lists) is a full disk or quota."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        todo += [current.__cause__, current.__context__]
        todo += [getattr(f, "error", None) for f in getattr(current, "failures", None) or ()]
    return False


# A filesystem with less than this left to root is full: what was written there may be lost.
FULL_BELOW_BYTES = 1024 * 1024


def full_filesystem(*paths: Path) -> Path | None:
    """The first of ``paths`` whose filesystem is full (its free blocks, root's reserve included,
    under ``FULL_BELOW_BYTES``); None when none is, or none can be asked. A render that fails on
    a full disk may not have been able to say so: its output spool is on that disk too."""
    for path in paths:
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        if st.f_bfree * st.f_frsize < FULL_BELOW_BYTES:
            return path
    return None


RENDERERS = ("cnode", "cnode.exe")  # the programs a task's command runs (contract.md)


def runs_renderer(command: str | None, renderers: tuple[str, ...] = RENDERERS) -> bool:
    """Whether ``command``'s program is the renderer (``cnode``, with or without a directory)."""
    try:
        words = shlex.split(command or "")
    except ValueError:
        return False
    return bool(words) and PurePath(words[0].replace("\\", "/")).name.lower() in renderers


def node_fault(error: CioError | None, command: str | None = None) -> bool:
    """Whether a task that ended with ``error`` failed because of this node. A program that is not
    here is the node's fault only when it is the renderer (``command`` runs it): a job whose
    command names something no machine has is the job's, and must not make every node give up."""
    if error is None:
        return False
    if error.code in ("command_not_found", "command_not_executable"):
        return runs_renderer(command)
    return error.code in NODE_FAULT_CODES or is_disk_full(error)
