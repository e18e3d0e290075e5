"""The render cannot touch the agent: with a render user (a real second user, ``nobody``) the
render reads its inputs, writes its outputs and TMPDIR, and cannot read the agent's token file,
cache or logs, see its token in the environment, or signal it. Needs root (skips otherwise)."""

from __future__ import annotations

import io
import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from cio_worker.cli.main import main as cli_main
from cio_worker.job.document import JobInfo, TaskDocument, TaskInfo, UploadFile
from cio_worker.job.hashing import hashstore_key, md5_b64_of_file
from cio_worker.job.paths import PathMap
from cio_worker.node.execution import ExecutionContext, execute
from cio_worker.node.render_user import RenderUser, RenderUserError, confine
from cio_worker.node.runner import ProcessRunner
from cio_worker.storage import open_storage
from cio_worker.storage.base import UploadItem

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")

PROBE = r"""
probe() { if eval "$2" >/dev/null 2>&1; then echo "$1: yes"; else echo "$1: no"; fi; }
probe read-token "cat '$TOKEN_FILE'"
probe list-cache "ls '$CACHE_DIR'"
probe list-logs "ls '$LOGS_DIR'"
probe signal-agent "kill -0 $CIO_AGENT_PID"
probe agent-environ "cat /proc/$CIO_AGENT_PID/environ"
probe read-input "grep -q texture-bytes '$INPUT'"
probe write-output "echo frame > '$OUT/beauty.0001.exr'"
probe write-tmp "echo scratch > \"\$TMPDIR/x\""
probe write-home "echo prefs > \"\$HOME/.clarisse.prefs\""
echo "token-env: ${CIO_TOKEN:-none}"
echo "agent-settings: ${CIO_TOKEN_FILE:-}${CIO_QUEUE:-}${CIO_RENDER_USER:-}${CREDENTIALS_DIRECTORY:-}"
echo "user: $USER $LOGNAME"
echo "uid: $(id -u)"
"""


@pytest.fixture
def base():
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")
    where = Path(tempfile.mkdtemp(prefix="cio-render-user-"))
    os.chmod(where, 0o711)  # others may pass through, as /var/lib is on a node
    yield where
    shutil.rmtree(where, ignore_errors=True)


def test_the_render_runs_as_the_render_user_and_cannot_touch_the_agent(base):
    user = RenderUser.resolve("nobody")
    token = base / "etc" / "agent.token"
    token.parent.mkdir()
    token.write_text("agent-secret-token\n")
    token.chmod(0o600)
    cache_dir = base / "cache"
    (cache_dir / "contents").mkdir(parents=True)
    work = base / "work"
    assert confine(user, work, cache_dir, [token]) == []
    (work / "logs" / "earlier.log").write_text("another task's log\n")
    # one input, stored as the artist had it: mode 0600
    storage_dir = base / "storage"
    storage_dir.mkdir()
    storage = open_storage(f"file://{storage_dir}")
    source = base / "texture.tex"
    source.write_text("texture-bytes\n")
    md5 = md5_b64_of_file(source)
    storage.upload([UploadItem(hashstore_key(md5), source, md5, source.stat().st_size)])
    root = base / "root"
    path_map = PathMap.rooted(str(root))
    out = root / "proj" / "renders"
    env = {"PATH": os.environ["PATH"], "CIO_TOKEN": "agent-secret-token", "TOKEN_FILE": str(token),
           "CIO_TOKEN_FILE": str(token), "CIO_QUEUE": "https://coordinator:8700", "CIO_RENDER_USER": "nobody",
           "CREDENTIALS_DIRECTORY": "/run/credentials/cio-agent.service", "HOME": "/root", "USER": "root",
           "CACHE_DIR": str(cache_dir / "contents"), "LOGS_DIR": str(work / "logs"),
           "INPUT": str(root / "proj" / "tex" / "texture.tex"), "OUT": str(out)}
    doc = TaskDocument(
        job=JobInfo(id="00001", title="render user", project="default", storage=f"file://{storage_dir}",
                    output_path="/proj/renders",
                    upload_files=(UploadFile("/proj/tex/texture.tex", md5, source.stat().st_size, 0o100600),)),
        task=TaskInfo(id="000", frames="1", command=PROBE),
    )
    ctx = ExecutionContext(work_root=work, open_storage=open_storage, runner=ProcessRunner(render_user=user),
                           path_map=path_map, base_env=env)
    outcome = execute(doc, ctx)
    text = outcome.log_path.read_text()
    body = text.split("==== cio_worker: output ====\n", 1)[1].split("==== cio_worker: end ====", 1)[0]
    said = dict(line.split(": ", 1) for line in body.splitlines()[1:])
    assert said == {
        "read-token": "no", "list-cache": "no", "list-logs": "no", "signal-agent": "no", "agent-environ": "no",
        "read-input": "yes", "write-output": "yes", "write-tmp": "yes", "write-home": "yes",
        "token-env": "none", "agent-settings": "", "user": "nobody nobody", "uid": str(user.uid),
    }, body
    assert outcome.status == "done", outcome.reason
    assert [f.relative_path for f in outcome.outputs.files] == ["beauty.0001.exr"]
    assert (out / "beauty.0001.exr").stat().st_uid == user.uid
    assert "run as: nobody" in text
    assert "agent-secret-token" not in text
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700


def test_a_token_file_others_may_read_is_named(base):
    user = RenderUser.resolve("nobody")
    token = base / "agent.token"
    token.write_text("t\n")
    token.chmod(0o644)
    [warning] = confine(user, base / "work", None, [token])
    assert str(token) in warning and "chmod 600" in warning


def test_an_unknown_or_privileged_render_user_is_refused_clearly():
    with pytest.raises(RenderUserError, match="no such user"):
        RenderUser.resolve("no-such-user-cio-xyz")
    with pytest.raises(RenderUserError, match="unprivileged"):
        RenderUser.resolve("root")


def test_run_task_with_an_unknown_render_user_is_an_error_a_person_can_act_on(base):
    doc = TaskDocument(job=JobInfo(id="00001", title="t", project="default", storage=f"file://{base}",
                                   output_path="/proj/renders"),
                       task=TaskInfo(id="000", frames="1", command="true"))
    path = base / "task.json"
    path.write_text(doc.to_json(), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    code = cli_main(["run-task", str(path), "--root", str(base / "root"), "--work-dir", str(base / "work"),
                     "--no-cache", "--render-user", "no-such-user-cio-xyz"], stdout=out, stderr=err)
    assert code == 2
    assert "no-such-user-cio-xyz" in err.getvalue() and "no such user" in err.getvalue()
