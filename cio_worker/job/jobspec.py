"""Job spec files: the Clarisse submitter's ConductorJob attributes, written as TOML.

Layout (every key optional unless marked; unknown keys and tables are errors)::

    [job]
    name = "shot_A"                         # the <job> token; default: the file's stem
    title = "Clarisse - shot_A"             # default: "Clarisse - <name>"
    project_file = "/proj/shots/shot_A.project"   # required: the render package (artist path)
    images = ["project://scene/image1"]     # required: the images (sources) to render
    project = "default"                     # the Conductor project
    clarisse_version = "5.0.sp12"           # default: the newest known version
    use_custom_frames = false
    custom_frames = "1-10"                  # required when use_custom_frames
    chunk_size = 1
    use_scout_frames = false
    scout_frames = "1,5"                    # required when use_scout_frames
    tiles = 1                               # 1, 4, 9, ... 100
    instance_type = "n1-standard-4"
    preemptible = true
    retries = 1                             # 0-5: both the preempted and the failed budget
    dependency_scan = "smart"               # "none" | "smart" | "glob" (or the seed's labels)
    upload_only = false                     # no tasks, only uploads
    local_upload = true                     # the submitter's "upload in session"; kept, unused here
    extra_uploads = ["C:/proj/config/ocio/config.ocio"]
    task_template = "cnode <render_package> ..."   # default: DEFAULT_TASK_TEMPLATE
    notify = ["artist@example.com"]         # or one comma-separated string
    show_tracebacks = false
    log_level = "INFO"                      # CRITICAL, ERROR, WARNING, INFO, DEBUG, NOTSET
    output_path = "C:/proj/renders"         # default: computed from the images' save_as

    [autoretry_policy]                      # optional, overrides retries per cause
    preempted = 3                           # or {max_retries = 3}
    failed = 1                              # or {max_retries = 1, distinct_workers = 2, block_worker_after = 3}:
    #   a task fails for real once its failures span distinct_workers workers (1-10, default 2); a
    #   worker that fails block_worker_after of the job's tasks gets no more of them (0: never; default 3)

    [[environment]]                         # user entries, applied after the software's
    name = "PATH"
    value = "/proj/pipeline/bin"
    exclusive = false                       # false: append (the default); true: exclusive
    # merge_policy = "prepend"              # instead of exclusive: exclusive | append | prepend

Paths (project_file, extra_uploads, output_path) are artist paths; a relative path is relative to
the job spec file's directory.
"""

from __future__ import annotations

import difflib
import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cio_worker.job.document import (
    FAILED_SETTINGS, MAX_BLOCK_WORKER_AFTER, MAX_DISTINCT_WORKERS, MAX_RETRIES, RetryPolicy,
)
from cio_worker.job.environment import EnvEntry, MERGE_POLICIES
from cio_worker.errors import CioError, DocumentError, TokenError
from cio_worker.job.frames import FrameSet
from cio_worker.job.instances import DEFAULT_INSTANCE_TYPE, InstanceCatalogue, default_catalogue
from cio_worker.job.layout import validate_tiles
from cio_worker.job.paths import node_path
from cio_worker.job.software import SoftwareCatalogue
from cio_worker.job.tokens import TOKENS, Scope, render

