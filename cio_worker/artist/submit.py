"""Submit a job: scan dependencies, hash them (with the MD5 cache), upload the contents storage
lacks into ``hashstore/``, expand the spec and enqueue its tasks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cio_worker.job.document import UploadFile
from cio_worker.errors import CioError
from cio_worker.job.depscan import upload_files
from cio_worker.job.expand import DEFAULT_TEMP_DIR, ExpandedJob, expand_job
from cio_worker.job.hashing import hashstore_key, md5_b64_of_file
from cio_worker.job.jobspec import load_job_spec
from cio_worker.storage.md5cache import Md5Cache
from cio_worker.job.paths import PathMap
from cio_worker.queue import NewTask, Queue
from cio_worker.queue.base import PLACEHOLDER_JOB_ID
from cio_worker.storage import Progress, Storage, UploadItem


class SubmitError(CioError):
    code = "submit"


@dataclass
class SubmitResult:
    job_id: str
    task_count: int
    holding: int
    uploaded: int  # contents sent to storage
    skipped: int  # contents storage already held
    upload_files: list[UploadFile]
    expanded: ExpandedJob


def submit_job(
    spec_path: str | Path,
    *,
    queue: Queue | Callable[[], Queue],
    storage: Storage,
    storage_url: str,
    path_map: PathMap = PathMap(),
    md5cache: Md5Cache | None = None,
    progress: Progress | None = None,
    allow_missing: bool = False,
    temp_dir: str = DEFAULT_TEMP_DIR,
    say: Callable[[str], None] = lambda line: None,
) -> SubmitResult:
    """``queue``: the queue, or a function that opens it, called only once the job is valid and its
    contents uploaded (so a submission that fails leaves no new queue behind)."""
    spec = load_job_spec(spec_path)
    expanded = expand_job(spec, path_map=path_map, temp_dir=temp_dir)
    missing = expanded.scan.missing
    if missing and not allow_missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SubmitError(
            f"{len(missing)} dependency file(s) of {spec.source} are missing: {shown}; fix the paths, locate "
            "them with --root / --path-map, or submit with --allow-missing",
            code="missing_dependencies",
        )
    for path in missing:
        say(f"warning: missing dependency {path} (not uploaded)")
    uploads = upload_files(expanded.scan.files, md5cache.md5_of if md5cache is not None else md5_b64_of_file)
    contents: dict[str, UploadItem] = {}  # one upload per content, however many destinations share it
    for found, entry in zip(expanded.scan.files, uploads):
        contents.setdefault(entry.md5, UploadItem(hashstore_key(entry.md5), Path(found.local_path), entry.md5, entry.size))
    say(f"{len(uploads)} dependencies hashed; uploading what {storage_url} lacks")
    skipped = storage.upload_missing(list(contents.values()), progress)
    job = expanded.job_info(PLACEHOLDER_JOB_ID, storage_url, uploads)
    tasks = [NewTask(t.frames, t.command, t.tile, t.tiles, t.scout) for t in expanded.tasks]
    job_id = (queue if hasattr(queue, "create_job") else queue()).create_job(job, tasks)
    return SubmitResult(
        job_id=job_id,
        task_count=len(tasks),
        holding=sum(1 for t in tasks if not t.scout) if expanded.holding else 0,
        uploaded=len(contents) - skipped,
        skipped=skipped,
        upload_files=uploads,
        expanded=expanded,
    )
