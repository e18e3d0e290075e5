"""Expand a job spec into tasks, as the Clarisse submitter did, without Clarisse.

Reads the project (through a path map), computes the job's frames (the custom frames, or the union
of the images' own ranges), each image's frames (the custom frames for every image, or its own
range), the chunks and tasks (chunks x tiles, scouts first-class), the output path, the token
values of every scope, each task's command, and the dependency scan.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Sequence

from cio_worker.job.depscan import ScanResult, scan_dependencies
from cio_worker.job.document import JobInfo, RetryPolicy, TaskDocument, TaskInfo, UploadFile, task_id_text
from cio_worker.job.environment import EnvEntry
from cio_worker.errors import CioError, DocumentError
from cio_worker.job.frames import FrameSet, clamp_chunk_size
from cio_worker.job.instances import InstanceCatalogue, default_catalogue
from cio_worker.job.jobspec import JobSpec
from cio_worker.job.layout import plan_tasks
from cio_worker.job.paths import PathMap, node_path
from cio_worker.job.project import ImageItem, Project, load_project
from cio_worker.job.software import SoftwareCatalogue
from cio_worker.job.tokens import Scope, chunk_values, render

DEFAULT_TEMP_DIR = "/tmp/conductor"
_DRIVE = re.compile(r"^[A-Za-z]:")


class ExpandError(CioError, ValueError):
    code = "bad_job"


@dataclass(frozen=True)
class ExpandedTask:
    index: int  # 0-based, chunk-major: the task id is task_id_text(index)
    chunk_index: int
    frames: str  # canonical Conductor form
    command: str
    tile: int  # 1-based
    tiles: int
    scout: bool

    @property
    def id(self) -> str:
        return task_id_text(self.index)


@dataclass(frozen=True)
class ExpandedJob:
    spec: JobSpec
    title: str
    project: str
    output_path: str  # artist form, drive letter kept
    preemptible: bool
    autoretry_policy: RetryPolicy
    environment: tuple[EnvEntry, ...]  # the software's entries, then the user's
    instance_type: str
    frames: FrameSet
    image_frames: tuple[tuple[str, FrameSet], ...]  # (image item, frames it renders)
    chunks: tuple[FrameSet, ...]
    scout_tasks: tuple[int, ...]  # task indices
    tasks: tuple[ExpandedTask, ...]  # empty for an upload-only job
    scan: ScanResult
    upload_only: bool
    values: dict[str, str] = field(default_factory=dict)  # Global and Job scope token values

    @property
    def holding(self) -> bool:
        """Whether some tasks wait for the job's release (there are scouts and other tasks)."""
        return 0 < len(self.scout_tasks) < len(self.tasks)

    def job_info(self, job_id: str, storage: str, upload_files: Sequence[UploadFile]) -> JobInfo:
        return JobInfo(
            id=job_id,
            title=self.title,
            project=self.project,
            storage=storage,
            output_path=self.output_path,
            preemptible=self.preemptible,
            autoretry_policy=self.autoretry_policy,
            environment=self.environment,
            upload_files=tuple(upload_files),
            instance_type=self.instance_type,
        )

    def documents(self, job_id: str, storage: str, upload_files: Sequence[UploadFile]) -> list[TaskDocument]:
        """One validated task document per task (none for an upload-only job)."""
        job = self.job_info(job_id, storage, upload_files)
        documents = []
        for task in self.tasks:
            info = TaskInfo(id=task.id, frames=task.frames, command=task.command, tile=task.tile, tiles=task.tiles)
            document = TaskDocument(job=job, task=info)
            TaskDocument.from_dict(document.to_dict())  # the same validation a worker applies
            documents.append(document)
        return documents


