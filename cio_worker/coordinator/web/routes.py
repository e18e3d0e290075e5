"""The web view's routes on the coordinator's FastAPI app (``mount``).

Pages: ``/`` (jobs), ``/jobs/{job}`` (its task grid, frames and controls), ``/jobs/{job}/tasks/{task}``
(attempts and log), ``/jobs/{job}/frames/{frame}`` (a frame at full size), ``/workers``. Their live
parts come from ``/live/...`` (fragments rendered here, JSON around them); previews from
``/jobs/{job}/previews/{output}``, an output at its full size from ``/jobs/{job}/full/{output}``. A request without a session is sent to ``/sign-in`` when it asks
for HTML and refused 401 otherwise; a POST also needs the session's CSRF token (403 without it),
and nothing changes when either is missing. None of these routes is under ``/v1/`` or in the API
document.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import parse_qsl, quote, urlencode

import anyio
import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from cio_worker.coordinator.web import figures, sessions
from cio_worker.coordinator.web.full_size import CannotShow, FullSizeViews
from cio_worker.errors import CioError, DocumentError, StorageError
from cio_worker.queue.base import AttemptRow, DownloadFile, DownloadRecord, TaskRow, preview_key
from cio_worker.queue.credentials import TokenRow
from cio_worker.queue.sql import SqlQueue
from cio_worker.storage import Storage, open_storage
from cio_worker.storage.base import key_of

log = logging.getLogger("cio_worker.coordinator.web")

HERE = Path(__file__).resolve().parent
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
LOG_SHOWN = 1024 * 1024  # the newest this much of a stored log is shown
OUTPUTS_KEPT = 8  # jobs whose outputs the view keeps between looks
NOTES = {"released": "released {n} held tasks", "killed": "killed the job: {n} tasks failed or asked to stop",
         "retried": "{n} failed tasks are pending again"}
# What every page answer carries: no framing by other sites, scripts and styles only from here.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; "
                               "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Call = Callable[..., Awaitable[Any]]
Refusal = Callable[[BaseException], tuple[int, dict[str, Any], dict[str, str]]]


@dataclass(frozen=True)
class Session:
    id: str
    token: TokenRow

    @property
    def csrf(self) -> str:
        return sessions.csrf_token(self.id)


class Refused(Exception):
    """A request the view answers with a refusal (an HTML page or the API's JSON error)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _NoSession(Exception):
    pass


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters.update(duration=figures.duration, size=figures.size, money=figures.money,
                       url=lambda text: quote(str(text)), pct=lambda v: f"{v:.0f} %" if v is not None else "—",
                       when=lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "—")
    return env


@dataclass(frozen=True)
class JobOutputs:
    """A job's outputs as its download records hold them, kept while ``mark`` says no record came since."""

    mark: tuple[int, float]
    frames: list[figures.Frame]  # newest first
    files: dict[str, DownloadFile]  # relative path -> the newest record's file (a retried task uploads again)

    @classmethod
    def of(cls, mark: tuple[int, float], records: list[DownloadRecord]) -> "JobOutputs":
        files = {f.relative_path: f for record in sorted(records, key=lambda r: r.created) for f in record.files}
        return cls(mark, figures.frames_of(records), files)


@dataclass
class WebView:
    """What the routes need: the queue, the coordinator's way of calling it, how to reach storage."""

    queue: SqlQueue
    call: Call
    refusal: Refusal
    gone_after: float = 120.0
    session_config: sessions.SessionConfig = field(default_factory=sessions.SessionConfig)
    open_storage: Callable[[str], Storage] = open_storage
    before_workers: Callable[[], Awaitable[None]] | None = None
    clock: Callable[[], float] = time.time
    env: jinja2.Environment = field(default_factory=templates)
    full_size: FullSizeViews = field(default_factory=FullSizeViews)
    _storages: dict[str, Storage] = field(default_factory=dict)
    _outputs: OrderedDict[str, JobOutputs] = field(default_factory=OrderedDict)
    _static: dict[str, bytes] = field(default_factory=dict)
    _finished: dict[str, tuple[tuple, figures.JobView]] = field(default_factory=dict)

    # -- rendering --------------------------------------------------------------------------------

    async def render(self, name: str, **values: Any) -> str:
        template = self.env.get_template(name)
        return await anyio.to_thread.run_sync(lambda: template.render(**values))

    async def page(self, name: str, session: Session | None, status: int = 200, **values: Any) -> HTMLResponse:
        html = await self.render(name, session=session, csrf=session.csrf if session else "", **values)
        return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)

    def refuse(self, request: Request, exc: BaseException) -> Response:
        if isinstance(exc, Refused):
            status, code, message = exc.status, exc.code, exc.message
        else:
            status, payload, _ = self.refusal(exc)
            code, message = payload.get("error", "error"), payload.get("message", "")
        if wants_html(request):
            html = self.env.get_template("error.html").render(session=None, csrf="", status=status, message=message)
            return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)
        return JSONResponse({"error": code, "message": message}, status_code=status)

    # -- sessions ---------------------------------------------------------------------------------

    async def session(self, request: Request) -> Session | None:
        sid = request.cookies.get(sessions.SESSION_COOKIE, "")
        if not sid or len(sid) > 100:
            return None
        token = await self.call(self.queue.web_session, sessions.digest(sid))
        if token is None or "owner" not in token.scopes:
            return None
        return Session(sid, token)

    async def signed_in(self, request: Request) -> Session:
        found = await self.session(request)
        if found is None:
            raise _NoSession()
        return found

    async def form(self, request: Request, session: Session | None, expected: str | None = None) -> dict[str, str]:
        """A POSTed form's fields, once its CSRF token is checked (the session's, or ``expected``)."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await request.body()
        fields = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)) \
            if media == "application/x-www-form-urlencoded" else {}
        want = expected if session is None else session.csrf
        if not want or not sessions.same(fields.get(sessions.CSRF_FIELD), want):
            raise Refused(403, "forbidden", "this form has no valid CSRF token (an old page, or another site "
                          "posted it); reload the page and try again")
        return fields

    def cookie(self, request: Request, response: Response, name: str, value: str, max_age: int) -> None:
        response.headers.append("set-cookie", sessions.cookie(name, value, secure=request.url.scheme == "https",
                                                              max_age=max_age))

    # -- storage ----------------------------------------------------------------------------------

    def storage(self, url: str) -> Storage:
        found = self._storages.get(url)
        if found is None:
            found = self._storages[url] = self.open_storage(url)
        return found

    async def read_stored(self, job_id: str, key: str) -> bytes:
        info = await self.call(self.queue.job, job_id)
        return await anyio.to_thread.run_sync(lambda: self.storage(info.storage).read_bytes(key))

    async def stored_log(self, job_id: str, location: str) -> str:
        info = await self.call(self.queue.job, job_id)
        key = key_of(info.storage, location)
        if key is None:
            return f"[the log {location} is not under the job's storage {info.storage}]"
        data = await anyio.to_thread.run_sync(lambda: self.storage(info.storage).read_bytes(key))
        note = f"[the first {len(data) - LOG_SHOWN} bytes are not shown]\n" if len(data) > LOG_SHOWN else ""
        return note + data[-LOG_SHOWN:].decode("utf-8", "replace")

    def close(self) -> None:
        for storage in self._storages.values():
            storage.close()
        self._storages.clear()

    def static(self, name: str) -> bytes | None:
        if name not in self._static:
            path = HERE / "static" / name
            if posixpath.basename(name) != name or path.suffix not in STATIC_TYPES or not path.is_file():
                return None
            self._static[name] = path.read_bytes()
        return self._static[name]

    # -- what the pages show ----------------------------------------------------------------------

    async def job_views(self) -> list[figures.JobView]:
        views = []
        for summary in await self.call(self.queue.jobs):
            key = (summary.id, tuple(summary.counts.values()), summary.killed)
            view = self._finished.get(summary.id)
            if view is None or view[0] != key:
                found = figures.job_view(summary, await self.call(self.queue.task_states, summary.id),
                                         await self.call(self.queue.job_cost, summary.id), self.clock())
                view = (key, found)
                if found.finished:  # a finished job changes only with its counts (a retry, a kill)
                    self._finished[summary.id] = view
            views.append(view[1])
        return views

    async def job_parts(self, job_id: str) -> tuple[figures.JobView, list[figures.TaskState], list[figures.Frame]]:
        summary = next((s for s in await self.call(self.queue.jobs) if s.id == job_id), None)
        if summary is None:
            await self.call(self.queue.job, job_id)  # the queue's own error for an unknown job
            raise Refused(404, "unknown_job", f"there is no job {job_id}")
        tasks = await self.call(self.queue.task_states, job_id)
        view = figures.job_view(summary, tasks, await self.call(self.queue.job_cost, job_id), self.clock())
        tiles = max((t[1] for t in tasks), default=1)
        records = await self.call(self.queue.recent_downloads, job_id, figures.GALLERY_SIZE * tiles)
        return view, tasks, figures.frames_of(records)[:figures.GALLERY_SIZE]

    async def job_outputs(self, job_id: str) -> JobOutputs:
        """The job's frames and files, read again only when a download record came since (a
        10,000-task job's records take a tenth of a second to read; its frames are looked at often)."""
        mark = await self.call(self.queue.downloads_mark, job_id)
        found = self._outputs.get(job_id)
        if found is None or found.mark != mark:
            records = await self.call(self.queue.downloads, job_id, None)
            found = self._outputs[job_id] = await anyio.to_thread.run_sync(JobOutputs.of, mark, records)
            while len(self._outputs) > OUTPUTS_KEPT:
                self._outputs.popitem(last=False)
        self._outputs.move_to_end(job_id)
        return found

    async def task_parts(self, job_id: str, task_id: str) -> tuple[TaskRow, list[AttemptRow]]:
        return await self.call(self.queue.task, job_id, task_id), await self.call(self.queue.attempts, job_id, task_id)


