"""The instance images as an operator meets them: the systemd units pass `systemd-analyze verify`
and keep a low `systemd-analyze security` exposure; the Packer template has a GCE and an EC2
builder that install a built wheel into /opt/cio-worker/venv, a hook for the site's renderer and
no licence server of its own (`packer validate` where Packer is installed, an HCL parse always).
The agent unit runs renders as the unprivileged `render` user, and the capabilities it keeps are
exactly those a real render-user task needs (run under them with setpriv, as root, where possible)."""

from __future__ import annotations

import configparser
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import hcl2
import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
UNITS = ("cio-worker.service", "cio-coordinator.service")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
PACKER = shutil.which("packer")
SETPRIV = shutil.which("setpriv")
# What cio_worker.node.render_user needs of root to hand a task to the render user and take it back.
RENDER_USER_CAPS = {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_KILL"}


# -- systemd --------------------------------------------------------------------------------------------

def _text(name: str) -> str:
    return (IMAGES / "systemd" / name).read_text().replace("\\\n", " ")


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(_text(name))
    return parser


def _values(name: str, key: str) -> list[str]:
    """Every assignment of ``key`` in the unit, in order (the parser keeps only the last)."""
    return re.findall(rf"^{key}=(.*)$", _text(name), re.M)


def _root_for(tmp: Path, units: dict[str, str]) -> Path:
    """A filesystem root holding ``units``, systemd's own unit library and the programs the units
    run (stand-ins), so that `systemd-analyze verify --root` checks them without installing."""
    root = tmp / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    for name, text in units.items():
        (root / "etc/systemd/system" / name).write_text(text)
    for library in ("usr/lib/systemd/system", "lib/systemd/system"):
        if (Path("/") / library).is_dir() and not (root / library).exists():
            shutil.copytree(Path("/") / library, root / library, symlinks=True)
    for text in units.values():
        for program in re.findall(r"^Exec\w+=[-+@!:]*(/\S+)", text, re.M):
            stand_in = root / program.lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("#!/bin/sh\n")
            stand_in.chmod(0o755)
    return root


def _verify(root: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", f"--root={root}", name],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian's systemd package)")
def test_units_pass_systemd_analyze_verify(tmp_path):
    units = {name: (IMAGES / "systemd" / name).read_text() for name in UNITS}
    root = _root_for(tmp_path, units)
    for name in UNITS:
        result = _verify(root, name)
        assert result.returncode == 0 and not result.stderr.strip(), f"{name}:\n{result.stderr}"


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian's systemd package)")
def test_verify_catches_a_broken_unit(tmp_path):
    broken = (IMAGES / "systemd" / "cio-worker.service").read_text().replace("Type=notify", "Type=notfy")
    root = _root_for(tmp_path, {"cio-worker.service": broken})
    result = _verify(root, "cio-worker.service")
    assert result.returncode != 0 or "notfy" in result.stderr, result.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian's systemd package)")
@pytest.mark.parametrize("name, limit", [("cio-worker.service", 3.0), ("cio-coordinator.service", 2.0)])
def test_units_exposure_is_low(name, limit):
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(IMAGES / "systemd" / name)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout).group(1))
    # systemd's own scale: 0 (locked down) to 10 (unprotected). The agent is root (for the render
    # user) with six capabilities: 2.7 where the coordinator, a dynamic user with none, is 1.2.
    assert score <= limit, result.stdout


