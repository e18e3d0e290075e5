"""The queue's values as JSON, the one shape the coordinator and its HTTP client both speak.

Reading is strict: a value of the wrong type or a missing field is a DocumentError naming the
field, so a bad request is refused with a reason before anything changes.
"""

from __future__ import annotations

from typing import Any, Mapping

from cio_worker.errors import DocumentError
from cio_worker.job.document import TaskDocument
from cio_worker.queue.base import (
    AttemptFigures,
    AttemptRow,
    TaskLogChunk,
    DownloadFile,
    DownloadRecord,
    Event,
    HeartbeatReply,
    JobSummary,
    Lease,
    NewDownload,
    NewTask,
    TaskRow,
    WorkerRow,
    WorkerBlock,
    WorkerStatus,
)


def _field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str, *, optional: bool = False) -> Any:
    if not isinstance(data, Mapping):
        raise DocumentError(where, f"must be an object, not {type(data).__name__}")
    if name not in data or data[name] is None:
        if optional:
            return None
        raise DocumentError(f"{where}.{name}", "is missing")
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise DocumentError(f"{where}.{name}", f"must be {_kind_name(kinds)}, not {value!r}")
    if not isinstance(value, kinds):
        raise DocumentError(f"{where}.{name}", f"must be {_kind_name(kinds)}, not {type(value).__name__}")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "text", int: "a whole number", float: "a number", bool: "true or false", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _only(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(data) - allowed) if isinstance(data, Mapping) else []
    if extra:
        raise DocumentError(f"{where}.{extra[0]}", f"is not a field here (known: {', '.join(sorted(allowed))})")


# -- leases -------------------------------------------------------------------------------------

def lease_to_dict(lease: Lease, *, with_document: bool = True) -> dict[str, Any]:
    data: dict[str, Any] = {"job_id": lease.job_id, "task_id": lease.task_id, "token": lease.token,
                            "worker": lease.worker, "expires_at": lease.expires_at}
    if with_document:
        data["document"] = lease.document.to_dict()
    return data


def lease_from_dict(data: Mapping[str, Any], where: str = "lease") -> Lease:
    document = TaskDocument.from_dict(_field(data, "document", dict, where))
    return Lease(
        job_id=_field(data, "job_id", str, where),
        task_id=_field(data, "task_id", str, where),
        token=_field(data, "token", str, where),
        worker=_field(data, "worker", str, where),
        expires_at=float(_field(data, "expires_at", (int, float), where)),
        document=document,
    )


def lease_ref_from_dict(data: Mapping[str, Any], where: str = "lease") -> Lease:
    """A lease named in a report: its ids and token (the document stays on the agent)."""
    _only(data, {"job_id", "task_id", "token", "worker", "expires_at", "document"}, where)
    return Lease(
        job_id=_field(data, "job_id", str, where),
        task_id=_field(data, "task_id", str, where),
        token=_field(data, "token", str, where),
        worker=_field(data, "worker", str, where),
        expires_at=0.0,
        document=None,  # type: ignore[arg-type]  (reports never read it)
    )


def reply_to_dict(reply: HeartbeatReply) -> dict[str, Any]:
    return {"cancel": reply.cancel, "expires_at": reply.expires_at}


def reply_from_dict(data: Mapping[str, Any]) -> HeartbeatReply:
    return HeartbeatReply(cancel=bool(_field(data, "cancel", bool, "reply")),
                          expires_at=float(_field(data, "expires_at", (int, float), "reply")))


def status_to_dict(status: WorkerStatus) -> dict[str, Any]:
    return {"state": status.state, "progress": status.progress, "detail": status.detail}


def status_from_dict(data: Mapping[str, Any], where: str = "status") -> WorkerStatus:
    _only(data, {"state", "progress", "detail"}, where)
    status = WorkerStatus(
        state=_field(data, "state", str, where),
        progress=_field(data, "progress", (int, float), where, optional=True),
        detail=_field(data, "detail", str, where, optional=True) or "",
    )
    status.validate()
    return status


# -- jobs and tasks -----------------------------------------------------------------------------

def new_task_to_dict(task: NewTask) -> dict[str, Any]:
    return {"frames": task.frames, "command": task.command, "tile": task.tile, "tiles": task.tiles, "scout": task.scout}


