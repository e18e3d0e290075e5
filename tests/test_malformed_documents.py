"""Malformed task documents, generated with hypothesis: each one fails its task with a reason that
names the field and what is wrong with it, and the agent that meets it keeps serving.

- 10,000 documents in-process: each is refused by the document parser with a DocumentError naming
  the mutated field, and every one a queue can hold is stored as a task that an agent loop claims:
  the claim fails it with that reason and the loop goes on to the good tasks between them.
- 200 through a real queue claimed by a real ``cio-worker agent`` process, between good tasks.
- ``cio-worker run-task`` with a malformed document: one line naming the field, exit status 2.
- Valid documents whose command is bad (no project, unbalanced quotes, a crash): the task fails with
  the renderer's or the command line's problem; the agent keeps serving.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cio_worker.cli.main import main as cli_main
from cio_worker.job.document import TaskDocument
from cio_worker.errors import DocumentError
from tests.test_faults_node import create_job, file_farm
from tests.test_faults_storage import agent_process, assert_farm_invariants, captured_logs, record_figure

DELETE = object()  # a mutation that removes the field


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def base_document(n_env: int, n_uploads: int) -> dict[str, Any]:
    """A valid document (design.md) with ``n_env`` environment entries and ``n_uploads`` inputs."""
    env = [{"name": "PATH", "value": "/opt/clarisse/bin", "merge_policy": "append"}]
    env += [{"name": f"EXTRA_{i}", "value": f"v{i}", "merge_policy": "exclusive"} for i in range(1, n_env)]
    uploads = [{"destination": "C:/proj/shot.project", "md5": _md5(b"project"), "size": 5120, "mode": 33188}]
    uploads += [{"destination": f"C:/proj/tex/t{i}.exr", "md5": _md5(b"t%d" % i), "size": 7, "mode": 33261}
                for i in range(1, n_uploads)]
    return {
        "version": 1,
        "job": {
            "id": "00042", "title": "Clarisse - shot_A", "project": "default", "storage": "s3://bucket/prefix",
            "output_path": "C:/proj/renders", "preemptible": True,
            "autoretry_policy": {"preempted": {"max_retries": 3}, "failed": {"max_retries": 1}},
            "environment": env, "upload_files": uploads, "instance_type": "n1-standard-8",
        },
        "task": {
            "id": "007", "frames": "15-16", "tile": 2, "tiles": 4, "attempt": 1,
            "command": "cnode \"/proj/shot.project\" -image project://scene/image1 -image_frames_list '15:16'"
                       " -tile_rendering 4 2",
            "frames_done": "",
        },
    }


# --- invalid values, per field ---------------------------------------------------------------------

not_text = st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), max_size=2),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                     st.floats(allow_nan=False, allow_infinity=False))
not_int = st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2), st.just(2.0),
                    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()))
not_bool = st.one_of(st.sampled_from(["yes", "true", 1, 0]), st.text(max_size=5), st.integers(),
                     st.lists(st.integers(), max_size=2))
not_object = st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.lists(st.integers(), max_size=2))
not_list = st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.dictionaries(st.text(max_size=3),
                     st.integers(), max_size=2))
blank = st.sampled_from(["", " ", "\t", "  \n"])
bad_frames = st.one_of(blank, st.sampled_from([
    "1:10", "5x2", "1-10x0", "1-10x01", "1,,2", ",1", "1,", "abc", "1-", "--1", "1 - 2", "1.5", "1-10x-2",
    "１-２", "1;2", "1-2000000", "9" * 5000]), not_text, st.just(DELETE))
bad_env_name = st.one_of(blank, st.sampled_from(["1ABC", "A-B", "A B", "A=B", "PATH\n", "é", "$X"]),
                         not_text, st.just(DELETE))
bad_artist_path = st.one_of(blank, st.sampled_from(["relative/x", "C:relative", "/a/../b", "C:/a/../b", "//srv/x",
                                                    "\\\\srv\\x", "/a\x00b", "/", "C:/", ".."]),
                            not_text, st.just(DELETE))
bad_md5 = st.one_of(blank, st.sampled_from([
    hashlib.md5(b"x").hexdigest(),  # hex, not base64
    "abc",
    _md5(b"x")[:-3] + "==",  # a character short
    base64.b64encode(b"x" * 15).decode(),  # 15 bytes
    _md5(b"x")[:-3] + "B==",  # stray bits in the last character: never a computed MD5
    _md5(b"x").replace("=", ""),  # no padding
    " " + _md5(b"x"),
]), not_text, st.just(DELETE))


@dataclass(frozen=True)
class Family:
    """One way of breaking a document: which field (given the base's sizes) and which values."""

    name: str
    path: Callable[[Callable, int, int], tuple]  # (draw, n_env, n_uploads) -> path
    values: st.SearchStrategy
    queue: str = "job"  # how a queue stores it: "job" (JSON document), "column" (task column), "" (cannot)


def fixed(*path: object) -> Callable[[Callable, int, int], tuple]:
    return lambda draw, n_env, n_up: path


def env_entry(*rest: str) -> Callable[[Callable, int, int], tuple]:
    return lambda draw, n_env, n_up: ("job", "environment", draw(st.integers(0, n_env - 1)), *rest)


def upload_entry(*rest: str) -> Callable[[Callable, int, int], tuple]:
    return lambda draw, n_env, n_up: ("job", "upload_files", draw(st.integers(0, n_up - 1)), *rest)


FAMILIES = [
    Family("document", fixed(), st.one_of(not_object, st.none()), queue=""),
    Family("version", fixed("version"), st.one_of(st.sampled_from([0, -1, 2, 99, "1", 1.5, True]), st.just(DELETE)),
           queue=""),
    Family("job", fixed("job"), st.one_of(not_object, st.just(DELETE))),
    Family("task", fixed("task"), st.one_of(not_object, st.just(DELETE)), queue=""),
    Family("job.id", fixed("job", "id"), st.one_of(blank, st.sampled_from(["1234", "abcde", "00042\n", "１２３４５",
                                                                          "0004a", "-0042"]), not_text, st.just(DELETE))),
    Family("job.title", fixed("job", "title"), not_text),
    Family("job.project", fixed("job", "project"), st.one_of(blank, not_text)),
    Family("job.storage", fixed("job", "storage"), st.one_of(blank, st.sampled_from([
        "http://b/p", "s3://", "s3://b p", "gs//b", "file:/x", "S3://b", "ftp://x", "s3:/b"]), not_text, st.just(DELETE))),
    Family("job.output_path", fixed("job", "output_path"), bad_artist_path),
    Family("job.preemptible", fixed("job", "preemptible"), not_bool),
    Family("job.autoretry_policy", fixed("job", "autoretry_policy"), not_object),
    Family("job.autoretry_policy.cause", lambda d, e, u: ("job", "autoretry_policy", d(st.sampled_from(
        ["failed", "preempted"]))), not_object),
    Family("job.autoretry_policy.max_retries", lambda d, e, u: ("job", "autoretry_policy", d(st.sampled_from(
        ["failed", "preempted"])), "max_retries"), st.one_of(st.sampled_from([6, -1, 100]), not_int, st.just(DELETE))),
    Family("job.autoretry_policy.unknown", lambda d, e, u: ("job", "autoretry_policy", d(st.sampled_from(
        ["crashed", "Failed", "timeout"]))), st.just({"max_retries": 1})),
    Family("job.environment", fixed("job", "environment"), not_list),
    Family("job.environment[i]", env_entry(), st.one_of(not_object, st.none())),
    Family("job.environment[i].name", env_entry("name"), bad_env_name),
    Family("job.environment[i].merge_policy", env_entry("merge_policy"),
           st.one_of(st.sampled_from(["merge", "APPEND", "replace"]), blank, not_text)),
    Family("job.environment[i].value", env_entry("value"), st.one_of(not_text, st.just("a\x00b"), st.just(DELETE))),
    Family("job.upload_files", fixed("job", "upload_files"), not_list),
    Family("job.upload_files[i]", upload_entry(), st.one_of(not_object, st.none())),
    Family("job.upload_files[i].destination", upload_entry("destination"), bad_artist_path),
    Family("job.upload_files[i].md5", upload_entry("md5"), bad_md5),
    Family("job.upload_files[i].size", upload_entry("size"), st.one_of(st.sampled_from([-1, -5120]), not_int,
                                                                         st.just(DELETE))),
    Family("job.upload_files[i].mode", upload_entry("mode"), st.one_of(st.sampled_from([-1, 0o200000, 2**40]),
                                                                         not_int)),
    Family("job.upload_files[duplicate]", lambda d, e, u: ("job", "upload_files", u, "destination"),
           st.sampled_from(["C:/proj/shot.project", "D:/proj/shot.project", "/proj/shot.project", "C:/proj//shot.project"])),
    Family("job.upload_files[nested]", lambda d, e, u: ("job", "upload_files", u, "destination"),
           st.sampled_from(["C:/proj/shot.project/inner.txt", "/proj/shot.project/a/b.exr"])),
    Family("job.instance_type", fixed("job", "instance_type"), not_text),
    Family("task.id", fixed("task", "id"), st.one_of(blank, st.sampled_from(["7", "07", "abc", "007\n", "0x7"]),
                                                       not_text, st.just(DELETE)), queue=""),
    Family("task.frames", fixed("task", "frames"), bad_frames, queue="column"),
    Family("task.tiles", fixed("task", "tiles"), st.one_of(st.sampled_from([0, 2, 3, 5, 8, 101, -4, 10**6]), not_int),
           queue="column"),
    Family("task.tile", fixed("task", "tile"), st.one_of(st.sampled_from([0, -1, 5, 17]), not_int), queue="column"),
    Family("task.attempt", fixed("task", "attempt"), st.one_of(st.sampled_from([0, -1]), not_int), queue=""),
    Family("task.command", fixed("task", "command"), st.one_of(blank, not_text, st.just(DELETE)), queue="column"),
    Family("task.frames_done", fixed("task", "frames_done"),
           st.one_of(st.sampled_from(["1:2", "99", "15-17", "abc", "15,,16", "1-10x0"]), not_text), queue="column"),
]


@dataclass
class Case:
    family: str
    document: Any
    field: str  # the field the error must name
    queue: str  # "job", "column" or "" (see Family)


def render(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + part
    return out or "document"


@st.composite
def malformed(draw, families: list[Family] = FAMILIES) -> Case:
    n_env, n_up = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    doc: Any = base_document(n_env, n_up)
    family = draw(st.sampled_from(families))
    path = family.path(draw, n_env, n_up)
    value = draw(family.values)
    if family.name.startswith("job.upload_files[") and family.name.endswith(("[duplicate]", "[nested]")):
        doc["job"]["upload_files"].append({"destination": value, "md5": _md5(b"other"), "size": 1, "mode": 33188})
    elif not path:
        doc = value
    else:
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        if value is DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(value)
    return Case(family.name, doc, render(path), _storable(family, doc, path, value))


def _storable(family: Family, doc: Any, path: tuple, value: Any) -> str:
    """Whether a queue can hold this document as it is (a task column has one SQL type)."""
    if family.queue != "column":
        return family.queue
    if value is DELETE:
        return ""  # the columns are NOT NULL
    column = path[-1]
    if column in ("tile", "tiles"):
        # INTEGER affinity turns "4" and 4.0 into 4: only other numbers and non-numeric text stay wrong.
        if isinstance(value, bool) or isinstance(value, float):
            return ""
        if isinstance(value, str):
            try:
                float(value)
                return ""
            except ValueError:
                return "column"
        return "column" if isinstance(value, int) and abs(value) < 2**63 else ""
    return "column" if isinstance(value, str) else ""  # TEXT affinity turns numbers into text


def check_refused(case: Case) -> DocumentError:
    """The parser refuses the document, naming the field, with a problem a person can act on."""
    with pytest.raises(DocumentError) as caught:
        TaskDocument.from_dict(case.document)
    error = caught.value
    assert error.field == case.field, (case.family, case.field, str(error))
    assert str(error) == f"{error.field}: {error.problem}" and len(error.problem) >= 8
    return error


# --- storing malformed documents in a queue, as a coordinator of another version (or an edit) might ---


def store_cases(db: Path, cases: list[Case], good_every: int, good_command: str) -> list[tuple[int, Case | None]]:
    """Write each case as a job with one pending task straight into the queue's tables (as another
    version of the coordinator, or a hand edit, might have left it), with a good job before every
    ``good_every`` cases and one after them all. Returns (job number, case or None for good), in order."""
    good = base_document(1, 1)
    good_job = dict(good["job"], upload_files=[], storage=f"file://{db.parent / 'storage'}")
    good_task = {"frames": "1", "command": good_command, "tile": 1, "tiles": 1, "frames_done": ""}
    items: list[Case | None] = []
    for i, case in enumerate(cases):
        if i % good_every == 0:
            items.append(None)
        items.append(case)
    items.append(None)
    rows: list[tuple[int, Case | None]] = []
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    number = conn.execute("SELECT COALESCE(MAX(number), 0) FROM jobs").fetchone()[0]
    now = time.time()
    for item in items:
        number += 1
        if item is None:
            job, task = dict(good_job, id=f"{number:05d}"), good_task
        elif item.queue == "job":  # the stored job document is the broken part
            job, task = item.document.get("job"), good_task
        else:  # a task column is
            job, task = dict(good_job, id=f"{number:05d}"), item.document["task"]
        conn.execute("INSERT INTO jobs (number, title, document, created, scout, retry_preempted, retry_failed)"
                     " VALUES (?, 'malformed', ?, ?, 0, 0, 0)", (number, json.dumps(job), now))
        conn.execute("INSERT INTO tasks (job_number, number, frames, command, tile, tiles, scout, state, updated,"
                     " frames_done) VALUES (?, 0, ?, ?, ?, ?, 0, 'pending', ?, ?)",
                     (number, task["frames"], task["command"], task["tile"], task["tiles"], now,
                      task.get("frames_done", "")))
        rows.append((number, item))
    conn.execute("COMMIT")
    conn.close()
    return rows


def check_queue_outcomes(farm, rows: list[tuple[int, Case | None]]) -> tuple[int, int]:
    """Every malformed task failed with a reason naming its field; every good one is done."""
    failed = done = 0
    for number, case in rows:
        [task] = farm.queue.tasks(f"{number:05d}")
        if case is None:
            assert task.state == "done", task.reason
            done += 1
            continue
        assert task.state == "failed", (case.family, case.field, task)
        prefix = "the stored job document is invalid: " if case.queue == "job" else "the stored task is invalid: "
        assert task.reason.startswith(prefix + case.field + ": "), (case.family, case.field, task.reason)
        assert task.attempt_count == 0  # never claimed by anyone: a bad document costs no attempt
        failed += 1
    return failed, done


# --- 10,000 in-process -----------------------------------------------------------------------------


BATCH = 50
EXAMPLES = 200  # x BATCH = 10,000 documents


@pytest.mark.slow  # about 5 s: hypothesis draws 10,000 documents
def test_ten_thousand_malformed_documents_each_fail_with_the_field_named(tmp_path: Path) -> None:
    seen: list[Case] = []

    @settings(max_examples=EXAMPLES, database=None, deadline=None, derandomize=True,
              phases=[Phase.generate, Phase.shrink],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(malformed(), min_size=BATCH, max_size=BATCH))
    def each(batch: list[Case]) -> None:
        for case in batch:
            check_refused(case)
        seen.extend(batch)

    each()
    assert len(seen) >= EXAMPLES * BATCH
    families = {c.family for c in seen}
    assert families == {f.name for f in FAMILIES}  # every way of breaking a document was tried

    # Every document a queue can hold goes into one, between good tasks; an agent loop claims them.
    storable = [c for c in seen if c.queue]
    farm = file_farm(tmp_path)
    rows = store_cases(farm.queue.path, storable, good_every=500, good_command="echo rendered")
    with captured_logs() as logs, farm.agent() as running:
        deadline = time.monotonic() + 120
        while not all(farm.queue.is_finished(j.id) for j in farm.queue.jobs()):
            running.check()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    failed, done = check_queue_outcomes(farm, rows)
    assert failed == len(storable) and done == len(rows) - len(storable) >= 2
    assert running.summary is not None and running.summary.done == done and running.summary.failed == 0
    assert "Traceback" not in logs.text
    assert_farm_invariants(farm)
    record_figure("malformed/in-process", documents=len(seen), families=len(families),
                  stored_in_queue=len(storable), failed_at_claim=failed, good_done=done,
                  by_family=dict(sorted({f: sum(c.family == f for c in seen) for f in families}.items())))
    farm.close()


def test_arbitrary_json_anywhere_is_refused_with_a_document_error_or_accepted() -> None:
    """Any JSON value at any place in a document: the parser never fails any other way."""
    paths: list[tuple] = []

    def walk(node: Any, path: tuple) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*path, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, (*path, index))

    walk(base_document(2, 2), ())
    json_values = st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=8,
    )

    @settings(max_examples=1500, database=None, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(paths), json_values)
    def each(path: tuple, value: Any) -> None:
        doc: Any = base_document(2, 2)
        if not path:
            doc = value
        else:
            parent = doc
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = value
        try:
            TaskDocument.from_dict(doc)
        except DocumentError as exc:
            assert exc.field and exc.problem
        try:
            TaskDocument.from_json(json.dumps(doc))
        except DocumentError:
            pass

    each()


