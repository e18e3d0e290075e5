"""The agents' hot routes (claim, heartbeat, report, complete) served straight from ASGI.

A fleet's traffic is almost all these four calls; through the web framework's routing,
dependency and response machinery each cost several times what its own work does. Here a
request is matched by path, its bearer token checked, its body read up to the limit and validated
by the same pydantic model the framework would use (``model_validate_json``), and the answer sent
as JSON, with the same status codes and error bodies as the framework's routes give (the routes
stay declared there for ``/openapi.json`` and for every other method).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable, Mapping

from pydantic import BaseModel, ValidationError

from cio_worker.coordinator.transport import DISCONNECT_EXTENSION

log = logging.getLogger("cio_worker.coordinator")

Reply = tuple[int, dict[str, Any] | None, dict[str, str]]  # status, JSON body (None: no body), headers


@dataclass(frozen=True)
class FastRoute:
    model: type[BaseModel]
    scope: str  # the token scope the route needs
    # ``handler(model)``, or ``handler(model, departure)`` for a long wait; None answers 204 No Content.
    handler: Callable[..., Awaitable[dict[str, Any] | None]]
    # An answer that carries a lease (a claim, with its long poll; a completion that claims the
    # next task): the handler is told through its ``Departure`` when the client goes away
    # meanwhile (and should end its wait), and an answer it made that can no longer be delivered
    # is handed here (a lease given back) rather than sent to nobody.
    undelivered: Callable[[dict[str, Any]], Awaitable[None]] | None = None


class Departure:
    """Whether a long wait's client is still there: ``gone`` once it has disconnected, when the
    callback set with ``on_leave`` (one at a time; None clears it) is called."""

    __slots__ = ("gone", "_callback")

    def __init__(self) -> None:
        self.gone = False
        self._callback: Callable[[], None] | None = None

    def on_leave(self, callback: Callable[[], None] | None) -> None:
        self._callback = callback

    def leave(self) -> None:
        if not self.gone:
            self.gone = True
            callback, self._callback = self._callback, None
            if callback is not None:
                callback()


class BodyTooLarge(Exception):
    pass


_GONE = object()  # the client went away before its answer was ready


def is_json(media_type: bytes) -> bool:
    """``application/json`` or ``application/*+json``, as the framework reads bodies."""
    return media_type == b"application/json" or (media_type.startswith(b"application/") and media_type.endswith(b"+json"))


def json_bytes(payload: Mapping[str, Any]) -> bytes:
    """JSON as the framework's responses write it."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def send_reply(send: Callable, reply: Reply) -> int:
    """Send ``reply``; return its status."""
    status, payload, headers = reply
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if payload is None:
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": b""})
        return status
    body = json_bytes(payload)
    raw += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
    return status


def _left(departure: Departure, receiving: asyncio.Future) -> None:
    if not receiving.cancelled() and receiving.exception() is None \
            and receiving.result().get("type") == "http.disconnect":
        departure.leave()


class FastRoutes:
    """An ASGI app in front of ``app``: POSTs to ``routes`` are answered here, everything else
    (other routes and methods, the lifespan) goes to ``app``.

    ``authenticate(header, scope)`` returns the token or raises; ``refuse(exc)`` turns any error
    into a reply (4xx for the caller's mistakes, 503 for the queue's); ``invalid(errors)`` turns
    pydantic's errors into the 422 body; ``limit`` is the body limit in bytes; ``observe(route,
    method, status, seconds)`` is told of every HTTP request answered, fast or not (its route as
    the framework's template, so that ids do not make new series)."""

    def __init__(self, app: Any, *, routes: Mapping[str, FastRoute], authenticate: Callable[[str, str], Awaitable[Any]],
                 refuse: Callable[[BaseException], Reply], invalid: Callable[[list], dict[str, Any]],
                 limit: int, too_large: Callable[[], Reply],
                 observe: Callable[[str, str, int, float], None] | None = None) -> None:
        self.app, self.fast = app, dict(routes)
        self.authenticate, self.refuse, self.invalid = authenticate, refuse, invalid
        self.limit, self.too_large, self.observe = limit, too_large, observe

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = self.fast.get(path) if scope["method"] == "POST" else None
        if self.observe is None:
            if route is None:
                return await self.app(scope, receive, send)
            await self._serve(route, scope, receive, send)
            return
        started, status = time.perf_counter(), 0  # 0: no answer (the client went away)
        if route is not None:
            try:
                status = await self._serve(route, scope, receive, send)
            finally:
                self.observe(path, "POST", status, time.perf_counter() - started)
            return

        async def sent(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        except Exception:
            status = status or 500
            raise
        finally:
            template = getattr(scope.get("route"), "path", "unmatched")
            self.observe(template, scope["method"], status, time.perf_counter() - started)

    async def _serve(self, route: FastRoute, scope: dict, receive: Callable, send: Callable) -> int:
        """Answer one request to a fast route; return the status sent (0: the client went away)."""
        authorization, declared, media = "", None, b""
        for key, value in scope["headers"]:
            if key == b"authorization":
                authorization = value.decode("latin-1")
            elif key == b"content-length":
                declared = value
            elif key == b"content-type":
                media = value.split(b";", 1)[0].strip().lower()
        try:
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                reply = self.too_large() if declared.isdigit() else (
                    400, {"error": "bad_request", "message": "Content-Length is not a number"}, {})
            elif not is_json(media):
                reply = (415, {"error": "unsupported_media_type",
                               "message": "send the body as JSON with 'Content-Type: application/json'"}, {})
            else:
                await self.authenticate(authorization, route.scope)
                body = await self._body(receive)
                if body is None:
                    return 0  # the client went away
                try:
                    model = route.model.model_validate_json(body)
                except ValidationError as exc:
                    reply = (422, self.invalid(exc.errors()), {})
                else:
                    if route.undelivered is None:
                        payload = await route.handler(model)
                    else:
                        payload = await self._unless_gone(route, model, scope, receive)
                        if payload is _GONE:
                            return 0
                    reply = (204, None, {}) if payload is None else (200, payload, {})
        except BodyTooLarge:
            reply = self.too_large()
        except Exception as exc:  # noqa: BLE001 - every error is answered; refuse() logs the unexpected
            reply = self.refuse(exc)
        return await send_reply(send, reply)

    async def _unless_gone(self, route: FastRoute, model: BaseModel, scope: dict, receive: Callable) -> Any:
        """The handler's answer, or ``_GONE`` when the client disconnected first (the handler is
        told through its ``Departure``; an answer it made all the same goes to
        ``route.undelivered``). The server tells of the disconnect through the scope's
        extension where it can; otherwise, with the body read whole, the server's next message
        is the disconnect, read by a task of its own."""
        departure = Departure()
        watch = (scope.get("extensions") or {}).get(DISCONNECT_EXTENSION)
        receiving = None
        if watch is not None:
            watch(departure.leave)
        else:
            receiving = asyncio.ensure_future(receive())
            receiving.add_done_callback(partial(_left, departure))
        try:
            answer = await route.handler(model, departure)
        finally:
            if receiving is None:
                watch(None)
            elif not receiving.done():
                receiving.cancel()
        if not departure.gone:
            return answer
        if answer is not None:
            assert route.undelivered is not None
            await route.undelivered(answer)
        return _GONE

    async def _body(self, receive: Callable) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise BodyTooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
