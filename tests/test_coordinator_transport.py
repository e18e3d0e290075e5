"""The coordinator's uvicorn protocol (coordinator/transport.py): a reply leaves in one write, and
a request is told when its client goes away (the ``cio.on_disconnect`` scope extension)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

from cio_worker.coordinator.transport import DISCONNECT_EXTENSION, CoalescingTransport, coalescing_protocol
from tests.fleet import serving_app


class RecordingTransport:
    """The transport underneath: what was written, in which calls."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def test_writes_made_in_one_loop_turn_leave_in_one_write_and_a_close_sends_what_was_written() -> None:
    async def main() -> tuple[list[bytes], list[bytes], list[bytes]]:
        under = RecordingTransport()
        transport = CoalescingTransport(under, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.writelines([b"{", b"}"])
        assert transport.get_write_buffer_size() == 21 and under.writes == []
        await asyncio.sleep(0)
        first = list(under.writes)
        transport.write(b"next")
        await asyncio.sleep(0)
        second = list(under.writes)
        transport.write(b"last")
        transport.close()
        return first, second, list(under.writes) if under.closed else []

    first, second, last = asyncio.run(main())
    assert first == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
    assert second == first + [b"next"]
    assert last == second + [b"last"]


def test_a_request_is_told_once_when_its_client_goes_away_and_not_after_it_stops_watching() -> None:
    seen: dict[str, Any] = {}
    told: list[str] = []
    done = threading.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await receive()  # the (empty) body
        watch = (scope.get("extensions") or {}).get(DISCONNECT_EXTENSION)
        seen[scope["path"]] = watch is not None
        if scope["path"] == "/served":  # answered, then the client leaves: nobody is told
            watch(lambda: told.append("served"))
            watch(None)
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"] == "/late":  # the client is gone before the request watches: told at once
            await asyncio.sleep(0.5)
        left = asyncio.Event()
        watch(lambda: (told.append(scope["path"]), left.set()))
        try:
            await asyncio.wait_for(left.wait(), 30)
        finally:
            done.set()

    with serving_app(app, http=coalescing_protocol()) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /served HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 204")
            sock.sendall(b"POST /waiting HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            deadline = time.monotonic() + 20
            while "/waiting" not in seen and time.monotonic() < deadline:
                time.sleep(0.01)
        assert done.wait(30)
        done.clear()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /late HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert done.wait(30)
    assert seen == {"/served": True, "/waiting": True, "/late": True}
    assert told == ["/waiting", "/late"]
