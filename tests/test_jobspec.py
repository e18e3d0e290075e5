"""Job spec files: every ConductorJob attribute, the defaults, and errors naming file and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cio_worker.job.document import RetryPolicy
from cio_worker.job.environment import EnvEntry
from cio_worker.errors import CioError
from cio_worker.job.frames import FrameSet
from cio_worker.job.instances import UnknownInstanceType, default_catalogue
from cio_worker.job.jobspec import DEFAULT_TASK_TEMPLATE, JobSpecError, load_job_spec
from cio_worker.job.software import SoftwareCatalogue, UnknownSoftwareVersion

MINIMAL = """
[job]
project_file = "/proj/shot.project"
images = ["project://scene/image1"]
"""

FULL = """
[job]
name = "lighting_v3"
title = "Clarisse - shot_B"
project_file = "C:\\\\proj\\\\shots\\\\shot_B.project"
images = ["project://scene/image1", "project://scene/image2"]
project = "harry_potter"
clarisse_version = "Clarisse 4.0 SP8"
use_custom_frames = true
custom_frames = "1-20x2, 30"
chunk_size = 3
use_scout_frames = true
scout_frames = "3-8x5"
tiles = 9
instance_type = "n1-highmem-8"
preemptible = false
retries = 2
dependency_scan = "Smart Sequence"
upload_only = true
local_upload = false
extra_uploads = ["C:/proj/config/ocio/config.ocio", "scripts/post.py"]
task_template = "cnode <render_package> -image <sources> -image_frames_list <chunks> -log_level Debug5"
notify = "a@example.com, b.c@example.org"
show_tracebacks = true
log_level = "debug"
output_path = "C:/proj/renders"

[autoretry_policy]
preempted = 4
failed = {max_retries = 0}

[[environment]]
name = "PATH"
value = "/my/scripts"
exclusive = false

[[environment]]
name = "OCIO"
value = "/proj/ocio/config.ocio"
exclusive = true

