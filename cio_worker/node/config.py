"""The agent's configuration: one typed ``AgentSettings``, each value with where it came from.

Sources, highest precedence first: the command line, ``CIO_<KEY>`` environment variables, a TOML
file (``/etc/cio-worker/agent.toml`` unless the caller names another), the instance's metadata
(``cloud_config.py``: GCE instance attributes ``cio-<key>`` over the project's, EC2 user-data,
Azure userData), then the defaults. Every source is a ``Layer`` of typed values; ``resolve`` takes
each key from the first layer that has it and lists every problem (an unknown key, with the
closest known one suggested; a bad value; no queue) instead of raising, so that a caller that must
act on a broken configuration (give up, see ``giveup.py``) can still read what is usable.
``Resolved.lines()`` is ``cio-worker agent --print-config``; secrets are masked there and in logs.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from cio_worker.errors import CioError
from cio_worker.node.preemption import DETECTION_ORDER, PROVIDER_CHOICES, PreemptionConfig, detect_provider

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
GIVE_UP_AFTER_SUPERVISED = 600.0  # seconds: the bound where a supervisor or a cloud would restart or bill us
CLOUD_PREFIX = "cio-"  # GCE attribute names: cio-queue, cio-idle-exit, ...
MASK = "****"


class ConfigError(CioError, ValueError):
    code = "bad_config"


def _key(default: Any, kind: type, *, secret: bool = False, choices: Sequence[str] = (), minimum: float | None = None,
         above: float | None = None, maximum: float | None = None, env: bool = True, cloud: bool = True,
         computed: bool = False) -> Any:
    """A setting: its type and limits; ``env``/``cloud``: whether CIO_<KEY> / instance metadata may
    set it; ``computed``: its default depends on the machine (``_defaults``)."""
    return field(default=default, metadata=dict(kind=kind, secret=secret, choices=tuple(choices), minimum=minimum,
                                                above=above, maximum=maximum, env=env, cloud=cloud, computed=computed))


@dataclass(frozen=True)
class AgentSettings:
    """Every option of ``cio-worker agent``; the names are the TOML keys (and the argparse dests)."""

    queue: str | None = _key(None, str)
    token: str | None = _key(None, str, secret=True)
    token_file: str | None = _key(None, str)
    worker_id: str = _key("", str, computed=True)
    root: str | None = _key(None, str)
    # CIO_PATH_MAP is what renders are given (execution.py), not an agent option.
    path_map: tuple[str, ...] = _key((), tuple, env=False)
    work_dir: str = _key("", str, computed=True)
    cache_dir: str = _key("", str, computed=True)
    cache_budget_gb: float = _key(20.0, float, minimum=0)
    no_cache: bool = _key(False, bool)
    task_timeout: float | None = _key(None, float, above=0)
    kill_grace: float = _key(10.0, float, minimum=0)
    log_cap_mb: float = _key(64.0, float, above=0)
    prices: str | None = _key(None, str)  # a price table (TOML) for attempts' costs; None: the packaged one
    storage_concurrency: int = _key(0, int, minimum=0)
    sync_processes: int = _key(0, int, minimum=0)
    lease_seconds: float = _key(60.0, float, above=0)
    heartbeat_seconds: float = _key(10.0, float, above=0)
    poll_seconds: float = _key(2.0, float, above=0)
    idle_exit: float | None = _key(None, float, minimum=0)
    on_idle_exit: str | None = _key(None, str)
    max_tasks: int | None = _key(None, int, minimum=0)
    stop_grace: float = _key(20.0, float, minimum=0)
    node_fault_limit: int = _key(3, int, minimum=0)
    # Which metadata server to read and watch, and where they are: never from the metadata itself.
    preemption: str = _key("auto", str, choices=PROVIDER_CHOICES, cloud=False)
    gce_metadata_url: str | None = _key(None, str, cloud=False)
    ec2_metadata_url: str | None = _key(None, str, cloud=False)
    azure_metadata_url: str | None = _key(None, str, cloud=False)
    notice_seconds: float | None = _key(None, float, minimum=0)
    metadata_poll_seconds: float | None = _key(None, float, above=0)
    hard_stop_margin: float = _key(1.5, float, minimum=0)
    grace_share: float = _key(0.3, float, above=0, maximum=1)
    render_user: str | None = _key(None, str)
    renderer: str | None = _key(None, str)  # a program that must be on this machine before work starts
    log_level: str = _key("INFO", str, choices=LOG_LEVELS)
    log_format: str = _key("text", str, choices=LOG_FORMATS)
    give_up_after: float = _key(0.0, float, minimum=0, computed=True)
    give_up_command: str | None = _key(None, str)

    def preemption_config(self, env: Mapping[str, str], provider: str | None = None) -> PreemptionConfig:
        """Where the metadata servers are (these settings over GCE_METADATA_HOST and the like)."""
        overrides: dict[str, Any] = {"provider": provider or self.preemption}
        for name in ("gce", "ec2", "azure"):
            url = getattr(self, f"{name}_metadata_url")
            if url:
                overrides[f"{name}_url"] = url
        if self.notice_seconds is not None:
            overrides["gce_grace"] = self.notice_seconds
            overrides["signal_grace"] = self.notice_seconds
        if self.metadata_poll_seconds is not None:
            overrides["poll_interval"] = self.metadata_poll_seconds
        return PreemptionConfig.from_env(env, **overrides)


KEYS: dict[str, Any] = {f.name: f.metadata for f in fields(AgentSettings)}


def env_name(key: str) -> str:
    return f"CIO_{key.upper()}"


def cloud_name(key: str) -> str:
    return CLOUD_PREFIX + key.replace("_", "-")


# -- values ----------------------------------------------------------------------------------------

def _convert(key: str, raw: Any) -> Any:
    """``raw`` (a string from the environment or an attribute, or a TOML / argparse value) as the
    key's type, within its limits; ValueError says what is wrong."""
    spec = KEYS[key]
    kind = spec["kind"]
    if kind is tuple:
        if isinstance(raw, str):
            items = [part.strip() for part in raw.replace(";", "\n").splitlines()]
        elif isinstance(raw, (list, tuple)) and all(isinstance(item, str) for item in raw):
            items = [item.strip() for item in raw]
        else:
            raise ValueError("must be a list of strings")
        return tuple(item for item in items if item)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower() if isinstance(raw, str) else None
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{raw!r} is not true or false")
    if kind in (int, float):
        value = _number(kind, raw)
        if spec["minimum"] is not None and value < spec["minimum"]:
            raise ValueError(f"{value} is below {spec['minimum']:g}")
        if spec["above"] is not None and value <= spec["above"]:
            raise ValueError(f"{value} must be more than {spec['above']:g}")
        if spec["maximum"] is not None and value > spec["maximum"]:
            raise ValueError(f"{value} is above {spec['maximum']:g}")
        return value
    if not isinstance(raw, str):
        raise ValueError(f"{raw!r} is not a string")
    value = raw.strip()
    if spec["choices"]:
        folded = value.upper() if key == "log_level" else value.lower()
        if folded not in spec["choices"]:
            raise ValueError(f"{value!r} is not one of {', '.join(spec['choices'])}")
        return folded
    return value


