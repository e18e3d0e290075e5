"""What this instance is: its cloud identity (from the metadata server) and the machine's figures.

``read_identity(config)`` asks the provider's metadata server (the one ``preemption.py`` watches,
found the same way: configured, or detected with ``detect_provider``) for the instance id, zone,
machine type and whether the instance is preemptible (GCE preemptible/Spot, EC2 Spot, Azure Spot),
with short timeouts; a value the server does not give stays empty. Cores, memory and hostname come
from the machine itself (psutil, socket). Where there is no metadata server the provider is
``"none"`` and the instance id is the hostname. Nothing here raises for an unreachable or odd
server: an identity is worth a log line, never a failed start.

The agent registers with the queue with ``InstanceIdentity.to_dict()``.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import psutil
import requests

from cio_worker import __version__
from cio_worker.node.preemption import (
    AZURE_INSTANCE_API_VERSION,
    AZURE_INSTANCE_PATH,
    DETECTION_ORDER,
    EC2_TOKEN_HEADER,
    GCE_PATH,
    PreemptionConfig,
    _BadStatus,
    detect_provider,
    ec2_token,
    metadata_session,
)

logger = logging.getLogger(__name__)

NO_PROVIDER = "none"
EC2_META = "/latest/meta-data/"
# (connect, read) seconds per request: a metadata server answers in milliseconds or not at all.
DEFAULT_TIMEOUT = (1.0, 2.0)


@dataclass(frozen=True)
class InstanceIdentity:
    """What a worker runs on, as the queue's worker list shows it."""

    instance_id: str
    provider: str  # gce | ec2 | azure | none
    zone: str  # e.g. us-central1-a, us-east-1a; Azure: the zone, else the location
    machine_type: str  # e.g. n1-standard-8, c5.2xlarge, Standard_D8s_v3
    preemptible: bool | None  # None: not known (no metadata server)
    cores: int
    memory_gb: float
    hostname: str
    version: str  # of cio_worker

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def local_identity() -> InstanceIdentity:
    """The machine's own figures, with no metadata server (provider ``none``)."""
    hostname = socket.gethostname()
    try:
        cores = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    except Exception:  # noqa: BLE001 - a figure, not worth a failure
        cores = os.cpu_count() or 1
    try:
        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        memory_gb = 0.0
    return InstanceIdentity(instance_id=hostname, provider=NO_PROVIDER, zone="", machine_type="",
                            preemptible=None, cores=int(cores), memory_gb=memory_gb, hostname=hostname,
                            version=__version__)


def read_identity(config: PreemptionConfig | None = None, *, provider: str | None = None,
                  session: requests.Session | None = None,
                  timeout: float | tuple[float, float] = DEFAULT_TIMEOUT) -> InstanceIdentity:
    """The instance's identity from its metadata server, over the machine's own figures.

    ``config`` names the endpoints (default: from the environment, as the notice watchers read
    them); ``provider`` overrides ``config.provider`` (pass what ``start_watchers`` detected to
    avoid probing twice). ``"auto"`` probes the servers; ``"none"`` asks nothing.
    """
    config = config or PreemptionConfig.from_env(os.environ)
    chosen = provider or config.provider
    if chosen == "auto":
        chosen = detect_provider(config.endpoints(), timeout=config.detect_timeout) or NO_PROVIDER
    base = local_identity()
    if chosen not in DETECTION_ORDER:
        return base
    own = session or metadata_session()
    try:
        reader = _READERS[chosen]
        found = reader(own, config.endpoints()[chosen].rstrip("/"), timeout)
    except Exception as exc:  # noqa: BLE001 - whatever the server did, the agent starts
        logger.warning("reading the %s instance identity failed: %s", chosen, exc)
        found = {}
    finally:
        if session is None:
            own.close()
    found = {k: v for k, v in found.items() if v not in (None, "")}
    if not found:
        logger.warning("the %s metadata server gave no identity; using the machine's own figures", chosen)
    return replace(base, provider=chosen, **found)


# -- per provider ---------------------------------------------------------------------------------

def _last_part(value: str) -> str:
    """GCE answers ``projects/123/zones/us-central1-a``: the last part is the name."""
    return value.rstrip("/").rsplit("/", 1)[-1]


def _quietly(what: str, get: Callable[[], str | None]) -> str | None:
    try:
        return get()
    except (requests.RequestException, _BadStatus, ValueError) as exc:
        logger.warning("instance identity: %s unavailable: %s", what, exc)
        return None


def _gce(session: requests.Session, base: str, timeout: Any) -> dict[str, Any]:
    def get(key: str) -> Callable[[], str | None]:
        def ask() -> str | None:
            response = session.get(f"{base}{GCE_PATH}{key}", headers={"Metadata-Flavor": "Google"},
                                   timeout=timeout)
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise _BadStatus(key, response.status_code)
            return response.text.strip()
        return ask

    instance_id = _quietly("instance/id", get("instance/id"))
    zone = _quietly("instance/zone", get("instance/zone"))
    machine = _quietly("instance/machine-type", get("instance/machine-type"))
    preemptible = _quietly("instance/scheduling/preemptible", get("instance/scheduling/preemptible"))
    return {
        "instance_id": instance_id,
        "zone": _last_part(zone) if zone else None,
        "machine_type": _last_part(machine) if machine else None,
        "preemptible": None if preemptible is None else preemptible.upper() == "TRUE",
    }


def _ec2(session: requests.Session, base: str, timeout: Any) -> dict[str, Any]:
    token, _ = ec2_token(session, base, ttl=60, timeout=timeout)

    def get(path: str) -> Callable[[], str | None]:
        def ask() -> str | None:
            response = session.get(f"{base}{EC2_META}{path}", headers={EC2_TOKEN_HEADER: token},
                                   timeout=timeout)
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise _BadStatus(path, response.status_code)
            return response.text.strip()
        return ask

    life_cycle = _quietly("instance-life-cycle", get("instance-life-cycle"))
    return {
        "instance_id": _quietly("instance-id", get("instance-id")),
        "zone": _quietly("placement/availability-zone", get("placement/availability-zone")),
        "machine_type": _quietly("instance-type", get("instance-type")),
        "preemptible": None if life_cycle is None else life_cycle.lower() == "spot",
    }


def _azure(session: requests.Session, base: str, timeout: Any) -> dict[str, Any]:
    response = session.get(base + AZURE_INSTANCE_PATH, params={"api-version": AZURE_INSTANCE_API_VERSION},
                           headers={"Metadata": "true"}, timeout=timeout)
    if response.status_code != 200:
        raise _BadStatus(AZURE_INSTANCE_PATH, response.status_code)
    compute = response.json().get("compute")
    if not isinstance(compute, dict):
        raise ValueError("the instance document has no compute object")

    def text(name: str) -> str | None:
        value = compute.get(name)
        return value.strip() if isinstance(value, str) and value.strip() else None

    priority = text("priority")
    return {
        "instance_id": text("vmId"),
        "zone": text("zone") or text("location"),
        "machine_type": text("vmSize"),
        "preemptible": None if priority is None else priority.lower() in ("spot", "low"),
    }


_READERS = {"gce": _gce, "ec2": _ec2, "azure": _azure}
