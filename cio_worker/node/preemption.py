"""Preemption notices: watchers for GCE, EC2 Spot, Azure Spot and SIGTERM/SIGINT.

``start_watchers(config, on_notice)`` starts the watchers for the provider (detected or
configured) plus the signal watcher; each calls ``on_notice`` once per distinct notice, from its
own thread. ``NoticeBoard`` is a ready-made ``on_notice`` the agent can poll or wait on.

A hard notice (preempt, terminate, signal) means the instance is going away by ``deadline``:
stop the render, save what is finished, release the task. A soft one (rebalance) means stop
claiming new work but finish the current task.

URLs are server roots (``http://169.254.169.254``); the watchers add the provider's paths.
"""

from __future__ import annotations

import email.utils
import logging
import queue
import signal
import socket
import threading
import time
import weakref
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from typing import Any, Callable, Iterable, Mapping

import requests
from requests.adapters import HTTPAdapter
from tenacity import (RetryCallState, RetryError, Retrying, retry_if_exception_type,
                      stop_when_event_set, wait_exponential, wait_random)
from urllib3.connectionpool import HTTPConnectionPool

from cio_worker.errors import CioError

logger = logging.getLogger(__name__)

HARD_KINDS = frozenset({"preempt", "terminate", "signal"})
PROVIDER_CHOICES = ("auto", "gce", "ec2", "azure", "none")
DETECTION_ORDER = ("gce", "ec2", "azure")

GCE_PATH = "/computeMetadata/v1/"
GCE_PREEMPTED = "instance/preempted"
GCE_MAINTENANCE = "instance/maintenance-event"
EC2_TOKEN_PATH = "/latest/api/token"
EC2_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
EC2_TOKEN_HEADER = "X-aws-ec2-metadata-token"
EC2_SPOT_PATH = "/latest/meta-data/spot/instance-action"
EC2_REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
EC2_NOTICE_SECONDS = 120.0
AZURE_EVENTS_PATH = "/metadata/scheduledevents"
AZURE_INSTANCE_PATH = "/metadata/instance"
AZURE_API_VERSION = "2020-07-01"
AZURE_INSTANCE_API_VERSION = "2021-02-01"  # the instance document (identity, detection)


class PreemptionConfigError(CioError, ValueError):
    code = "bad_config"


@dataclass(frozen=True)
class Notice:
    kind: str  # "preempt" | "terminate" | "rebalance" | "signal"
    provider: str  # "gce" | "ec2" | "azure" | "signal"
    received_at: float
    deadline: float | None  # absolute time by which the instance is gone; None for rebalance
    detail: str
    ref: str = ""  # the provider's name for the event (Azure EventId: what acknowledge() sends)

    @property
    def hard(self) -> bool:
        return self.kind in HARD_KINDS

    def time_left(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now


OnNotice = Callable[[Notice], None]


# ---- HTTP plumbing ----

class _BadStatus(Exception):
    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"{url} answered HTTP {status}")
        self.status = status


