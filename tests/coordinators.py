"""A coordinator app served by uvicorn in a thread of the test process, on a free loopback port."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def serving(queue, config=None, **uvicorn_options) -> Iterator[str]:
    """Serve ``create_app(queue, config)``; yield its base URL; stop it (and only it) after."""
    from cio_worker.coordinator.app import create_app
    from tests.fleet import serving_app

    with serving_app(create_app(queue, config), **uvicorn_options) as url:
        yield url
