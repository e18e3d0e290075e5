"""uvicorn's HTTP protocol with each response leaving in one send.

uvicorn writes a response's head and its body with two ``transport.write`` calls; on a socket
with nothing queued each is a system call and a packet of its own, and the client wakes for
each. An agent's reply is a few hundred bytes, so at a fleet's rate that doubles the kernel's
work per request. Here the writes made in one turn of the event loop are joined and sent at the
end of it (the head and body of a reply are written in the same turn).

The protocol also tells a request when its client goes away, through the ASGI scope's
``extensions[DISCONNECT_EXTENSION]``: ``watch(callback)`` has ``callback()`` called (once) when
the connection is lost, at once if it is lost already; ``watch(None)`` stops that. ASGI alone
says so only to a pending ``receive()``, which a long poll would have to keep as a task of its
own, with its wake-ups, for all its wait.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

DISCONNECT_EXTENSION = "cio.on_disconnect"


def _LOST() -> None:
    """Marks a connection already lost (never called)."""


class CoalescingTransport:
    """A transport whose writes wait for the end of the current loop turn and go out together."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()  # what was written goes before the close, as with the transport itself
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending or ()))

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


def coalescing_protocol() -> Any:
    """uvicorn's httptools protocol on a ``CoalescingTransport``; None without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        # ``_on_lost``: the watching request's callback, None, or _LOST once the connection is lost
        # (one attribute: with ten thousand connections, each attribute more grows every instance).
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._on_lost: Callable[[], None] | None = None
            super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["extensions"] = {DISCONNECT_EXTENSION: self._watch}  # type: ignore[typeddict-unknown-key]

        def _watch(self, callback: Callable[[], None] | None) -> None:
            if self._on_lost is _LOST:  # gone before the request began to watch: told at once
                if callback is not None:
                    callback()
                return
            self._on_lost = callback

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            callback, self._on_lost = self._on_lost, _LOST
            if callback is not None and callback is not _LOST:
                callback()

    return CoalescingHttpToolsProtocol
