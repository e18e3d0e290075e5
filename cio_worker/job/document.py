"""The task document (design.md): typed dataclasses, parsing and validation.

Every error is a DocumentError naming the field by its path in the document
(``job.upload_files[3].md5``) and what was wrong with it.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from cio_worker.job.environment import EnvEntry, MERGE_POLICIES
from cio_worker.errors import CioError, DocumentError
from cio_worker.job.frames import FrameSet
from cio_worker.job.hashing import check_md5_b64
from cio_worker.job.layout import validate_tiles
from cio_worker.job.paths import node_path

DOCUMENT_VERSION = 1
RETRY_CAUSES = ("preempted", "failed")
MAX_RETRIES = 5
# The failed cause's settings besides max_retries (RetryPolicy): how many workers a task must fail
# on before it fails for real, and after how many of a job's tasks a worker fails it is blocked.
FAILED_SETTINGS = ("max_retries", "distinct_workers", "block_worker_after")
MAX_DISTINCT_WORKERS = 10
MAX_BLOCK_WORKER_AFTER = 1000
# Matched with fullmatch: '$' would accept a trailing newline, '\d' other scripts' digits.
_JOB_ID = re.compile(r"[0-9]{5,}")
_TASK_ID = re.compile(r"[0-9]{3,}")
_STORAGE = re.compile(r"(file|s3|gs)://\S+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def job_id_text(number: int) -> str:
    return f"{int(number):05d}"


def task_id_text(number: int) -> str:
    return f"{int(number):03d}"


@dataclass(frozen=True)
class UploadFile:
    """One input: where it goes (artist form), its identity and its mode."""

    destination: str
    md5: str
    size: int
    mode: int = 0o100644

    def to_dict(self) -> dict[str, Any]:
        return {"destination": self.destination, "md5": self.md5, "size": self.size, "mode": self.mode}

    @property
    def node_destination(self) -> str:
        return node_path(self.destination, what="destination")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry budgets per cause, and who may retry a failed task (the queue applies them):

    - ``distinct_workers`` (K): a task whose failed budget is spent fails for real only once its
      failures span K different workers; until then it waits for a worker that has not failed it
      (when no other worker that may take it is there, it fails at once: a farm of one).
    - ``block_worker_after`` (M): a worker that fails M of the job's tasks gets no more of them
      (0: never blocked), unless no other worker that may take them is there.
    """

    preempted: int = 3
    failed: int = 1
    distinct_workers: int = 2
    block_worker_after: int = 3

    def budget(self, cause: str) -> int:
        return self.preempted if cause == "preempted" else self.failed

    def to_dict(self) -> dict[str, Any]:
        failed: dict[str, int] = {"max_retries": self.failed}
        for name in ("distinct_workers", "block_worker_after"):  # written when not the default
            if getattr(self, name) != getattr(RetryPolicy, name):
                failed[name] = getattr(self, name)
        return {"preempted": {"max_retries": self.preempted}, "failed": failed}


@dataclass(frozen=True)
class JobInfo:
    id: str
    title: str
    project: str
    storage: str
    output_path: str
    preemptible: bool = True
    autoretry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    environment: tuple[EnvEntry, ...] = ()
    upload_files: tuple[UploadFile, ...] = ()
    instance_type: str = ""

    @property
    def node_output_path(self) -> str:
        return node_path(self.output_path, what="job.output_path")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "project": self.project,
            "storage": self.storage,
            "output_path": self.output_path,
            "preemptible": self.preemptible,
            "autoretry_policy": self.autoretry_policy.to_dict(),
            "environment": [e.to_dict() for e in self.environment],
            "upload_files": [u.to_dict() for u in self.upload_files],
            "instance_type": self.instance_type,
        }


@dataclass(frozen=True)
class TaskInfo:
    id: str
    frames: str
    command: str
    tile: int = 1
    tiles: int = 1
    attempt: int = 1
    frames_done: str = ""

    @property
    def frame_set(self) -> FrameSet:
        return FrameSet.parse(self.frames)

    @property
    def frames_done_set(self) -> FrameSet:
        return FrameSet.parse_optional(self.frames_done)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "frames": self.frames,
            "tile": self.tile,
            "tiles": self.tiles,
            "attempt": self.attempt,
            "command": self.command,
            "frames_done": self.frames_done,
        }


