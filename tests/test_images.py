"""The instance images as an operator meets them: the systemd units pass `systemd-analyze verify`
and keep a low `systemd-analyze security` exposure; the Packer template has a GCE and an EC2
builder that install a built wheel into /opt/cio-worker/venv, a hook for the site's renderer and
no licence server of its own (`packer validate` where Packer is installed, an HCL parse always)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest

IMAGES = Path(__file__).resolve().parents[1] / "images"
UNITS = ("cio-worker.service", "cio-coordinator.service")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
PACKER = shutil.which("packer")


# -- systemd --------------------------------------------------------------------------------------------

def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    text = (IMAGES / "systemd" / name).read_text().replace("\\\n", " ")
    parser.read_string(text)
    return parser


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
@pytest.mark.parametrize("name", UNITS)
def test_units_exposure_is_low(name):
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(IMAGES / "systemd" / name)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout).group(1))
    assert score <= 2.0, result.stdout  # systemd's own scale: 0 (locked down) to 10 (unprotected)


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
