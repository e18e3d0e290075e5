"""A coordinator that can go down and come back on the same port (a restart, an outage), served by
uvicorn in a thread of the test process, like ``tests.coordinators.serving``.

    with Coordinator(queue, config) as coordinator:   # on a free loopback port
        agent_queue = HttpQueue(coordinator.url, token)
        coordinator.stop()                             # connections are refused now
        coordinator.start()                            # the same URL answers again
"""

from __future__ import annotations

import socket
import threading
import time


class Coordinator:
    def __init__(self, queue, config=None, *, port: int = 0, **uvicorn_options) -> None:
        self.queue = queue
        self.config = config
        self.port = port
        self.options = uvicorn_options
        self._server = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("the coordinator has not been started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, timeout: float = 20.0) -> "Coordinator":
        """Serve (again) on the same port; a fresh app each time, like a restarted process."""
        import uvicorn

        from cio_worker.coordinator.app import create_app

        if self._server is not None:
            return self
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if not self.port or time.monotonic() > deadline:
                    sock.close()
                    raise
                time.sleep(0.05)
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(self.queue, self.config), log_level="warning",
                                               lifespan="on", **self.options))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="coordinator", daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise RuntimeError("the coordinator did not start")
            time.sleep(0.01)
        self._server, self._thread, self._sock = server, thread, sock
        self.starts += 1
        return self

    def stop(self) -> None:
        """Stop serving: from now on connections to the port are refused."""
        server, thread, sock = self._server, self._thread, self._sock
        self._server = self._thread = self._sock = None
        if server is None:
            return
        server.should_exit = True
        if thread is not None:
            thread.join(20)
        if sock is not None:
            sock.close()

    def __enter__(self) -> "Coordinator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