@dataclass(frozen=True)
class TaskDocument:
    job: JobInfo
    task: TaskInfo
    version: int = DOCUMENT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "job": self.job.to_dict(), "task": self.task.to_dict()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> "TaskDocument":
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise DocumentError("document", f"is not valid JSON ({_clip(str(exc) or type(exc).__name__)})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> "TaskDocument":
        d = _Reader(data, "document")
        version = d.integer("version", minimum=1)
        if version != DOCUMENT_VERSION:
            raise DocumentError("version", f"{version} is not supported (this agent reads {DOCUMENT_VERSION})")
        job = parse_job(d.mapping("job"))
        task = parse_task(d.mapping("task"))
        return cls(job=job, task=task, version=version)

    @property
    def label(self) -> str:
        return f"job {self.job.id} task {self.task.id}"


def parse_job(j: "_Reader") -> JobInfo:
    job_id = j.text("id")
    if not _JOB_ID.fullmatch(job_id):
        raise DocumentError(j.path("id"), f"{job_id!r} is not a job id of at least 5 digits")
    storage = j.text("storage")
    if not _STORAGE.fullmatch(storage):
        raise DocumentError(j.path("storage"), f"{storage!r} is not a file://, s3:// or gs:// URL")
    output_path = j.text("output_path")
    _node(output_path, j.path("output_path"))
    return JobInfo(
        id=job_id,
        title=j.text("title", default="", allow_empty=True),
        project=j.text("project", default="default"),
        storage=storage,
        output_path=output_path,
        preemptible=j.boolean("preemptible", default=True),
        autoretry_policy=parse_retry_policy(j.optional_mapping("autoretry_policy")),
        environment=tuple(parse_env_entry(e) for e in j.items("environment")),
        upload_files=_upload_files(j),
        instance_type=j.text("instance_type", default="", allow_empty=True),
    )


def parse_task(t: "_Reader") -> TaskInfo:
    task_id = t.text("id")
    if not _TASK_ID.fullmatch(task_id):
        raise DocumentError(t.path("id"), f"{task_id!r} is not a task id of at least 3 digits")
    frames = t.text("frames")
    frame_set = _frames(frames, t.path("frames"))
    tiles = validate_tiles(t.integer("tiles", default=1), field=t.path("tiles"))
    tile = t.integer("tile", default=1, minimum=1)
    if tile > tiles:
        raise DocumentError(t.path("tile"), f"{tile} is beyond the task's {tiles} tiles")
    frames_done = t.text("frames_done", default="", allow_empty=True)
    done = _frames(frames_done, t.path("frames_done"), optional=True)
    extra = done.difference(frame_set)
    if extra:
        raise DocumentError(t.path("frames_done"), f"names frames {extra} that are not in the task's frames {frames}")
    return TaskInfo(
        id=task_id,
        frames=frames,
        command=t.text("command"),
        tile=tile,
        tiles=tiles,
        attempt=t.integer("attempt", default=1, minimum=1),
        frames_done=frames_done,
    )


def parse_retry_policy(p: "_Reader | None") -> RetryPolicy:
    if p is None:
        return RetryPolicy()
    budgets: dict[str, int] = {}
    for cause in RETRY_CAUSES:
        entry = p.optional_mapping(cause)
        budgets[cause] = 0 if entry is None else entry.integer("max_retries", minimum=0, maximum=MAX_RETRIES)
    unknown = set(p.data) - set(RETRY_CAUSES)
    if unknown:
        raise DocumentError(p.path(sorted(unknown)[0]), f"is not a retry cause (use {', '.join(RETRY_CAUSES)})")
    failed = p.optional_mapping("failed")
    if failed is not None:
        extra = sorted(set(failed.data) - set(FAILED_SETTINGS))
        if extra:
            raise DocumentError(failed.path(extra[0]), f"is not a setting of the failed cause (use {', '.join(FAILED_SETTINGS)})")
        budgets["distinct_workers"] = failed.integer("distinct_workers", default=RetryPolicy.distinct_workers,
                                                     minimum=1, maximum=MAX_DISTINCT_WORKERS)
        budgets["block_worker_after"] = failed.integer("block_worker_after", default=RetryPolicy.block_worker_after,
                                                       minimum=0, maximum=MAX_BLOCK_WORKER_AFTER)
    return RetryPolicy(**budgets)


def parse_env_entry(e: "_Reader") -> EnvEntry:
    name = e.text("name")
    if not _ENV_NAME.fullmatch(name):
        raise DocumentError(e.path("name"), f"{name!r} is not a valid environment variable name")
    policy = e.text("merge_policy", default="exclusive")
    if policy not in MERGE_POLICIES:
        raise DocumentError(e.path("merge_policy"), f"{policy!r} is not one of {', '.join(MERGE_POLICIES)}")
    value = e.text("value", allow_empty=True)
    if "\x00" in value:
        raise DocumentError(e.path("value"), "contains a NUL character")
    return EnvEntry(name=name, value=value, merge_policy=policy)


def _upload_files(j: "_Reader") -> tuple[UploadFile, ...]:
    """The inputs; two that land on the same node path must be the same content, and no input
    may land below another (drive letters are stripped, so ``C:/a`` and ``D:/a`` collide)."""
    files = j.items("upload_files")
    parsed = tuple(parse_upload_file(u) for u in files)
    placed: dict[str, int] = {}
    for index, upload in enumerate(parsed):
        node = upload.node_destination
        earlier = placed.get(node)
        if earlier is not None and parsed[earlier].md5 != upload.md5:
            raise DocumentError(
                files[index].path("destination"),
                f"places a file at {node}, as {files[earlier].where} does, with other content",
            )
        placed.setdefault(node, index)
    for node, index in placed.items():
        parent = posixpath.dirname(node)
        while parent not in ("/", ""):
            if parent in placed:
                raise DocumentError(
                    files[index].path("destination"),
                    f"is below {parent}, which {files[placed[parent]].where} places as a file",
                )
            parent = posixpath.dirname(parent)
    return parsed


def parse_upload_file(u: "_Reader") -> UploadFile:
    destination = u.text("destination")
    _node(destination, u.path("destination"))
    try:
        md5 = check_md5_b64(u.data.get("md5"), u.path("md5"))
    except DocumentError:
        if "md5" not in u.data:
            raise DocumentError(u.path("md5"), "is missing") from None
        raise
    return UploadFile(
        destination=destination,
        md5=md5,
        size=u.integer("size", minimum=0),
        mode=u.integer("mode", default=0o100644, minimum=0, maximum=0o177777),
    )


def _node(path: str, field_path: str) -> None:
    try:
        node_path(path)
    except CioError as exc:
        raise DocumentError(field_path, str(exc)) from None


def _frames(spec: str, field_path: str, optional: bool = False) -> FrameSet:
    try:
        return FrameSet.parse_optional(spec) if optional else FrameSet.parse(spec)
    except CioError as exc:
        raise DocumentError(field_path, str(exc)) from None
    except ValueError as exc:  # int() refuses numbers of thousands of digits
        raise DocumentError(field_path, f"is not a usable frame spec ({_clip(str(exc))})") from None


class _Reader:
    """Typed access to one JSON object, with errors that name the field's path."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise DocumentError(where, f"must be an object, not {_kind(data)}")
        self.data = data
        self.where = where

    def path(self, key: str) -> str:
        return key if self.where == "document" else f"{self.where}.{key}"

    def _get(self, key: str, default: Any) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise DocumentError(self.path(key), "is missing")
            return default
        return self.data[key]

    def text(self, key: str, default: Any = None, allow_empty: bool = False) -> str:
        value = self._get(key, _MISSING if default is None else default)
        if not isinstance(value, str):
            raise DocumentError(self.path(key), f"must be text, not {_kind(value)}")
        if not allow_empty and value.strip() == "":
            raise DocumentError(self.path(key), "is empty")
        return value

    def integer(self, key: str, default: Any = None, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self._get(key, _MISSING if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise DocumentError(self.path(key), f"must be a whole number, not {_kind(value)}")
        if minimum is not None and value < minimum:
            raise DocumentError(self.path(key), f"{value} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise DocumentError(self.path(key), f"{value} is above the maximum {maximum}")
        return value

    def boolean(self, key: str, default: Any = None) -> bool:
        value = self._get(key, _MISSING if default is None else default)
        if not isinstance(value, bool):
            raise DocumentError(self.path(key), f"must be true or false, not {_kind(value)}")
        return value

    def mapping(self, key: str) -> "_Reader":
        return _Reader(self._get(key, _MISSING), self.path(key))

    def optional_mapping(self, key: str) -> "_Reader | None":
        value = self._get(key, None)
        return None if value is None else _Reader(value, self.path(key))

    def items(self, key: str) -> list["_Reader"]:
        value = self._get(key, [])
        if not isinstance(value, list):
            raise DocumentError(self.path(key), f"must be a list, not {_kind(value)}")
        return [_Reader(v, f"{self.path(key)}[{i}]") for i, v in enumerate(value)]


_MISSING = object()


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "a number", float: "a decimal number", str: "text", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)