def test_text_that_is_not_a_document_is_refused_naming_the_document() -> None:
    for text in ["", "{", "[1, 2", "nul", "\x00", "[" * 100_000, "1" * 10_000, b"\xff\xfe{}"]:
        with pytest.raises(DocumentError) as caught:
            TaskDocument.from_json(text)
        assert caught.value.field in ("document", "version") and len(str(caught.value)) < 400


# --- 200 through a real queue and a real agent process ----------------------------------------------


def test_two_hundred_malformed_tasks_in_a_queue_fail_and_the_agent_process_keeps_serving(tmp_path: Path) -> None:
    cases: list[Case] = []
    storable = [f for f in FAMILIES if f.queue]

    @settings(max_examples=1, database=None, deadline=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(malformed(storable).filter(lambda c: bool(c.queue)), min_size=200, max_size=200))
    def draw(batch: list[Case]) -> None:
        cases[:] = batch

    draw()
    assert len(cases) == 200
    farm = file_farm(tmp_path)
    real = farm.submit("real", frames="1-2")  # a real render, queued before them all
    rows = store_cases(farm.queue.path, cases, good_every=40, good_command="echo rendered")
    last = farm.submit("last", frames="3-4", texture=b"the last texture\n" * 32)  # and one after them all
    with agent_process(farm) as agent:
        assert agent.wait(timeout=180) == 0, agent.log_text()
    log = agent.log_text()
    failed, done = check_queue_outcomes(farm, rows)
    assert failed == 200 and done == len(rows) - 200
    assert farm.task(real).state == farm.task(last).state == "done"
    assert f"tasks {done + 2}: done {done + 2}, failed 0" in log and "Traceback" not in log
    states = assert_farm_invariants(farm)
    record_figure("malformed/agent-process", documents=200, failed_at_claim=failed, good_done=done + 2,
                  outcome=states)
    farm.close()