class _InterruptibleAdapter(HTTPAdapter):
    """Tracks its connections so that stop() can cut a blocking request (a hanging GET) short."""

    def __init__(self) -> None:
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        track = self._track

        class _TrackingPool(HTTPConnectionPool):
            def _new_conn(self) -> Any:
                conn = super()._new_conn()
                track(conn)
                return conn

        self.poolmanager.pool_classes_by_scheme = {
            **self.poolmanager.pool_classes_by_scheme, "http": _TrackingPool}

    def _track(self, conn: Any) -> None:
        with self._lock:
            self._connections.add(conn)

    def interrupt(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def metadata_session() -> requests.Session:
    """A session for metadata endpoints: never through a proxy from the environment."""
    session = requests.Session()
    session.trust_env = False
    return session


def _retry_logger(what: str) -> Callable[[RetryCallState], None]:
    def log(state: RetryCallState) -> None:
        n = state.attempt_number
        level = logging.WARNING if n == 1 or n % 30 == 0 else logging.DEBUG
        error = state.outcome.exception() if state.outcome else None
        logger.log(level, "%s failed (attempt %d): %s; retrying", what, n, error)
    return log


def _parse_time(text: object) -> float | None:
    """ISO 8601 (EC2) or RFC 1123 (Azure) to epoch seconds; None when absent or unreadable."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        parsed = datetime.fromisoformat(text.strip())
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


# ---- watchers ----

class _Watcher:
    """Base: named loops run in daemon threads; stop() interrupts blocking requests and joins."""

    provider = ""

    def __init__(self, on_notice: OnNotice, clock: Callable[[], float]) -> None:
        self._on_notice = on_notice
        self._clock = clock
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._adapters: dict[int, _InterruptibleAdapter] = {}
        self._owned: list[requests.Session] = []
        self._seen: set[tuple[str, str]] = set()
        self._seen_lock = threading.Lock()

    def _loops(self) -> list[tuple[str, Callable[[], None]]]:
        raise NotImplementedError

    def start(self) -> "_Watcher":
        if self._threads:
            return self
        for name, loop in self._loops():
            thread = threading.Thread(target=self._run, args=(loop,), daemon=True,
                                      name=f"notice-{self.provider}-{name}")
            self._threads.append(thread)
            thread.start()
        return self

    def _run(self, loop: Callable[[], None]) -> None:
        while not self._stopping.is_set():
            try:
                loop()
                return
            except Exception:  # a watcher must outlive surprises; it is our only warning
                logger.exception("%s notice watcher failed; restarting it", self.provider)
                self._stopping.wait(1.0)

    def _session(self, given: requests.Session | None) -> requests.Session:
        session = given
        if session is None:
            session = metadata_session()
            self._owned.append(session)
        if id(session) not in self._adapters:
            adapter = _InterruptibleAdapter()
            session.mount("http://", adapter)
            self._adapters[id(session)] = adapter
        return session

    def _interrupt(self) -> None:
        for adapter in list(self._adapters.values()):
            adapter.interrupt()

    def request_stop(self) -> None:
        self._stopping.set()
        self._interrupt()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop and join; True when every thread has ended within ``timeout``."""
        self.request_stop()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            while thread.is_alive() and time.monotonic() < deadline:
                thread.join(0.05)
                self._interrupt()  # a request that began after the first interrupt
        for session in self._owned:
            session.close()
        return not self.alive

    @property
    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _emit(self, kind: str, ref: str, received_at: float, deadline: float | None,
              detail: str) -> None:
        with self._seen_lock:
            if (kind, ref) in self._seen or self._stopping.is_set():
                return
            self._seen.add((kind, ref))
        notice = Notice(kind, self.provider, received_at, deadline, detail, ref)
        logger.warning("%s notice: %s", self.provider, detail)
        try:
            self._on_notice(notice)
        except Exception:
            logger.exception("on_notice failed for %s", notice)


class GceWatcher(_Watcher):
    """Hanging GETs on instance/preempted and instance/maintenance-event, one thread each."""

    provider = "gce"

    def __init__(self, base_url: str, session: requests.Session | None = None,
                 clock: Callable[[], float] = time.time, *, on_notice: OnNotice,
                 wait_timeout: float = 60.0, grace: float = 30.0, backoff_max: float = 2.0,
                 connect_timeout: float = 2.0) -> None:
        super().__init__(on_notice, clock)
        self._base = base_url.rstrip("/")
        self._given = session
        self._wait_timeout = max(1, int(wait_timeout))
        self._grace = grace
        self._backoff_max = backoff_max
        self._connect_timeout = connect_timeout

    def _loops(self) -> list[tuple[str, Callable[[], None]]]:
        # requests sessions are not documented as thread-safe: one per loop unless one is given
        shared = self._session(self._given) if self._given is not None else None
        return [(key.rsplit("/", 1)[-1], partial(self._watch, key, shared or self._session(None)))
                for key in (GCE_PREEMPTED, GCE_MAINTENANCE)]

    def _watch(self, key: str, session: requests.Session) -> None:
        url = f"{self._base}{GCE_PATH}{key}"
        retrying = Retrying(
            retry=retry_if_exception_type((requests.RequestException, _BadStatus)),
            wait=wait_exponential(multiplier=0.1, max=self._backoff_max) + wait_random(0, 0.1),
            stop=stop_when_event_set(self._stopping),
            sleep=self._stopping.wait,  # a stop cuts the backoff short
            before_sleep=_retry_logger(f"GCE {key}"),
        )
        etag: str | None = None
        while not self._stopping.is_set():
            try:
                value, etag = retrying(self._get, session, url, etag)
            except RetryError:
                return
            self._check(key, value)
            if etag is None:  # no ETag, no hanging GET: fall back to polling
                self._stopping.wait(1.0)

    def _get(self, session: requests.Session, url: str,
             etag: str | None) -> tuple[str, str | None]:
        params = None
        read_timeout = 5.0
        if etag:
            params = {"wait_for_change": "true", "last_etag": etag,
                      "timeout_sec": str(self._wait_timeout)}
            read_timeout = self._wait_timeout + 10.0  # must outlast the server's wait
        response = session.get(url, params=params, headers={"Metadata-Flavor": "Google"},
                               timeout=(self._connect_timeout, read_timeout))
        if response.status_code != 200:
            raise _BadStatus(url, response.status_code)
        return response.text.strip(), response.headers.get("ETag")

    def _check(self, key: str, value: str) -> None:
        now = self._clock()
        if key == GCE_PREEMPTED and value.upper() == "TRUE":
            self._emit("preempt", key, now, now + self._grace, "GCE instance/preempted is TRUE")
        elif key == GCE_MAINTENANCE and value == "TERMINATE_ON_HOST_MAINTENANCE":
            self._emit("terminate", key, now, now + self._grace,
                       "GCE maintenance-event TERMINATE_ON_HOST_MAINTENANCE")
        elif key == GCE_MAINTENANCE and value not in ("", "NONE"):
            logger.info("GCE maintenance-event %s: the VM keeps running, not a notice", value)


class Ec2Watcher(_Watcher):
    """IMDSv2 polling of spot/instance-action and the rebalance recommendation."""

    provider = "ec2"

    def __init__(self, base_url: str, session: requests.Session | None = None,
                 clock: Callable[[], float] = time.time, *, on_notice: OnNotice,
                 poll_interval: float = 1.0, token_ttl: int = 21600,
                 request_timeout: float = 2.0) -> None:
        super().__init__(on_notice, clock)
        if not 1 <= token_ttl <= 21600:
            raise PreemptionConfigError(f"token_ttl {token_ttl}: must be 1..21600 seconds")
        if poll_interval <= 0:
            raise PreemptionConfigError(f"poll_interval {poll_interval}: must be positive")
        self._base = base_url.rstrip("/")
        self._given = session
        self._interval = poll_interval
        self._ttl = token_ttl
        self._refresh_margin = min(60.0, token_ttl / 4)
        self._timeout = request_timeout
        self._token: str | None = None
        self._token_expires = 0.0

    def _loops(self) -> list[tuple[str, Callable[[], None]]]:
        return [("spot", partial(self._poll, self._session(self._given)))]

    def _poll(self, session: requests.Session) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self._check(session)
                failures = 0
            except (requests.RequestException, _BadStatus, ValueError) as err:
                failures += 1
                level = logging.WARNING if failures == 1 or failures % 30 == 0 else logging.DEBUG
                logger.log(level, "EC2 metadata poll failed (%d in a row): %s", failures, err)
            self._stopping.wait(max(0.0, self._interval - (time.monotonic() - started)))

    def _check(self, session: requests.Session) -> None:
        spot = self._get(session, EC2_SPOT_PATH)
        if spot.status_code == 200:
            now = self._clock()
            data = spot.json()
            deadline = _parse_time(data.get("time"))
            self._emit("preempt", "spot/instance-action", now,
                       deadline if deadline is not None else now + EC2_NOTICE_SECONDS,
                       f"EC2 spot instance-action {data.get('action')} at {data.get('time')}")
        elif spot.status_code != 404:
            raise _BadStatus(EC2_SPOT_PATH, spot.status_code)
        rebalance = self._get(session, EC2_REBALANCE_PATH)
        if rebalance.status_code == 200:
            self._emit("rebalance", "rebalance", self._clock(), None,
                       f"EC2 rebalance recommendation at {rebalance.json().get('noticeTime')}")
        elif rebalance.status_code != 404:
            raise _BadStatus(EC2_REBALANCE_PATH, rebalance.status_code)

    def _get(self, session: requests.Session, path: str) -> requests.Response:
        response: requests.Response | None = None
        for _ in range(2):
            token = self._current_token(session)
            response = session.get(self._base + path, headers={EC2_TOKEN_HEADER: token},
                                   timeout=self._timeout)
            if response.status_code != 401:
                return response
            self._token = None  # expired or revoked: fetch a new one and ask again
        assert response is not None
        return response

    def _current_token(self, session: requests.Session) -> str:
        if self._token is None or self._clock() >= self._token_expires - self._refresh_margin:
            asked_at = self._clock()
            self._token, ttl = ec2_token(session, self._base, self._ttl, self._timeout)
            self._token_expires = asked_at + ttl
        return self._token


def ec2_token(session: requests.Session, base_url: str, ttl: int = 21600,
              timeout: float | tuple[float, float] = 2.0) -> tuple[str, int]:
    """An IMDSv2 session token and the seconds it lives (``PUT /latest/api/token``)."""
    response = session.put(base_url.rstrip("/") + EC2_TOKEN_PATH, headers={EC2_TTL_HEADER: str(ttl)},
                           timeout=timeout)
    if response.status_code != 200 or not response.text:
        raise _BadStatus(EC2_TOKEN_PATH, response.status_code)
    try:
        granted = int(response.headers.get(EC2_TTL_HEADER, ttl))
    except ValueError:
        granted = ttl
    return response.text, granted


class AzureWatcher(_Watcher):
    """Polls Scheduled Events about once a second; Preempt (and Terminate) are notices."""

    provider = "azure"
    KINDS = {"Preempt": "preempt", "Terminate": "terminate"}

    def __init__(self, base_url: str, session: requests.Session | None = None,
                 clock: Callable[[], float] = time.time, *, on_notice: OnNotice,
                 poll_interval: float = 1.0, grace: float = 30.0, first_timeout: float = 120.0,
                 request_timeout: float = 5.0) -> None:
        super().__init__(on_notice, clock)
        if poll_interval <= 0:
            raise PreemptionConfigError(f"poll_interval {poll_interval}: must be positive")
        self._base = base_url.rstrip("/")
        self._given = session
        self._interval = poll_interval
        self._grace = grace
        self._first_timeout = first_timeout  # the first call after boot can take long
        self._timeout = request_timeout

    @property
    def _url(self) -> str:
        return self._base + AZURE_EVENTS_PATH

    def _loops(self) -> list[tuple[str, Callable[[], None]]]:
        return [("events", partial(self._poll, self._session(self._given)))]

    def _poll(self, session: requests.Session) -> None:
        read_timeout = self._first_timeout
        incarnation: object = None
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                response = session.get(self._url, params={"api-version": AZURE_API_VERSION},
                                       headers={"Metadata": "true"},
                                       timeout=(2.0, read_timeout))
                if response.status_code != 200:
                    raise _BadStatus(self._url, response.status_code)
                document = response.json()
                read_timeout = self._timeout
                failures = 0
                if document.get("DocumentIncarnation") != incarnation:
                    incarnation = document.get("DocumentIncarnation")
                    self._check(document.get("Events") or [])
            except (requests.RequestException, _BadStatus, ValueError, AttributeError) as err:
                failures += 1
                level = logging.WARNING if failures == 1 or failures % 30 == 0 else logging.DEBUG
                logger.log(level, "Azure scheduled events poll failed (%d in a row): %s",
                           failures, err)
            self._stopping.wait(max(0.0, self._interval - (time.monotonic() - started)))

    def _check(self, events: Iterable[Mapping[str, Any]]) -> None:
        now = self._clock()
        for event in events:
            kind = self.KINDS.get(str(event.get("EventType")))
            if kind is None:
                continue
            not_before = _parse_time(event.get("NotBefore"))
            event_id = str(event.get("EventId", ""))
            self._emit(kind, event_id, now,
                       not_before if not_before is not None else now + self._grace,
                       f"Azure {event.get('EventType')} event {event_id} "
                       f"NotBefore {event.get('NotBefore') or '(now)'}")

    def acknowledge(self, event_id: str, timeout: float = 5.0) -> bool:
        """Tell Azure it may go ahead now (after the agent has saved what it can)."""
        session = metadata_session()
        try:
            response = session.post(self._url, params={"api-version": AZURE_API_VERSION},
                                    headers={"Metadata": "true"},
                                    json={"StartRequests": [{"EventId": event_id}]},
                                    timeout=timeout)
            return response.status_code == 200
        except requests.RequestException as err:
            logger.warning("Azure event %s could not be acknowledged: %s", event_id, err)
            return False
        finally:
            session.close()


class SignalWatcher:
    """SIGTERM/SIGINT become a "signal" notice; previous Python handlers still run after ours.

    Handlers only queue (SimpleQueue.put is reentrant); a thread delivers the notice, so
    ``on_notice`` never runs inside a signal handler.
    """

    provider = "signal"

    def __init__(self, on_notice: OnNotice, clock: Callable[[], float] = time.time, *,
                 grace: float = 25.0,
                 signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self._on_notice = on_notice
        self._clock = clock
        self._grace = grace
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._queue: queue.SimpleQueue[tuple[int, float] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._emitted = False

    def start(self) -> "SignalWatcher":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._thread = threading.Thread(target=self._deliver, name="notice-signal", daemon=True)
        self._thread.start()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        previous = self._previous.get(signum)
        if self._stopped:  # could not be restored from another thread: act as if never here
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self._queue.put((signum, self._clock()))
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def _deliver(self) -> None:
        while (item := self._queue.get()) is not None:
            signum, received = item
            name = signal.Signals(signum).name
            if self._emitted:
                logger.warning("%s received again; already draining", name)
                continue
            self._emitted = True
            logger.warning("%s received: draining within %.0f s", name, self._grace)
            try:
                self._on_notice(Notice("signal", "signal", received, received + self._grace,
                                       name, name))
            except Exception:
                logger.exception("on_notice failed for %s", name)

    def request_stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                if signal.getsignal(signum) == self._handle:
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._queue.put(None)

    def stop(self, timeout: float = 2.0) -> bool:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.alive

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


# ---- detection, configuration, start ----

def _probe(provider: str, url: str, session: requests.Session, timeout: float) -> bool:
    try:
        if provider == "gce":
            response = session.get(f"{url}{GCE_PATH}instance/id", timeout=timeout,
                                   headers={"Metadata-Flavor": "Google"})
            return response.status_code == 200 and \
                response.headers.get("Metadata-Flavor") == "Google"
        if provider == "ec2":
            response = session.put(url + EC2_TOKEN_PATH, timeout=timeout,
                                   headers={EC2_TTL_HEADER: "60"})
            return response.status_code == 200 and bool(response.text)
        if provider == "azure":
            response = session.get(url + AZURE_INSTANCE_PATH, timeout=timeout,
                                   params={"api-version": AZURE_INSTANCE_API_VERSION},
                                   headers={"Metadata": "true"})
            return response.status_code == 200 and "compute" in response.json()
    except (requests.RequestException, ValueError):
        return False
    return False


def detect_provider(endpoints: Mapping[str, str], session: requests.Session | None = None,
                    timeout: float = 1.0) -> str | None:
    """Which of {"gce": url, "ec2": url, "azure": url} answers like its provider, probed in
    parallel; ties go in the order gce, ec2, azure. Returns within about ``timeout``."""
    results: dict[str, bool] = {}

    def probe(provider: str, url: str) -> None:
        own = session or metadata_session()
        try:
            results[provider] = _probe(provider, url.rstrip("/"), own, timeout)
        finally:
            if session is None:
                own.close()

    threads = [threading.Thread(target=probe, args=(provider, url), daemon=True,
                                name=f"detect-{provider}")
               for provider, url in endpoints.items() if provider in DETECTION_ORDER and url]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + 0.5  # a slow DNS lookup is left behind, not waited on
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return next((p for p in DETECTION_ORDER if results.get(p)), None)


def _url_from_host(value: str) -> str:
    return value if "://" in value else f"http://{value}"


@dataclass(frozen=True)
class PreemptionConfig:
    provider: str = "auto"  # "auto" | "gce" | "ec2" | "azure" | "none"
    gce_url: str = "http://metadata.google.internal"
    ec2_url: str = "http://169.254.169.254"
    azure_url: str = "http://169.254.169.254"
    poll_interval: float = 1.0  # EC2 and Azure
    signal_grace: float = 25.0
    gce_grace: float = 30.0
    gce_wait_timeout: float = 60.0
    detect_timeout: float = 1.0

    def __post_init__(self) -> None:
        if self.provider not in PROVIDER_CHOICES:
            raise PreemptionConfigError(
                f"provider {self.provider!r}: must be one of {', '.join(PROVIDER_CHOICES)}")
        if self.poll_interval <= 0:
            raise PreemptionConfigError(f"poll_interval {self.poll_interval}: must be positive")
        for name in ("gce_url", "ec2_url", "azure_url"):
            object.__setattr__(self, name, getattr(self, name).rstrip("/"))

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> "PreemptionConfig":
        """Defaults, then GCE_METADATA_HOST (or GCE_METADATA_IP) and
        AWS_EC2_METADATA_SERVICE_ENDPOINT from ``env``, then ``overrides``."""
        config = cls()
        gce_host = env.get("GCE_METADATA_HOST") or env.get("GCE_METADATA_IP")
        if gce_host:
            config = replace(config, gce_url=_url_from_host(gce_host))
        if env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT"):
            config = replace(config, ec2_url=env["AWS_EC2_METADATA_SERVICE_ENDPOINT"])
        return replace(config, **overrides)

    def endpoints(self) -> dict[str, str]:
        return {"gce": self.gce_url, "ec2": self.ec2_url, "azure": self.azure_url}


@dataclass
class Watchers:
    """What start_watchers started; stop() ends them all."""

    provider: str | None
    members: list[Any]

    def stop(self, timeout: float = 2.0) -> bool:
        for member in self.members:
            member.request_stop()
        deadline = time.monotonic() + timeout
        done = [member.stop(max(0.1, deadline - time.monotonic())) for member in self.members]
        return all(done)

    def acknowledge(self, notice: Notice) -> bool:
        """Let the provider go ahead early (Azure only; elsewhere there is nothing to send)."""
        for member in self.members:
            if isinstance(member, AzureWatcher) and notice.provider == "azure":
                return member.acknowledge(notice.ref)
        return False


def start_watchers(config: PreemptionConfig, on_notice: OnNotice,
                   clock: Callable[[], float] = time.time,
                   install_signals: bool = True) -> Watchers:
    provider: str | None = config.provider
    if provider == "auto":
        provider = detect_provider(config.endpoints(), timeout=config.detect_timeout)
        logger.info("cloud provider detected: %s", provider or "none")
    members: list[Any] = []
    if provider == "gce":
        members.append(GceWatcher(config.gce_url, clock=clock, on_notice=on_notice,
                                  wait_timeout=config.gce_wait_timeout, grace=config.gce_grace))
    elif provider == "ec2":
        members.append(Ec2Watcher(config.ec2_url, clock=clock, on_notice=on_notice,
                                  poll_interval=config.poll_interval))
    elif provider == "azure":
        members.append(AzureWatcher(config.azure_url, clock=clock, on_notice=on_notice,
                                    poll_interval=config.poll_interval))
    if install_signals:
        if threading.current_thread() is threading.main_thread():
            members.append(SignalWatcher(on_notice, clock, grace=config.signal_grace))
        else:
            logger.warning("not on the main thread: SIGTERM/SIGINT will not become notices")
    watchers = Watchers(provider if provider in DETECTION_ORDER else None, members)
    try:
        for member in members:
            member.start()
    except BaseException:
        watchers.stop()
        raise
    return watchers


# ---- the board the agent polls ----

class NoticeBoard:
    """Collects notices (use ``board.post`` as on_notice); thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._notices: list[Notice] = []

    def post(self, notice: Notice) -> None:
        with self._cond:
            self._notices.append(notice)
            self._cond.notify_all()

    __call__ = post

    def _latest(self, hard: bool) -> Notice | None:
        hard_ones = [n for n in self._notices if n.hard]
        if hard_ones:
            return hard_ones[-1]
        return None if hard or not self._notices else self._notices[-1]

    def latest(self) -> Notice | None:
        """The most recent hard notice, else the most recent soft one, else None."""
        with self._cond:
            return self._latest(hard=False)

    def wait(self, timeout: float | None = None, *, hard: bool = False) -> Notice | None:
        """Block until there is a notice (a hard one, with ``hard``) or ``timeout`` passes."""
        with self._cond:
            self._cond.wait_for(lambda: self._latest(hard) is not None, timeout)
            return self._latest(hard)

    def notices(self) -> list[Notice]:
        with self._cond:
            return list(self._notices)

    def deadline(self) -> float | None:
        """The earliest deadline of the hard notices: when the instance is gone."""
        with self._cond:
            deadlines = [n.deadline for n in self._notices if n.hard and n.deadline is not None]
            return min(deadlines) if deadlines else None

    @property
    def draining(self) -> bool:
        with self._cond:
            return any(n.hard for n in self._notices)

    @property
    def no_new_work(self) -> bool:
        with self._cond:
            return bool(self._notices)