[[environment]]
name = "PYTHONPATH"
value = "$HOME/python"
merge_policy = "prepend"
"""


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_every_attribute_is_read(tmp_path: Path) -> None:
    spec = load_job_spec(write(tmp_path, FULL))
    assert spec.source == str(tmp_path / "job.toml")
    assert spec.name == "lighting_v3"
    assert spec.title == "Clarisse - shot_B"
    assert spec.project_file == "C:/proj/shots/shot_B.project"  # backslashes to slashes, drive kept
    assert spec.images == ("project://scene/image1", "project://scene/image2")
    assert spec.project == "harry_potter"
    assert spec.clarisse_version == "4.0.sp8"
    assert spec.use_custom_frames is True
    assert spec.custom_frames == FrameSet.parse("1-19x2,30")
    assert spec.frames_override == spec.custom_frames
    assert spec.chunk_size == 3
    assert spec.use_scout_frames is True
    assert spec.scouts == FrameSet.of([3, 8])
    assert spec.tiles == 9
    assert spec.instance_type == "n1-highmem-8"
    assert spec.preemptible is False
    assert spec.retries == 2
    assert spec.autoretry_policy == RetryPolicy(preempted=4, failed=0)
    assert spec.dependency_scan == "smart"
    assert spec.upload_only is True
    assert spec.local_upload is False
    # A relative extra upload is relative to the job spec file.
    assert spec.extra_uploads == ("C:/proj/config/ocio/config.ocio", (tmp_path / "scripts/post.py").as_posix())
    assert spec.environment == (
        EnvEntry("PATH", "/my/scripts", "append"),
        EnvEntry("OCIO", "/proj/ocio/config.ocio", "exclusive"),
        EnvEntry("PYTHONPATH", "$HOME/python", "prepend"),
    )
    assert "-log_level Debug5" in spec.task_template
    assert spec.notify == ("a@example.com", "b.c@example.org")
    assert spec.show_tracebacks is True
    assert spec.log_level == "DEBUG"
    assert spec.output_path == "C:/proj/renders"


def test_defaults(tmp_path: Path) -> None:
    spec = load_job_spec(write(tmp_path, MINIMAL, "shot_C.toml"))
    assert spec.name == "shot_C"
    assert spec.title == "Clarisse - shot_C"
    assert spec.project == "default"
    assert spec.clarisse_version == SoftwareCatalogue().default_version
    assert spec.use_custom_frames is False and spec.frames_override is None
    assert spec.chunk_size == 1
    assert spec.use_scout_frames is False and spec.scouts is None
    assert spec.tiles == 1
    assert spec.instance_type == "n1-standard-4"
    assert spec.preemptible is True
    assert spec.retries == 1
    assert spec.autoretry_policy == RetryPolicy(preempted=1, failed=1)
    assert spec.dependency_scan == "smart"
    assert spec.upload_only is False
    assert spec.extra_uploads == ()
    assert spec.environment == ()
    assert spec.task_template == DEFAULT_TASK_TEMPLATE
    assert DEFAULT_TASK_TEMPLATE == (
        "cnode <render_package> -image <sources> -image_frames_list <chunks> "
        "-tile_rendering <tiles> <tile_number> -license_server conductor_ilise:40500"
    )
    assert spec.notify == ()
    assert spec.log_level == "INFO"
    assert spec.output_path is None


def test_retries_fill_causes_missing_from_the_policy_table(tmp_path: Path) -> None:
    spec = load_job_spec(write(tmp_path, MINIMAL + "retries = 3\n[autoretry_policy]\nfailed = 0\n"))
    assert spec.autoretry_policy == RetryPolicy(preempted=3, failed=0)


def test_custom_frames_kept_but_unused_when_switched_off(tmp_path: Path) -> None:
    spec = load_job_spec(write(tmp_path, MINIMAL + 'custom_frames = "1-5"\nscout_frames = "2"\n'))
    assert spec.custom_frames == FrameSet.parse("1-5")
    assert spec.frames_override is None and spec.scouts is None


def test_relative_project_file_is_relative_to_the_spec(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    text = '[job]\nproject_file = "../scenes/shot.project"\nimages = ["project://scene/a"]\n'
    spec = load_job_spec(write(tmp_path / "specs", text))
    assert spec.project_file == (tmp_path / "scenes/shot.project").as_posix()


def test_seed_scan_labels_are_accepted(tmp_path: Path) -> None:
    assert load_job_spec(write(tmp_path, MINIMAL + 'dependency_scan = "No Scan"\n')).dependency_scan == "none"
    assert load_job_spec(write(tmp_path, MINIMAL + 'dependency_scan = "glob"\n')).dependency_scan == "glob"


@pytest.mark.parametrize(
    "extra, field, words",
    [
        ('chunk_size = 0\n', "[job] chunk_size", "below the minimum 1"),
        ('chunk_size = "2"\n', "[job] chunk_size", "whole number"),
        ("tiles = 5\n", "[job] tiles", "square grid"),
        ('instance_type = "n1-standard-7"\n', "[job] instance_type", "n1-standard-8"),
        ('clarisse_version = "3.6"\n', "[job] clarisse_version", "known:"),
        ("retries = 9\n", "[job] retries", "above the maximum 5"),
        ('dependency_scan = "deep"\n', "[job] dependency_scan", "none, smart, glob"),
        ("use_custom_frames = true\n", "[job] custom_frames", "use_custom_frames is on"),
        ('use_custom_frames = true\ncustom_frames = "1:10"\n', "[job] custom_frames", "cnode's form"),
        ("use_scout_frames = true\n", "[job] scout_frames", "use_scout_frames is on"),
        ('use_scout_frames = true\nscout_frames = "5x2"\n', "[job] scout_frames", "step needs a range"),
        ('preemptible = "yes"\n', "[job] preemptible", "true or false"),
        ('notify = ["not-an-address"]\n', "[job] notify", "email address"),
        ('log_level = "LOUD"\n', "[job] log_level", "DEBUG"),
        ('output_path = "/"\n', "[job] output_path", "root directory"),
        ('extra_uploads = "C:/a.txt"\n', "[job] extra_uploads", "list"),
        ('extra_uploads = ["//server/share/a.txt"]\n', "[job] extra_uploads", "UNC"),
        ('task_template = "cnode <render_pakage>"\n', "[job] task_template", "<render_pakage>"),
        ('task_template = "cnode <sources"\n', "[job] task_template", "column 7"),
        ('chunk_sise = 2\n', "[job] chunk_sise", "did you mean 'chunk_size'"),
        ('images2 = []\n', "[job] images2", "not a known key"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, extra: str, field: str, words: str) -> None:
    path = write(tmp_path, MINIMAL + extra)
    with pytest.raises(JobSpecError) as caught:
        load_job_spec(path)
    message = str(caught.value)
    assert message.startswith(f"job spec {path}: {field}:"), message
    assert words in message
    assert caught.value.code == "bad_job_spec"
    assert isinstance(caught.value, CioError)


@pytest.mark.parametrize(
    "text, field, words",
    [
        ('[job]\nimages = ["project://scene/a"]\n', "[job] project_file", "is missing"),
        ('[job]\nproject_file = "/p.project"\n', "[job] images", "is missing"),
        ('[job]\nproject_file = "/p.project"\nimages = []\n', "[job] images", "is empty"),
        ('[job]\nproject_file = "/p.project"\nimages = ["scene/a"]\n', "[job] images", "image item"),
        (
            '[job]\nproject_file = "/p.project"\nimages = ["project://a", "project://a"]\n',
            "[job] images",
            "twice",
        ),
        ('title = "x"\n', "title", "[job] table"),
        ('[jobs]\ntitle = "x"\n', "jobs", "did you mean 'job'"),
        (MINIMAL + "[environment]\nname = \"A\"\n", "[[environment]]", "array of tables"),
        ("[job\n", "file", "not valid TOML"),
    ],
)
def test_bad_structure_is_named(tmp_path: Path, text: str, field: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(JobSpecError) as caught:
        load_job_spec(path)
    assert str(caught.value).startswith(f"job spec {path}: {field}:"), str(caught.value)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    "entry, field, words",
    [
        ('name = "1BAD"\nvalue = "x"\n', "name", "not a valid environment variable name"),
        ('name = "A"\n', "value", "is missing"),
        ('name = "A"\nvalue = "x"\nexclusive = "no"\n', "exclusive", "true or false"),
        ('name = "A"\nvalue = "x"\nmerge_policy = "replace"\n', "merge_policy", "exclusive, append, prepend"),
        ('name = "A"\nvalue = "x"\nmerge_policy = "append"\nexclusive = true\n', "merge_policy", "contradicts"),
        ('name = "A"\nvalue = "x"\nexclsive = true\n', "exclsive", "did you mean 'exclusive'"),
    ],
)
def test_bad_environment_entries_are_named(tmp_path: Path, entry: str, field: str, words: str) -> None:
    text = MINIMAL + '[[environment]]\nname = "OK"\nvalue = ""\n[[environment]]\n' + entry
    path = write(tmp_path, text)
    with pytest.raises(JobSpecError) as caught:
        load_job_spec(path)
    assert f"[[environment]] #2 {field}:" in str(caught.value)
    assert words in str(caught.value)


def test_bad_retry_policy_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "[autoretry_policy]\npreempted = {max_retries = 6}\n")
    with pytest.raises(JobSpecError, match=r"\[autoretry_policy\] preempted max_retries: 6 is above"):
        load_job_spec(path)
    path = write(tmp_path, MINIMAL + "[autoretry_policy]\ncrashed = 1\n")
    with pytest.raises(JobSpecError, match=r"\[autoretry_policy\] crashed: is not a known key"):
        load_job_spec(path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="does not exist"):
        load_job_spec(tmp_path / "absent.toml")
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe[job]")
    with pytest.raises(JobSpecError, match="not UTF-8"):
        load_job_spec(path)


def test_instance_catalogue() -> None:
    catalogue = default_catalogue()
    n1 = catalogue.get("n1-standard-2")
    assert (n1.cores, n1.flavor, n1.description) == (2, "standard", "2 core, 7.50GB Mem")
    assert catalogue.get("n1-highmem-16").description == "16 core, 104.00GB Mem"
    assert catalogue.get("r5.2xlarge").flavor == "highmem"
    assert catalogue.get("c5.xlarge").memory_gb == 8
    with pytest.raises(UnknownInstanceType, match="m5.xlarge"):
        catalogue.get("m5.xlarg")


def test_software_package_environment() -> None:
    package = SoftwareCatalogue().package("5.0 SP8")
    assert [e.to_dict() for e in package.environment()] == [
        {"name": "PATH", "value": "/opt/isotropix/clarisse/5.0.sp8/bin", "merge_policy": "append"},
        {"name": "ILISE_SERVER", "value": "conductor_ilise:40500", "merge_policy": "exclusive"},
    ]
    with pytest.raises(UnknownSoftwareVersion, match="did you mean 5.0.sp8"):
        SoftwareCatalogue().package("5.0.sp9")
