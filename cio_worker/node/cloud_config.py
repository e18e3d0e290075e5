"""The agent's configuration kept in the instance's metadata (spec/cloud.md), as ``config.Layer``s.

GCE: instance attributes ``cio-<key>`` (``cio-queue``, ``cio-token``, ``cio-idle-exit``...), then
the project's, each read whole with ``?recursive=true``. EC2: the user-data, a TOML document of
the agent.toml keys. Azure: the VM's userData, base64 of the same TOML. User-data that is a
script or a cloud-init document is someone else's and is passed over. The server is the one
``preemption.py`` watches (``PreemptionConfig.endpoints()``), asked with short timeouts; a
server that does not answer is a ``ConfigError`` (the caller retries, then gives up).
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

import requests

from cio_worker.node.config import ConfigError, Layer, attributes_layer, toml_layer
from cio_worker.node.preemption import (
    EC2_TOKEN_HEADER,
    GCE_PATH,
    PreemptionConfig,
    _BadStatus,
    ec2_token,
    metadata_session,
)

logger = logging.getLogger(__name__)

EC2_USER_DATA = "/latest/user-data"
AZURE_USER_DATA = "/metadata/instance/compute/userData"
AZURE_USER_DATA_API_VERSION = "2021-01-01"
DEFAULT_TIMEOUT = (1.0, 3.0)  # (connect, read) seconds
# How user-data that is not ours begins: a script, cloud-init's formats, a MIME multipart.
NOT_OURS = ("#!", "#cloud-config", "#include", "#cloud-boothook", "#part-handler", "#upstart-job",
            "content-type:", "mime-version:")


def read_cloud_layers(provider: str, config: PreemptionConfig, *, session: requests.Session | None = None,
                      timeout: Any = DEFAULT_TIMEOUT) -> list[Layer]:
    """The configuration layers ``provider``'s metadata server holds, highest precedence first."""
    base = config.endpoints()[provider].rstrip("/")
    own = session or metadata_session()
    try:
        if provider == "gce":
            return [attributes_layer(_gce_attributes(own, base, scope, timeout), f"gce {scope} attribute")
                    for scope in ("instance", "project")]
        if provider == "ec2":
            token, _ = ec2_token(own, base, ttl=60, timeout=timeout)
            response = own.get(base + EC2_USER_DATA, headers={EC2_TOKEN_HEADER: token}, timeout=timeout)
            if response.status_code == 404:
                return []
            _expect_ok(response, EC2_USER_DATA)
            return _user_data_layers(response.content, "ec2 user-data")
        if provider == "azure":
            response = own.get(base + AZURE_USER_DATA, headers={"Metadata": "true"}, timeout=timeout,
                               params={"api-version": AZURE_USER_DATA_API_VERSION, "format": "text"})
            _expect_ok(response, AZURE_USER_DATA)
            text = response.text.strip()
            if not text:
                return []
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError("the Azure userData is not base64 (Azure keeps it base64-encoded: encode the "
                                  "TOML once when setting it)") from None
            return _user_data_layers(data, "azure userData")
        return []
    except (requests.RequestException, _BadStatus, ValueError) as exc:
        raise ConfigError(f"cannot read the agent's configuration from the {provider} metadata server at {base}: "
                          f"{exc}") from None
    finally:
        if session is None:
            own.close()


def _expect_ok(response: requests.Response, path: str) -> None:
    if response.status_code != 200:
        raise _BadStatus(path, response.status_code)


def _gce_attributes(session: requests.Session, base: str, scope: str, timeout: Any) -> dict[str, str]:
    path = f"{GCE_PATH}{scope}/attributes/"
    response = session.get(base + path, params={"recursive": "true"}, headers={"Metadata-Flavor": "Google"},
                           timeout=timeout)
    if response.status_code == 404:
        return {}
    _expect_ok(response, path)
    found = response.json()
    if not isinstance(found, dict):
        raise ValueError(f"{path} is not a JSON object")
    return {str(name): str(value) for name, value in found.items()}


def _user_data_layers(data: bytes, source: str) -> list[Layer]:
    """User-data as a TOML layer, or none when it is someone else's (a script, cloud-init's)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        logger.info("%s is not text (gzip?): not agent configuration, passed over", source)
        return []
    first = next((line.strip().lower() for line in text.splitlines() if line.strip()), "")
    if first.startswith(NOT_OURS):
        logger.info("%s begins %r: not agent configuration, passed over", source, first[:40])
        return []
    return [toml_layer(text, source, cloud=True)]