def new_task_from_dict(data: Mapping[str, Any], where: str) -> NewTask:
    _only(data, {"frames", "command", "tile", "tiles", "scout"}, where)
    return NewTask(
        frames=_field(data, "frames", str, where),
        command=_field(data, "command", str, where),
        tile=_field(data, "tile", int, where, optional=True) or 1,
        tiles=_field(data, "tiles", int, where, optional=True) or 1,
        scout=bool(_field(data, "scout", bool, where, optional=True) or False),
    )


def summary_to_dict(s: JobSummary) -> dict[str, Any]:
    return {"id": s.id, "title": s.title, "counts": s.counts, "created": s.created, "scout": s.scout, "killed": s.killed,
            "blocked": [dict(b.__dict__) for b in s.blocked]}


def summary_from_dict(d: Mapping[str, Any]) -> JobSummary:
    return JobSummary(id=d["id"], title=d["title"], counts=dict(d["counts"]), created=d["created"],
                      scout=d["scout"], killed=d["killed"],
                      blocked=tuple(WorkerBlock(**dict(b)) for b in d.get("blocked") or ()))


def task_row_to_dict(r: TaskRow) -> dict[str, Any]:
    return dict(r.__dict__)


def task_row_from_dict(d: Mapping[str, Any]) -> TaskRow:
    return TaskRow(**{**d, "kept_from": tuple(d.get("kept_from") or ())})


def event_to_dict(e: Event) -> dict[str, Any]:
    return dict(e.__dict__)


def event_from_dict(d: Mapping[str, Any]) -> Event:
    return Event(**dict(d))


def worker_row_to_dict(w: WorkerRow) -> dict[str, Any]:
    return dict(w.__dict__)


def worker_row_from_dict(d: Mapping[str, Any]) -> WorkerRow:
    return WorkerRow(**dict(d))


# -- downloads ----------------------------------------------------------------------------------

def new_download_to_dict(download: NewDownload) -> dict[str, Any]:
    return {"output_dir": download.output_dir, "files": [f.to_dict() for f in download.files]}


def new_download_from_dict(data: Mapping[str, Any], where: str = "download") -> NewDownload:
    _only(data, {"output_dir", "files"}, where)
    files = []
    for i, item in enumerate(_field(data, "files", list, where)):
        at = f"{where}.files[{i}]"
        _only(item, {"relative_path", "md5", "size", "key"}, at)
        files.append(DownloadFile(
            relative_path=_field(item, "relative_path", str, at),
            md5=_field(item, "md5", str, at),
            size=_field(item, "size", int, at),
            key=_field(item, "key", str, at),
        ))
    download = NewDownload(output_dir=_field(data, "output_dir", str, where), files=tuple(files))
    download.validate()
    return download


def record_to_dict(r: DownloadRecord) -> dict[str, Any]:
    return {**r.to_dict(), "created": r.created}


def record_from_dict(d: Mapping[str, Any]) -> DownloadRecord:
    return DownloadRecord(
        download_id=d["download_id"], job_id=d["job_id"], task_id=d["task_id"], output_dir=d["output_dir"],
        size=d["size"], files=tuple(DownloadFile.from_dict(f) for f in d["files"]), state=d["state"], created=d["created"],
    )


# -- attempts and their logs --------------------------------------------------------------------

def figures_to_dict(figures: AttemptFigures | None) -> dict[str, Any] | None:
    return None if figures is None else figures.to_dict()


def figures_from_dict(data: Mapping[str, Any] | None, where: str = "figures") -> AttemptFigures | None:
    return None if data is None else AttemptFigures.from_dict(data, where)


def attempt_row_to_dict(r: AttemptRow) -> dict[str, Any]:
    return {**r.__dict__, "figures": r.figures.to_dict()}


def attempt_row_from_dict(d: Mapping[str, Any]) -> AttemptRow:
    return AttemptRow(**{**d, "figures": AttemptFigures.from_dict(d["figures"])})


def log_chunk_to_dict(c: TaskLogChunk) -> dict[str, Any]:
    return dict(c.__dict__)


def log_chunk_from_dict(d: Mapping[str, Any]) -> TaskLogChunk:
    return TaskLogChunk(**dict(d))
