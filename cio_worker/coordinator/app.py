"""The coordinator's HTTP/JSON API (FastAPI), in front of any queue backend.

Every route checks its bearer token's scope first (no token or a bad one: 401; the wrong scope:
403), validates its body strictly (unknown fields, wrong types, oversized bodies: 4xx with the
field named), then calls the queue in a worker thread bounded by the database pool. A report on a
lease that is gone or belongs to another worker is 409; in every refused case nothing changes.

Claims are long polls: a claim that finds nothing waits on the server (``WorkSignal``) until work
arrives or the poll ends, instead of the agent asking again every few seconds. A watcher looks for
pending work once a second while anyone waits (one cheap query, however many wait) and reaps
expired leases, so work submitted through another coordinator also wakes this one's waiters.
While the queue is known to be empty, a new long poll waits without asking the database, and idle
agents' contact and status reports are gathered in memory and written together by the watcher:
thousands of idle agents cost a few queries a second, not one per request. A busy agent claims
its next task with its completion (``next_lease_seconds``): one request per task, not two.

The agents' hot calls (claim, heartbeat, report, complete, register) are answered by
``FastRoutes`` ahead of the framework, and the claims, completions and registrations that arrive
together go to the database as one transaction (``Batcher``); the framework serves the rest and
the API document.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, TypeVar

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cio_worker import __version__
from cio_worker.coordinator.batch import Batcher
from cio_worker.coordinator.collector import PacedCollector
from cio_worker.coordinator.fastpath import Departure, FastRoute, FastRoutes, Reply
from cio_worker.coordinator.metrics import CoordinatorMetrics
from cio_worker.coordinator.signal import WorkSignal
from cio_worker.coordinator.web.routes import WebView, mount as mount_web
from cio_worker.errors import CioError, DocumentError, LeaseLost, QueueError
from cio_worker.queue import wire
from cio_worker.queue.base import LOG_SHIPMENT_CAP, Lease, WorkerStatus
from cio_worker.queue.credentials import TokenRow
from cio_worker.queue.sql import Completion, ReportOutcome, SqlQueue

T = TypeVar("T")
log = logging.getLogger("cio_worker.coordinator")

MAX_BODY = 64 * 1024 * 1024  # a job of 100,000 tasks fits; nothing else comes near
MAX_SMALL_BODY = 4 * 1024 * 1024


@dataclass(frozen=True)
class CoordinatorConfig:
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    long_poll_seconds: float = 20.0
    watch_seconds: float = 1.0  # how often to look for work while agents wait, and to reap
    token_cache_seconds: float = 5.0  # a revoked token is refused within this long
    db_threads: int = 8  # queue calls at once; match the queue's connection pool
    gone_after: float = 120.0
    metrics_token_required: bool = False  # /metrics asks for an owner token
    metrics_cache_seconds: float = 1.0  # /metrics counts tasks and workers at most this often


# -- request bodies --------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Name = Field(min_length=1, max_length=200)
OpId = Field(default=None, min_length=1, max_length=100)


class LeaseRef(_Strict):
    job_id: str = Field(min_length=1, max_length=32)
    task_id: str = Field(min_length=1, max_length=32)
    token: str = Field(min_length=1, max_length=128)
    worker: str = Name
    expires_at: float | None = None


class RegisterBody(_Strict):
    worker: str = Name
    info: dict[str, Any] = Field(default_factory=dict)


class ClaimBody(_Strict):
    worker: str = Name
    lease_seconds: float | None = Field(default=None, gt=0, le=86_400)
    wait_seconds: float | None = Field(default=None, ge=0, le=300)
    # A claim with an op id has its lease recorded under it; a copy sent again after a lost
    # answer says ``resend`` and gets that lease back, while it is still the worker's.
    op_id: str | None = OpId
    resend: bool = False


class StatusBody(_Strict):
    state: str = Field(min_length=1, max_length=32)
    progress: float | None = Field(default=None, ge=0, le=100)
    detail: str = Field(default="", max_length=500)


def poll_length(wait: float, draw: float) -> float:
    """How long a long poll of ``wait`` seconds waits, for a ``draw`` in [0, 1): a random point
    of its last quarter. A fleet that booted together would otherwise have all its polls end,
    and come back, in the same second, every poll; each poll an idle agent makes costs the
    coordinator about as much as any request, so the polls end late rather than anywhere. The
    wait itself ends on ``WorkSignal``'s grid, up to a tenth of a second after this."""
    return wait * (0.75 + 0.25 * draw) if wait > 2 else wait


