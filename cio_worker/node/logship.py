"""A task's log off the instance: its new lines shipped to the queue every few seconds while the
attempt runs (``cio-worker logs --follow`` reads them from anywhere), and the whole log uploaded
to the job's storage when the attempt ends, at ``_logs/<job>/<task>/<attempt>-<lease>.log``
(the lease's first characters keep an attempt number that a ``retry`` starts again unique).

Shipping is bounded and never touches the render: one shipment carries at most
``LOG_SHIPMENT_CAP`` bytes of whole lines, a log that outruns the shipper is skipped ahead to its
newest ``LOG_TAIL_CAP`` bytes (the queue would keep no more), and a shipment the queue does not
take is logged and tried again from the same offset at the next tick.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable

from cio_worker.errors import LeaseLost
from cio_worker.queue import Lease, Queue
from cio_worker.queue.base import LOG_SHIPMENT_CAP, LOG_TAIL_CAP
from cio_worker.storage import Storage, UploadItem

LOG_PREFIX = "_logs"

logger = logging.getLogger(__name__)


def log_key(job_id: str, task_id: str, attempt: int, token: str) -> str:
    """Where an attempt's log goes under the job's storage URL."""
    return f"{LOG_PREFIX}/{job_id}/{task_id}/{attempt}-{token[:8]}.log"


class LogShipper:
    """Ships the new lines of the file ``path_of()`` names (None until it is known) through
    ``queue.append_log`` every ``interval`` seconds, on its own thread; ``stop`` ships the rest."""

    def __init__(self, queue: Queue, lease: Lease, path_of: Callable[[], Path | None], *, interval: float = 5.0,
                 shipment_cap: int = LOG_SHIPMENT_CAP, tail_cap: int = LOG_TAIL_CAP,
                 log: logging.Logger | None = None) -> None:
        self.queue, self.lease, self.path_of = queue, lease, path_of
        self.interval, self.shipment_cap, self.tail_cap = interval, shipment_cap, tail_cap
        self.log = log or logger
        self.position = 0  # bytes of the file read so far
        self.offset = 0  # bytes of the log as shipped (UTF-8), skipped bytes counted
        self.shipments = 0
        self.failures = 0
        self._lost = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one shipment at a time
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return callable(getattr(self.queue, "append_log", None))

    def start(self) -> "LogShipper":
        """Ship every ``interval`` seconds from now on (0: only when asked, and at ``stop``)."""
        if self.enabled and self.interval > 0:
            self._thread = threading.Thread(target=self._run, name="log-ship", daemon=True)
            self._thread.start()
        return self

    def stop(self, final: bool = True, timeout: float = 5.0) -> None:
        """Stop the thread; with ``final``, ship what is left (the render has ended), bounded by
        ``timeout`` seconds of shipments."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if final and self.enabled:
            done = threading.Event()

            def rest() -> None:
                try:
                    while self.ship(final=True):
                        pass
                finally:
                    done.set()

            threading.Thread(target=rest, name="log-ship-last", daemon=True).start()
            done.wait(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for _ in range(4):  # catch up a little on a chatty log, never without bound
                if not self.ship() or self._stop.is_set():
                    break

    def ship(self, final: bool = False) -> bool:
        """One shipment of the lines written since the last; True when there may be more."""
        with self._lock:
            if self._lost:
                return False
            path = self.path_of()
            if path is None:
                return False
            try:
                chunk, skipped = self._read(path, final)
            except OSError:
                return False  # not there yet (the render has not started), or gone
            if not chunk:
                return False
            text = chunk.decode("utf-8", "replace")
            try:
                self.queue.append_log(self.lease, self.offset + skipped, text)  # type: ignore[attr-defined]
            except LeaseLost:
                self._lost = True
                return False
            except Exception as exc:  # noqa: BLE001 - a shipment never matters to the render
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    self.log.warning("%s: shipping the task log failed (%d times): %s", self.lease.label,
                                     self.failures, str(exc)[:300])
                return False
            self.shipments += 1
            self.position += skipped + len(chunk)
            self.offset += skipped + len(text.encode("utf-8"))
            return True

    def _read(self, path: Path, final: bool) -> tuple[bytes, int]:
        """(the next whole lines, at most a shipment, bytes skipped before them)."""
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            skipped = 0
            if size - self.position > self.tail_cap:  # the queue keeps no more than this: go on from there
                skipped = size - self.tail_cap - self.position
            handle.seek(self.position + skipped)
            chunk = handle.read(min(self.shipment_cap, size - self.position - skipped))
        if skipped:
            newline = chunk.find(b"\n")
            if newline < 0:
                return b"", 0
            skipped += newline + 1
            chunk = chunk[newline + 1:]
        if not final and len(chunk) < self.shipment_cap:
            cut = chunk.rfind(b"\n")
            chunk = chunk[:cut + 1] if cut >= 0 else b""  # a line still being written waits
        elif len(chunk) == self.shipment_cap:
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                chunk = chunk[:cut + 1]
        return chunk, skipped


def upload_log(open_storage: Callable[[], Storage], key: str, path: Path, timeout: float,
               log: logging.Logger | None = None) -> bool:
    """Upload ``path`` to ``key`` of the storage ``open_storage()`` gives, waiting ``timeout``
    seconds at most (the upload goes on in the background past that); True when it is in storage.
    Failures are logged, never raised."""
    log = log or logger
    done = threading.Event()
    result = {"ok": False}

    def run() -> None:
        try:
            with open_storage() as storage:
                storage.upload([UploadItem(key, path, size=path.stat().st_size)])
            result["ok"] = True
        except Exception as exc:  # noqa: BLE001 - the log is a courtesy; the report goes on
            log.warning("uploading the task log %s to %s failed: %s", path, key, str(exc)[:300])
        finally:
            done.set()

    if timeout <= 0:
        return False
    threading.Thread(target=run, name="log-upload", daemon=True).start()
    if not done.wait(timeout):
        log.warning("uploading the task log %s took over %.1f s; reporting without its location", path, timeout)
        return False
    return result["ok"]