def _number(kind: type, raw: Any) -> float | int:
    value = None
    if isinstance(raw, str):
        try:
            value = kind(raw.strip())
        except ValueError:
            pass
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool) and (kind is float or float(raw).is_integer()):
        value = kind(raw)
    if value is None or not math.isfinite(value):
        raise ValueError(f"{raw!r} is not {'a whole number' if kind is int else 'a number'}")
    return value


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"


# -- layers ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """One source's typed values; ``labels`` says where each came from, ``problems`` what was refused."""

    name: str
    values: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()


def _layer(name: str, raw: Mapping[str, tuple[Any, str]], problems: list[str]) -> Layer:
    """``raw``: key -> (value, label); bad values become problems."""
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for key, (value, label) in raw.items():
        try:
            values[key] = _convert(key, value)
        except ValueError as exc:
            problems.append(f"{label}: {exc}")
            continue
        labels[key] = label
    return Layer(name, values, labels, tuple(problems))


def command_line_layer(given: Mapping[str, Any], flags: Mapping[str, str] | None = None) -> Layer:
    """What argparse parsed (only options that were given); ``flags``: key -> the option's name."""
    flags = flags or {}
    raw = {key: (value, f"command line ({flags.get(key, '--' + key.replace('_', '-'))})")
           for key, value in given.items() if key in KEYS}
    return _layer("command line", raw, [])


def environment_layer(env: Mapping[str, str]) -> Layer:
    """``CIO_<KEY>`` for each key that may come from the environment; empty ones count as unset."""
    raw = {key: (env[env_name(key)], f"env {env_name(key)}") for key, spec in KEYS.items()
           if spec["env"] and env.get(env_name(key), "").strip()}
    return _layer("environment", raw, [])


