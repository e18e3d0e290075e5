"""The instance identity an agent registers with, read from our metadata server for GCE, EC2
(IMDSv2) and Azure, and from the machine alone where there is no metadata server."""

from __future__ import annotations

import socket

import psutil
import pytest

from cio_worker import __version__
from cio_worker.node.identity import InstanceIdentity, local_identity, read_identity
from cio_worker.node.preemption import PreemptionConfig
from cio_worker.sim.metadata_server import InstanceIdentity as SimIdentity
from cio_worker.sim.metadata_server import MetadataServer

SPOT = SimIdentity(
    gce_id="7700000000000000001", machine_type="n2-highcpu-16", zone="europe-west4-b", preemptible=True,
    ec2_instance_id="i-0fedcba9876543210", ec2_instance_type="c6i.4xlarge", ec2_availability_zone="eu-west-1c",
    azure_vm_id="9d7f1c8e-0000-4a2b-9c3d-123456789abc", azure_vm_size="Standard_F16s_v2",
    azure_location="northeurope", azure_zone="2",
)
EXPECTED = {
    "gce": ("7700000000000000001", "europe-west4-b", "n2-highcpu-16"),
    "ec2": ("i-0fedcba9876543210", "eu-west-1c", "c6i.4xlarge"),
    "azure": ("9d7f1c8e-0000-4a2b-9c3d-123456789abc", "2", "Standard_F16s_v2"),
}


def config_for(provider: str, url: str, **kw) -> PreemptionConfig:
    return PreemptionConfig(provider=provider, gce_url=url, ec2_url=url, azure_url=url, detect_timeout=1.0, **kw)


def assert_machine_figures(identity: InstanceIdentity) -> None:
    assert identity.hostname == socket.gethostname()
    assert identity.cores == psutil.cpu_count(logical=True)
    assert identity.memory_gb == round(psutil.virtual_memory().total / 2**30, 1) > 0
    assert identity.version == __version__


@pytest.mark.parametrize("provider", ["gce", "ec2", "azure"])
def test_each_provider_gives_its_identity_from_the_metadata_server(provider: str) -> None:
    with MetadataServer(identity=SPOT, providers=[provider]) as md:
        identity = read_identity(config_for(provider, md.url))
        asked = {r.path for r in md.request_log()}
    instance_id, zone, machine = EXPECTED[provider]
    assert (identity.provider, identity.instance_id, identity.zone, identity.machine_type) == \
        (provider, instance_id, zone, machine)
    assert identity.preemptible is True
    assert_machine_figures(identity)
    assert identity.to_dict()["instance_id"] == instance_id
    if provider == "ec2":  # IMDSv2: a token first, then the values with it
        assert "/latest/api/token" in asked and "/latest/meta-data/instance-life-cycle" in asked


@pytest.mark.parametrize("provider", ["gce", "ec2", "azure"])
def test_a_standard_vm_is_not_preemptible_and_changes_show(provider: str) -> None:
    with MetadataServer(identity=SPOT, providers=[provider]) as md:
        md.set_identity(preemptible=False, machine_type="n1-standard-4", ec2_instance_type="m5.xlarge",
                        azure_vm_size="Standard_D4s_v3", azure_zone="")
        identity = read_identity(config_for(provider, md.url))
    assert identity.preemptible is False
    assert identity.machine_type == {"gce": "n1-standard-4", "ec2": "m5.xlarge", "azure": "Standard_D4s_v3"}[provider]
    if provider == "azure":  # a VM in no availability zone: its location
        assert identity.zone == "northeurope"


@pytest.mark.parametrize("provider", ["gce", "ec2", "azure"])
def test_auto_detects_the_provider_as_the_notice_watchers_do(provider: str) -> None:
    with MetadataServer(identity=SPOT, providers=[provider]) as md:
        identity = read_identity(config_for("auto", md.url))
    assert identity.provider == provider and identity.instance_id == EXPECTED[provider][0]


def test_no_metadata_server_gives_the_machines_own_figures() -> None:
    with MetadataServer() as md:
        url = md.url
    # nothing listens there any more: detection finds no provider
    identity = read_identity(config_for("auto", url))
    assert identity.provider == "none"
    assert identity.instance_id == socket.gethostname()
    assert (identity.zone, identity.machine_type, identity.preemptible) == ("", "", None)
    assert_machine_figures(identity)
    assert read_identity(config_for("none", url)) == identity == local_identity()


def test_provider_none_asks_nothing() -> None:
    with MetadataServer() as md:
        identity = read_identity(config_for("none", md.url))
        assert md.request_log() == []
    assert identity.provider == "none"


@pytest.mark.parametrize("provider", ["gce", "ec2", "azure"])
def test_a_failing_metadata_server_never_stops_the_read(provider: str) -> None:
    with MetadataServer(identity=SPOT, providers=[provider]) as md:
        md.fail_next(100, status=503)
        identity = read_identity(config_for(provider, md.url))
    assert identity.provider == provider
    assert identity.instance_id == socket.gethostname()  # what the machine itself says
    assert_machine_figures(identity)


def test_one_missing_value_leaves_the_others() -> None:
    with MetadataServer(identity=SPOT, providers=["gce"]) as md:
        md.fail_next(1, status=500)  # the first request: instance/id
        identity = read_identity(config_for("gce", md.url))
    assert identity.instance_id == socket.gethostname()
    assert (identity.zone, identity.machine_type, identity.preemptible) == ("europe-west4-b", "n2-highcpu-16", True)