def test_agent_unit_is_a_notify_service_with_a_watchdog_that_gives_up():
    unit = _unit("cio-worker.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and service["WatchdogSec"]
    assert service["Restart"] == "on-failure"
    assert unit["Unit"]["StartLimitBurst"] and unit["Unit"]["StartLimitAction"] == "poweroff"
    # an agent that gave up (exit 69, after its give-up command) is not restarted: the instance powers off
    assert service["RestartPreventExitStatus"] == "69" and '"$EXIT_STATUS" = 69' in service["ExecStopPost"]
    for setting in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert service[setting] == "yes"
    assert service["ProtectSystem"] == "strict"
    # every directory the agent writes is one the unit makes writable
    writable = {f"/var/lib/{service['StateDirectory']}", f"/var/cache/{service['CacheDirectory']}",
                f"/run/{service['RuntimeDirectory']}"}
    for option in ("--root", "--work-dir", "--cache-dir"):
        path = re.search(rf"{option} (\S+)", service["ExecStart"]).group(1)
        assert any(path == w or path.startswith(w + "/") for w in writable), (option, path)
    # the token: a root-only file handed over as a credential, never in the environment file
    assert service["LoadCredential"].startswith("agent-token:/etc/cio-worker/")
    assert "CIO_TOKEN_FILE=%d/agent-token" in service["Environment"]
    example = (IMAGES / "systemd" / "agent.env.example").read_text()
    settings = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert settings["CIO_QUEUE"].startswith("https://")
    assert "CIO_TOKEN" not in settings and "CIO_TOKEN_FILE" not in settings


def test_agent_unit_runs_renders_as_an_unprivileged_user_that_cannot_reach_the_agent():
    from cio_worker.node.containment import TASK_SLICE

    unit = _unit("cio-worker.service")
    service = unit["Service"]
    environment = " ".join(_values("cio-worker.service", "Environment")).split()
    assert "CIO_RENDER_USER=render" in environment
    # root (no User=, no DynamicUser=): render_user switches users only as root, so the token
    # credential ($CREDENTIALS_DIRECTORY, 0500 and its files 0400, the service user's) is root's alone
    assert "User" not in service and "DynamicUser" not in service
    assert set(service["CapabilityBoundingSet"].split()) == RENDER_USER_CAPS
    assert service["NoNewPrivileges"] == "yes" and "AmbientCapabilities" not in service
    # the agent's directories: the render passes through the state directory, never into the cache
    assert service["StateDirectoryMode"] == "0711"
    assert service["CacheDirectoryMode"] == service["RuntimeDirectoryMode"] == "0700"
    assert service["UMask"] == "0077"
    # the seccomp filter lets the agent become the render user and give it its directories
    filters = _values("cio-worker.service", "SystemCallFilter")
    assert filters.index("~@privileged") < len(filters) - 1
    assert {"@setuid", "@chown"} <= set(filters[-1].split())
    # the agent sees the render user's processes, and may kill a task's scope in the task slice
    assert service.get("ProtectProc", "default") == "default"
    assert f"-/sys/fs/cgroup/{TASK_SLICE}" in " ".join(_values("cio-worker.service", "ReadWritePaths")).split()
    assert TASK_SLICE in unit["Unit"]["Wants"].split() and TASK_SLICE in unit["Unit"]["After"].split()
    example = (IMAGES / "systemd" / "agent.env.example").read_text()
    assert re.search(r"^CIO_RENDER_USER=render$", example, re.M)


# A render-user task run by an agent that has only the given capabilities (setpriv --bounding-set,
# as the unit's CapabilityBoundingSet= does): it probes what the render may do, leaves a setsid'd
# SIGTERM-ignoring process behind, and writes one output. Prints what came of it as JSON.
AGENT_TASK_PY = r"""
import json, os, sys
from pathlib import Path
import psutil
from cio_worker.job.document import JobInfo, TaskDocument, TaskInfo, UploadFile
from cio_worker.job.hashing import hashstore_key, md5_b64_of_file
from cio_worker.job.paths import PathMap
from cio_worker.node.containment import detect
from cio_worker.node.execution import ExecutionContext, execute
from cio_worker.node.render_user import RenderUser, confine
from cio_worker.node.runner import ProcessRunner
from cio_worker.storage import open_storage
from cio_worker.storage.base import UploadItem

base, prefer = Path(sys.argv[1]), tuple(sys.argv[2:])
user = RenderUser.resolve("nobody")
token = base / "etc" / "agent.token"
token.parent.mkdir()
token.write_text("agent-secret-token\n")
token.chmod(0o600)
work, cache_dir = base / "work", base / "cache"
confine(user, work, cache_dir, [token])
(base / "storage").mkdir()
storage = open_storage(f"file://{base / 'storage'}")
source = base / "texture.tex"
source.write_text("texture-bytes\n")
md5 = md5_b64_of_file(source)
storage.upload([UploadItem(hashstore_key(md5), source, md5, source.stat().st_size)])
root = base / "root"
command = "\n".join([
    'probe() { if eval "$2" >/dev/null 2>&1; then echo "$1: yes"; else echo "$1: no"; fi; }',
    f"probe read-token \"cat '{token}'\"",
    'probe signal-agent "kill -0 $CIO_AGENT_PID"',
    f"probe read-input \"grep -q texture-bytes '{root}/proj/tex/texture.tex'\"",
    f"probe write-output \"echo frame > '{root}/proj/renders/beauty.0001.exr'\"",
    "setsid sh -c 'trap \"\" TERM; exec sleep 600' </dev/null >/dev/null 2>&1 &",
    'echo "escapee: $!"',
])
doc = TaskDocument(
    job=JobInfo(id="00001", title="caps", project="default", storage=f"file://{base / 'storage'}",
                output_path="/proj/renders",
                upload_files=(UploadFile("/proj/tex/texture.tex", md5, source.stat().st_size, 0o100600),)),
    task=TaskInfo(id="000", frames="1", command=command))
runner = ProcessRunner(containment=detect(prefer), render_user=user)
ctx = ExecutionContext(work_root=work, open_storage=open_storage, runner=runner, path_map=PathMap.rooted(str(root)),
                       base_env={"PATH": "/usr/bin:/bin"})
outcome = execute(doc, ctx)
text = outcome.log_path.read_text() if outcome.log_path.exists() else ""
body = text.split("==== cio_worker: output ====\n", 1)[-1].split("==== cio_worker: end ====", 1)[0]
said = dict(line.split(": ", 1) for line in body.splitlines()[1:] if ": " in line)
escapee = int(said.pop("escapee", "0"))
try:
    escapee_alive = escapee > 0 and psutil.Process(escapee).status() != psutil.STATUS_ZOMBIE
except psutil.NoSuchProcess:
    escapee_alive = False
print(json.dumps({
    "status": outcome.status, "reason": str(outcome.error or ""), "said": said,
    "run_as_nobody": "run as: nobody" in text, "containment": runner.containment.describe(),
    "outputs": [f.relative_path for f in outcome.outputs.files] if outcome.outputs else [],
    "escapee_alive": escapee_alive, "task_dirs_left": sorted(p.name for p in (work / "tasks").iterdir()),
}))
"""


def _task_under_caps(tmp_path: Path, caps: set[str], prefer: tuple[str, ...]) -> dict:
    base = tmp_path / "node"
    base.mkdir()
    base.chmod(0o711)  # others may pass through, as /var/lib is on a node
    script = tmp_path / "agent_task.py"
    script.write_text(AGENT_TASK_PY)
    bounding = ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}" for c in sorted(caps))])
    done = subprocess.run([SETPRIV, f"--bounding-set={bounding}", "--inh-caps=-all", sys.executable, str(script),
                           str(base), *prefer], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _cannot_switch_users_here(prefer: tuple[str, ...]) -> str | None:
    if os.geteuid() != 0 or SETPRIV is None:
        return "needs root and setpriv (util-linux) to run a task under the unit's capabilities"
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "no user 'nobody' on this machine"
    from cio_worker.node.containment import detect

    if prefer and detect(prefer, subreaper=False).hierarchy is None:
        return f"no writable {prefer[0]} cgroup hierarchy here"
    return None


@pytest.mark.parametrize("prefer", [("v2",), ("v1:freezer",)], ids=["cgroup-v2", "cgroup-v1-freezer"])
def test_the_agent_units_capabilities_are_enough_for_a_render_user_task(tmp_path, prefer):
    if why := _cannot_switch_users_here(prefer):
        pytest.skip(why)
    caps = set(_unit("cio-worker.service")["Service"]["CapabilityBoundingSet"].split())
    got = _task_under_caps(tmp_path, caps, prefer)
    assert got["status"] == "done" and got["containment"].startswith("cgroup"), got
    assert got["run_as_nobody"] and got["said"] == {
        "read-token": "no", "signal-agent": "no", "read-input": "yes", "write-output": "yes"}, got
    assert got["outputs"] == ["beauty.0001.exr"], got
    assert not got["escapee_alive"], got  # killed through its cgroup, though another user's
    assert got["task_dirs_left"] == [], got  # the render's own directory removed by the agent


def test_without_the_capabilities_a_render_user_task_cannot_run(tmp_path):
    if why := _cannot_switch_users_here(()):
        pytest.skip(why)
    got = _task_under_caps(tmp_path, set(), ())
    assert got["status"] != "done", got  # so the test above measures the unit's set, not this machine's


def test_coordinator_unit_is_a_notify_service_reading_its_password_from_a_credential():
    service = _unit("cio-coordinator.service")["Service"]
    assert service["Type"] == "notify" and service["WatchdogSec"]
    assert "cio-worker serve" in service["ExecStart"]
    assert service["LoadCredential"].startswith("pgpass:")
    example = (IMAGES / "systemd" / "coordinator.env.example").read_text()
    queue = re.search(r"^CIO_QUEUE=(\S+)", example, re.M).group(1)
    assert queue.startswith("postgresql://") and ":" not in queue.split("//")[1].split("@")[0]  # no password


# -- Packer ---------------------------------------------------------------------------------------------

def _unquote(value):
    if isinstance(value, str):
        return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if k != "__is_block__"}
    return value


