"""systemd's notify protocol (sd_notify(3)) for services started with ``Type=notify``.

A datagram of ``KEY=VALUE`` lines to the unix socket named by ``$NOTIFY_SOCKET`` (a path, or
``@name`` in the abstract namespace): ``READY=1`` once the service works, ``STATUS=`` a line for
``systemctl status``, ``WATCHDOG=1`` while it is alive and ``STOPPING=1`` when it begins to stop.
With ``WatchdogSec=`` systemd sets ``$WATCHDOG_USEC``; a service that sends no ``WATCHDOG=1`` for
that long is killed (SIGABRT) and restarted. ``alive()`` pings at most every half of it: the
caller's loop calls it on every turn, so a wedged loop stops the pings. Without
``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, MutableMapping

ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass
class Notifier:
    address: str | None = None  # $NOTIFY_SOCKET; None: nobody listens
    watchdog_seconds: float | None = None  # $WATCHDOG_USEC; None: no watchdog
    clock: Callable[[], float] = time.monotonic
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("cio_worker.node.systemd"))
    _last_ping: float | None = field(default=None, init=False, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _failed: bool = field(default=False, init=False, repr=False)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str], *, pid: int | None = None, **kwargs) -> "Notifier":
        """What systemd gave this process, taken out of ``environ`` (as sd_notify's
        unset_environment does) so that renders and other children do not inherit it."""
        address, usec, watchdog_pid = (environ.pop(name, None) for name in ENVIRONMENT)
        watchdog = None
        if usec and (not watchdog_pid or watchdog_pid == str(os.getpid() if pid is None else pid)):
            try:
                watchdog = int(usec) / 1e6 if int(usec) > 0 else None
            except ValueError:
                logging.getLogger("cio_worker.node.systemd").warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return cls(address or None, watchdog, **kwargs)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def ping_seconds(self) -> float | None:
        """How often ``alive()`` pings: half the watchdog's time, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_seconds is None else self.watchdog_seconds / 2

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines; False when nobody listens or the send failed (logged once)."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, target)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                self.log.warning("cannot notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def alive(self) -> None:
        """A turn of the service's loop: ``WATCHDOG=1`` when half the watchdog time has passed."""
        if self.address is None or self.watchdog_seconds is None:
            return
        with self._guard:
            now = self.clock()
            if self._last_ping is not None and now - self._last_ping < self.watchdog_seconds / 2:
                return
            self._last_ping = now
        self.notify("WATCHDOG=1")
