"""Where a render's raw output lands: an unnamed file the command appends to at the speed of a
plain file, and the agent tails to mask, scan, cap and store it (``runner.py``).

The file has no name (``O_TMPFILE``, or created and unlinked at once), mode 0600, owned by the
agent: nothing can open it by path, a render user cannot reopen it through ``/proc``, and it
vanishes when the last descriptor closes (the agent's, and the command's if it outlives the
agent). The command gets a write-only, append-only descriptor of it. What the agent has read is
released (a hole punched), so the disk holds only the part not yet read.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class OutputSpool:
    """One command's raw output. Read by one thread; ``release`` frees what it has read."""

    def __init__(self, directory: Path) -> None:
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".cio-output-", buffering=0)
        self.fd = self._file.fileno()
        self._released = 0
        self._punch = _fallocate()

    def writer(self) -> int:
        """A new write-only, append-only descriptor for the command (close-on-exec: the caller
        hands it over as stdout and closes its own copy)."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def read_into(self, room: memoryview, offset: int) -> int:
        return os.preadv(self.fd, [room], offset)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def release(self, upto: int) -> None:
        """Free the disk blocks and cached pages before ``upto`` (already read)."""
        if self._punch is None or upto <= self._released:
            return
        if self._punch(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, self._released, upto - self._released):
            error = ctypes.get_errno()
            if error in (errno.EOPNOTSUPP, errno.ENOSYS):
                log.info("this filesystem cannot punch holes: the output spool keeps its blocks until the task ends")
            else:
                log.warning("releasing the read part of the output spool failed: %s", os.strerror(error))
            self._punch = None
            return
        self._released = upto

    def close(self) -> None:
        self._file.close()


def _fallocate():  # type: ignore[no-untyped-def]
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function