def worker_status(body: StatusBody) -> WorkerStatus:
    """The queue's status from a validated body (the queue's own rules checked too)."""
    status = WorkerStatus(body.state, body.progress, body.detail)
    status.validate()
    return status


class HeartbeatBody(_Strict):
    lease: LeaseRef
    lease_seconds: float | None = Field(default=None, gt=0, le=86_400)
    status: StatusBody | None = None


class DownloadFileBody(_Strict):
    relative_path: str = Field(min_length=1, max_length=4096)
    md5: str = Field(min_length=1, max_length=64)
    size: int = Field(ge=0)
    key: str = Field(min_length=1, max_length=1024)


class DownloadBody(_Strict):
    output_dir: str = Field(min_length=1, max_length=4096)
    files: list[DownloadFileBody] = Field(default_factory=list, max_length=100_000)


Figure = Field(default=None, ge=0)
FigureText = Field(default="", max_length=2048)


class FiguresBody(_Strict):
    """What the attempt took (``AttemptFigures``); every figure may be null (not measured)."""

    wall_seconds: float | None = Figure
    cpu_seconds: float | None = Figure
    peak_rss_bytes: int | None = Figure
    sync_bytes: int | None = Figure
    sync_seconds: float | None = Figure
    upload_bytes: int | None = Figure
    upload_seconds: float | None = Figure
    instance_type: str = FigureText
    hourly_price: float | None = Figure
    cost: float | None = Figure
    currency: str = FigureText
    log: str = FigureText
    drain_seconds: float | None = Figure
    storage_scheme: str = FigureText


class CompleteBody(_Strict):
    lease: LeaseRef
    download: DownloadBody | None = None
    op_id: str | None = OpId
    figures: FiguresBody | None = None
    # Claim the worker's next task in the same request (no wait): it comes back as "next".
    next_lease_seconds: float | None = Field(default=None, gt=0, le=86_400)


class FailBody(_Strict):
    lease: LeaseRef
    reason: str = Field(max_length=10_000)
    op_id: str | None = OpId
    figures: FiguresBody | None = None


class AppendLogBody(_Strict):
    lease: LeaseRef
    offset: int = Field(ge=0)
    text: str = Field(max_length=LOG_SHIPMENT_CAP)  # characters; the queue checks the bytes


class ReleaseBody(_Strict):
    lease: LeaseRef
    cause: Literal["preempted", "released"] = "preempted"
    frames_done: str = Field(default="", max_length=100_000)
    download: DownloadBody | None = None
    reason: str = Field(default="", max_length=10_000)
    op_id: str | None = OpId
    figures: FiguresBody | None = None


class WorkerReportBody(_Strict):
    worker: str = Name
    status: StatusBody


class NewTaskBody(_Strict):
    frames: str = Field(min_length=1, max_length=100_000)
    command: str = Field(min_length=1, max_length=100_000)
    tile: int = 1
    tiles: int = 1
    scout: bool = False


class RetryBody(_Strict):
    tasks: list[str] | None = Field(default=None, max_length=100_000)  # None: every failed task


class CreateJobBody(_Strict):
    job: dict[str, Any]
    tasks: list[NewTaskBody] = Field(max_length=100_000)


# -- errors ----------------------------------------------------------------------------------------

_STATUS_BY_CODE = {
    "unknown_job": 404, "unknown_task": 404, "unknown_download": 404, "unknown_worker": 404,
    "queue_unavailable": 503, "queue_db": 503, "queue_closed": 503, "queue_busy": 503,
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"the request body is larger than {limit} bytes")


