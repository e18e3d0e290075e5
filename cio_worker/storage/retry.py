"""Retries for storage requests: exponential backoff with full jitter, transient errors only.

The backends switch their SDK's own retries off (botocore ``total_max_attempts=1``,
google-cloud-storage ``retry=None``) so that this is the only retry layer: attempts do not
multiply, and every retry is logged with the object it was for.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import requests
import tenacity
import urllib3.exceptions

T = TypeVar("T")
log = logging.getLogger(__name__)

# Throttling (429, S3 SlowDown is a 503), server errors and request timeouts are worth another try.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,  # includes resets, refused, aborted, BrokenPipe
    TimeoutError,
    socket.timeout,
    http.client.IncompleteRead,
    http.client.RemoteDisconnected,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
)


def is_network_error(exc: BaseException) -> bool:
    """A reset, refused or timed-out connection, or a body cut short."""
    return isinstance(exc, _NETWORK_ERRORS)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry; waits are random in [0, min(maximum, initial * 2**n)]."""

    attempts: int = 5
    initial: float = 0.5
    maximum: float = 8.0


@dataclass(frozen=True)
class Retrier:
    """Calls a function, retrying it while ``is_transient`` says its error is worth another try.

    Once ``stop`` is set (the batch failed or ended), no further attempt starts: a thread the stall
    detector gave up on ends at its socket timeout instead of retrying on.
    """

    policy: RetryPolicy
    is_transient: Callable[[BaseException], bool]
    sleep: Callable[[float], None] = time.sleep
    stop: threading.Event | None = None

    def until(self, stop: threading.Event) -> "Retrier":
        return replace(self, stop=stop)

    def __call__(self, fn: Callable[[], T], what: str = "request") -> T:
        def log_retry(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "%s failed (attempt %d of %d): %s; retrying in %.1f s",
                what,
                state.attempt_number,
                self.policy.attempts,
                describe(error),
                wait,
            )

        stop = tenacity.stop_after_attempt(max(1, self.policy.attempts))
        if self.stop is not None:
            stop = stop | tenacity.stop_when_event_set(self.stop)
        retrying = tenacity.Retrying(
            stop=stop,
            wait=tenacity.wait_random_exponential(multiplier=self.policy.initial, max=self.policy.maximum),
            retry=tenacity.retry_if_exception(self.is_transient),
            before_sleep=log_retry,
            sleep=self.sleep,
            reraise=True,
        )
        return retrying(fn)


def describe(error: BaseException | None) -> str:
    if error is None:
        return "no error"
    text = str(error) or type(error).__name__
    return text if len(text) < 300 else text[:300] + "..."