@pytest.fixture(scope="module")
def template():
    with open(IMAGES / "packer" / "cio-worker.pkr.hcl") as f:
        return _unquote(hcl2.load(f))


def _provisioners(template) -> list[tuple[str, dict]]:
    (build,) = template["build"]
    return [next(iter(p.items())) for p in build["provisioner"]]


def test_packer_template_builds_for_gce_and_ec2(template):
    kinds = {kind: set(names) for source in template["source"] for kind, names in source.items()}
    assert kinds == {"googlecompute": {"render_node"}, "amazon-ebs": {"render_node"}}
    (build,) = template["build"]
    assert sorted(build["sources"]) == ["source.amazon-ebs.render_node", "source.googlecompute.render_node"]


def test_packer_installs_the_wheel_into_the_venv_and_ships_no_work_tree(template):
    provisioners = _provisioners(template)
    uploads = [p["source"] for kind, p in provisioners if kind == "file"]
    assert "${var.wheel}" in uploads
    for source in uploads:
        assert not re.search(r"(^|/)\.\.?/?$|\.venv|\.git", source.replace("${path.root}/../systemd/", "")), source
    commands = [line for kind, p in provisioners if kind == "shell" for line in p.get("inline", [])]
    installs = [c for c in commands if "pip install" in c]
    assert installs and all("/opt/cio-worker/venv/bin/pip install" in c and "basename(var.wheel)" in c for c in installs)
    assert any("systemctl enable cio-worker.service" in c for c in commands)