def refusal(exc: BaseException) -> Reply:
    """The answer to an error raised while serving a request: the caller's mistakes and lost
    leases are 4xx, a queue that cannot answer 503, anything else a logged 500."""
    if isinstance(exc, ApiError):
        return exc.status, {"error": exc.code, "message": exc.message}, exc.headers
    if isinstance(exc, DocumentError):
        return 422, {"error": exc.code, "field": exc.field, "message": str(exc)}, {}
    if isinstance(exc, CioError):
        return _status_of(exc), {"error": exc.code, "message": str(exc)}, {}
    log.error("coordinator: unexpected error serving a request", exc_info=exc)
    return 500, {"error": "internal", "message": "the coordinator failed to serve this request; its log says why"}, {}


def invalid_body(errors: list) -> dict[str, Any]:
    """pydantic's errors as one 422 body naming the first field (and listing up to four more)."""
    problems = [(_field_path(err.get("loc", ())), str(err.get("msg", "is invalid"))) for err in errors[:5]]
    if not problems:
        problems.append(("body", "is invalid"))
    field, problem = problems[0]
    if len(problems) > 1:
        problem += "; also " + "; ".join(f"{w}: {m}" for w, m in problems[1:])
    return {"error": "bad_document", "field": field, "message": f"{field}: {problem}"}


def _status_of(exc: CioError) -> int:
    if isinstance(exc, LeaseLost):
        return 409
    if isinstance(exc, DocumentError):
        return 422
    if isinstance(exc, QueueError):
        return _STATUS_BY_CODE.get(exc.code, 400)
    return 400


def _field_path(loc: Any) -> str:
    """pydantic's location as our documents name fields: ``download.files[0].size``."""
    text = ""
    for part in loc:
        if part == "body" and not text:
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


# -- the app ---------------------------------------------------------------------------------------

