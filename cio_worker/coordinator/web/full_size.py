"""A frame (or tile) at its full size for the web view: the output itself, read from the job's
storage (its MD5 checked on the way, as every download is) and made an sRGB JPEG at its own
resolution by ``imaging.write_display_jpeg`` (an EXR clamped and encoded with the sRGB transfer
function). Made when a person asks, one at a time (the coordinator's cores serve the fleet
first), and kept in a small cache by the output's identity (key and MD5): a second look costs
nothing, and a re-rendered output under the same name is made afresh.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from cio_worker.imaging import DisplayError, DisplaySettings, write_display_jpeg
from cio_worker.queue.base import DownloadFile
from cio_worker.storage import DownloadItem, Storage


class CannotShow(Exception):
    """An output the view cannot show at full size, with the reason and the status to refuse it with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class FullSizeViews:
    settings: DisplaySettings = DisplaySettings(max_side=None, quality=92)
    max_source_bytes: int = 2 * 1024**3  # an output larger than this is not read into the coordinator
    cache_bytes: int = 128 * 1024**2  # the JPEGs kept, newest looked at first
    _cache: OrderedDict[tuple[str, str, str], bytes] = field(default_factory=OrderedDict)
    _cached: int = 0
    _one_at_a_time: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def jpeg(self, storage: Storage, storage_url: str, output: DownloadFile) -> bytes:
        """The JPEG of ``output`` (a file of the job's downloads, in ``storage``)."""
        identity = (storage_url, output.key, output.md5)
        async with self._one_at_a_time:  # a second request for the same output finds it made
            found = self._cache.get(identity)
            if found is None:
                if output.size > self.max_source_bytes:
                    raise CannotShow(413, f"{output.relative_path} is {output.size} bytes, more than the "
                                          f"{self.max_source_bytes} the web view reads; download it with "
                                          "`cio-worker download`")
                found = await anyio.to_thread.run_sync(self._make, storage, output)
                self._keep(identity, found)
            else:
                self._cache.move_to_end(identity)
        return found

    def _make(self, storage: Storage, output: DownloadFile) -> bytes:
        work = Path(tempfile.mkdtemp(prefix="cio-full-size-"))
        try:
            source = work / ("source" + Path(output.relative_path).suffix.lower())
            storage.download([DownloadItem(output.key, source, output.md5, output.size)])
            try:
                write_display_jpeg(source, work / "shown.jpg", self.settings)
            except DisplayError as exc:
                raise CannotShow(422, f"{output.relative_path} cannot be shown: {exc}") from None
            except ImportError as exc:
                raise CannotShow(422, f"the coordinator cannot show images without OpenImageIO ({exc}): "
                                      "pip install openimageio") from None
            return (work / "shown.jpg").read_bytes()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _keep(self, identity: tuple[str, str, str], data: bytes) -> None:
        if len(data) > self.cache_bytes:
            return
        self._cache[identity] = data
        self._cached += len(data)
        while self._cached > self.cache_bytes:
            _, dropped = self._cache.popitem(last=False)
            self._cached -= len(dropped)