def test_packer_makes_the_render_user_and_keeps_the_configuration_from_it(template):
    commands = [line for kind, p in _provisioners(template) if kind == "shell" for line in p.get("inline", [])]
    assert any(re.search(r"useradd --system .*--shell /usr/sbin/nologin render\b", c) for c in commands)
    assert not any("useradd" in c and "/var/lib/cio-worker" in c for c in commands)  # not the agent's state
    assert any("install -d -m 0700 /etc/cio-worker" in c for c in commands)
    assert any(re.search(r"install -m 0600 \S+/agent.env.example /etc/cio-worker/agent.env", c) for c in commands)


def test_packer_has_the_sites_renderer_hook_and_no_licence_server(template):
    hooks = [p for kind, p in _provisioners(template) if kind == "shell" and "var.renderer_install" in p.get("script", "")]
    assert len(hooks) == 1 and hooks[0]["environment_vars"] == "${var.renderer_env}"
    default_hook = IMAGES / "packer" / "renderer-install.sh"
    assert default_hook.stat().st_mode & 0o111
    for path in (IMAGES / "packer").iterdir():
        text = path.read_text().lower()
        assert not re.search(r"licen[sc]e_server|ilise|:40500|rlm|@[\w.-]+:\d+", text), path


@pytest.mark.skipif(PACKER is None, reason="packer is not installed (Debian's packer package)")
def test_packer_validate(tmp_path):
    wheel = tmp_path / "cio_worker-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")  # validate checks the upload exists; the build itself installs it
    template = IMAGES / "packer" / "cio-worker.pkr.hcl"
    base = [PACKER, "validate", f"-var=wheel={wheel}"]
    ok = subprocess.run([*base, "-var=gce_project_id=p", str(template)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the check is real: a GCE build without its project, or an EC2 one without a type, is refused
    for missing in ("-var=gce_project_id=", "-var=aws_instance_type="):
        bad = subprocess.run([*base, "-var=gce_project_id=p", missing, str(template)], capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode != 0, missing
