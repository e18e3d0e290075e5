"""The task document (design.md): round trip, and an error naming the field for every bad value."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from typing import Any, Callable

import pytest

from cio_worker.job.document import RetryPolicy, TaskDocument, job_id_text, task_id_text
from cio_worker.job.environment import EnvEntry
from cio_worker.errors import CioError, DocumentError
from cio_worker.job.frames import FrameSet

MD5 = base64.b64encode(hashlib.md5(b"project").digest()).decode()
MD5_HEX = hashlib.md5(b"project").hexdigest()
MD5_TEX = base64.b64encode(hashlib.md5(b"texture").digest()).decode()


def valid() -> dict[str, Any]:
    return {
        "version": 1,
        "job": {
            "id": "00042",
            "title": "Clarisse - shot_A",
            "project": "default",
            "storage": "s3://bucket/prefix",
            "output_path": "C:/proj/renders",
            "preemptible": True,
            "autoretry_policy": {"preempted": {"max_retries": 3}, "failed": {"max_retries": 1}},
            "environment": [
                {"name": "PATH", "value": "/opt/clarisse/bin", "merge_policy": "append"},
                {"name": "ILISE_SERVER", "value": "conductor_ilise:40500", "merge_policy": "exclusive"},
            ],
            "upload_files": [
                {"destination": "C:/proj/shot.project", "md5": MD5, "size": 5120, "mode": 33188},
                {"destination": "C:/proj/tex/wood.exr", "md5": MD5_TEX, "size": 7, "mode": 33261},
            ],
            "instance_type": "n1-standard-8",
        },
        "task": {
            "id": "007",
            "frames": "15-16",
            "tile": 2,
            "tiles": 4,
            "attempt": 1,
            "command": "cnode \"/proj/shot.project\" -image project://scene/image1 -image_frames_list '15:16' "
            "-tile_rendering 4 2",
            "frames_done": "",
        },
    }


def test_valid_document_parses_into_typed_fields() -> None:
    doc = TaskDocument.from_dict(valid())
    assert doc.job.id == "00042"
    assert doc.job.node_output_path == "/proj/renders"
    assert doc.job.autoretry_policy == RetryPolicy(preempted=3, failed=1)
    assert doc.job.environment[0] == EnvEntry("PATH", "/opt/clarisse/bin", "append")
    assert doc.job.upload_files[0].node_destination == "/proj/shot.project"
    assert doc.job.upload_files[1].mode == 0o100755
    assert doc.task.frame_set == FrameSet.of([15, 16])
    assert doc.task.frames_done_set == FrameSet()
    assert (doc.task.tile, doc.task.tiles) == (2, 4)
    assert doc.label == "job 00042 task 007"


def test_round_trip() -> None:
    doc = TaskDocument.from_dict(valid())
    assert TaskDocument.from_dict(doc.to_dict()) == doc
    assert TaskDocument.from_json(doc.to_json()) == doc
    assert TaskDocument.from_json(doc.to_json().encode()) == doc
    assert doc.to_dict() == valid()


def test_defaults_for_optional_fields() -> None:
    data = valid()
    for key in ("title", "project", "preemptible", "autoretry_policy", "environment", "upload_files", "instance_type"):
        del data["job"][key]
    for key in ("tile", "tiles", "attempt", "frames_done"):
        del data["task"][key]
    doc = TaskDocument.from_dict(data)
    assert doc.job.project == "default"
    assert doc.job.preemptible is True
    assert doc.job.autoretry_policy == RetryPolicy(preempted=3, failed=1)
    assert doc.job.upload_files == () and doc.job.environment == ()
    assert (doc.task.tile, doc.task.tiles, doc.task.attempt, doc.task.frames_done) == (1, 1, 1, "")
    assert TaskDocument.from_dict(doc.to_dict()) == doc


def test_a_partial_retry_policy_gives_the_other_cause_no_retries() -> None:
    data = valid()
    data["job"]["autoretry_policy"] = {"preempted": {"max_retries": 5}}
    policy = TaskDocument.from_dict(data).job.autoretry_policy
    assert (policy.budget("preempted"), policy.budget("failed")) == (5, 0)


def test_frames_done_inside_frames_is_kept() -> None:
    data = valid()
    data["task"]["frames_done"] = "15"
    assert TaskDocument.from_dict(data).task.frames_done_set == FrameSet.of([15])


def test_ids_are_zero_padded() -> None:
    assert (job_id_text(42), task_id_text(7)) == ("00042", "007")


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, last = _keys(path)
        target = data
        for key in parents:
            target = target[key]
        target[last] = value

    return change


def _delete(path: str) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, last = _keys(path)
        target = data
        for key in parents:
            target = target[key]
        del target[last]

    return change


def _keys(path: str) -> list[Any]:
    keys: list[Any] = []
    for part in path.split("."):
        name, _, index = part.partition("[")
        keys.append(name)
        if index:
            keys.append(int(index.rstrip("]")))
    return keys


BAD = [
    # (field path reported, change, words of the message)
    ("job.upload_files[0].md5", _set("job.upload_files[0].md5", MD5_HEX), "not base64 of a 16-byte MD5"),
    (
        "job.upload_files[0].md5",
        _set("job.upload_files[0].md5", base64.b64encode(b"x" * 15).decode()),
        "not base64 of a 16-byte MD5",
    ),
    ("job.upload_files[1].md5", _set("job.upload_files[1].md5", MD5[:-3] + "B=="), "not the canonical base64"),
    ("job.upload_files[1].md5", _set("job.upload_files[1].md5", MD5 + "\n"), "base64"),
    ("job.upload_files[1].md5", _set("job.upload_files[1].md5", 5), "must be base64 text"),
    ("job.upload_files[0].md5", _delete("job.upload_files[0].md5"), "is missing"),
    ("job.upload_files[1].destination", _set("job.upload_files[1].destination", "proj/wood.exr"), "relative"),
    ("job.upload_files[1].destination", _set("job.upload_files[1].destination", "C:/proj/../../etc/x"), "'..'"),
    ("job.upload_files[0].size", _set("job.upload_files[0].size", -1), "below the minimum 0"),
    ("job.upload_files[0].size", _set("job.upload_files[0].size", "5120"), "must be a whole number, not text"),
    ("job.upload_files[0].size", _set("job.upload_files[0].size", 5.5), "must be a whole number, not a decimal"),
    ("job.upload_files[0].mode", _set("job.upload_files[0].mode", 0o1000000), "above the maximum"),
    ("job.upload_files[0]", _set("job.upload_files[0]", "C:/proj/a"), "must be an object, not text"),
    ("job.upload_files", _set("job.upload_files", {}), "must be a list, not an object"),
    (
        "job.upload_files[1].destination",
        _set("job.upload_files[1].destination", "D:\\proj\\shot.project"),
        "/proj/shot.project, as job.upload_files[0] does, with other content",
    ),
    (
        "job.upload_files[1].destination",
        _set("job.upload_files[1].destination", "C:/proj/shot.project/inside.exr"),
        "below /proj/shot.project, which job.upload_files[0] places as a file",
    ),
    ("task.frames", _set("task.frames", "15:16"), "cnode"),
    ("task.frames", _set("task.frames", ""), "is empty"),
    ("task.frames", _set("task.frames", 15), "must be text, not a number"),
    ("task.tile", _set("task.tile", 5), "5 is beyond the task's 4 tiles"),
    ("task.tile", _set("task.tile", 0), "below the minimum 1"),
    ("task.tiles", _set("task.tiles", 3), "not a tile count"),
    ("task.tiles", _set("task.tiles", 10000), "not a tile count"),
    ("task.frames_done", _set("task.frames_done", "14-15"), "14"),
    ("task.frames_done", _set("task.frames_done", "1-"), "frame spec"),
    ("task.attempt", _set("task.attempt", 0), "below the minimum 1"),
    ("task.command", _set("task.command", "  "), "is empty"),
    ("task.command", _delete("task.command"), "is missing"),
    ("task.id", _set("task.id", "7"), "task id of at least 3 digits"),
    ("task.id", _set("task.id", "007\n"), "task id"),
    ("task.id", _set("task.id", "00\u0667"), "task id"),
    ("task", _delete("task"), "is missing"),
    ("task", _set("task", []), "must be an object, not a list"),
    ("job.id", _set("job.id", "42"), "job id of at least 5 digits"),
    ("job.id", _set("job.id", "00042\n"), "job id"),
    ("job.id", _set("job.id", 42), "must be text, not a number"),
    ("job.storage", _set("job.storage", "ftp://host/x"), "file://, s3:// or gs://"),
    ("job.storage", _set("job.storage", "s3://bucket\n"), "file://, s3:// or gs://"),
    ("job.output_path", _set("job.output_path", "renders"), "relative"),
    ("job.preemptible", _set("job.preemptible", "yes"), "must be true or false, not text"),
    ("job.preemptible", _set("job.preemptible", 1), "must be true or false, not a number"),
    (
        "job.autoretry_policy.preempted.max_retries",
        _set("job.autoretry_policy.preempted.max_retries", 6),
        "6 is above the maximum 5",
    ),
    (
        "job.autoretry_policy.failed.max_retries",
        _set("job.autoretry_policy.failed.max_retries", -1),
        "below the minimum 0",
    ),
    ("job.autoretry_policy.failed.max_retries", _set("job.autoretry_policy.failed.max_retries", True), "whole number"),
    ("job.autoretry_policy.crashed", _set("job.autoretry_policy.crashed", {"max_retries": 1}), "not a retry cause"),
    ("job.autoretry_policy", _set("job.autoretry_policy", 3), "must be an object"),
    ("job.environment[1].merge_policy", _set("job.environment[1].merge_policy", "replace"), "'replace' is not one of"),
    ("job.environment[0].name", _set("job.environment[0].name", "MY-VAR"), "not a valid environment variable name"),
    ("job.environment[0].name", _set("job.environment[0].name", "PATH\n"), "not a valid environment variable name"),
    ("job.environment[0].value", _set("job.environment[0].value", "a\x00b"), "NUL"),
    ("job.environment[0].value", _delete("job.environment[0].value"), "is missing"),
    ("job", _delete("job"), "is missing"),
    ("version", _set("version", 2), "2 is not supported"),
    ("version", _delete("version"), "is missing"),
]


@pytest.mark.parametrize(("field", "change", "says"), BAD, ids=[f"{b[0]}:{b[2][:30]}" for b in BAD])
def test_bad_value_names_the_field(field: str, change: Callable[[dict], None], says: str) -> None:
    data = valid()
    change(data)
    with pytest.raises(DocumentError) as info:
        TaskDocument.from_dict(data)
    err = info.value
    assert err.field == field, str(err)
    assert says in err.problem, str(err)
    assert str(err).startswith(f"{field}: ")
    assert isinstance(err, CioError) and err.code == "bad_document"


def test_the_same_file_listed_twice_is_fine() -> None:
    data = valid()
    data["job"]["upload_files"].append(copy.deepcopy(data["job"]["upload_files"][0]))
    data["job"]["upload_files"][-1]["destination"] = "D:/proj/shot.project"
    assert len(TaskDocument.from_dict(data).job.upload_files) == 3


@pytest.mark.parametrize(
    ("text", "says"),
    [("[1, 2]", "must be an object, not a list"), ('"x"', "not text"), ("null", "not null"), ("{", "not valid JSON")],
)
def test_non_object_json(text: str, says: str) -> None:
    with pytest.raises(DocumentError, match=says) as info:
        TaskDocument.from_json(text)
    assert info.value.field == "document"


def test_invalid_utf8_is_a_document_error() -> None:
    with pytest.raises(DocumentError, match="not valid JSON"):
        TaskDocument.from_json(b"\xff\xfe{")


def test_the_input_is_not_modified() -> None:
    data = valid()
    before = json.dumps(data, sort_keys=True)
    TaskDocument.from_dict(data)
    assert json.dumps(data, sort_keys=True) == before
