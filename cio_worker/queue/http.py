"""The queue behind a coordinator: ``http://host:port`` or ``https://host:port`` (``cio-worker serve``).

Every call sends the bearer token and retries what a retry can fix (connection refused or reset,
timeouts, 502/503/504) with exponential backoff and full jitter, within ``retry_seconds``; every
report carries an operation id that stays the same across those retries, so a report whose answer
was lost is applied once. So does a claim: a copy sent again is marked as a resend and gets the
lease the first copy made, never a second one. The coordinator's refusals come back as the
errors the other backends raise: 409 is ``LeaseLost``, 422 a ``DocumentError`` naming the field,
404 an unknown job or task; 401/403 say to check the token. The token never appears in a message
or a log line.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import requests
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from cio_worker.errors import DocumentError, LeaseLost, QueueError
from cio_worker.job.document import JobInfo
from cio_worker.queue import wire
from cio_worker.queue.base import (
    AttemptFigures,
    AttemptRow,
    TaskLogChunk,
    DownloadRecord,
    Event,
    HeartbeatReply,
    JobSummary,
    Lease,
    NewDownload,
    NewTask,
    Queue,
    TaskRow,
    WorkerRow,
    WorkerStatus,
    check_lease_seconds,
    coerce_job,
    validate_new_tasks,
)

SCHEMES = ("http", "https")
_RETRY_STATUS = frozenset({502, 503, 504})
# How long a claim whose answer was lost is sent again: long enough for a dropped answer or a
# reset; a coordinator that stays away is the agent's loop's to wait for, between claims.
CLAIM_RESEND_SECONDS = 5.0


class _Retryable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)


def is_http_url(url: str) -> bool:
    return url.partition(":")[0].lower() in SCHEMES


class HttpQueue(Queue):
    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout: float = 30.0,
        retry_seconds: float = 30.0,
        verify: bool | str = True,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not is_http_url(url):
            raise QueueError(f"queue URL {url!r} is not http(s)://host:port", code="bad_queue_url")
        if not token or not token.strip():
            raise QueueError(
                f"queue {url} is a coordinator and needs a token: set CIO_TOKEN or pass --token-file "
                "(`cio-worker token create` on the coordinator makes one)",
                code="no_token",
            )
        self.url = url.rstrip("/")
        self._token = token.strip()
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self._verify = verify
        self._sleep = sleep
        self._local = threading.local()
        # What the coordinator last said: how often to heartbeat, how long to long-poll.
        self.settings: dict[str, float] = {}
        self._claims_with_completions = True  # False once a coordinator refused next_lease_seconds

    def __repr__(self) -> str:
        return f"HttpQueue({self.url!r})"

    # -- transport ------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self._token}"
            session.headers["User-Agent"] = "cio-worker"
            session.verify = self._verify
        return session

    def _request(self, method: str, path: str, body: Any = None, *, params: Mapping[str, Any] | None = None,
                 timeout: float | None = None, retry_seconds: float | None = None, resends_marked: bool = False) -> Any:
        """``resends_marked``: every copy after the first carries ``"resend": true``."""
        url = f"{self.url}{path}"
        budget = self.retry_seconds if retry_seconds is None else retry_seconds
        sent = [0]

        def attempt() -> Any:
            payload = {**body, "resend": True} if resends_marked and sent[0] else body
            sent[0] += 1
            try:
                response = self._session().request(method, url, json=payload, params=params, timeout=timeout or self.timeout)
            except requests.exceptions.SSLError as exc:
                raise QueueError(f"coordinator {self.url}: TLS failed ({_short(exc)}); check its certificate "
                                 "(or point REQUESTS_CA_BUNDLE at the CA that signed it)", code="queue_unavailable") from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                # ChunkedEncodingError: the answer was cut after its headers (a reset mid-body), so
                # the coordinator may have acted; the retry carries the same op id.
                raise _Retryable(f"coordinator {self.url} did not answer {method} {path} ({_short(exc)})") from None
            if response.status_code in _RETRY_STATUS:
                raise _Retryable(f"coordinator {self.url} answered {response.status_code} to {method} {path}"
                                 f" ({_message(response)})")
            return self._answer(response, method, path)

        try:
            for tried in Retrying(
                retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
                wait=wait_random_exponential(multiplier=0.2, max=5.0),
                stop=stop_after_delay(budget),
                sleep=self._sleep,
                reraise=False,
            ):
                with tried:
                    return attempt()
        except RetryError as exc:
            last = exc.last_attempt.exception()
            raise QueueError(
                f"{last}; tried for {budget:g} s. Check that the coordinator runs at {self.url} and that this machine "
                "can reach it (address, port, firewall, TLS)",
                code="queue_unavailable",
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer(self, response: requests.Response, method: str, path: str) -> Any:
        status = response.status_code
        if status == 204:
            return None
        if 200 <= status < 300:
            try:
                return response.json()
            except ValueError:
                raise QueueError(f"coordinator {self.url} sent a non-JSON answer to {method} {path}", code="queue_protocol") from None
        code, message = _error_of(response)
        if status == 401:
            raise QueueError(f"coordinator {self.url} refused the token ({message}); check CIO_TOKEN or --token-file",
                             code="unauthorized")
        if status == 403:
            raise QueueError(f"coordinator {self.url}: {message}", code="forbidden")
        if status == 409:
            raise LeaseLost(message)
        if status == 422:
            field = _field_of(response)
            if field:
                raise DocumentError(field, message.removeprefix(f"{field}: "))
            raise QueueError(f"coordinator {self.url} refused {method} {path}: {message}", code="bad_request")
        raise QueueError(message if code.startswith("unknown_") else f"coordinator {self.url}: {message}", code=code or "queue")

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(self, job: JobInfo | Mapping[str, Any], tasks: Sequence[NewTask]) -> str:
        info = coerce_job(job)  # checked here too: a bad job is refused before it is sent
        checked = validate_new_tasks(tasks)
        body = {"job": info.to_dict(), "tasks": [wire.new_task_to_dict(t) for t in checked]}
        return self._request("POST", "/v1/jobs", body, retry_seconds=0)["job_id"]

    def release_job(self, job_id: str) -> int:
        return self._request("POST", f"/v1/jobs/{_part(job_id)}/release")["released"]

    def retry_tasks(self, job_id: str, task_ids: Sequence[str] | None = None) -> int:
        body = {} if task_ids is None else {"tasks": list(task_ids)}
        return self._request("POST", f"/v1/jobs/{_part(job_id)}/retry", body)["retried"]

    def kill_job(self, job_id: str) -> int:
        return self._request("POST", f"/v1/jobs/{_part(job_id)}/kill")["killed"]

    def jobs(self) -> list[JobSummary]:
        return [wire.summary_from_dict(d) for d in self._request("GET", "/v1/jobs")["jobs"]]

    def job(self, job_id: str) -> JobInfo:
        from cio_worker.queue.base import job_from_stored

        return job_from_stored(self._request("GET", f"/v1/jobs/{_part(job_id)}")["job"])

    def tasks(self, job_id: str) -> list[TaskRow]:
        return [wire.task_row_from_dict(d) for d in self._request("GET", f"/v1/jobs/{_part(job_id)}/tasks")["tasks"]]

    def events(self, job_id: str, task_id: str | None = None) -> list[Event]:
        params = None if task_id is None else {"task": task_id}
        return [wire.event_from_dict(d) for d in self._request("GET", f"/v1/jobs/{_part(job_id)}/events", params=params)["events"]]

    def is_finished(self, job_id: str) -> bool:
        return bool(self._request("GET", f"/v1/jobs/{_part(job_id)}")["finished"])

    # -- leases ---------------------------------------------------------------------------------

    def claim(self, worker: str, lease_seconds: float, wait: float = 0.0) -> Lease | None:
        """``wait``: seconds the coordinator may hold the request until a task comes (long poll).
        A claim whose answer was lost is sent again, marked as a resend, for a few seconds: the
        coordinator answers it with the lease the first copy made (recorded under the claim's op
        id) rather than leasing a second task."""
        body = {"worker": worker, "lease_seconds": lease_seconds, "wait_seconds": wait, "op_id": new_op_id()}
        answer = self._request("POST", "/v1/claim", body, timeout=self.timeout + wait,
                               retry_seconds=min(self.retry_seconds, CLAIM_RESEND_SECONDS), resends_marked=True)
        if answer is None:
            return None
        self._remember_settings(answer)
        return wire.lease_from_dict(answer["lease"])

    def reap(self) -> int:
        return self._request("POST", "/v1/reap")["reaped"]

    def heartbeat(self, lease: Lease, lease_seconds: float, status: WorkerStatus | None = None) -> HeartbeatReply:
        body: dict[str, Any] = {"lease": wire.lease_to_dict(lease, with_document=False), "lease_seconds": lease_seconds}
        if status is not None:
            body["status"] = wire.status_to_dict(status)
        answer = self._request("POST", "/v1/heartbeat", body)
        self._remember_settings(answer)
        return wire.reply_from_dict(answer)

    def complete(self, lease: Lease, download: NewDownload | None = None, op_id: str | None = None,
                 figures: AttemptFigures | None = None, next_lease_seconds: float | None = None) -> Lease | None:
        body = {"lease": wire.lease_to_dict(lease, with_document=False), "op_id": op_id or new_op_id(),
                "download": None if download is None else wire.new_download_to_dict(download)}
        if figures is not None:
            body["figures"] = wire.figures_to_dict(figures)
        if next_lease_seconds is not None:
            check_lease_seconds(next_lease_seconds, "next_lease_seconds")
        if next_lease_seconds is not None and self._claims_with_completions:
            try:
                answer = self._request("POST", "/v1/complete", {**body, "next_lease_seconds": next_lease_seconds})
            except DocumentError as exc:
                if exc.field != "next_lease_seconds":
                    raise
                # A coordinator older than the field refuses it before it acts: tell it as it knows.
                self._claims_with_completions = False
            else:
                self._remember_settings(answer)
                return None if answer.get("next") is None else wire.lease_from_dict(answer["next"])
        self._request("POST", "/v1/complete", body)
        return None

    def fail(self, lease: Lease, reason: str, op_id: str | None = None, figures: AttemptFigures | None = None) -> str:
        body = {"lease": wire.lease_to_dict(lease, with_document=False), "reason": reason, "op_id": op_id or new_op_id()}
        if figures is not None:
            body["figures"] = wire.figures_to_dict(figures)
        return self._request("POST", "/v1/fail", body)["state"]

    def release(
        self,
        lease: Lease,
        cause: str = "preempted",
        frames_done: str = "",
        download: NewDownload | None = None,
        reason: str = "",
        op_id: str | None = None,
        figures: AttemptFigures | None = None,
    ) -> str:
        body = {"lease": wire.lease_to_dict(lease, with_document=False), "cause": cause, "frames_done": frames_done,
                "reason": reason, "op_id": op_id or new_op_id(),
                "download": None if download is None else wire.new_download_to_dict(download)}
        if figures is not None:
            body["figures"] = wire.figures_to_dict(figures)
        return self._request("POST", "/v1/release", body)["state"]

    # -- attempts and their logs ----------------------------------------------------------------

    def attempts(self, job_id: str, task_id: str | None = None) -> list[AttemptRow]:
        params = None if task_id is None else {"task": task_id}
        answer = self._request("GET", f"/v1/jobs/{_part(job_id)}/attempts", params=params)
        return [wire.attempt_row_from_dict(d) for d in answer["attempts"]]

    def append_log(self, lease: Lease, offset: int, text: str) -> int:
        body = {"lease": wire.lease_to_dict(lease, with_document=False), "offset": offset, "text": text}
        # Not retried: the next shipment carries these lines again from the same offset.
        return self._request("POST", "/v1/logs/append", body, retry_seconds=0)["end"]

    def task_log(self, job_id: str, task_id: str, attempt: int | None = None, after: int = 0) -> TaskLogChunk:
        params: dict[str, Any] = {"after": after, **({} if attempt is None else {"attempt": attempt})}
        return wire.log_chunk_from_dict(
            self._request("GET", f"/v1/jobs/{_part(job_id)}/tasks/{_part(task_id)}/log", params=params))

    # -- workers --------------------------------------------------------------------------------

    def register_worker(self, worker: str, info: Mapping[str, Any]) -> None:
        self._remember_settings(self._request("POST", "/v1/workers/register", {"worker": worker, "info": dict(info)}))

    def worker_report(self, worker: str, status: WorkerStatus) -> None:
        self._request("POST", "/v1/workers/report", {"worker": worker, "status": wire.status_to_dict(status)})

    def workers(self, gone_after: float = 120.0) -> list[WorkerRow]:
        return [wire.worker_row_from_dict(d) for d in self._request("GET", "/v1/workers")["workers"]]

    # -- downloads ------------------------------------------------------------------------------

    def downloads(self, job_id: str | None = None, state: str | None = "pending") -> list[DownloadRecord]:
        params = {"state": state or "all", **({"job": job_id} if job_id is not None else {})}
        return [wire.record_from_dict(d) for d in self._request("GET", "/v1/downloads", params=params)["downloads"]]

    def mark_downloaded(self, download_id: str) -> None:
        self._request("POST", f"/v1/downloads/{_part(download_id)}/downloaded")

    def close(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
        self._local = threading.local()

    def _remember_settings(self, answer: Mapping[str, Any]) -> None:
        for key in ("lease_seconds", "heartbeat_seconds", "long_poll_seconds"):
            value = answer.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                self.settings[key] = float(value)


def new_op_id() -> str:
    return uuid.uuid4().hex


def _part(text: str) -> str:
    from urllib.parse import quote

    return quote(str(text), safe="")


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _error_of(response: requests.Response) -> tuple[str, str]:
    try:
        data = response.json()
        return str(data.get("error") or ""), str(data.get("message") or data.get("detail") or response.reason)
    except (ValueError, AttributeError):
        return "", f"HTTP {response.status_code} {response.reason}"


def _field_of(response: requests.Response) -> str:
    try:
        field = response.json().get("field")
    except (ValueError, AttributeError):
        return ""
    return field if isinstance(field, str) else ""


def _message(response: requests.Response) -> str:
    return _error_of(response)[1]