def expand_job(
    spec: JobSpec,
    *,
    path_map: PathMap = PathMap(),
    temp_dir: str = DEFAULT_TEMP_DIR,
    instances: InstanceCatalogue | None = None,
    software: SoftwareCatalogue | None = None,
) -> ExpandedJob:
    instance = (instances or default_catalogue()).get(spec.instance_type)
    package = (software or SoftwareCatalogue()).package(spec.clarisse_version)
    project = _read_project(spec, path_map)
    images = [_image(spec, project, item) for item in spec.images]

    override = spec.frames_override
    if override is not None:
        frames = override
        image_frames = tuple((image.path, override) for image in images)
    else:
        frames = FrameSet()
        for image in images:
            frames = frames.union(image.frames)
        image_frames = tuple((image.path, image.frames) for image in images)

    scouts = spec.scouts
    try:
        planned = plan_tasks(frames, spec.chunk_size, spec.tiles, scouts)
    except DocumentError as exc:
        raise spec.error(f"[job] {exc.field}", exc.problem) from None
    chunks = tuple(frames.chunks(spec.chunk_size))

    output_dirs = _output_dirs(project, images)
    output_path = spec.output_path or _common_directory(spec, output_dirs)
    project_node = node_path(spec.project_file, what="project_file")
    scout_set = frames.intersect(scouts) if scouts else FrameSet()

    values = {
        # Global
        "render_package": f'"{project_node}"',
        "pdir": posixpath.dirname(project_node),
        "temp_dir": f'"{temp_dir}"',
        # Job
        "sequence": frames.canonical(),
        "sequencelength": str(len(frames)),
        "sequencemin": str(frames.first),
        "sequencemax": str(frames.last),
        "chunksize": str(clamp_chunk_size(spec.chunk_size, len(frames))),
        "chunkcount": str(len(chunks)),
        "scout": scout_set.canonical(),
        "scoutcount": str(len(scout_set)),
        "cores": str(instance.cores),
        "flavor": instance.flavor,
        "instance": instance.description,
        "preemptible": "preemptible" if spec.preemptible else "non-preemptible",
        "retries": str(spec.retries),
        "job": spec.name,
        "project": spec.project,
        "sources": " ".join(spec.images),
        "directories": " ".join(f'"{node_path(d, what="output directory")}"' for d in output_dirs),
        "tiles": str(spec.tiles),
    }

    tasks: list[ExpandedTask] = []
    if not spec.upload_only:
        where = f"job spec {spec.source}: [job] task_template"
        per_chunk: dict[int, dict[str, str]] = {}
        for plan in planned:
            if plan.chunk_index not in per_chunk:
                per_chunk[plan.chunk_index] = chunk_values(plan.frames, image_frames)
            task_values = {**values, **per_chunk[plan.chunk_index], "tile_number": str(plan.tile)}
            command = render(spec.task_template, task_values, where=where, scope=Scope.TILE)
            tasks.append(
                ExpandedTask(
                    index=plan.index,
                    chunk_index=plan.chunk_index,
                    frames=plan.frames.canonical(),
                    command=command,
                    tile=plan.tile,
                    tiles=plan.tiles,
                    scout=plan.scout,
                )
            )
    scout_tasks = tuple(t.index for t in tasks if t.scout)

    scan = scan_dependencies(
        project=project,
        project_file=spec.project_file,
        images=image_frames,
        mode=spec.dependency_scan,
        extra_uploads=spec.extra_uploads,
        path_map=path_map,
    )
    return ExpandedJob(
        spec=spec,
        title=spec.title,
        project=spec.project,
        output_path=output_path,
        preemptible=spec.preemptible,
        autoretry_policy=spec.autoretry_policy,
        environment=package.environment() + spec.environment,
        instance_type=spec.instance_type,
        frames=frames,
        image_frames=image_frames,
        chunks=chunks,
        scout_tasks=scout_tasks,
        tasks=tuple(tasks),
        scan=scan,
        upload_only=spec.upload_only,
        values=values,
    )


def _read_project(spec: JobSpec, path_map: PathMap) -> Project:
    local = path_map.local(spec.project_file, what="project_file")
    try:
        return load_project(local, display_path=spec.project_file)
    except CioError as exc:
        where = f"project_file {spec.project_file} of job spec {spec.source}"
        if not path_map:
            where += "; if it lives elsewhere on this machine, locate it with a path map (--root / --path-map)"
        raise ExpandError(f"{exc} ({where})") from None


def _image(spec: JobSpec, project: Project, item: str) -> ImageItem:
    try:
        image = project.image(item)
    except CioError as exc:
        raise spec.error("[job] images", str(exc)) from None
    if not image.render_to_disk:
        raise spec.error("[job] images", f"{item} does not have Render to Disk set in {spec.project_file}")
    return image


def _output_dirs(project: Project, images: Sequence[ImageItem]) -> list[str]:
    """Each image's output directory (artist form), first use first."""
    dirs: dict[str, None] = {}
    for image in images:
        dirs.setdefault(posixpath.dirname(project.resolve(image.save_as)))
    return list(dirs)


def _common_directory(spec: JobSpec, directories: Sequence[str]) -> str:
    drives = {(_DRIVE.match(d).group(0).upper() if _DRIVE.match(d) else "") for d in directories}
    if len(drives) > 1:
        shown = ", ".join(sorted(d or "no drive" for d in drives))
        raise spec.error(
            "[job] output_path",
            f"the images save to different drives ({shown}), so they have no common output directory; "
            "set output_path",
        )
    nodes = [node_path(d, what="output directory") for d in directories]
    common = posixpath.commonpath(nodes)
    if common == "/":
        raise spec.error(
            "[job] output_path",
            f"the images' output directories ({', '.join(directories)}) share only the root directory; "
            "set output_path",
        )
    return drives.pop() + common
