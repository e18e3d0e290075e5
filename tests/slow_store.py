"""A file:// store that takes ``delay`` seconds more for each object it fetches: a download that
lasts long enough for a stop to land in its middle on any machine. Importable by a sync worker
process (which unpickles it), so kept apart from the test modules and their imports."""

from __future__ import annotations

import time

from cio_worker.storage.base import StorageOptions
from cio_worker.storage.file import FileStorage


class SlowFileStorage(FileStorage):
    def __init__(self, url: str, delay: float) -> None:
        # concurrency=1: for_split_worker keeps this store (and its delay) in the worker
        super().__init__(url, StorageOptions(concurrency=1))
        self.delay = delay

    def _download_one(self, item, activity) -> None:
        time.sleep(self.delay)
        super()._download_one(item, activity)

    def _download_unnamed_one(self, item, activity, place) -> None:
        time.sleep(self.delay)
        super()._download_unnamed_one(item, activity, place)
