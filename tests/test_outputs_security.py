"""What a task may not do with the agent's help: get a file from outside its output path uploaded
through a symbolic or a hard link, or see its secrets (environment values with secret-looking names) written
into the task log, the agent's log, a failure reason, or ``cio-worker status``.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from cio_worker.cli.main import main as cli_main
from cio_worker.job.document import JobInfo, TaskDocument, TaskInfo
from cio_worker.job.environment import EnvEntry
from cio_worker.errors import ChecksumError, StorageError
from cio_worker.job.hashing import hashstore_key, md5_b64_of_bytes
from cio_worker.node.outputs import changed_since, snapshot, upload_outputs
from cio_worker.storage import TransferError, open_storage
from tests.test_faults_node import create_job, file_farm
from tests.test_faults_storage import (
    Backend,
    assert_farm_invariants,
    captured_logs,
    record_figure,
)

SECRET_FILE_TEXT = b"root:$6$not-for-the-render-farm$:0:0:root:/root:/bin/sh\n"


AGENT_WRITTEN = ("_logs", "_previews")  # the task logs and previews the agent stores beside the outputs


def stored_contents(storage_root: Path, outputs_only: bool = True) -> list[bytes]:
    return [p.read_bytes() for p in storage_root.rglob("*")
            if p.is_file() and not (outputs_only and p.relative_to(storage_root).parts[0] in AGENT_WRITTEN)]


# --- symbolic links among the outputs -----------------------------------------------------------


def test_outputs_that_are_symlinks_are_never_uploaded_or_downloaded(tmp_path: Path) -> None:
    farm = file_farm(tmp_path)
    secret = tmp_path / "outside" / "shadow"
    secret.parent.mkdir()
    secret.write_bytes(SECRET_FILE_TEXT)
    (tmp_path / "outside" / "more").write_bytes(SECRET_FILE_TEXT * 2)
    out = f"{farm.root}/proj/renders"
    command = " && ".join([
        f"mkdir -p {out}/sub",
        f"echo frame > {out}/beauty.0001.exr",  # the one real output
        f"echo nested > {out}/sub/fx.0001.exr",  # a real one in a real directory
        f"ln -s {secret} {out}/beauty.0002.exr",  # a file outside the output path
        f"ln -s {secret.parent} {out}/linked_dir",  # a directory outside it
        f"ln -s beauty.0001.exr {out}/alias.exr",  # inside, but a link all the same
        f"ln -s {out}/missing {out}/dangling.exr",
        f"ln -s {out}/beauty.0002.exr {out}/chain.exr",  # a link to a link to outside
    ])
    with captured_logs(), farm.agent() as running:
        job = create_job(farm, command)
        farm.wait_finished(job, running)
    task = farm.task(job)
    assert task.state == "done", task.reason
    [record] = farm.queue.downloads(job, state=None)
    assert sorted(f.relative_path for f in record.files) == ["beauty.0001.exr", "sub/fx.0001.exr"]
    contents = stored_contents(tmp_path / "storage")
    assert all(SECRET_FILE_TEXT not in data for data in stored_contents(tmp_path / "storage", outputs_only=False))
    assert sorted(contents) == sorted([b"frame\n", b"nested\n"])
    # the artist gets the two real files, and no link
    artist = tmp_path / "artist-download"
    report = farm.download(lambda url: open_storage(url), artist)
    assert report.refused == [] and report.files_written == 2
    placed = sorted(p.relative_to(artist).as_posix() for p in artist.rglob("*") if not p.is_dir())
    assert placed == ["proj/renders/beauty.0001.exr", "proj/renders/sub/fx.0001.exr"]
    assert not any(p.is_symlink() for p in artist.rglob("*"))
    assert_farm_invariants(farm)
    record_figure("outputs/symlinks", links=5, uploaded=2, leaked=0)
    farm.close()


@pytest.mark.parametrize(("ln", "reason"), [("ln -s", "symlink"), ("ln", "hard link (2 names)")])
def test_run_task_says_which_outputs_were_not_uploaded_because_they_are_links(tmp_path: Path, ln: str,
                                                                              reason: str) -> None:
    secret = tmp_path / "shadow"  # outside the output path, on the same file system (a hard link needs that)
    secret.write_bytes(SECRET_FILE_TEXT)
    root = tmp_path / "root"
    out = root / "proj" / "renders"
    doc = TaskDocument(
        job=JobInfo(id="00001", title="links", project="default", storage=f"file://{tmp_path / 'storage'}",
                    output_path="C:/proj/renders"),
        task=TaskInfo(id="000", frames="1",
                      command=f"mkdir -p {out} && echo frame > {out}/a.exr && {ln} {secret} {out}/b.exr"),
    )
    path = tmp_path / "task.json"
    path.write_text(doc.to_json(), encoding="utf-8")
    stdout, stderr = io.StringIO(), io.StringIO()
    code = cli_main(["run-task", str(path), "--root", str(root), "--work-dir", str(tmp_path / "work"),
                     "--no-cache", "--quiet"], stdout=stdout, stderr=stderr)
    assert code == 0, stdout.getvalue() + stderr.getvalue()
    assert f"not uploaded ({reason}): b.exr" in stdout.getvalue()
    assert "output a.exr" in stdout.getvalue() and "output b.exr" not in stdout.getvalue()
    assert all(SECRET_FILE_TEXT not in data for data in stored_contents(tmp_path / "storage", outputs_only=False))
    assert secret.read_bytes() == SECRET_FILE_TEXT


def _link_after_render_cnode(bin_dir: Path, real_bin: Path, ln: str = "ln -s") -> None:
    """A ``cnode`` that renders with the simulator, then swaps frame 2's image for a link (``ln``:
    symbolic or hard) to a file outside the output path (a compromised or buggy renderer)."""
    script = bin_dir / "cnode"
    script.write_text(
        "#!/bin/sh\n"
        f'"{real_bin / "cnode"}" "$@" || exit $?\n'
        f'for f in $(find "$LINK_ROOT" -name "beauty.0002.png"); do rm -f "$f"; {ln} "$LINK_TARGET" "$f"; done\n',
        encoding="utf-8",
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _linking_farm(tmp_path: Path, ln: str = "ln -s"):
    farm = file_farm(tmp_path)
    secret = tmp_path / "outside-secret"
    secret.write_bytes(SECRET_FILE_TEXT)
    linking = tmp_path / "linking-bin"
    linking.mkdir()
    _link_after_render_cnode(linking, farm.bin, ln)
    farm.env.update(PATH=f"{linking}:{farm.env['PATH']}", LINK_ROOT=str(farm.root), LINK_TARGET=str(secret))
    return farm


def test_a_renderer_that_leaves_a_link_to_an_outside_file_never_gets_it_uploaded(tmp_path: Path) -> None:
    farm = _linking_farm(tmp_path)
    with farm.agent() as running:
        job = farm.submit("linked", frames="1-2", retries_failed=0)
        farm.wait_finished(job, running)
    offered = [f.relative_path for r in farm.queue.downloads(job, state=None) for f in r.files]
    assert "beauty.0002.png" not in offered
    assert all(SECRET_FILE_TEXT not in data for data in stored_contents(tmp_path / "storage", outputs_only=False))
    assert_farm_invariants(farm)
    farm.close()


@pytest.mark.parametrize("ln", ["ln -s", "ln"])
def test_a_frame_the_renderer_left_as_a_link_is_judged_missing(tmp_path: Path, ln: str) -> None:
    farm = _linking_farm(tmp_path, ln)
    with farm.agent() as running:
        job = farm.submit("linked", frames="1-2", retries_failed=0)
        farm.wait_finished(job, running)
    task = farm.task(job)
    farm.close()
    assert task.state == "failed" and "beauty.0002.png" in task.reason, (task.state, task.reason)
    assert all(SECRET_FILE_TEXT not in data for data in stored_contents(tmp_path / "storage", outputs_only=False))


@pytest.fixture(params=["file", "s3", "gcs"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "file":
        return open_storage(f"file://{tmp_path / 'storage'}")
    from tests.test_faults_storage import make_backend

    backend: Backend = make_backend(request, request.param)
    return backend.storage()


def test_an_output_swapped_for_a_link_after_the_scan_is_refused_by_the_upload(any_store, tmp_path: Path) -> None:
    """The race: the file is hashed as a regular file, then replaced by a link before its upload.
    The upload reads through the link, but the bytes do not match the scanned MD5, so nothing of
    the outside file is stored under any name."""
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(out)
    frame = out / "beauty.0001.exr"
    frame.write_bytes(b"the rendered frame\n")
    scan = changed_since(out, before)
    assert [f.relative_path for f in scan.files] == ["beauty.0001.exr"]
    secret = tmp_path / "shadow"
    secret.write_bytes(SECRET_FILE_TEXT)
    frame.unlink()
    frame.symlink_to(secret)
    with pytest.raises((ChecksumError, TransferError, StorageError)) as caught:
        upload_outputs(any_store, scan)
    assert "md5" in str(caught.value).lower() or "checksum" in type(caught.value).__name__.lower()
    keys = {scan.files[0].key, hashstore_key(md5_b64_of_bytes(SECRET_FILE_TEXT))}
    assert any_store.exists(keys) == set()
    any_store.close()


def test_a_new_output_with_a_second_name_is_skipped_with_its_reason(tmp_path: Path) -> None:
    """A hard link made in the output directory to a file outside it (same file system) is never
    hashed or uploaded; nor is a file that gains a second name after the walk."""
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(SECRET_FILE_TEXT)
    before = snapshot(out)
    (out / "beauty.0001.exr").write_bytes(b"the rendered frame\n")
    os.link(outside, out / "beauty.0002.exr")
    scan = changed_since(out, before)
    assert [f.relative_path for f in scan.files] == ["beauty.0001.exr"]
    assert [(s.relative_path, s.reason) for s in scan.skipped] == [("beauty.0002.exr", "hard link (2 names)")]
    # an unchanged file with two names (an input the cache placed by a hard link) is no output at all
    assert changed_since(out, snapshot(out)).skipped == []
    # the race: one name when walked, two when opened to be hashed
    from cio_worker.node import outputs

    walked = dict(outputs._walk(out, []))
    os.link(out / "beauty.0001.exr", tmp_path / "second-name")
    assert walked["beauty.0001.exr"].st_nlink == 1
    assert outputs._md5_nofollow(out / "beauty.0001.exr") == (None, "hard link (2 names)")


# --- secrets in the environment -------------------------------------------------------------------


TOKEN = "tok-5c1f0b9e-SECRET-4b7d"
AWS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
NODE_TOKEN = "node-session-token-77aa"
SECRETS = (TOKEN, AWS_KEY, NODE_TOKEN)


def _secret_env() -> tuple[EnvEntry, ...]:
    return (EnvEntry("MY_API_TOKEN", TOKEN, "exclusive"), EnvEntry("AWS_SECRET_ACCESS_KEY", AWS_KEY, "exclusive"),
            EnvEntry("PLAIN_SETTING", "visible-value", "exclusive"))


def _status_outputs(farm, job: str) -> str:
    text = ""
    for args in (["status"], ["status", job]):
        out, err = io.StringIO(), io.StringIO()
        assert cli_main([*args, "--queue", f"sqlite:///{farm.queue.path}"], stdout=out, stderr=err) == 0
        text += out.getvalue() + err.getvalue()
    return text


def _leaks(texts: dict[str, str]) -> dict[str, list[str]]:
    return {where: [s for s in SECRETS if s in text] for where, text in texts.items() if any(s in text for s in SECRETS)}


def test_secret_values_never_reach_a_log_a_reason_or_status(tmp_path: Path) -> None:
    farm = file_farm(tmp_path)
    farm.env["AWS_SESSION_TOKEN"] = NODE_TOKEN  # the node's own credentials, inherited by the render
    out = f"{farm.root}/proj/renders"
    echo = (f'mkdir -p {out} && echo "token=$MY_API_TOKEN aws=$AWS_SECRET_ACCESS_KEY node=$AWS_SESSION_TOKEN" '
            f'&& echo "$MY_API_TOKEN" >&2 && env && echo frame > {out}/f.0001.exr')
    fail = 'echo "ERROR: license server refused token $MY_API_TOKEN: licence denied"; exit 1'
    with captured_logs() as logs, farm.agent() as running:
        ok = create_job(farm, echo, environment=_secret_env())
        bad = create_job(farm, fail, environment=_secret_env())
        farm.wait_finished(ok, running)
        farm.wait_finished(bad, running)
    assert farm.task(ok).state == "done" and farm.task(bad).state == "failed"
    reason = farm.task(bad).reason
    assert "license server refused token ****" in reason  # the reason still says what happened
    task_logs = {p.name: p.read_text(errors="replace") for p in (farm.work / "logs").iterdir()}
    ok_log = task_logs[f"{ok}-000-a1.log"]
    assert "token=**** aws=**** node=****" in ok_log and "MY_API_TOKEN=****" in ok_log
    assert "PLAIN_SETTING=visible-value" in ok_log  # only secret-looking names are masked
    texts = {"agent log": logs.text, "status": _status_outputs(farm, bad), "reason": reason, **task_logs}
    assert _leaks(texts) == {}
    assert_farm_invariants(farm)
    record_figure("secrets/agent", places_checked=len(texts), leaks=0)
    farm.close()


def test_run_task_output_masks_secret_values(tmp_path: Path) -> None:
    root = tmp_path / "root"
    doc = TaskDocument(
        job=JobInfo(id="00001", title="secrets", project="default", storage=f"file://{tmp_path / 'storage'}",
                    output_path="C:/proj/renders", environment=_secret_env()),
        task=TaskInfo(id="000", frames="1", command='echo "my token is $MY_API_TOKEN"; echo "$AWS_SECRET_ACCESS_KEY"'),
    )
    path = tmp_path / "task.json"
    path.write_text(doc.to_json(), encoding="utf-8")
    stdout, stderr = io.StringIO(), io.StringIO()
    code = cli_main(["run-task", str(path), "--root", str(root), "--work-dir", str(tmp_path / "work"), "--no-cache"],
                    stdout=stdout, stderr=stderr)
    assert code == 0, stdout.getvalue() + stderr.getvalue()
    assert "my token is ****" in stdout.getvalue()
    logs = {p.name: p.read_text() for p in (tmp_path / "work" / "logs").iterdir()}
    assert _leaks({"stdout": stdout.getvalue(), "stderr": stderr.getvalue(), **logs}) == {}


def test_a_malformed_reference_in_a_secret_value_does_not_quote_the_secret(tmp_path: Path) -> None:
    farm = file_farm(tmp_path)
    broken = (EnvEntry("MY_API_TOKEN", TOKEN + "${BROKEN", "exclusive"),)
    with captured_logs() as logs, farm.agent() as running:
        job = create_job(farm, "echo hello", environment=broken)
        farm.wait_finished(job, running)
    task = farm.task(job)
    texts = {"agent log": logs.text, "status": _status_outputs(farm, job), "reason": task.reason}
    farm.close()
    assert task.state == "failed"
    assert _leaks(texts) == {}
    assert "MY_API_TOKEN" in task.reason  # the reason names the entry to fix, not its value