def mapping_layer(values: Mapping[str, Any], source: str, *, cloud: bool = False) -> Layer:
    """A TOML document's keys (``-`` and ``_`` alike); ``cloud``: it came from instance metadata."""
    raw: dict[str, tuple[Any, str]] = {}
    problems: list[str] = []
    for name, value in values.items():
        key = name.replace("-", "_")
        if isinstance(value, dict):
            problems.append(f"{source}: {name!r} is a table; the agent's keys are plain `key = value` lines")
        elif key not in KEYS:
            problems.append(f"unknown key {name!r} in {source}{_suggest(key, list(KEYS))}")
        elif cloud and not KEYS[key]["cloud"]:
            problems.append(_not_from_cloud(name, source))
        else:
            raw[key] = (value, source)
    return _layer(source, raw, problems)


def toml_layer(text: str, source: str, *, cloud: bool = False) -> Layer:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return Layer(source, problems=(f"{source} is not valid TOML: {exc}",))
    return mapping_layer(document, source, cloud=cloud)


def file_layer(path: Path, *, required: bool) -> Layer | None:
    """The TOML file at ``path``; None when it is absent and not ``required``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not required:
            return None
        return Layer(str(path), problems=(f"configuration file {path} does not exist; check --config (or CIO_CONFIG)",))
    except (OSError, UnicodeDecodeError) as exc:
        return Layer(str(path), problems=(f"cannot read the configuration file {path}: {getattr(exc, 'strerror', None) or exc}",))
    return toml_layer(text, str(path))


def attributes_layer(attributes: Mapping[str, str], source: str) -> Layer:
    """GCE instance or project attributes: ``cio-<key>`` ones are ours, the rest (ssh-keys, ...) not."""
    known = [cloud_name(key) for key in KEYS]
    raw: dict[str, tuple[Any, str]] = {}
    problems: list[str] = []
    for name, value in attributes.items():
        if not name.startswith(CLOUD_PREFIX):
            continue
        key = name[len(CLOUD_PREFIX):].replace("-", "_")
        if key not in KEYS:
            problems.append(f"unknown {source} {name!r}{_suggest(name, known)}")
        elif not KEYS[key]["cloud"]:
            problems.append(_not_from_cloud(name, source))
        else:
            raw[key] = (value, f"{source} {name}")
    return _layer(source, raw, problems)


def _not_from_cloud(name: str, source: str) -> str:
    key = name.removeprefix(CLOUD_PREFIX).replace("-", "_")
    return (f"{name!r} in {source} cannot come from instance metadata: it says which metadata server to read; "
            f"set it with --{key.replace('_', '-')}, {env_name(key)} or in agent.toml")


# -- resolution ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resolved:
    settings: AgentSettings
    sources: Mapping[str, str]  # key -> "command line (--queue)", "env CIO_QUEUE", a file, an attribute, "default"
    provider: str = "none"  # the metadata server read (gce, ec2, azure) or none
    problems: tuple[str, ...] = ()

    def check(self) -> AgentSettings:
        """The settings, or ConfigError naming every problem."""
        if self.problems:
            raise ConfigError("; ".join(self.problems))
        return self.settings

    def shown(self, key: str) -> str:
        """The value as TOML, secrets masked."""
        value = getattr(self.settings, key)
        if value is None:
            return "(unset)"
        if KEYS[key]["secret"]:
            return f'"{MASK}"'
        if isinstance(value, str) and key == "queue":
            value = mask_url(value)
        return _toml(value)

    def lines(self) -> list[str]:
        """``--print-config``: TOML a person can read (and paste), each line saying where its value came from."""
        rows = []
        for key in KEYS:
            value = self.shown(key)
            rows.append((f"{'# ' if value == '(unset)' else ''}{key} = {value}", self.sources.get(key, "default")))
        width = max(len(text) for text, _ in rows)
        head = [f"# cio-worker agent: effective configuration (secrets masked); metadata server: {self.provider}"]
        return head + [f"{text.ljust(width)}  # {source}" for text, source in rows]

    def summary(self) -> str:
        """One log line: every value that is not a default, with its source."""
        given = [f"{key}={self.shown(key)} ({self.sources[key]})" for key in KEYS
                 if not self.sources.get(key, "default").startswith("default")]
        return ", ".join(given) + "; the rest default"


def mask_url(url: str) -> str:
    """A URL with any password in it replaced by ****."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:{MASK}@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(value)


