"""The agent's configuration from the command line, CIO_* variables, a TOML file and the instance's
metadata (GCE attributes, EC2 user-data, Azure userData), read over real HTTP from the metadata
server stand-in on 127.0.0.1; ``cio-worker agent --print-config`` and an agent process that takes
its queue from the metadata."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cio_worker.cli.agent import GIVEN, NOT_SETTINGS
from cio_worker.cli.main import build_parser
from cio_worker.node.cloud_config import read_cloud_layers
from cio_worker.node.config import KEYS, AgentSettings, ConfigError, environment_layer, load_settings, resolve
from cio_worker.queue import SqliteQueue
from cio_worker.sim.metadata_server import MetadataServer
from tests.servers import free_port

SECRET = "s3cr3t-token-value"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would configure an agent."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CIO_", "GCE_METADATA", "AWS_EC2_METADATA")) and k not in ("NOTIFY_SOCKET",)}
    return {**env, **extra}


def load(given: dict, env: dict, config: Path | None = None, **kw):
    return load_settings(given, env, config, config_required=config is not None, read_cloud=read_cloud_layers, **kw)


@pytest.fixture
def md():
    with MetadataServer() as server:
        yield server


def test_each_source_in_its_order_of_precedence_says_where_each_value_came_from(tmp_path: Path, md) -> None:
    md.set_gce_attributes(
        instance={"cio-queue": "https://instance:8700", "cio-idle-exit": "300", "ssh-keys": "not ours"},
        project={"cio-queue": "https://project:8700", "cio-token": SECRET, "cio-idle-exit": "900",
                 "cio-poll-seconds": "4", "cio-max-tasks": "7", "startup-script": "not ours either"})
    config = tmp_path / "agent.toml"
    config.write_text('poll_seconds = 3\nmax-tasks = 5\nlease_seconds = 90\nwork_dir = "/from/file"\n'
                      'path_map = ["C:/proj=/mnt/proj"]\n')
    env = clean_env(CIO_LEASE_SECONDS="120", CIO_WORK_DIR="/from/env", CIO_NO_CACHE="yes",
                    CIO_GCE_METADATA_URL=md.url)
    resolved = load({"preemption": "gce", "work_dir": "/from/cli"}, env, config)

    settings = resolved.check()
    assert resolved.provider == "gce"
    assert (settings.work_dir, resolved.sources["work_dir"]) == ("/from/cli", "command line (--work-dir)")
    assert (settings.lease_seconds, resolved.sources["lease_seconds"]) == (120.0, "env CIO_LEASE_SECONDS")
    assert settings.no_cache is True
    assert (settings.poll_seconds, settings.max_tasks, resolved.sources["max_tasks"]) == (3.0, 5, str(config))
    assert settings.path_map == ("C:/proj=/mnt/proj",)
    # GCE: the instance's attributes over the project's
    assert (settings.queue, resolved.sources["queue"]) == ("https://instance:8700", "gce instance attribute cio-queue")
    assert (settings.idle_exit, resolved.sources["idle_exit"]) == (300.0, "gce instance attribute cio-idle-exit")
    assert (settings.token, resolved.sources["token"]) == (SECRET, "gce project attribute cio-token")
    assert resolved.sources["heartbeat_seconds"] == "default" and settings.heartbeat_seconds == 10.0
    # on a cloud instance, a start that fails is retried before the agent gives up
    assert settings.give_up_after == 600.0 and resolved.sources["give_up_after"] == "default (a gce instance)"
    # the agent asked the stand-in, over HTTP, for both attribute sets
    asked = {(r.path, r.query.get("recursive")) for r in md.request_log()}
    assert {("/computeMetadata/v1/instance/attributes/", "true"),
            ("/computeMetadata/v1/project/attributes/", "true")} <= asked


@pytest.mark.parametrize("provider", ["ec2", "azure"])
def test_user_data_is_a_toml_layer_and_a_script_is_passed_over(md, provider: str) -> None:
    put = md.set_ec2_user_data if provider == "ec2" else md.set_azure_user_data
    env = clean_env(**{f"CIO_{provider.upper()}_METADATA_URL": md.url})
    put(f'queue = "https://{provider}:8700"\ntoken = "{SECRET}"\ngive-up-after = 120\n'
        'give_up_command = "systemctl poweroff"\n')
    resolved = load({"preemption": provider}, env)
    settings = resolved.check()
    label = "ec2 user-data" if provider == "ec2" else "azure userData"
    assert (settings.queue, resolved.sources["queue"]) == (f"https://{provider}:8700", label)
    assert (settings.token, settings.give_up_after, settings.give_up_command) == (SECRET, 120.0, "systemctl poweroff")

    put("#!/bin/sh\necho 'a boot script, someone else's'\n")
    resolved = load({"preemption": provider, "queue": "sqlite:///q.db"}, env)
    assert resolved.problems == () and resolved.sources["token"] == "default"

    put(None)  # no user-data at all
    assert load({"preemption": provider, "queue": "sqlite:///q.db"}, env).problems == ()


def test_an_unknown_key_is_an_error_that_suggests_the_known_one(tmp_path: Path, md) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('queu = "https://coordinator:8700"\n')
    md.set_gce_attributes(instance={"cio-idle-exti": "60"})
    resolved = load({"preemption": "gce"}, clean_env(CIO_GCE_METADATA_URL=md.url), config)
    assert f"unknown key 'queu' in {config}; did you mean 'queue'?" in resolved.problems
    assert "unknown gce instance attribute 'cio-idle-exti'; did you mean 'cio-idle-exit'?" in resolved.problems
    with pytest.raises(ConfigError, match="did you mean 'queue'"):
        resolved.check()


def test_bad_values_and_keys_that_cannot_come_from_metadata_are_named(tmp_path: Path, md) -> None:
    md.set_ec2_user_data('queue = "https://x:1"\npreemption = "none"\nidle_exit = "soon"\n[agent]\nx = 1\n')
    env = clean_env(CIO_EC2_METADATA_URL=md.url, CIO_MAX_TASKS="2.5", CIO_LOG_LEVEL="loud")
    problems = " | ".join(load({"preemption": "ec2"}, env).problems)
    assert "'preemption' in ec2 user-data cannot come from instance metadata" in problems
    assert "ec2 user-data: 'soon' is not a number" in problems
    assert "'agent' is a table" in problems
    assert "env CIO_MAX_TASKS: '2.5' is not a whole number" in problems
    assert "env CIO_LOG_LEVEL: 'loud' is not one of DEBUG, INFO, WARNING, ERROR" in problems

    config = tmp_path / "broken.toml"
    config.write_text("queue = \n")
    assert any("broken.toml is not valid TOML" in p for p in load({}, clean_env(), config).problems)
    missing = load({"queue": "sqlite:///q.db"}, clean_env(), tmp_path / "absent.toml").problems
    assert missing == (f"configuration file {tmp_path / 'absent.toml'} does not exist; check --config (or CIO_CONFIG)",)


def test_no_queue_anywhere_says_where_one_may_come_from() -> None:
    [problem] = resolve([environment_layer(clean_env())], clean_env()).problems
    assert problem.startswith("no queue: pass --queue URL, set CIO_QUEUE")


def test_a_token_file_in_a_higher_layer_stands_over_a_token_in_the_metadata(md) -> None:
    md.set_gce_attributes(project={"cio-token": SECRET, "cio-queue": "https://c:1"})
    resolved = load({"preemption": "gce"}, clean_env(CIO_GCE_METADATA_URL=md.url, CIO_TOKEN_FILE="/run/creds/token"))
    assert (resolved.settings.token_file, resolved.settings.token) == ("/run/creds/token", None)
    assert resolved.sources["token"].startswith("unused: env CIO_TOKEN_FILE comes first")


def test_off_cloud_detection_finds_nothing_and_reads_no_metadata() -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: refused at once
    env = clean_env(GCE_METADATA_HOST=closed.removeprefix("http://"), CIO_EC2_METADATA_URL=closed,
                    CIO_AZURE_METADATA_URL=closed, CIO_QUEUE="sqlite:///q.db")
    resolved = load_settings({}, env, None, read_cloud=read_cloud_layers)
    assert resolved.problems == () and resolved.provider == "none"
    assert resolved.settings.give_up_after == 0.0  # a person's agent fails at once, as before
    assert load_settings({}, env, None, read_cloud=read_cloud_layers, supervised=True).settings.give_up_after == 600.0


def test_a_named_metadata_server_that_does_not_answer_is_a_problem_not_a_hang() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    resolved = load({"preemption": "gce", "gce_metadata_url": closed, "queue": "sqlite:///q.db"}, clean_env())
    [problem] = resolved.problems
    assert problem.startswith(f"cannot read the agent's configuration from the gce metadata server at {closed}")


def test_every_agent_option_is_a_setting_with_the_same_default() -> None:
    parser = next(p for name, p in _subparsers(build_parser()) if name == "agent")
    dests = {a.dest for a in parser._actions} - NOT_SETTINGS
    assert dests == set(KEYS) - {"token"}  # a token is never typed on a command line (ps shows it)
    defaults = AgentSettings()
    for action in parser._actions:
        if action.dest in dests and not KEYS[action.dest]["computed"] and action.dest not in ("preemption", "path_map"):
            assert action.default == getattr(defaults, action.dest), action.dest
    args = build_parser().parse_args(["agent", "--idle-exit", "5", "--no-cache"])
    assert getattr(args, GIVEN) == {"idle_exit": "--idle-exit", "no_cache": "--no-cache"}


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cio_worker", *args], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_print_config_masks_secrets_and_says_where_each_value_came_from(tmp_path: Path, md) -> None:
    md.set_gce_attributes(instance={"cio-token": SECRET, "cio-queue": "postgresql://cio:dbpass@db:5432/cio"})
    config = tmp_path / "agent.toml"
    config.write_text("idle_exit = 600\n")
    env = clean_env(CIO_GCE_METADATA_URL=md.url, CIO_POLL_SECONDS="0.5")
    out = cli("agent", "--print-config", "--config", str(config), "--preemption", "gce", "--max-tasks", "3", env=env)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout and "dbpass" not in out.stdout
    lines = {line.split("=")[0].strip("# ").strip(): line for line in out.stdout.splitlines() if "=" in line}
    assert lines["token"].endswith("# gce instance attribute cio-token") and '"****"' in lines["token"]
    assert 'queue = "postgresql://cio:****@db:5432/cio"' in lines["queue"]
    assert lines["idle_exit"].endswith(f"# {config}") and lines["poll_seconds"].endswith("# env CIO_POLL_SECONDS")
    assert lines["max_tasks"].endswith("# command line (--max-tasks)")
    assert lines["task_timeout"].startswith("# task_timeout = (unset)")

    config.write_text('queu = "https://coordinator:8700"\n')
    bad = cli("agent", "--print-config", "--config", str(config), "--preemption", "none", env=clean_env())
    assert bad.returncode == 2
    [line] = bad.stderr.strip().splitlines()
    assert line.startswith("cio-worker: error: ") and f"unknown key 'queu' in {config}; did you mean 'queue'?" in line


def test_an_agent_takes_its_queue_from_the_instance_attributes_and_its_idle_exit_from_the_file(tmp_path: Path, md) -> None:
    db = tmp_path / "queue.db"
    SqliteQueue(db).close()
    md.set_gce_attributes(instance={"cio-queue": f"sqlite:///{db}"}, project={"cio-worker-id": "from-metadata"})
    config = tmp_path / "agent.toml"
    config.write_text(f'idle_exit = 0.2\npoll_seconds = 0.05\nwork_dir = "{tmp_path / "work"}"\nno_cache = true\n'
                      f'root = "{tmp_path / "root"}"\n')
    out = cli("agent", "--config", str(config), "--preemption", "gce", env=clean_env(CIO_GCE_METADATA_URL=md.url))
    assert out.returncode == 0, out.stderr
    assert "configuration: queue=" in out.stderr and "(gce instance attribute cio-queue)" in out.stderr
    with SqliteQueue(db) as queue:
        [worker] = queue.workers()
    assert worker.id == "from-metadata" and worker.info["provider"] == "gce"
