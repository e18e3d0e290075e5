"""A sync worker process: ``python -m cio_worker.node.sync_worker FD``, started by
``InputSync._download_in_processes`` with one end of a socket pair as descriptor FD.

A large download from a local store costs per file: a few system calls under the directory's
lock and some Python, which threads of one process share (the GIL). So the contents are split
over a process a core, each fetching and placing its share with the same code (and the same
content cache) as the agent would, and sending back what moved as it goes, then its outcomes
and the MD5 records of what it placed, which the agent writes. Started as a module of its own,
not through ``multiprocessing``, whose "spawn" re-imports the agent's main module.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
from multiprocessing.connection import Connection

from cio_worker.errors import CioError
from cio_worker.job.paths import PathMap
from cio_worker.node.sync import InputSync, _Failure, _Placed, _Record
from cio_worker.storage.common import UnnamedFiles


class _SentProgress:
    """A sync worker process's Progress: what moved, sent to its parent every 50 ms or so. Once
    the parent has stopped listening (or is gone), every call raises: the worker's transfers
    fail, clean up and end."""

    INTERVAL = 0.05

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._parent = os.getppid()
        self._lock = threading.Lock()
        self._moved = 0
        self._keys: list[str] = []
        self._sent = time.monotonic()
        self._unheard = False

    def start(self, files: int, total_bytes: int) -> None:
        pass  # the parent told its own progress the whole download's size

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._moved += nbytes
        self._maybe_send()

    def file_done(self, key: str) -> None:
        with self._lock:
            self._keys.append(key)
        self._maybe_send()

    def _maybe_send(self) -> None:
        if self._unheard or time.monotonic() - self._sent >= self.INTERVAL:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._unheard and os.getppid() == self._parent:
                moved, keys, self._moved, self._keys = self._moved, self._keys, 0, []
                self._sent = time.monotonic()
                try:
                    if moved or keys:
                        self._conn.send(("moved", moved, keys))
                    return
                except OSError:
                    pass
            self._unheard = True
        raise CioError("the agent stopped listening to this sync worker (a stop, or the agent is gone)",
                       code="sync_worker_unheard")


class _Summed:
    """The outcomes list a worker's sync appends to (from several threads): summed as they come,
    not held one per content (tens of thousands of objects to keep and to send)."""

    def __init__(self) -> None:
        self.total = _Placed()
        self._lock = threading.Lock()

    def append(self, outcome: _Placed) -> None:
        with self._lock:
            self.total.add(outcome)


def serve(conn: Connection) -> None:
    """Take one share (storage, cache, groups, and where the parent found files without a name
    can be made, per filesystem, or None for nowhere), fetch and place it as the parent would,
    then answer ("done", outcomes, MD5 records, failures), or ("failed", error) when the share
    could not even begin. The parent probed every destination before the workers started: a
    probe's short-lived name is never in the tree while another worker copies."""
    try:
        storage, cache, groups, unnamed = conn.recv()
        progress = _SentProgress(conn)
        syncer = InputSync(storage.for_split_worker(), cache, None, PathMap(), progress=progress, processes=1)
        outcomes = _Summed()
        records: list[_Record] = []
        failures: list[_Failure] = []
        names = None if unnamed is None else UnnamedFiles.open(unnamed)
        try:
            syncer._download(groups, outcomes, records, failures, names)  # type: ignore[arg-type]
        finally:
            if names is not None:
                names.close()
        progress.flush()
        answer: tuple = ("done", [outcomes.total], records, failures)
    except BaseException as exc:  # noqa: BLE001  (told to the parent, which fails the share)
        answer = ("failed", exc)
    try:
        conn.send(_portable(answer))
    except OSError:
        pass  # nobody is listening any more: nothing to tell


def _portable(answer: tuple) -> tuple:
    """``answer`` with each error that would not come out of a pickle whole (an exception whose
    arguments do not rebuild it, or a class the parent cannot import) as a CioError of its text,
    its type named and its code kept."""

    def sendable(exc: BaseException) -> BaseException:
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:  # noqa: BLE001  (any way a pickle can fail)
            return CioError(f"{type(exc).__name__}: {exc}", code=getattr(exc, "code", None) or "place_failed")

    def sendables(failures: list[_Failure]) -> list[_Failure]:
        return [_Failure(f.targets, f.key, sendable(f.error)) for f in failures]

    if answer[0] == "failed":
        return ("failed", sendable(answer[1]))
    _, outcomes, records, failures = answer
    for outcome in outcomes:
        outcome.failures = sendables(outcome.failures)
    return ("done", outcomes, records, sendables(failures))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m cio_worker.node.sync_worker FD (started by the agent's input sync, "
              "FD its end of a socket pair)", file=sys.stderr)
        return 2
    conn = Connection(int(argv[1]))
    try:
        serve(conn)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