# --- run-task with a malformed document ------------------------------------------------------------


def test_run_task_refuses_a_malformed_document_in_one_line_with_exit_status_2(tmp_path: Path) -> None:
    checked: list[str] = []

    @settings(max_examples=60, database=None, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(malformed())
    def each(case: Case) -> None:
        path = tmp_path / "task.json"
        path.write_text(json.dumps(case.document), encoding="utf-8")
        out, err = io.StringIO(), io.StringIO()
        code = cli_main(["run-task", str(path), "--work-dir", str(tmp_path / "work"), "--no-cache"],
                        stdout=out, stderr=err)
        assert code == 2, err.getvalue()
        [line] = err.getvalue().strip().splitlines()
        assert line.startswith(f"cio-worker: error: {case.field}: "), line
        checked.append(case.family)

    each()
    assert len(checked) >= 60
    assert not (tmp_path / "work" / "tasks").exists() or not list((tmp_path / "work" / "tasks").iterdir())


# --- valid documents with a bad command -------------------------------------------------------------


BAD_COMMANDS = {
    # command: what the reason must say
    "cnode": "names no project file",
    "cnode /proj/shot.project -image a b -image_frames_list '1:2'": "2 images but 1 frame specs",
    "cnode /proj/shot.project -image a -image_frames_list '1::2'": "frame spec is wrong",
    "cnode /proj/shot.project -image a -image_frames_list '1' -tile_rendering 4": "-tile_rendering needs",
    "cnode /proj/shot.project -image a -image_frames_list '1' -tile_rendering 4 9": "the index must be 1 to the count",
    "cnode /proj/missing.project -image a -image_frames_list '1'": "is not on this node",
    "no-such-program-here --render": "exited with status 127",
    'echo "unbalanced': "exited with status 2",
    "exit 3": "exited with status 3",
    "kill -SEGV $$": "killed by signal 11",
}


def test_bad_commands_fail_their_tasks_with_the_problem_and_the_agent_keeps_serving(tmp_path: Path) -> None:
    farm = file_farm(tmp_path)
    jobs = {}
    with captured_logs() as logs, farm.agent() as running:
        for command in BAD_COMMANDS:
            jobs[command] = create_job(farm, command)
        good = create_job(farm, "echo rendered")
        for job in [*jobs.values(), good]:
            farm.wait_finished(job, running)
    for command, phrase in BAD_COMMANDS.items():
        task = farm.task(jobs[command])
        assert task.state == "failed" and phrase in task.reason, (command, task.reason)
    assert farm.task(good).state == "done"
    assert "Traceback" not in logs.text
    states = assert_farm_invariants(farm)
    record_figure("bad-commands/in-process", commands=len(BAD_COMMANDS), outcome=states,
                  reasons={c: farm.task(j).reason for c, j in jobs.items()})
    farm.close()


def test_a_command_with_an_absurd_frame_number_fails_its_task_not_the_agent(tmp_path: Path) -> None:
    farm = file_farm(tmp_path)
    with farm.agent() as running:
        bad = create_job(farm, f"cnode /proj/shot.project -image a -image_frames_list '{'9' * 5000}'")
        farm.wait_finished(bad, running)
        good = create_job(farm, "echo rendered")
        farm.wait_finished(good, running)
    assert farm.task(bad).state == "failed" and farm.task(good).state == "done"
    farm.close()


def test_a_stored_job_document_that_is_not_json_fails_its_task_and_the_agent_goes_on(tmp_path: Path) -> None:
    farm = file_farm(tmp_path)
    broken = [create_job(farm, "echo never") for _ in range(3)]
    good = create_job(farm, "echo rendered")
    conn = sqlite3.connect(farm.queue.path, isolation_level=None)
    for job, text in zip(broken, ["{not json", "[" * 100_000, ""]):
        conn.execute("UPDATE jobs SET document = ? WHERE number = ?", (text, int(job)))
    conn.close()
    with captured_logs() as logs, farm.agent() as running:
        farm.wait_finished(good, running)
        for job in broken:
            farm.wait_finished(job, running)
    for job in broken:
        task = farm.task(job)
        assert task.state == "failed"
        assert task.reason.startswith("the stored job document is invalid: job: the stored document is not valid JSON")
    assert farm.task(good).state == "done" and "Traceback" not in logs.text
    assert_farm_invariants(farm)
    farm.close()