DEFAULT_TASK_TEMPLATE = (
    "cnode <render_package> -image <sources> -image_frames_list <chunks> "
    "-tile_rendering <tiles> <tile_number> -license_server conductor_ilise:40500"
)
SCAN_MODES = ("none", "smart", "glob")
_SCAN_ALIASES = {"none": "none", "no scan": "none", "smart": "smart", "smart sequence": "smart", "glob": "glob"}
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET")
_EMAIL = re.compile(r"^[^@\s,;<>]+@[^@\s,;<>]+\.[^@\s,;<>]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IMAGE = re.compile(r"^project://\S+$")
_DRIVE = re.compile(r"^[A-Za-z]:")

_JOB_KEYS = (
    "name", "title", "project_file", "images", "project", "clarisse_version", "use_custom_frames",
    "custom_frames", "chunk_size", "use_scout_frames", "scout_frames", "tiles", "instance_type",
    "preemptible", "retries", "dependency_scan", "upload_only", "local_upload", "extra_uploads",
    "task_template", "notify", "show_tracebacks", "log_level", "output_path",
)  # fmt: skip
_TABLES = ("job", "autoretry_policy", "environment")


class JobSpecError(DocumentError):
    """A job spec that cannot be used; names the file, the key and what is wrong."""

    code = "bad_job_spec"

    def __init__(self, source: str | Path, field: str, problem: str) -> None:
        CioError.__init__(self, f"job spec {source}: {field}: {problem}")
        self.source = str(source)
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class JobSpec:
    source: str  # the TOML file it was read from
    name: str
    title: str
    project_file: str  # artist path
    images: tuple[str, ...]
    project: str = "default"
    clarisse_version: str = ""
    use_custom_frames: bool = False
    custom_frames: FrameSet | None = None
    chunk_size: int = 1
    use_scout_frames: bool = False
    scout_frames: FrameSet | None = None
    tiles: int = 1
    instance_type: str = DEFAULT_INSTANCE_TYPE
    preemptible: bool = True
    retries: int = 1
    autoretry_policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(1, 1))
    dependency_scan: str = "smart"
    upload_only: bool = False
    local_upload: bool = True
    extra_uploads: tuple[str, ...] = ()
    environment: tuple[EnvEntry, ...] = ()
    task_template: str = DEFAULT_TASK_TEMPLATE
    notify: tuple[str, ...] = ()
    show_tracebacks: bool = False
    log_level: str = "INFO"
    output_path: str | None = None

    @property
    def frames_override(self) -> FrameSet | None:
        """The custom frames when they are in use, else None (each image's own range)."""
        return self.custom_frames if self.use_custom_frames else None

    @property
    def scouts(self) -> FrameSet | None:
        return self.scout_frames if self.use_scout_frames else None

    def error(self, field: str, problem: str) -> JobSpecError:
        return JobSpecError(self.source, field, problem)


