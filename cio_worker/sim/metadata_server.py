"""A cloud metadata server of our own, for tests and the local simulation.

It serves the GCE, EC2 IMDSv2 and Azure shapes of spec/cloud.md on one port (each provider can
be switched off), and control endpoints under ``/_control/<method>`` (JSON in, JSON out) that
mirror the Python methods of ``MetadataState``: raise or clear notices, set attributes and
user-data, change what the instance says it is (``set_identity``: id, zone, machine type, spot or
not), make the next requests fail, expire tokens, read the request log.

Run it as a process with ``python -m cio_worker.sim.metadata_server --port N``; it prints its URL.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import hashlib
import json
import secrets
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import parse_qs, urlsplit

PROVIDERS = ("gce", "ec2", "azure")

GCE_PREFIX = "/computeMetadata/v1/"
EC2_TOKEN_PATH = "/latest/api/token"
EC2_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
EC2_TOKEN_HEADER = "X-aws-ec2-metadata-token"
EC2_MAX_TTL = 21600
EC2_NOTICE_SECONDS = 120
AZURE_EVENTS_PATH = "/metadata/scheduledevents"
AZURE_INSTANCE_PATH = "/metadata/instance"
AZURE_USER_DATA_PATH = "/metadata/instance/compute/userData"  # ?format=text: the base64 text
AZURE_PREEMPT_SECONDS = 30.0
MAINTENANCE_EVENTS = ("NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE")
DEFAULT_WAIT_SECONDS = 300.0
MAX_WAIT_SECONDS = 3600.0


@dataclass(frozen=True)
class InstanceIdentity:
    """What the instance says it is, per provider."""

    gce_id: str = "4519703853386345781"
    name: str = "cio-render-0"
    machine_type: str = "n1-standard-8"
    zone: str = "us-central1-a"
    project_id: str = "cio-sim"
    project_number: str = "123456789012"
    preemptible: bool = True
    ec2_instance_id: str = "i-0123456789abcdef0"
    ec2_instance_type: str = "c5.2xlarge"
    ec2_availability_zone: str = "us-east-1a"
    azure_vm_id: str = "02aab8a4-74ef-476e-8182-f6d2ba4166a6"
    azure_vm_size: str = "Standard_D8s_v3"
    azure_location: str = "westeurope"
    azure_zone: str = "1"  # "" for a VM in no availability zone


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # keys lower-case
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestRecord:
    """One (non-control) request, stamped with the server's clock at arrival; ``status`` is
    None while it is being answered (a hanging GET)."""

    time: float
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    status: int | None
    provider: str | None


@dataclass
class _Fault:
    remaining: int
    status: int
    provider: str | None


def iso_z(t: float) -> str:
    """EC2's time form: whole seconds, UTC, with a Z."""
    return datetime.fromtimestamp(int(t), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _etag(body: bytes | None) -> str:
    return "" if body is None else hashlib.sha256(body).hexdigest()[:16]


def _text(status: int, body: str | bytes, headers: dict[str, str] | None = None,
          content_type: str = "text/plain") -> Response:
    raw = body.encode() if isinstance(body, str) else body
    return Response(status, raw, {"Content-Type": content_type, **(headers or {})})


def _json(status: int, value: Any, headers: dict[str, str] | None = None) -> Response:
    return _text(status, json.dumps(value), headers, "application/json")


def provider_of(path: str) -> str | None:
    if path.startswith(GCE_PREFIX):
        return "gce"
    if path.startswith("/latest/"):
        return "ec2"
    if path.startswith("/metadata/"):
        return "azure"
    return None


class MetadataState:
    """Everything the server knows, and the answer to each request. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 identity: InstanceIdentity | None = None,
                 providers: Iterable[str] = PROVIDERS) -> None:
        self.clock = clock
        self.identity = identity or InstanceIdentity()
        self.providers = frozenset(providers)
        unknown = self.providers - set(PROVIDERS)
        if unknown:
            raise ValueError(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
        self._cond = threading.Condition()
        self._closed = False
        self._gce_preempted = False
        self._gce_maintenance = "NONE"
        self._instance_attrs: dict[str, str] = {}
        self._project_attrs: dict[str, str] = {}
        self._tokens: dict[str, float] = {}
        self._spot_action: dict[str, str] | None = None
        self._rebalance: dict[str, str] | None = None
        self._user_data: bytes | None = None
        self._azure_user_data: bytes | None = None
        self._incarnation = 1
        self._events: list[dict[str, Any]] = []
        self._acks: list[str] = []
        self._faults: list[_Fault] = []
        self._log: list[RequestRecord] = []

    # ---- controls (also reachable as POST /_control/<name> with JSON keyword arguments) ----

    def raise_gce_preempt(self) -> None:
        with self._cond:
            self._gce_preempted = True
            self._cond.notify_all()

    def raise_gce_maintenance(self, event: str = "TERMINATE_ON_HOST_MAINTENANCE") -> None:
        if event not in MAINTENANCE_EVENTS:
            raise ValueError(f"maintenance event must be one of {MAINTENANCE_EVENTS}")
        with self._cond:
            self._gce_maintenance = event
            self._cond.notify_all()

    def raise_ec2_spot(self, action: str = "terminate",
                       in_seconds: float = EC2_NOTICE_SECONDS) -> dict[str, str]:
        """A spot interruption notice for ``in_seconds`` from now (EC2 gives two minutes; tests
        and the simulation give less). The time is whole seconds, as EC2 writes it."""
        if action not in ("terminate", "stop", "hibernate"):
            raise ValueError("spot action must be terminate, stop or hibernate")
        with self._cond:
            self._spot_action = {"action": action,
                                 "time": iso_z(self.clock() + float(in_seconds))}
            return dict(self._spot_action)

    def raise_ec2_rebalance(self) -> dict[str, str]:
        with self._cond:
            self._rebalance = {"noticeTime": iso_z(self.clock())}
            return dict(self._rebalance)

    def raise_azure_preempt(self, not_before_in: float = AZURE_PREEMPT_SECONDS) -> dict[str, Any]:
        event = {
            "EventId": str(uuid.uuid4()).upper(),
            "EventType": "Preempt",
            "ResourceType": "VirtualMachine",
            "Resources": [self.identity.name],
            "EventStatus": "Scheduled",
            "NotBefore": email.utils.formatdate(self.clock() + not_before_in, usegmt=True),
            "Description": "",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        }
        with self._cond:
            self._events.append(event)
            self._incarnation += 1
            return dict(event)

    def clear(self, provider: str | None = None) -> None:
        """Withdraw every notice (of one provider, or all)."""
        with self._cond:
            if provider in (None, "gce"):
                self._gce_preempted = False
                self._gce_maintenance = "NONE"
            if provider in (None, "ec2"):
                self._spot_action = None
                self._rebalance = None
            if provider in (None, "azure") and self._events:
                self._events = []
                self._incarnation += 1
            self._cond.notify_all()

    def set_gce_attributes(self, instance: Mapping[str, str | None] | None = None,
                           project: Mapping[str, str | None] | None = None) -> None:
        """Merge attributes in; a None value removes that key."""
        with self._cond:
            for target, changes in ((self._instance_attrs, instance), (self._project_attrs, project)):
                for key, value in (changes or {}).items():
                    if value is None:
                        target.pop(key, None)
                    else:
                        target[key] = str(value)
            self._cond.notify_all()

    def set_ec2_user_data(self, data: str | bytes | None) -> None:
        with self._cond:
            self._user_data = data.encode() if isinstance(data, str) else data

    def set_azure_user_data(self, data: str | bytes | None) -> None:
        """The VM's userData (given plain: it is served base64-encoded, as Azure keeps it)."""
        with self._cond:
            self._azure_user_data = data.encode() if isinstance(data, str) else data

    def fail_next(self, count: int, status: int = 503, provider: str | None = None) -> None:
        """The next ``count`` requests (to ``provider``, or any) answer ``status``."""
        with self._cond:
            self._faults.append(_Fault(int(count), int(status), provider))

    def set_identity(self, **changes: Any) -> dict[str, Any]:
        """Change what the instance says it is (fields of ``InstanceIdentity``); returns it all."""
        unknown = set(changes) - set(InstanceIdentity.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown identity fields {sorted(unknown)}")
        with self._cond:
            self.identity = replace(self.identity, **changes)
            self._cond.notify_all()
            return asdict(self.identity)

    def expire_tokens(self) -> int:
        with self._cond:
            count = len(self._tokens)
            self._tokens.clear()
            return count

    def request_log(self) -> list[RequestRecord]:
        with self._cond:
            return list(self._log)

    def clear_log(self) -> None:
        with self._cond:
            self._log.clear()

    def azure_acks(self) -> list[str]:
        with self._cond:
            return list(self._acks)

    CONTROLS = ("raise_gce_preempt", "raise_gce_maintenance", "raise_ec2_spot",
                "raise_ec2_rebalance", "raise_azure_preempt", "clear", "set_gce_attributes",
                "set_ec2_user_data", "set_azure_user_data", "set_identity", "fail_next", "expire_tokens", "request_log",
                "clear_log", "azure_acks")

    def control(self, name: str, arguments: Mapping[str, Any]) -> Any:
        if name not in self.CONTROLS:
            raise KeyError(name)
        result = getattr(self, name)(**arguments)
        if name == "request_log":
            return [asdict(record) for record in result]
        return result

    def close(self) -> None:
        """Release every hanging GET (the server is stopping)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ---- serving ----

    def handle(self, request: Request) -> Response:
        provider = provider_of(request.path)
        pending = RequestRecord(self.clock(), request.method, request.path, dict(request.query),
                                dict(request.headers), None, provider)
        with self._cond:
            self._log.append(pending)  # at arrival, so a hanging GET shows while it hangs
        if provider is None or provider not in self.providers:
            response = _text(404, "Not Found")
        else:
            response = self._injected_fault(provider) or self._serve(provider, request)
        with self._cond:
            for index in range(len(self._log) - 1, -1, -1):
                if self._log[index] is pending:
                    self._log[index] = replace(pending, status=response.status)
                    break
        return response

    def _injected_fault(self, provider: str) -> Response | None:
        with self._cond:
            for fault in self._faults:
                if fault.remaining > 0 and fault.provider in (None, provider):
                    fault.remaining -= 1
                    self._faults = [f for f in self._faults if f.remaining > 0]
                    return _text(fault.status, "injected failure")
        return None

    def _serve(self, provider: str, request: Request) -> Response:
        if provider == "gce":
            return self._serve_gce(request)
        if provider == "ec2":
            return self._serve_ec2(request)
        return self._serve_azure(request)

    # GCE

    def _gce_value(self, rel: str, recursive: bool) -> tuple[bytes, str] | None:
        """The body and content type at ``rel`` (under /computeMetadata/v1/); call locked."""
        ident = self.identity
        fixed = {
            "instance/preempted": "TRUE" if self._gce_preempted else "FALSE",
            "instance/maintenance-event": self._gce_maintenance,
            "instance/scheduling/preemptible": "TRUE" if ident.preemptible else "FALSE",
            "instance/id": ident.gce_id,
            "instance/name": ident.name,
            "instance/machine-type":
                f"projects/{ident.project_number}/machineTypes/{ident.machine_type}",
            "instance/zone": f"projects/{ident.project_number}/zones/{ident.zone}",
            "project/project-id": ident.project_id,
            "project/numeric-project-id": ident.project_number,
        }
        if rel in fixed:
            return fixed[rel].encode(), "application/text"
        for prefix, attrs in (("instance/attributes", self._instance_attrs),
                              ("project/attributes", self._project_attrs)):
            if rel in (prefix, prefix + "/"):
                if recursive:
                    return json.dumps(attrs, sort_keys=True).encode(), "application/json"
                return "".join(f"{key}\n" for key in sorted(attrs)).encode(), "application/text"
            if rel.startswith(prefix + "/"):
                value = attrs.get(rel[len(prefix) + 1:])
                return None if value is None else (value.encode(), "application/text")
        return None

    def _serve_gce(self, request: Request) -> Response:
        flavor = {"Metadata-Flavor": "Google"}
        if request.method != "GET":
            return _text(405, "Method Not Allowed", flavor)
        if request.header("Metadata-Flavor") != "Google":
            return _text(403, "Missing Metadata-Flavor:Google header.", flavor)
        rel = request.path[len(GCE_PREFIX):]
        recursive = request.query.get("recursive", "").lower() == "true"
        wait = request.query.get("wait_for_change", "").lower() == "true"
        try:
            timeout = min(float(request.query.get("timeout_sec", DEFAULT_WAIT_SECONDS)),
                          MAX_WAIT_SECONDS)
        except ValueError:
            return _text(400, "timeout_sec must be a number", flavor)
        with self._cond:
            found = self._gce_value(rel, recursive)
            if found is not None and wait:
                baseline = request.query.get("last_etag") or _etag(found[0])
                deadline = time.monotonic() + max(timeout, 0.0)

                def changed() -> bool:
                    value = self._gce_value(rel, recursive)
                    return self._closed or _etag(value[0] if value else None) != baseline

                self._cond.wait_for(changed, timeout=max(deadline - time.monotonic(), 0.0))
                found = self._gce_value(rel, recursive)
        if found is None:
            return _text(404, "Not Found", flavor)
        body, content_type = found
        return _text(200, body, {**flavor, "ETag": _etag(body)}, content_type)

    # EC2

    def _serve_ec2(self, request: Request) -> Response:
        if request.path == EC2_TOKEN_PATH:
            if request.method != "PUT":
                return _text(405, "Method Not Allowed")
            raw = request.header(EC2_TTL_HEADER)
            try:
                ttl = int(raw or "")
            except ValueError:
                return _text(400, "Bad Request")
            if not 1 <= ttl <= EC2_MAX_TTL:
                return _text(400, "Bad Request")
            token = secrets.token_urlsafe(32)
            with self._cond:
                self._tokens[token] = self.clock() + ttl
            return _text(200, token, {EC2_TTL_HEADER: str(ttl)})
        if request.method != "GET":
            return _text(405, "Method Not Allowed")
        with self._cond:
            now = self.clock()
            expires = self._tokens.get(request.header(EC2_TOKEN_HEADER) or "")
            if expires is None or expires <= now:
                return _text(401, "Unauthorized")
            ttl_left = {EC2_TTL_HEADER: str(max(int(expires - now), 0))}
            ident = self.identity
            path = request.path
            if path == "/latest/meta-data/instance-id":
                return _text(200, ident.ec2_instance_id, ttl_left)
            if path == "/latest/meta-data/instance-type":
                return _text(200, ident.ec2_instance_type, ttl_left)
            if path == "/latest/meta-data/placement/availability-zone":
                return _text(200, ident.ec2_availability_zone, ttl_left)
            if path == "/latest/meta-data/placement/region":
                return _text(200, ident.ec2_availability_zone.rstrip("abcdefghijklmnopqrstuvwxyz"), ttl_left)
            if path == "/latest/meta-data/instance-life-cycle":
                return _text(200, "spot" if ident.preemptible else "on-demand", ttl_left)
            if path == "/latest/meta-data/spot/instance-action" and self._spot_action:
                return _json(200, self._spot_action, ttl_left)
            if path == "/latest/meta-data/spot/termination-time" and self._spot_action:
                return _text(200, self._spot_action["time"], ttl_left)
            if path == "/latest/meta-data/events/recommendations/rebalance" and self._rebalance:
                return _json(200, self._rebalance, ttl_left)
            if path == "/latest/user-data" and self._user_data is not None:
                return _text(200, self._user_data, ttl_left, "application/octet-stream")
            return _text(404, "Not Found", ttl_left)

    # Azure

    def _serve_azure(self, request: Request) -> Response:
        if (request.header("Metadata") or "").lower() != "true":
            return _json(400, {"error": "Bad request. Required metadata header not specified"})
        if not request.query.get("api-version"):
            return _json(400, {"error": "Bad request. api-version was not specified"})
        if request.path == AZURE_USER_DATA_PATH and request.method == "GET":
            if request.query.get("format") != "text":
                return _json(400, {"error": "Bad request. userData is served with format=text"})
            with self._cond:
                data = self._azure_user_data
            return _text(200, base64.b64encode(data) if data else b"")  # none set: an empty answer
        if request.path == AZURE_INSTANCE_PATH and request.method == "GET":
            ident = self.identity
            return _json(200, {"compute": {"name": ident.name, "vmId": ident.azure_vm_id,
                                           "vmSize": ident.azure_vm_size, "location": ident.azure_location,
                                           "zone": ident.azure_zone,
                                           "priority": "Spot" if ident.preemptible else "Regular"}})
        if request.path != AZURE_EVENTS_PATH:
            return _json(404, {"error": "Not found"})
        if request.method == "GET":
            with self._cond:
                return _json(200, {"DocumentIncarnation": self._incarnation,
                                   "Events": [dict(e) for e in self._events]})
        if request.method != "POST":
            return _json(405, {"error": "Method not allowed"})
        try:
            starts = json.loads(request.body or b"{}")["StartRequests"]
            ids = [str(item["EventId"]) for item in starts]
        except (ValueError, KeyError, TypeError):
            return _json(400, {"error": "Bad request. Expected {\"StartRequests\": [{\"EventId\": ...}]}"})
        with self._cond:
            self._acks.extend(ids)
            for event in self._events:
                if event["EventId"] in ids and event["EventStatus"] == "Scheduled":
                    event["EventStatus"] = "Started"
                    event["NotBefore"] = ""
                    self._incarnation += 1
        return _text(200, b"")


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    timeout = 10  # a client that connects and sends nothing cannot hold stop() up for long
    error_content_type = "text/plain"

    def do_GET(self) -> None:
        self._dispatch()

    do_PUT = do_POST = do_DELETE = do_GET

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        state = self.server.state
        if parts.path.startswith("/_control/"):
            response = self._control(state, parts.path[len("/_control/"):], body)
        else:
            headers = {k.lower(): v for k, v in self.headers.items()}
            response = state.handle(Request(self.command, parts.path, query, headers, body))
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. a watcher being stopped mid hanging GET)

    @staticmethod
    def _control(state: MetadataState, name: str, body: bytes) -> Response:
        try:
            arguments = json.loads(body) if body.strip() else {}
            if not isinstance(arguments, dict):
                raise TypeError("the body must be a JSON object of keyword arguments")
            return _json(200, {"result": state.control(name, arguments)})
        except KeyError:
            return _json(404, {"error": f"no control {name!r}", "controls": state.CONTROLS})
        except (TypeError, ValueError) as err:
            return _json(400, {"error": str(err)})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # so server_close() joins the handler threads
    block_on_close = True

    def __init__(self, address: tuple[str, int], state: MetadataState) -> None:
        self.state = state
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a dropped client connection is normal here


class MetadataServer(MetadataState):
    """The metadata stand-in on a real socket: ``with MetadataServer() as md: md.url``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 clock: Callable[[], float] = time.time,
                 identity: InstanceIdentity | None = None,
                 providers: Iterable[str] = PROVIDERS) -> None:
        super().__init__(clock, identity, providers)
        self._address = (host, port)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the metadata server is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "MetadataServer":
        if self._httpd is not None:
            return self
        with self._cond:
            self._closed = False
        self._httpd = _HTTPServer(self._address, self)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="metadata-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self.close()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "MetadataServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cio_worker.sim.metadata_server",
                                     description="Serve GCE/EC2/Azure instance metadata locally.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="comma-separated subset of gce,ec2,azure")
    args = parser.parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    with MetadataServer(args.host, args.port, providers=providers) as server:
        print(server.url, flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
