"""Polling a condition in tests: ``wait_for`` returns the first true value, or fails saying what
it waited for (and ``detail()``, what it last saw)."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.05,
             detail: Callable[[], Any] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} {detail()}".rstrip())
        time.sleep(poll)