class _BodyLimit:
    """Refuse bodies over the limit before reading them whole (413), declared or streamed."""

    def __init__(self, app: Any, limit: Callable[[str], int]) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        refused = _too_large(limit)
        too_big = _error_response(refused.status, refused.code, refused.message)
        if declared is not None:
            try:
                if int(declared) > limit:
                    return await too_big(scope, receive, send)
            except ValueError:
                return await _error_response(400, "bad_request", "Content-Length is not a number")(scope, receive, send)
        if declared is None and scope.get("method") not in ("GET", "HEAD"):
            # A streamed (chunked) body: read it here up to the limit and hand it on whole, since
            # FastAPI answers 400 to any error raised while it reads a body.
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > limit:
                    return await too_big(scope, receive, send)
                if not message.get("more_body", False):
                    break
            whole: dict | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

            async def replay() -> dict:
                nonlocal whole
                if whole is not None:
                    message, whole = whole, None
                    return message
                return await receive()

            return await self.app(scope, replay, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return message

        try:
            await self.app(scope, counted, send)
        except ApiError as exc:
            await _error_response(exc.status, exc.code, exc.message)(scope, receive, send)


def create_app(queue: SqlQueue, config: CoordinatorConfig | None = None,
               collector: PacedCollector | None = None) -> FastRoutes:
    """The coordinator as an ASGI app: the agents' hot routes answered by ``FastRoutes`` in front
    of the FastAPI app that serves the rest (``.app``; its ``.state`` is the wrapper's too).
    ``collector``, if given, runs Python's garbage collector from the app's event loop while the
    app lives (a process-wide setting: ``serve`` passes one); its pauses are in ``/metrics``."""
    config = config or CoordinatorConfig()
    signal = WorkSignal()
    limiter = anyio.CapacityLimiter(config.db_threads)
    token_cache: dict[str, tuple[float, TokenRow | None]] = {}
    looking: dict[str, asyncio.Future] = {}  # token lookups at the database now
    stop = asyncio.Event()
    metrics = CoordinatorMetrics(lambda: queue.counts(config.gone_after), counts_ttl=config.metrics_cache_seconds)

    async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=limiter)

    # What the watcher writes next: workers heard from (a claim), and their latest reported status.
    seen: set[str] = set()
    statuses: dict[str, Any] = {}
    known_workers: set[str] = set()  # registered and idle as written: another "idle" may wait for the watcher
    empty = {"now": False}  # a claim found nothing and no work has been announced since

    def work_arrived(count: int) -> None:
        if count > 0:
            empty["now"] = False
            signal.notify(count)

    async def flush_contacts() -> None:
        if not seen and not statuses:
            return
        batch_seen, batch_statuses = list(seen), dict(statuses)
        seen.clear()
        statuses.clear()
        await call(queue.touch_workers, batch_seen, batch_statuses)

    async def watch() -> None:
        """Reap expired leases; while agents wait, look for work and wake one waiter per task;
        write the workers' gathered contact."""
        while not stop.is_set():
            try:
                reaped = await call(queue.reap)
                metrics.leases_expired.inc(reaped)
                if signal.waiting:
                    found = await call(queue.pending, signal.waiting)
                    work_arrived(max(found, reaped))
                await flush_contacts()
            except CioError as exc:
                log.warning("coordinator watch: %s", exc)
            except Exception:  # noqa: BLE001  (the watch must outlive any one failure)
                log.exception("coordinator watch failed")
            try:
                await asyncio.wait_for(stop.wait(), config.watch_seconds)
            except asyncio.TimeoutError:
                pass

    from contextlib import asynccontextmanager

    web = WebView(queue, call, refusal, gone_after=config.gone_after, before_workers=flush_contacts)

    if collector is not None and collector.on_pause is None:
        collector.on_pause = metrics.gc_pause

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        task = asyncio.create_task(watch())
        if collector is not None:
            collector.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            if collector is not None:
                collector.stop()
            web.close()
            stop.set()
            signal.notify(signal.waiting)
            await task
            try:
                await flush_contacts()
            except CioError as exc:
                log.warning("coordinator: last contact of %d workers not written: %s", len(seen) + len(statuses), exc)

    app = FastAPI(
        title="cio_worker coordinator",
        version=__version__,
        description="The farm's queue over HTTP: agents claim, heartbeat and report; owners submit, watch and download.",
        lifespan=lifespan,
        redirect_slashes=False,  # exact paths: "/v1/claim/" is a 404, not a 307 that re-sends the body
    )
    app.state.signal, app.state.metrics = signal, metrics

    # -- auth ----------------------------------------------------------------------------------

    async def authenticate(header: str, needed: str | None = None) -> TokenRow:
        """The token an Authorization header carries (401 without a good one), with scope ``needed`` (403)."""
        scheme, _, text = header.partition(" ")
        if scheme.lower() != "bearer" or not text.strip():
            raise ApiError(401, "unauthorized", "no bearer token: send 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})
        text = text.strip()
        now = time.monotonic()
        cached = token_cache.get(text)
        if cached is None or now - cached[0] > config.token_cache_seconds:
            # One lookup per token at a time: when a fleet's shared token is due, the requests that
            # arrive meanwhile wait for that lookup instead of each asking the database.
            lookup = looking.get(text)
            if lookup is None:
                lookup = looking[text] = asyncio.ensure_future(call(queue.authenticate, text))
                lookup.add_done_callback(lambda _: looking.pop(text, None))
            row = await asyncio.shield(lookup)
            if len(token_cache) > 10_000:
                token_cache.clear()
            token_cache[text] = cached = (now, row)
        token = cached[1]
        if token is None:
            raise ApiError(401, "unauthorized", "the bearer token is unknown, revoked or malformed",
                           {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if needed is not None and needed not in token.scopes:
            raise ApiError(403, "forbidden", f"token {token.name!r} has scope {', '.join(sorted(token.scopes))}, "
                           f"and this call needs {needed!r}")
        return token

    def scope(name: str) -> Callable:
        async def check(request: Request) -> TokenRow:
            return await authenticate(request.headers.get("authorization", ""), name)
        return check

    agent = Depends(scope("agent"))
    owner = Depends(scope("owner"))

    # -- errors --------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        status, payload, headers = refusal(exc)
        return JSONResponse(payload, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """FastAPI's own refusals (no such route, wrong method, an unreadable body) in our shape."""
        path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "..."
        if exc.status_code == 404:
            code, message = "not_found", f"there is no {path} here; /openapi.json lists the API"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow") or ""
            code, message = "method_not_allowed", f"{request.method} is not allowed on {path}" + (
                f" (use {allowed})" if allowed else "")
        else:
            code = "bad_request" if exc.status_code == 400 else f"http_{exc.status_code}"
            message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code < 400:
            return Response(status_code=exc.status_code, headers=exc.headers)
        return _error_response(exc.status_code, code, message, dict(exc.headers or {}))

    @app.exception_handler(CioError)
    async def _cio_error(_: Request, exc: CioError) -> JSONResponse:
        status, payload, headers = refusal(exc)
        return JSONResponse(payload, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(invalid_body(list(exc.errors())), status_code=422)

    # -- agents --------------------------------------------------------------------------------

    def settings() -> dict[str, float]:
        return {"lease_seconds": config.lease_seconds, "heartbeat_seconds": config.heartbeat_seconds,
                "long_poll_seconds": config.long_poll_seconds}

    @app.post("/v1/workers/register", tags=["agents"])
    async def register(body: RegisterBody, _: TokenRow = agent) -> dict:
        """Record a worker and what it runs on; answers how often to heartbeat and how long to long-poll."""
        return await do_register(body)

    # The calls that are nearly all of a fleet's traffic: written once here, served by the
    # fast path (``FastRoutes``) and declared to the framework below for the API document.

    async def do_register(body: RegisterBody) -> dict:
        await registrations.submit((body.worker, body.info))
        known_workers.add(body.worker)
        return {"worker": body.worker, "server_time": time.time(), **settings()}

    async def do_report(body: WorkerReportBody) -> dict:
        status = worker_status(body.status)
        if body.worker in known_workers and status.state == "idle":
            statuses[body.worker] = status
        else:
            statuses.pop(body.worker, None)
            await call(queue.worker_report, body.worker, status)  # an unknown worker is a 404 here
            if status.state == "idle":
                known_workers.add(body.worker)
            else:  # stopped, draining...: its next "idle" is a change of state, written at once too
                known_workers.discard(body.worker)
        return {"ok": True}

    async def do_claim(body: ClaimBody, departure: Departure | None = None) -> dict | None:
        """A lease, or None when the poll ended first; ``departure`` ends the wait when the agent
        goes away meanwhile (the caller gives back a lease made all the same). A resend finds the
        lease its first copy made, if any (``"replay": true``), before it claims anew."""
        if body.resend and body.op_id is not None:
            again = await call(queue.claimed_after, body.op_id, body.worker)
            if again is not None:
                return {"lease": wire.lease_to_dict(again), "replay": True, **settings()}
        lease_seconds = body.lease_seconds or config.lease_seconds
        wait = config.long_poll_seconds if body.wait_seconds is None else body.wait_seconds
        deadline = time.monotonic() + poll_length(wait, random.random())
        seen.add(body.worker)  # its contact, written by the watcher (a no-op for an unregistered name)
        timer = metrics.claim()
        on_leave = None if departure is None else departure.on_leave
        while True:
            if not (empty["now"] and wait > 0):
                lease = await claims.submit((body.worker, lease_seconds, body.op_id))
                if lease is not None:
                    timer.leased()
                    return {"lease": wire.lease_to_dict(lease), **settings()}
                empty["now"] = True
            left = deadline - time.monotonic()
            if left <= 0 or stop.is_set() or (departure is not None and departure.gone):
                timer.empty()
                return None
            began = time.monotonic()
            woken = await signal.wait(left, on_leave)
            timer.waited(began)
            if not woken:
                timer.empty()
                return None

    async def do_heartbeat(body: HeartbeatBody) -> dict:
        lease = wire.lease_ref_from_dict(body.lease.model_dump())
        status = None if body.status is None else worker_status(body.status)
        reply = await call(queue.heartbeat, lease, body.lease_seconds or config.lease_seconds, status)
        return {**wire.reply_to_dict(reply), **settings()}

    def figures_of(body: CompleteBody | FailBody | ReleaseBody) -> Any:
        return None if body.figures is None else wire.figures_from_dict(body.figures.model_dump())

    async def do_complete(body: CompleteBody, _departure: Departure | None = None) -> dict:
        """With ``next_lease_seconds``, the worker's next task comes back as ``next`` (None: there
        is none), claimed in the completion's transaction; a resend after a lost answer gets the
        lease claimed then, while it is still the worker's, claims nothing, and says
        ``"replay": true``. Should the agent be gone before the answer, the task it claimed goes
        back (``undelivered_completion``)."""
        lease = wire.lease_ref_from_dict(body.lease.model_dump())
        download = None if body.download is None else wire.new_download_from_dict(body.download.model_dump())
        figures = figures_of(body)
        timer = None if body.next_lease_seconds is None else metrics.claim()
        outcome = await completions.submit((lease, download, body.op_id, figures, body.next_lease_seconds))
        if not outcome.replay:  # a copy resent after a lost answer was counted when it was applied
            metrics.completions.inc()
            metrics.attempt("done", figures)
        if timer is None:
            return {"state": "done"}
        if not outcome.replay:  # a resend claims nothing: it gets the lease its first copy claimed
            if outcome.next is None:
                timer.empty()
                empty["now"] = True
            else:
                timer.leased()
        answer = {"state": "done", "next": None if outcome.next is None else wire.lease_to_dict(outcome.next), **settings()}
        return {**answer, "replay": True} if outcome.replay else answer

    async def undelivered_claim(answer: dict) -> None:
        """A claim answered as its agent went away: the lease goes back at no cost to the task
        (not a resend's: its first copy's answer may have reached the agent after all)."""
        if not answer.get("replay"):
            await give_back(wire.lease_from_dict(answer["lease"]))

    async def give_back_next(outcome: ReportOutcome) -> None:
        """A completion answered after its request was cancelled: the next task it claimed goes
        back. Not a resend's: another copy of the report may have delivered that lease."""
        if outcome.next is not None and not outcome.replay:
            await give_back(outcome.next)

    async def undelivered_completion(answer: dict) -> None:
        """A completion answered as its agent went away: the next task it claimed goes back (not
        a resend's, see ``give_back_next``)."""
        if answer.get("next") is not None and not answer.get("replay"):
            await give_back(wire.lease_from_dict(answer["next"]))

    async def give_back(lease: Lease) -> None:
        await call(queue.release, lease, "released", "", None, "claimed for a request that went away", None)
        work_arrived(1)

    # Claims, completions and registrations that arrive together share a transaction, one
    # transaction of each kind at a time: those that arrive meanwhile make the next one larger.
    # (Two at a time made smaller batches and cost the coordinator 1.44-1.61 ms of CPU per
    # claim+complete against 1.17-1.22 ms: 574-638 cycles/s against 719-764 in fleet.py.)
    # The other database threads serve every other call.
    inflight = 1
    claims: Batcher[tuple[str, float, str | None], Lease | None] = Batcher(
        lambda items: call(queue.claim_many, [worker for worker, _, _ in items], items[0][1],
                           [op_id for _, _, op_id in items]),
        key=lambda item: item[1], orphaned=give_back, max_inflight=inflight)
    completions: Batcher[Completion, ReportOutcome] = Batcher(
        lambda items: call(queue.complete_outcomes, items), max_inflight=inflight, orphaned=give_back_next)
    registrations: Batcher[tuple[str, dict], None] = Batcher(
        lambda items: call(queue.register_many, items), max_inflight=inflight)
    app.state.claims, app.state.completions = claims, completions

    @app.post("/v1/workers/report", tags=["agents"])
    async def worker_report(body: WorkerReportBody, _: TokenRow = agent) -> dict:
        """A worker's state between tasks. An idle worker's "still here" (the bulk of a large idle
        fleet's traffic) is written with others by the watcher within a second or so; a change of
        state (stopped, draining, ...) and a worker not yet known here are written at once."""
        return await do_report(body)

    @app.post("/v1/claim", tags=["agents"], responses={204: {"description": "no task before the poll ended"}})
    async def claim(body: ClaimBody, _: TokenRow = agent) -> Any:
        """Lease the next task; with ``wait_seconds``, wait on the server until one comes."""
        answer = await do_claim(body)
        return Response(status_code=204) if answer is None else answer

    @app.post("/v1/heartbeat", tags=["agents"])
    async def heartbeat(body: HeartbeatBody, _: TokenRow = agent) -> dict:
        """Extend a lease, say what the worker is doing; the answer says whether to cancel."""
        return await do_heartbeat(body)

    @app.post("/v1/complete", tags=["agents"])
    async def complete(body: CompleteBody, _: TokenRow = agent) -> dict:
        """The task is done; its outputs (if any) become a download record."""
        return await do_complete(body)

    @app.post("/v1/fail", tags=["agents"])
    async def fail(body: FailBody, _: TokenRow = agent) -> dict:
        lease = wire.lease_ref_from_dict(body.lease.model_dump())
        figures = figures_of(body)
        outcome = await call(queue.fail_outcome, lease, body.reason, body.op_id, figures)
        if not outcome.replay:
            metrics.failed(outcome.state)
            metrics.attempt("failed", figures)
            if outcome.state == "pending":
                work_arrived(1)
        return {"state": outcome.state}

    @app.post("/v1/release", tags=["agents"])
    async def release(body: ReleaseBody, _: TokenRow = agent) -> dict:
        lease = wire.lease_ref_from_dict(body.lease.model_dump())
        download = None if body.download is None else wire.new_download_from_dict(body.download.model_dump())
        figures = figures_of(body)
        outcome = await call(queue.release_outcome, lease, body.cause, body.frames_done, download, body.reason,
                             body.op_id, figures)
        if not outcome.replay:
            metrics.released(body.cause, outcome.state)
            metrics.attempt(body.cause, figures)
            if outcome.state == "pending":
                work_arrived(1)
        return {"state": outcome.state}

    @app.post("/v1/logs/append", tags=["agents"])
    async def append_log(body: AppendLogBody, _: TokenRow = agent) -> dict:
        """The next lines of a running task's log, for ``cio-worker logs --follow`` (the queue keeps
        the newest 256 KiB of each attempt); answers the offset the queue now has up to."""
        lease = wire.lease_ref_from_dict(body.lease.model_dump())
        return {"end": await call(queue.append_log, lease, body.offset, body.text)}

    @app.post("/v1/reap", tags=["agents"])
    async def reap(_: TokenRow = agent) -> dict:
        count = await call(queue.reap)
        metrics.leases_expired.inc(count)
        work_arrived(count)
        return {"reaped": count}

    # -- owners --------------------------------------------------------------------------------

    @app.post("/v1/jobs", tags=["owners"], status_code=201)
    async def create_job(body: CreateJobBody, _: TokenRow = owner) -> dict:
        tasks = [wire.new_task_from_dict(t.model_dump(), f"tasks[{i}]") for i, t in enumerate(body.tasks)]
        job_id = await call(queue.create_job, body.job, tasks)
        work_arrived(len(tasks))
        return {"job_id": job_id}

    @app.get("/v1/jobs", tags=["owners"])
    async def jobs(_: TokenRow = owner) -> dict:
        return {"jobs": [wire.summary_to_dict(s) for s in await call(queue.jobs)]}

    @app.get("/v1/jobs/{job_id}", tags=["owners"])
    async def job(job_id: str, _: TokenRow = owner) -> dict:
        info = await call(queue.job, job_id)
        return {"job": info.to_dict(), "finished": await call(queue.is_finished, job_id)}

    @app.get("/v1/jobs/{job_id}/tasks", tags=["owners"])
    async def tasks(job_id: str, _: TokenRow = owner) -> dict:
        return {"tasks": [wire.task_row_to_dict(r) for r in await call(queue.tasks, job_id)]}

    @app.get("/v1/jobs/{job_id}/events", tags=["owners"])
    async def events(job_id: str, task: str | None = None, _: TokenRow = owner) -> dict:
        return {"events": [wire.event_to_dict(e) for e in await call(queue.events, job_id, task)]}

    @app.get("/v1/jobs/{job_id}/attempts", tags=["owners"])
    async def attempts(job_id: str, task: str | None = None, _: TokenRow = owner) -> dict:
        """Every ended attempt of the job's tasks (or of ``task``) with its figures and log location."""
        return {"attempts": [wire.attempt_row_to_dict(a) for a in await call(queue.attempts, job_id, task)]}

    @app.get("/v1/jobs/{job_id}/tasks/{task_id}/log", tags=["owners"])
    async def task_log(job_id: str, task_id: str, attempt: int | None = None, after: int = 0,
                       _: TokenRow = owner) -> dict:
        """What the queue holds of a task attempt's live log after byte ``after`` (the latest
        attempt unless ``attempt`` is named)."""
        return wire.log_chunk_to_dict(await call(queue.task_log, job_id, task_id, attempt, after))

    @app.post("/v1/jobs/{job_id}/release", tags=["owners"])
    async def release_job(job_id: str, _: TokenRow = owner) -> dict:
        count = await call(queue.release_job, job_id)
        work_arrived(count)
        return {"released": count}

    @app.post("/v1/jobs/{job_id}/retry", tags=["owners"])
    async def retry_tasks(job_id: str, body: RetryBody | None = None, _: TokenRow = owner) -> dict:
        count = await call(queue.retry_tasks, job_id, body.tasks if body is not None else None)
        work_arrived(count)
        return {"retried": count}

    @app.post("/v1/jobs/{job_id}/kill", tags=["owners"])
    async def kill_job(job_id: str, _: TokenRow = owner) -> dict:
        return {"killed": await call(queue.kill_job, job_id)}

    @app.get("/v1/downloads", tags=["owners"])
    async def downloads(job: str | None = None, state: str | None = "pending", _: TokenRow = owner) -> dict:
        wanted = None if state in (None, "", "all") else state
        return {"downloads": [wire.record_to_dict(r) for r in await call(queue.downloads, job, wanted)]}

    @app.post("/v1/downloads/{download_id}/downloaded", tags=["owners"])
    async def mark_downloaded(download_id: str, _: TokenRow = owner) -> dict:
        await call(queue.mark_downloaded, download_id)
        return {"ok": True}

    @app.get("/v1/workers", tags=["owners"])
    async def workers(_: TokenRow = owner) -> dict:
        await flush_contacts()  # what this coordinator has heard, before it is read back
        return {"workers": [wire.worker_row_to_dict(w) for w in await call(queue.workers, config.gone_after)]}

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict:
        """Unauthenticated liveness: the process answers (it says nothing of the queue)."""
        return {"ok": True, "version": __version__}

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus_metrics(request: Request) -> Response:
        """The farm's figures in Prometheus's format: tasks and workers by state, requests, claims and
        their latency, reports, retries. Open to any caller unless the coordinator runs with
        ``--metrics-token-required`` (then an owner token)."""
        if config.metrics_token_required:
            await authenticate(request.headers.get("authorization", ""), "owner")
        body, content_type = await call(metrics.render, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    mount_web(app, web)  # the web view: pages at /, never under /v1/ (coordinator/web)

    def limit_for(path: str) -> int:
        return MAX_BODY if path == "/v1/jobs" else MAX_SMALL_BODY

    app.add_middleware(_BodyLimit, limit=limit_for)
    return FastRoutes(
        app,
        routes={"/v1/claim": FastRoute(ClaimBody, "agent", do_claim, undelivered=undelivered_claim),
                "/v1/heartbeat": FastRoute(HeartbeatBody, "agent", do_heartbeat),
                "/v1/workers/report": FastRoute(WorkerReportBody, "agent", do_report),
                "/v1/complete": FastRoute(CompleteBody, "agent", do_complete, undelivered=undelivered_completion),
                "/v1/workers/register": FastRoute(RegisterBody, "agent", do_register)},
        authenticate=authenticate, refuse=refusal, invalid=invalid_body, limit=MAX_SMALL_BODY,
        too_large=lambda: refusal(_too_large(MAX_SMALL_BODY)),
        observe=metrics.request,
    )
