"""A lean HTTP/1.1 keep-alive client for generating a fleet's load from one process.

The agents of a real fleet run on their own machines; here thousands of them share two cores
with the coordinator and PostgreSQL, so their client must cost as little as possible, or the
benchmark measures its own client. Each ``Connection`` keeps one socket open and sends
pre-built requests on it (JSON bodies, a bearer token), reading back the status and body by
Content-Length: about a tenth of a general-purpose client's CPU per request.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

from cio_worker.coordinator.collector import PacedCollector


class Connection:
    """One keep-alive connection to ``base`` (http://host:port); reopened after the server closes it."""

    def __init__(self, base: str, token: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._head = (f"Host: {self.host}:{self.port}\r\nAuthorization: Bearer {token}\r\n"
                      "Content-Type: application/json\r\n").encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        """POST ``body`` as JSON; (status, the decoded JSON answer or None)."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (path.encode(), self._head, len(raw), raw)
        for attempt in (1, 2):
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            try:
                self._writer.write(request)
                return await self._answer()
            except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _answer(self) -> tuple[int, Any]:
        assert self._reader is not None
        status_line = await self._reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split(None, 2)[1])
        length, close = 0, False
        while True:
            line = await self._reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        data = await self._reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, (json.loads(data) if data and status == 200 else None)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def run(main: Any) -> Any:
    """Run a coroutine on uvloop where it is installed (as the coordinator does), else asyncio,
    with the garbage collector paced as the coordinator paces it: ten thousand simulated agents
    are as many live objects as the coordinator holds for them, and Python's own schedule stopped
    this process for up to a second at a time, after which its agents' reports left in a burst."""

    async def paced() -> Any:
        collector = PacedCollector()
        collector.start(asyncio.get_running_loop())
        try:
            return await main
        finally:
            collector.stop()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(paced())
    return uvloop.run(paced())