def _defaults(env: Mapping[str, str], provider: str, supervised: bool) -> dict[str, tuple[Any, str]]:
    """The defaults that depend on this machine, with what they depend on."""
    cache_home = Path(env.get("XDG_CACHE_HOME") or Path(env.get("HOME") or Path.home()) / ".cache") / "cio-worker"
    if supervised:
        give_up = (GIVE_UP_AFTER_SUPERVISED, "default (a systemd service)")
    elif provider in DETECTION_ORDER:
        give_up = (GIVE_UP_AFTER_SUPERVISED, f"default (a {provider} instance)")
    else:
        give_up = (0.0, "default (neither a service nor a cloud instance: fail at once)")
    return {
        "worker_id": (f"{socket.gethostname()}-{os.getpid()}", "default (HOST-PID)"),
        "work_dir": (str(cache_home / "work"), "default"),
        "cache_dir": (str(cache_home / "cache"), "default"),
        "give_up_after": give_up,
    }


def resolve(layers: Sequence[Layer], env: Mapping[str, str], provider: str = "none", *,
            supervised: bool = False) -> Resolved:
    """Each key from the first layer that has it, else its default; every layer's problems kept.
    ``supervised``: a service manager restarts this agent (systemd's $NOTIFY_SOCKET was set)."""
    problems = [problem for layer in layers for problem in layer.problems]
    defaults = _defaults(env, provider, supervised)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    rank: dict[str, int] = {}
    for key, spec in KEYS.items():
        for index, layer in enumerate(layers):
            if key in layer.values:
                values[key], sources[key], rank[key] = layer.values[key], layer.labels[key], index
                break
        else:
            if spec["computed"]:
                values[key], sources[key] = defaults[key]
            else:
                sources[key] = "default"
    # A token and a token file: the one from the higher layer stands.
    if "token" in rank and "token_file" in rank:
        if rank["token"] == rank["token_file"]:
            problems.append(f"{sources['token']}: give token or token_file, not both")
        loser = "token" if rank["token"] > rank["token_file"] else "token_file"
        values.pop(loser)
        sources[loser] = f"unused: {sources['token' if loser == 'token_file' else 'token_file']} comes first"
    if not values.get("queue"):
        problems.append("no queue: pass --queue URL, set CIO_QUEUE, write `queue = \"URL\"` in agent.toml or "
                        "give the instance the metadata attribute cio-queue (a coordinator's https://host:port)")
    return Resolved(AgentSettings(**values), sources, provider, tuple(problems))


# -- loading ----------------------------------------------------------------------------------------

CloudReader = Callable[[str, PreemptionConfig], list[Layer]]


def load_settings(
    given: Mapping[str, Any],
    env: Mapping[str, str],
    config_file: Path | None,
    *,
    config_required: bool = False,
    flags: Mapping[str, str] | None = None,
    read_cloud: CloudReader | None = None,
    detect: Callable[[PreemptionConfig], str | None] | None = None,
    supervised: bool = False,
) -> Resolved:
    """The agent's settings from every source; never raises for a bad configuration (see
    ``Resolved.problems`` and ``check``). ``read_cloud(provider, config)`` reads the metadata
    layers (``cloud_config.read_cloud_layers``), ``detect(config)`` finds the provider when
    ``preemption`` is ``auto`` (default: ``detect_provider`` on the configured endpoints)."""
    layers = [command_line_layer(given, flags), environment_layer(env)]
    if config_file is not None:
        found = file_layer(config_file, required=config_required)
        if found is not None:
            layers.append(found)
    local = resolve(layers, env, supervised=supervised)
    provider = local.settings.preemption
    try:
        where = local.settings.preemption_config(env)
    except CioError as exc:
        return replace(local, problems=local.problems + (str(exc),))
    if provider == "auto":
        detected = (detect or (lambda c: detect_provider(c.endpoints(), timeout=c.detect_timeout)))(where)
        provider = detected or "none"
    if provider in DETECTION_ORDER and read_cloud is not None:
        try:
            layers.extend(read_cloud(provider, where))
        except CioError as exc:
            layers.append(Layer(f"{provider} metadata", problems=(str(exc),)))
    return resolve(layers, env, provider if provider in DETECTION_ORDER else "none", supervised=supervised)