def mount(app: FastAPI, view: WebView) -> None:
    """Add the web view's routes to the coordinator's app."""

    def route(method: str, path: str, *, page: bool = True) -> Callable:
        """A route of the view: its refusals answered for a person or a program, a missing session
        sent to the sign-in page (``page``) or refused."""
        def register(handler: Callable) -> Callable:
            async def endpoint(request: Request) -> Response:
                try:
                    return await handler(request, **request.path_params)
                except _NoSession:
                    if page and request.method == "GET" and wants_html(request):
                        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                        return RedirectResponse("/sign-in?" + urlencode({"next": target}), status_code=303)
                    return view.refuse(request, Refused(401, "unauthorized", "sign in at /sign-in with an owner token"))
                except (Refused, CioError) as exc:
                    return view.refuse(request, exc)
            app.add_api_route(path, endpoint, methods=[method], include_in_schema=False, name=f"web {method} {path}")
            return handler
        return register

    # -- signing in and out -----------------------------------------------------------------------

    @route("GET", "/sign-in")
    async def sign_in_page(request: Request) -> Response:
        return await sign_in_form(request, 200, "")

    async def sign_in_form(request: Request, status: int, message: str) -> Response:
        pre = sessions.new_session_id()
        response = await view.page("sign_in.html", None, status, sign_in_csrf=pre, message=message,
                                   next=safe_next(request.query_params.get("next", "/")))
        view.cookie(request, response, sessions.SIGN_IN_COOKIE, pre, 3600)
        return response

    @route("POST", "/sign-in")
    async def sign_in(request: Request) -> Response:
        fields = await view.form(request, None, request.cookies.get(sessions.SIGN_IN_COOKIE, ""))
        token = await view.call(view.queue.authenticate, fields.get("token", "").strip())
        if token is None or "owner" not in token.scopes:
            why = "that token is unknown, revoked or malformed" if token is None else \
                f"token {token.name!r} has no owner scope; the web view needs an owner token"
            return await sign_in_form(request, 401 if token is None else 403, why)
        sid = sessions.new_session_id()
        lifetime = view.session_config.lifetime
        await view.call(view.queue.create_web_session, sessions.digest(sid), token.id, lifetime)
        response = RedirectResponse(safe_next(fields.get("next", "/")), status_code=303)
        view.cookie(request, response, sessions.SESSION_COOKIE, sid, int(lifetime))
        view.cookie(request, response, sessions.SIGN_IN_COOKIE, "", 0)
        return response

    @route("POST", "/sign-out")
    async def sign_out(request: Request) -> Response:
        session = await view.signed_in(request)
        await view.form(request, session)
        await view.call(view.queue.end_web_session, sessions.digest(session.id))
        response = RedirectResponse("/sign-in", status_code=303)
        view.cookie(request, response, sessions.SESSION_COOKIE, "", 0)
        return response

    @route("GET", "/static/{name}")
    async def static(request: Request, name: str) -> Response:
        data = view.static(name)
        if data is None:
            raise Refused(404, "not_found", f"there is no /static/{name} here")
        return Response(data, media_type=STATIC_TYPES[Path(name).suffix],
                        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})

    # -- jobs -------------------------------------------------------------------------------------

    @route("GET", "/")
    async def jobs_page(request: Request) -> Response:
        session = await view.signed_in(request)
        return await view.page("jobs.html", session, jobs=await view.job_views())

    @route("GET", "/live/jobs", page=False)
    async def jobs_live(request: Request) -> Response:
        session = await view.signed_in(request)
        html = await view.render("jobs_rows.html", session=session, jobs=await view.job_views())
        return JSONResponse({"html": html}, headers={"Cache-Control": "no-store"})

    @route("GET", "/jobs/{job_id}")
    async def job_page(request: Request, job_id: str) -> Response:
        session = await view.signed_in(request)
        job, tasks, frames = await view.job_parts(job_id)
        note = request.query_params.get("note", "")
        said = NOTES[note].format(n=int(request.query_params.get("n", "0") or 0)) if note in NOTES else ""
        return await view.page("job.html", session, job=job, chunks=figures.grid(tasks), frames=frames, note=said)

    @route("GET", "/live/jobs/{job_id}", page=False)
    async def job_live(request: Request, job_id: str) -> Response:
        session = await view.signed_in(request)
        job, tasks, frames = await view.job_parts(job_id)
        values = dict(session=session, csrf=session.csrf, job=job, frames=frames)
        return JSONResponse({"head": await view.render("job_head.html", **values),
                             "gallery": await view.render("gallery.html", **values),
                             "states": figures.states(tasks), "finished": job.finished},
                            headers={"Cache-Control": "no-store"})

    async def act(request: Request, job_id: str, what: str, action: Callable[[Mapping[str, str]], Awaitable[int]]) -> Response:
        session = await view.signed_in(request)
        fields = await view.form(request, session)
        count = await action(fields)
        return RedirectResponse(f"/jobs/{quote(job_id)}?" + urlencode({"note": what, "n": count}), status_code=303)

    @route("POST", "/jobs/{job_id}/release", page=False)
    async def release(request: Request, job_id: str) -> Response:
        return await act(request, job_id, "released", lambda _: view.call(view.queue.release_job, job_id))

    @route("POST", "/jobs/{job_id}/kill", page=False)
    async def kill(request: Request, job_id: str) -> Response:
        return await act(request, job_id, "killed", lambda _: view.call(view.queue.kill_job, job_id))

    @route("POST", "/jobs/{job_id}/retry", page=False)
    async def retry(request: Request, job_id: str) -> Response:
        def tasks_of(fields: Mapping[str, str]) -> list[str] | None:
            named = [t for t in fields.get("tasks", "").replace(",", " ").split() if t]
            return named or None
        return await act(request, job_id, "retried",
                         lambda fields: view.call(view.queue.retry_tasks, job_id, tasks_of(fields)))

    # -- tasks ------------------------------------------------------------------------------------

    @route("GET", "/jobs/{job_id}/tasks/{task_id}")
    async def task_page(request: Request, job_id: str, task_id: str) -> Response:
        session = await view.signed_in(request)
        task, attempts = await view.task_parts(job_id, task_id)
        shown = chosen_attempt(task, attempts, request.query_params.get("attempt"))
        running = task.state == "leased" and shown == task.attempt_count + 1
        text, end = "", 0
        if shown is not None:
            text, end = await log_text(job_id, task, attempts, shown, running)
        return await view.page("task.html", session, job_id=job_id, task=task, attempts=attempts, shown=shown,
                               running=running, log_text=text, log_end=end)

    @route("GET", "/live/jobs/{job_id}/tasks/{task_id}", page=False)
    async def task_live(request: Request, job_id: str, task_id: str) -> Response:
        session = await view.signed_in(request)
        task, attempts = await view.task_parts(job_id, task_id)
        html = await view.render("task_head.html", session=session, csrf=session.csrf, job_id=job_id, task=task,
                                 attempts=attempts)
        return JSONResponse({"html": html, "state": task.state}, headers={"Cache-Control": "no-store"})

    @route("GET", "/live/jobs/{job_id}/tasks/{task_id}/log", page=False)
    async def task_log(request: Request, job_id: str, task_id: str) -> Response:
        """The running attempt's lines after byte ``after``; once it has ended, its whole stored log."""
        await view.signed_in(request)
        attempt, after = number(request, "attempt", 1), number(request, "after", 0)
        chunk = await view.call(view.queue.task_log, job_id, task_id, attempt, after)
        if chunk.running and chunk.attempt == attempt:
            return JSONResponse({"running": True, "text": chunk.text, "end": chunk.end, "skipped": chunk.skipped})
        task, attempts = await view.task_parts(job_id, task_id)
        text, end = await log_text(job_id, task, attempts, attempt, False)
        return JSONResponse({"running": False, "text": text, "end": end, "skipped": False})

    async def log_text(job_id: str, task: TaskRow, attempts: list[AttemptRow], attempt: int, running: bool) -> tuple[str, int]:
        """An attempt's log: a running one's newest lines from the queue, an ended one's from storage
        (the queue's lines when it was never uploaded)."""
        record = next((a for a in reversed(attempts) if a.attempt == attempt), None)
        if not running and record is not None and record.figures.log:
            try:
                return await view.stored_log(job_id, record.figures.log), 0
            except CioError as exc:
                return f"[the stored log could not be read: {exc}]", 0
        chunk = await view.call(view.queue.task_log, job_id, task.id, attempt, 0)
        if chunk.attempt != attempt or not (chunk.text or chunk.running):
            return ("[no line has come yet]" if running else "[this attempt left no log]"), 0
        note = "[lines before these are no longer kept]\n" if chunk.start > 0 else ""
        return note + chunk.text, chunk.end

    # -- frames -----------------------------------------------------------------------------------

    @route("GET", "/jobs/{job_id}/previews/{output:path}", page=False)
    async def preview(request: Request, job_id: str, output: str) -> Response:
        await view.signed_in(request)
        check_output(output)
        try:
            data = await view.read_stored(job_id, preview_key(job_id, output))
        except StorageError as exc:
            raise Refused(404, "not_found", f"no preview of {output} (yet): {exc}") from None
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff"})

    @route("GET", "/jobs/{job_id}/full/{output:path}", page=False)
    async def full_size(request: Request, job_id: str, output: str) -> Response:
        await view.signed_in(request)
        check_output(output)
        found = (await view.job_outputs(job_id)).files.get(output)
        if found is None:
            raise Refused(404, "not_found", f"job {job_id} has no output {output} (yet)")
        info = await view.call(view.queue.job, job_id)
        try:
            storage = await anyio.to_thread.run_sync(view.storage, info.storage)
            data = await view.full_size.jpeg(storage, info.storage, found)
        except CannotShow as exc:
            raise Refused(exc.status, "cannot_show", str(exc)) from None
        except StorageError as exc:
            raise Refused(502, "storage_error", f"{output} cannot be read from the job's storage: {exc}") from None
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff"})

    @route("GET", "/jobs/{job_id}/frames/{name:path}")
    async def frame_page(request: Request, job_id: str, name: str) -> Response:
        session = await view.signed_in(request)
        check_output(name)
        frame = next((f for f in (await view.job_outputs(job_id)).frames if f.name == name), None)
        if frame is None:
            raise Refused(404, "not_found", f"job {job_id} has no frame {name} (yet)")
        return await view.page("frame.html", session, job_id=job_id, frame=frame)

    # -- workers ----------------------------------------------------------------------------------

    async def worker_rows() -> list[dict]:
        if view.before_workers is not None:
            await view.before_workers()
        now = view.clock()
        return [figures.worker_row(w, now) for w in await view.call(view.queue.workers, view.gone_after)]

    @route("GET", "/workers")
    async def workers_page(request: Request) -> Response:
        session = await view.signed_in(request)
        return await view.page("workers.html", session, workers=await worker_rows())

    @route("GET", "/live/workers", page=False)
    async def workers_live(request: Request) -> Response:
        session = await view.signed_in(request)
        html = await view.render("workers_rows.html", session=session, workers=await worker_rows())
        return JSONResponse({"html": html}, headers={"Cache-Control": "no-store"})


def chosen_attempt(task: TaskRow, attempts: list[AttemptRow], asked: str | None) -> int | None:
    """The attempt whose log a task page shows: the one asked for, else the running one, else the last."""
    if asked:
        if not asked.isdigit() or int(asked) < 1:
            raise Refused(400, "bad_request", f"attempt must be a whole number >= 1, not {asked[:20]!r}")
        return int(asked)
    if task.state == "leased":
        return task.attempt_count + 1
    return attempts[-1].attempt if attempts else None


def number(request: Request, name: str, least: int) -> int:
    text = request.query_params.get(name, str(least))
    if not text.isdigit() or int(text) < least or len(text) > 18:
        raise Refused(400, "bad_request", f"{name} must be a whole number >= {least}, not {text[:20]!r}")
    return int(text)


def check_output(path: str) -> None:
    """An output's relative path as the queue records them (never out of the job's previews)."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path or ".." in path.split("/"):
        raise DocumentError("output", f"{path[:200]!r} is not an output's relative path")


def safe_next(target: str) -> str:
    """Where to go after signing in: a path of this site only."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"