def load_job_spec(
    path: str | Path,
    *,
    instances: InstanceCatalogue | None = None,
    software: SoftwareCatalogue | None = None,
) -> JobSpec:
    """Read and validate a job spec file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise JobSpecError(path, "file", "does not exist") from None
    except OSError as exc:
        raise JobSpecError(path, "file", f"cannot be read ({exc.strerror or exc})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise JobSpecError(path, "file", "is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError(path, "file", f"is not valid TOML ({exc})") from None
    return parse_job_spec(
        data,
        source=path,
        instances=instances or default_catalogue(),
        software=software or SoftwareCatalogue(),
    )


def parse_job_spec(
    data: Mapping[str, Any],
    *,
    source: str | Path,
    instances: InstanceCatalogue,
    software: SoftwareCatalogue,
) -> JobSpec:
    """Validate an already-parsed TOML document; ``source`` names the file and anchors relative paths."""
    source = Path(source)
    base_dir = source.resolve().parent
    for key in data:
        if key not in _TABLES:
            hint = " (job settings go in the [job] table)" if key in _JOB_KEYS else _did_you_mean(key, _TABLES)
            raise JobSpecError(source, key, f"is not a job spec table{hint}")
    if "job" not in data:
        raise JobSpecError(source, "[job]", "is missing: a job spec needs a [job] table")
    job = _Table(data["job"], source, "[job]", _JOB_KEYS)

    name = job.text("name", default=source.stem)
    images = job.text_list("images", required=True)
    if not images:
        job.fail("images", "is empty: name at least one image, e.g. project://scene/image1")
    for index, image in enumerate(images):
        if not _IMAGE.match(image):
            job.fail("images", f"item {index + 1} {image!r} is not an image item like project://scene/image1")
    duplicate = next((i for i in images if images.count(i) > 1), None)
    if duplicate:
        job.fail("images", f"names {duplicate!r} twice")

    use_custom_frames = job.boolean("use_custom_frames", default=False)
    custom_frames = job.frames("custom_frames", required=use_custom_frames, because="use_custom_frames is on")
    use_scout_frames = job.boolean("use_scout_frames", default=False)
    scout_frames = job.frames("scout_frames", required=use_scout_frames, because="use_scout_frames is on")

    tiles = job.integer("tiles", default=1)
    try:
        validate_tiles(tiles)
    except DocumentError as exc:
        job.fail("tiles", exc.problem)

    instance_type = job.text("instance_type", default=DEFAULT_INSTANCE_TYPE)
    try:
        instances.get(instance_type)
    except CioError as exc:
        job.fail("instance_type", str(exc))

    version = job.text("clarisse_version", default=software.default_version)
    try:
        version = software.package(version).version
    except CioError as exc:
        job.fail("clarisse_version", str(exc))

    retries = job.integer("retries", default=1, minimum=0, maximum=MAX_RETRIES)
    policy = _retry_policy(data.get("autoretry_policy"), source, retries)

    scan = job.text("dependency_scan", default="smart")
    scan_mode = _SCAN_ALIASES.get(re.sub(r"[\s_-]+", " ", scan.strip().lower()))
    if scan_mode is None:
        job.fail("dependency_scan", f"{scan!r} is not one of {', '.join(SCAN_MODES)}")

    log_level = job.text("log_level", default="INFO").upper()
    if log_level not in LOG_LEVELS:
        job.fail("log_level", f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}")

    output_path = job.text("output_path", default=None)
    spec = JobSpec(
        source=str(source),
        name=name,
        title=job.text("title", default=f"Clarisse - {name}"),
        project_file=_artist_path(job, "project_file", job.text("project_file", required=True), base_dir),
        images=tuple(images),
        project=job.text("project", default="default"),
        clarisse_version=version,
        use_custom_frames=use_custom_frames,
        custom_frames=custom_frames,
        chunk_size=job.integer("chunk_size", default=1, minimum=1),
        use_scout_frames=use_scout_frames,
        scout_frames=scout_frames,
        tiles=tiles,
        instance_type=instance_type,
        preemptible=job.boolean("preemptible", default=True),
        retries=retries,
        autoretry_policy=policy,
        dependency_scan=scan_mode,
        upload_only=job.boolean("upload_only", default=False),
        local_upload=job.boolean("local_upload", default=True),
        extra_uploads=tuple(
            _artist_path(job, "extra_uploads", p, base_dir) for p in job.text_list("extra_uploads", required=False)
        ),
        environment=_environment(data.get("environment"), source),
        task_template=_template(job),
        notify=_notify(job),
        show_tracebacks=job.boolean("show_tracebacks", default=False),
        log_level=log_level,
        output_path=None if output_path is None else _artist_path(job, "output_path", output_path, base_dir),
    )
    if not spec.upload_only:
        _check_cnode_can_open(job, spec.project_file)
    return spec


# -- pieces ---------------------------------------------------------------------------------------


def _artist_path(table: "_Table", key: str, text: str, base_dir: Path) -> str:
    path = text.replace("\\", "/")
    if not (path.startswith("/") or _DRIVE.match(path)):
        path = posixpath.normpath((base_dir / path).as_posix())
    try:
        node = node_path(path, what=key)
    except CioError as exc:
        table.fail(key, str(exc))
    drive = _DRIVE.match(path)
    return (drive.group(0) if drive else "") + node


def _check_cnode_can_open(table: "_Table", project_file: str) -> None:
    """cnode cannot open a project whose file name holds a space (the node runs it from the
    project's directory with the bare file name, so the directories may hold spaces)."""
    name = posixpath.basename(project_file)
    if any(c.isspace() for c in name):
        table.fail("project_file", f"the file name {name!r} holds a space, which cnode cannot open, so every "
                   "task would fail; rename the project file (its directories may keep their spaces)")


def _retry_policy(raw: Any, source: Path, retries: int) -> RetryPolicy:
    if raw is None:
        return RetryPolicy(preempted=retries, failed=retries)
    table = _Table(raw, source, "[autoretry_policy]", ("preempted", "failed"))
    budgets = {}
    for cause in ("preempted", "failed"):
        value = table.data.get(cause)
        if isinstance(value, Mapping):
            allowed = FAILED_SETTINGS if cause == "failed" else ("max_retries",)
            inner = _Table(value, source, f"[autoretry_policy] {cause}", allowed)
            budgets[cause] = inner.integer("max_retries", default=None, minimum=0, maximum=MAX_RETRIES, required=True)
            if cause == "failed":
                budgets["distinct_workers"] = inner.integer(
                    "distinct_workers", default=RetryPolicy.distinct_workers, minimum=1, maximum=MAX_DISTINCT_WORKERS)
                budgets["block_worker_after"] = inner.integer(
                    "block_worker_after", default=RetryPolicy.block_worker_after, minimum=0,
                    maximum=MAX_BLOCK_WORKER_AFTER)
        elif value is None:
            budgets[cause] = retries
        else:
            budgets[cause] = table.integer(cause, default=retries, minimum=0, maximum=MAX_RETRIES)
    return RetryPolicy(**budgets)


def _environment(raw: Any, source: Path) -> tuple[EnvEntry, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise JobSpecError(source, "[[environment]]", "must be an array of tables ([[environment]] entries)")
    entries = []
    for index, item in enumerate(raw):
        table = _Table(item, source, f"[[environment]] #{index + 1}", ("name", "value", "exclusive", "merge_policy"))
        name = table.text("name", required=True)
        if not _ENV_NAME.match(name):
            table.fail("name", f"{name!r} is not a valid environment variable name")
        value = table.text("value", required=True, allow_empty=True)
        if "\x00" in value:
            table.fail("value", "contains a NUL character")
        exclusive = table.boolean("exclusive", default=None)
        policy = table.text("merge_policy", default=None)
        if policy is not None and policy not in MERGE_POLICIES:
            table.fail("merge_policy", f"{policy!r} is not one of {', '.join(MERGE_POLICIES)}")
        if policy is not None and exclusive is not None and (policy == "exclusive") != exclusive:
            table.fail("merge_policy", f"{policy!r} contradicts exclusive = {str(exclusive).lower()}; give one of them")
        if policy is None:
            policy = "exclusive" if exclusive else "append"
        entries.append(EnvEntry(name=name, value=value, merge_policy=policy))
    return tuple(entries)


def _template(job: "_Table") -> str:
    template = job.text("task_template", default=DEFAULT_TASK_TEMPLATE)
    try:  # syntax and unknown tokens now, with every known token given a stand-in value
        render(template, {name: "1" for name in TOKENS}, where="the template", scope=Scope.TILE)
    except TokenError as exc:
        job.fail("task_template", str(exc))
    return template


def _notify(job: "_Table") -> tuple[str, ...]:
    raw = job.data.get("notify")
    if raw is None:
        return ()
    if isinstance(raw, str):
        addresses = [a.strip() for a in raw.split(",") if a.strip()]
    else:
        addresses = job.text_list("notify", required=False)
    for address in addresses:
        if not _EMAIL.match(address):
            job.fail("notify", f"{address!r} is not an email address like name@example.com")
    return tuple(addresses)


def _did_you_mean(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


_NO_DEFAULT = object()


class _Table:
    """Typed access to one TOML table; errors name the file, the table and the key."""

    def __init__(self, data: Any, source: Path, where: str, keys: tuple[str, ...]) -> None:
        if not isinstance(data, Mapping):
            raise JobSpecError(source, where, f"must be a table, not {_kind(data)}")
        self.data = data
        self.source = source
        self.where = where
        self.keys = keys
        for key in data:
            if key not in keys:
                self.fail(key, f"is not a known key{_did_you_mean(key, keys)}")

    def fail(self, key: str, problem: str) -> None:
        raise JobSpecError(self.source, f"{self.where} {key}", problem)

    def _get(self, key: str, default: Any, required: bool, because: str = "") -> Any:
        if key in self.data:
            return self.data[key]
        if required:
            self.fail(key, f"is missing ({because})" if because else "is missing")
        return default

    def text(self, key: str, default: Any = None, *, required: bool = False, allow_empty: bool = False) -> Any:
        value = self._get(key, default, required)
        if key not in self.data:
            return value
        if not isinstance(value, str):
            self.fail(key, f"must be text, not {_kind(value)}")
        if not allow_empty and value.strip() == "":
            self.fail(key, "is empty")
        return value

    def text_list(self, key: str, *, required: bool) -> list[str]:
        value = self._get(key, [], required)
        if not isinstance(value, list):
            self.fail(key, f"must be a list of text, not {_kind(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(key, f"item {index + 1} must be text, not {_kind(item)}")
            if item.strip() == "":
                self.fail(key, f"item {index + 1} is empty")
        return list(value)

    def boolean(self, key: str, default: Any) -> Any:
        value = self._get(key, default, False)
        if key in self.data and not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {_kind(value)}")
        return value

    def integer(
        self,
        key: str,
        default: Any,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
        required: bool = False,
    ) -> Any:
        value = self._get(key, default, required)
        if key not in self.data:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be a whole number, not {_kind(value)}")
        if minimum is not None and value < minimum:
            self.fail(key, f"{value} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            self.fail(key, f"{value} is above the maximum {maximum}")
        return value

    def frames(self, key: str, *, required: bool, because: str) -> FrameSet | None:
        value = self._get(key, None, required, because)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            self.fail(key, f"must be a frame spec in text like \"1-10\", not {_kind(value)}")
        try:
            return FrameSet.parse(value)
        except CioError as exc:
            self.fail(key, str(exc))
        return None  # unreachable

