"""Faults of the fleet path (issue "Fleet", section "Faults"), with real servers on 127.0.0.1 only.

- 10,000 generated hostile requests against a real ``cio-worker serve``: every answer a 4xx with
  a JSON ``{"error", "message"}`` body, never a 5xx or a dropped connection, and the queue unchanged.
- ``HttpQueue`` clients driving a job through a fault-injecting proxy (resets, 5xx, delays shorter
  and longer than their timeout, answers dropped after the coordinator acted): no task lost, none
  completed twice. Like the agent, each client's completion claims its next task.
- complete / fail / release requests replayed raw: the same answer, applied once.
- the coordinator SIGKILLed and restarted mid-job; unreachable for longer than a heartbeat, and
  for longer than a lease; PostgreSQL restarted under it mid-job.

Each test prints its figures (``[figures] ...``, seen with ``pytest -s``) and records them as
properties (``--junitxml``).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator
from urllib.parse import quote, unquote

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cio_worker.coordinator.app import MAX_SMALL_BODY, CoordinatorConfig
from cio_worker.errors import LeaseLost, QueueError
from cio_worker.job.hashing import md5_b64_of_bytes
from cio_worker.queue import DownloadFile, NewDownload, NewTask, SqliteQueue
from cio_worker.queue.base import WORKER_STATES, Lease, WorkerStatus
from tests.coordinators import serving
from tests.fleet import JOB, ROUTES, CoordinatorProcess, CoordinatorProxy, CountingHttpQueue, figures_line, queue_state
from tests.waiting import wait_for


def report(record_property: Callable[[str, Any], None], name: str, figures: dict[str, Any]) -> None:
    print("\n" + figures_line(name, figures))
    for key, value in figures.items():
        record_property(key, value if isinstance(value, (int, float, str)) else json.dumps(value, default=str))


def a_download(name: str) -> NewDownload:
    return NewDownload("/proj/renders", (DownloadFile(name, md5_b64_of_bytes(name.encode()), len(name), f"hashstore/{name}"),))


def download_dict(name: str = "img.0001.exr") -> dict[str, Any]:
    return {"output_dir": "/proj/renders",
            "files": [{"relative_path": name, "md5": md5_b64_of_bytes(name.encode()), "size": len(name), "key": f"hashstore/{name}"}]}


# ==================================================================================================
# 10,000 hostile requests
# ==================================================================================================

ROUTE_PATTERNS = [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$") for _, path, _ in ROUTES]
# Answered without a token (and rightly so): never a target of the random paths.
OPEN_PATHS = re.compile(r"^/(healthz|openapi\.json|docs|docs/oauth2-redirect|redoc|sign-in|static/.*)$")

# -- the fields of each body, to break them one at a time -------------------------------------------


@dataclass(frozen=True)
class Fld:
    kind: str  # str, float, int, bool, model, anydict, list, literal
    required: bool = False
    nullable: bool = False  # `X | None`: null is a valid value
    lo: float | None = None  # min_length / ge (gt: lo with strict)
    hi: float | None = None  # max_length / le
    strict_lo: bool = False
    sub: dict[str, "Fld"] | None = None  # model's fields / list item's fields


NAME = Fld("str", True, lo=1, hi=200)
OP_ID = Fld("str", nullable=True, lo=1, hi=100)
LEASE_SECONDS = Fld("float", nullable=True, lo=0, hi=86_400, strict_lo=True)
LEASE = Fld("model", True, sub={
    "job_id": Fld("str", True, lo=1, hi=32), "task_id": Fld("str", True, lo=1, hi=32),
    "token": Fld("str", True, lo=1, hi=128), "worker": NAME, "expires_at": Fld("float", nullable=True)})
STATUS_FIELDS = {"state": Fld("str", True, lo=1, hi=32), "progress": Fld("float", nullable=True, lo=0, hi=100),
                 "detail": Fld("str", hi=500)}
DOWNLOAD = Fld("model", nullable=True, sub={
    "output_dir": Fld("str", True, lo=1, hi=4096),
    "files": Fld("list", sub={"relative_path": Fld("str", True, lo=1, hi=4096), "md5": Fld("str", True, lo=1, hi=64),
                              "size": Fld("int", True, lo=0), "key": Fld("str", True, lo=1, hi=1024)})})
SPECS: dict[str, dict[str, Fld]] = {
    "/v1/workers/register": {"worker": NAME, "info": Fld("anydict")},
    "/v1/workers/report": {"worker": NAME, "status": Fld("model", True, sub=STATUS_FIELDS)},
    "/v1/claim": {"worker": NAME, "lease_seconds": LEASE_SECONDS, "wait_seconds": Fld("float", nullable=True, lo=0, hi=300)},
    "/v1/heartbeat": {"lease": LEASE, "lease_seconds": LEASE_SECONDS, "status": Fld("model", nullable=True, sub=STATUS_FIELDS)},
    "/v1/complete": {"lease": LEASE, "download": DOWNLOAD, "op_id": OP_ID},
    "/v1/fail": {"lease": LEASE, "reason": Fld("str", True, hi=10_000), "op_id": OP_ID},
    "/v1/release": {"lease": LEASE, "cause": Fld("literal"), "frames_done": Fld("str", hi=100_000), "download": DOWNLOAD,
                    "reason": Fld("str", hi=10_000), "op_id": OP_ID},
    "/v1/jobs": {"job": Fld("anydict", True), "tasks": Fld("list", True, sub={
        "frames": Fld("str", True, lo=1, hi=100_000), "command": Fld("str", True, lo=1, hi=100_000),
        "tile": Fld("int"), "tiles": Fld("int"), "scout": Fld("bool")})},
}
BODY_ROUTES = sorted(SPECS)


def _number(text: str) -> int | None:
    text = str(text).strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


@dataclass
class Hostile:
    """The farm under attack and the tally of its answers."""

    url: str
    tokens: dict[str, str]
    leases: dict[str, Lease]  # a, b (leased), done, failed
    download_id: str
    session: requests.Session = field(default_factory=requests.Session)
    statuses: Counter = field(default_factory=Counter)
    per_strategy: dict[str, Counter] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    parser_refusals: int = 0

    def ref(self, name: str) -> dict[str, Any]:
        lease = self.leases[name]
        return {"job_id": lease.job_id, "task_id": lease.task_id, "token": lease.token, "worker": lease.worker}

    def forged_ref(self) -> dict[str, Any]:
        """A lease ref that names a real task but not as its holder (so even a body that turned out
        valid would be refused 409, never applied)."""
        ref = self.ref("a")
        ref["token"] = self.leases["b"].token
        return ref

    def template(self, route: str) -> dict[str, Any]:
        """A body of every field (each valid on its own) for ``route``."""
        status = {"state": "rendering", "progress": 50, "detail": "frame 3"}
        return {
            "/v1/workers/register": {"worker": "w-new", "info": {"zone": "z"}},
            "/v1/workers/report": {"worker": "w-a", "status": {"state": "idle", "progress": 0, "detail": ""}},
            "/v1/claim": {"worker": "w-new", "lease_seconds": 60, "wait_seconds": 0},
            "/v1/heartbeat": {"lease": self.forged_ref(), "lease_seconds": 60, "status": status},
            "/v1/complete": {"lease": self.forged_ref(), "download": download_dict(), "op_id": uuid.uuid4().hex},
            "/v1/fail": {"lease": self.forged_ref(), "reason": "boom", "op_id": uuid.uuid4().hex},
            "/v1/release": {"lease": self.forged_ref(), "cause": "released", "frames_done": "", "download": download_dict(),
                            "reason": "", "op_id": uuid.uuid4().hex},
            "/v1/jobs": {"job": dict(JOB), "tasks": [{"frames": "1", "command": "cnode x", "tile": 1, "tiles": 1, "scout": False}]},
        }[route]

    def token_for(self, route: str) -> str:
        return self.tokens["owner"] if route == "/v1/jobs" else self.tokens["agent"]

    def send(self, strategy: str, method: str, path: str, headers: dict[str, str], body: bytes | None) -> None:
        tally = self.per_strategy.setdefault(strategy, Counter())
        self.bytes_sent += len(body or b"")
        what = f"{strategy}: {method} {path[:80]} ({len(body or b'')} bytes: {(body or b'')[:80]!r})"
        try:
            response = self.session.request(method, self.url + path, headers=headers, data=body, timeout=60,
                                            allow_redirects=False)
        except requests.RequestException as exc:
            self.statuses["dropped"] += 1
            tally["dropped"] += 1
            self.problems.append(f"{what}: no answer ({type(exc).__name__}: {str(exc)[:120]})")
            self.session.close()
            self.session = requests.Session()
            return
        status = response.status_code
        self.statuses[status] += 1
        tally[status] += 1
        if not 400 <= status < 500:
            self.problems.append(f"{what}: answered {status} {response.text[:200]}")
            return
        if method == "HEAD":
            return
        if method == "FOO" and status == 400 and response.text == "Invalid HTTP request received.":
            # A method the HTTP parser (httptools) does not know never becomes a request the app
            # sees: uvicorn itself answers 400 in plain text. Counted apart; still a 4xx.
            tally["400 from the HTTP parser"] += 1
            self.parser_refusals += 1
            return
        try:
            data = response.json()
        except ValueError:
            self.problems.append(f"{what}: {status} with a body that is not JSON: {response.text[:200]!r}")
            return
        if not (isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"]
                and isinstance(data.get("message"), str) and data["message"]):
            self.problems.append(f"{what}: {status} without error and message: {response.text[:200]}")


JSON_HEADERS = {"Content-Type": "application/json"}
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **JSON_HEADERS}


def dumps(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


def wrong_values(fld: Fld) -> list[Any]:
    """Values of a type ``fld`` refuses (strict: no coercion)."""
    values: list[Any] = {
        "str": [0, 1.5, True, [], ["x"], {"a": "b"}],
        "float": ["1", "", True, False, [], [1], {"x": 1}],
        "int": [1.5, "1", True, [], {"x": 1}],
        "bool": [0, 1, "true", "", [], {}],
        "model": [[], "x", 1, True, 2.5, [{}]],
        "anydict": [[], "x", 1, True, [["x"]]],
        "list": [{}, "x", 1, True, {"0": {}}],
        "literal": ["", "failed", "PREEMPTED", 1, True, []],
    }[fld.kind]
    if not fld.nullable and fld.kind != "literal":
        values.append(None)
    if fld.kind == "literal":
        values.append(None)
    return values


def field_paths(spec: dict[str, Fld], body: dict[str, Any], prefix: tuple = ()) -> list[tuple[tuple, Fld]]:
    """(path, field) of every field present in ``body`` (list items: the first one)."""
    found = []
    for name, fld in spec.items():
        if name not in body:
            continue
        path = prefix + (name,)
        found.append((path, fld))
        value = body[name]
        if fld.kind == "model" and isinstance(value, dict) and fld.sub:
            found += field_paths(fld.sub, value, path)
        elif fld.kind == "list" and fld.sub and isinstance(value, list) and value and isinstance(value[0], dict):
            found += field_paths(fld.sub, value[0], path + (0,))
    return found


def objects_of(spec: dict[str, Fld], body: dict[str, Any], prefix: tuple = ()) -> list[tuple]:
    """Paths of the objects whose fields are fixed (where an unknown field is refused)."""
    found = [prefix]
    for name, fld in spec.items():
        value = body.get(name)
        if fld.kind == "model" and isinstance(value, dict) and fld.sub:
            found += objects_of(fld.sub, value, prefix + (name,))
        elif fld.kind == "list" and fld.sub and isinstance(value, list) and value and isinstance(value[0], dict):
            found += objects_of(fld.sub, value[0], prefix + (name, 0))
    return found


def at(body: Any, path: tuple) -> Any:
    for part in path:
        body = body[part]
    return body


@st.composite
def broken_bodies(draw: st.DrawFn, farm: Hostile) -> tuple:
    """A body with the right token, broken in one way: an unknown field, a missing one, a value of the
    wrong type, a string too short or too long, a number out of range, a job that does not parse."""
    route = draw(st.sampled_from(BODY_ROUTES))
    spec = SPECS[route]
    body = farm.template(route)
    how = draw(st.sampled_from(["unknown", "missing", "wrong_type", "length", "range", "job"]))
    fields = field_paths(spec, body)
    ranged = [(p, f) for p, f in fields if f.kind in ("float", "int") and (f.lo is not None or f.hi is not None)]
    if how == "range" and not ranged:
        how = "wrong_type"
    if how == "unknown":
        where = draw(st.sampled_from(objects_of(spec, body)))
        target = at(body, where)
        name = draw(st.text(PRINTABLE, min_size=1, max_size=30).filter(lambda n: n not in target))
        target[name] = draw(st.one_of(st.none(), st.integers(), ANY_TEXT, st.lists(st.integers(), max_size=3)))
    elif how == "missing":
        required = [(p, f) for p, f in fields if f.required]
        path, _ = draw(st.sampled_from(required))
        del at(body, path[:-1])[path[-1]]
    elif how == "wrong_type":
        path, fld = draw(st.sampled_from(fields))
        at(body, path[:-1])[path[-1]] = draw(st.sampled_from(wrong_values(fld)))
    elif how == "length":
        bounded = [(p, f) for p, f in fields if f.kind == "str" and (f.hi or (f.lo or 0) >= 1)]
        path, fld = draw(st.sampled_from(bounded))
        if fld.hi and (not fld.lo or draw(st.booleans())):
            value = draw(st.sampled_from("xé€🎬 ")) * (int(fld.hi) + draw(st.integers(1, 2000)))
        else:
            value = ""
        at(body, path[:-1])[path[-1]] = value
    elif how == "range":
        path, fld = draw(st.sampled_from(ranged))
        choices = []
        if fld.lo is not None:
            below = st.floats(max_value=fld.lo, allow_nan=False) if fld.strict_lo else st.floats(
                max_value=fld.lo, exclude_max=True, allow_nan=False)
            choices.append(below if fld.kind == "float" else st.integers(max_value=int(fld.lo) - 1))
        if fld.hi is not None:
            choices.append(st.floats(min_value=fld.hi, exclude_min=True, allow_nan=False))
        value = draw(st.one_of(*choices))
        at(body, path[:-1])[path[-1]] = value
    else:  # a job document that does not parse: a required field gone or of the wrong type
        route, body = "/v1/jobs", farm.template("/v1/jobs")
        key = draw(st.sampled_from(["storage", "output_path"]))
        if draw(st.booleans()):
            del body["job"][key]
        else:
            body["job"][key] = draw(st.sampled_from([None, 1, [], {}, ""] + (["ftp://x", "nope"] if key == "storage" else [])))
    return "POST", route, auth(farm.token_for(route)), dumps(body)


def resolves(text: str, number: int) -> bool:
    return _number(text) == number


@st.composite
def forged_reports(draw: st.DrawFn, farm: Hostile) -> tuple:
    """Well-formed reports on leases that are not the sender's: another worker's, a wrong token, a
    task done or failed, unknown jobs and tasks; with the agent's token."""
    route = draw(st.sampled_from(["/v1/heartbeat", "/v1/complete", "/v1/fail", "/v1/release"]))
    base = draw(st.sampled_from(["a", "b", "done", "failed"]))
    ref = farm.ref(base)
    leases = farm.leases
    ref["worker"] = draw(st.one_of(st.sampled_from(["w-a", "w-b", "w-c", "w-a ", "W-A"]), st.text(PRINTABLE, min_size=1, max_size=200)))
    ref["token"] = draw(st.one_of(st.sampled_from([l.token for l in leases.values()]),
                                  st.text("0123456789abcdef", min_size=32, max_size=32),
                                  st.text(PRINTABLE, min_size=1, max_size=128)))
    if draw(st.integers(0, 4)) == 0:
        ref["job_id"] = draw(st.one_of(st.sampled_from(["1", "01", " 00001", "00002", "99999", "0"]),
                                       st.text(PRINTABLE, min_size=1, max_size=32)))
    if draw(st.integers(0, 4)) == 0:
        ref["task_id"] = draw(st.one_of(st.sampled_from(["0", "00", "001", "004", "999"]), st.text(PRINTABLE, min_size=1, max_size=32)))
    if draw(st.booleans()):
        ref["expires_at"] = draw(st.floats(allow_nan=False, allow_infinity=False))
    for holder in ("a", "b"):  # never the holder itself, with its own token, on its own task
        lease = leases[holder]
        if (resolves(ref["job_id"], int(lease.job_id)) and resolves(ref["task_id"], int(lease.task_id))
                and ref["worker"] == lease.worker and ref["token"] == lease.token):
            ref["token"] = uuid.uuid4().hex
    body: dict[str, Any] = {"lease": ref}
    op_id = draw(st.one_of(st.none(), st.just(uuid.uuid4().hex), st.text(PRINTABLE, min_size=1, max_size=100)))
    if route == "/v1/heartbeat":
        body["lease_seconds"] = draw(st.one_of(st.none(), st.floats(min_value=0.001, max_value=86_400)))
        if draw(st.booleans()):
            body["status"] = {"state": draw(st.sampled_from(WORKER_STATES)), "progress": draw(st.floats(0, 100)),
                              "detail": draw(st.text(PRINTABLE, max_size=100))}
    elif route == "/v1/complete":
        body["op_id"] = op_id
        if draw(st.booleans()):
            body["download"] = download_dict(draw(st.sampled_from(["a.exr", "b/c.exr", "img.0001.exr"])))
    elif route == "/v1/fail":
        body["op_id"] = op_id
        body["reason"] = draw(ANY_TEXT)
    else:
        body["op_id"] = op_id
        body["cause"] = draw(st.sampled_from(["preempted", "released"]))
        body["frames_done"] = draw(st.sampled_from(["", "1", "1-4", "2"]))
        body["reason"] = draw(ANY_TEXT)
    token = draw(st.sampled_from([farm.tokens["agent"], farm.tokens["both"]]))
    return "POST", route, auth(token), dumps(body)


@st.composite
def bad_credentials(draw: st.DrawFn, farm: Hostile) -> tuple:
    """Every route with a body it would accept, and no token, a bad one, a revoked one, another
    scheme, or the other scope's token."""
    method, template, scope = draw(st.sampled_from(ROUTES))
    path = template.replace("{job_id}", "00001").replace("{download_id}", farm.download_id)
    body = dumps(farm.template(template)) if template in SPECS else None
    good = farm.tokens["both"]
    kind = draw(st.sampled_from(["none", "empty", "garbage", "malformed", "unknown", "wrong_secret", "revoked",
                                 "scheme", "scope"]))
    headers = dict(JSON_HEADERS)
    if kind == "empty":
        headers["Authorization"] = draw(st.sampled_from(["", "Bearer", "Bearer ", "Bearer    "]))
    elif kind == "garbage":
        headers["Authorization"] = "Bearer " + draw(st.text(PRINTABLE, min_size=1, max_size=300))
    elif kind == "malformed":
        token_id = good.split("_")[1]
        secret = good.split("_", 2)[2]
        headers["Authorization"] = "Bearer " + draw(st.sampled_from([
            good[:-1], good + "x", good.upper(), f"cio_{token_id}", f"cio_{token_id}_{secret[:42]}",
            f"cio_{token_id.upper()}_{secret}", f"cio{token_id}_{secret}", f"cio_{token_id}_{secret}=", f"{good} {good}"]))
    elif kind == "unknown":
        token_id = draw(st.text("0123456789abcdef", min_size=12, max_size=12))
        secret = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", min_size=43, max_size=43))
        headers["Authorization"] = f"Bearer cio_{token_id}_{secret}"
    elif kind == "wrong_secret":
        token_id = good.split("_")[1]
        secret = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", min_size=43, max_size=43))
        headers["Authorization"] = f"Bearer cio_{token_id}_{secret}"
    elif kind == "revoked":
        headers["Authorization"] = f"Bearer {farm.tokens['revoked']}"
    elif kind == "scheme":
        headers["Authorization"] = draw(st.sampled_from(["Basic ", "Token ", "", "Bearer: ", "Bearer", "Bearerx "])) + (
            good if draw(st.booleans()) else good.replace("_", "-"))
    else:  # the other scope
        headers["Authorization"] = f"Bearer {farm.tokens['owner' if scope == 'agent' else 'agent']}"
    if kind == "none":
        headers.pop("Authorization", None)
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["state=all", "job=00001", "task=000", "x=" + "y" * 100]))
    return method, path, headers, body


SEGMENT = st.one_of(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_~", min_size=1, max_size=20),
    st.sampled_from(["v1", "jobs", "claim", "workers", "downloads", "tasks", "events", "kill", "release", "00001",
                     "000", "healthz", "openapi.json", "docs", "admin", "v2", "%2F", "%00", "%2e%2e", "%ff"]),
    st.binary(min_size=1, max_size=8).map(lambda b: quote(b, safe="")),
)


@st.composite
def random_paths(draw: st.DrawFn, farm: Hostile) -> tuple:
    """Random methods on random paths (a real route gets a bad token: it is the path that is random)."""
    segments = draw(st.lists(SEGMENT, min_size=0, max_size=8))
    segments = [s for s in segments if s not in (".", "..")]
    path = "/" + "/".join(segments) + draw(st.sampled_from(["", "", "/", "//"]))
    if draw(st.booleans()):
        path = "/v1" + path
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "FOO"]))
    decoded = unquote(path)
    if OPEN_PATHS.match(decoded):
        path = "/x" + path
        decoded = unquote(path)
    token = draw(st.sampled_from([farm.tokens["both"], farm.tokens["agent"], farm.tokens["owner"], "nope", None]))
    if any(p.match(decoded) for p in ROUTE_PATTERNS) and token not in ("nope", None):
        token = "nope"
    headers = dict(JSON_HEADERS) if token is None else auth(token)
    body = draw(st.one_of(st.none(), st.binary(max_size=200), st.just(b"{}"), st.just(b'{"worker": "w-x"}')))
    if draw(st.booleans()):
        path += "?" + quote(draw(st.text(PRINTABLE, max_size=40)), safe="=&")
    return method, path, headers, body


WRONG_CONTENT_TYPES = [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz",
                       "application/xml", "application/octet-stream", "text/json", "image/png", "application/jsonp",
                       "text/html; charset=utf-8", "json", "*/*"]


@st.composite
def not_json(draw: st.DrawFn, farm: Hostile) -> tuple:
    """Bodies that are not JSON, and bodies a route would accept sent as another content type."""
    route = draw(st.sampled_from(BODY_ROUTES))
    headers = auth(farm.token_for(route))
    valid = dumps(farm.template(route))
    kind = draw(st.sampled_from(["binary", "truncated", "trailing", "quotes", "content_type", "empty", "form"]))
    if kind == "binary":
        body = draw(st.sampled_from([b"\xff", b"<", b"\x00", b"\xfe\xff"])) + draw(st.binary(max_size=2000))
    elif kind == "truncated":
        body = valid[: draw(st.integers(1, len(valid) - 1))]
    elif kind == "trailing":
        body = valid + draw(st.sampled_from([b"}", b"x", b",", b"{}", b"\x00", b"]"])) + draw(st.binary(max_size=20))
    elif kind == "quotes":
        body = valid.replace(b'"', b"'")
    elif kind == "empty":
        body = draw(st.sampled_from([b"", b" ", b"\n", b"null", b"[]", b"0", b'""', b"true"]))
    elif kind == "form":
        body = b"worker=w-new&lease_seconds=60"
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    else:
        body = valid
        content_type = draw(st.sampled_from(WRONG_CONTENT_TYPES))
        if content_type is None:
            headers.pop("Content-Type")
        else:
            headers["Content-Type"] = content_type
    return "POST", route, headers, body


@st.composite
def deep_nesting(draw: st.DrawFn, farm: Hostile) -> tuple:
    """Deeply nested JSON: the whole body, or where a string, a number or a fixed object goes."""
    route = draw(st.sampled_from(BODY_ROUTES))
    depth = draw(st.one_of(st.integers(1, 100), st.integers(100, 5000), st.integers(5000, 200_000)))
    opener, closer, leaf = draw(st.sampled_from([(b"[", b"]", b"1"), (b'{"a":', b"}", b"1")]))
    nested = opener * depth + leaf + closer * depth
    where = draw(st.sampled_from(["body", "field", "info"]))
    if where == "body":
        body = nested
    elif where == "info" and route == "/v1/workers/register":
        # info takes any object: only a nesting too deep to read (or too big to keep) is refused
        deep = b'{"a":' * max(depth, 3000) + b"1" + b"}" * max(depth, 3000)
        body = b'{"worker": "w-new", "info": ' + deep + b"}"
    else:
        template = farm.template(route)
        fields = [(p, f) for p, f in field_paths(SPECS[route], template) if f.kind not in ("anydict",)]
        path, _ = draw(st.sampled_from(fields))
        at(template, path[:-1])[path[-1]] = "\x00NESTED\x00"
        body = dumps(template).replace(b'"\\u0000NESTED\\u0000"', nested)
    return "POST", route, auth(farm.token_for(route)), body


@st.composite
def huge_strings(draw: st.DrawFn, farm: Hostile) -> tuple:
    """Strings far past their field's limit (up to 2 MB), or thousands of unknown fields, in a body
    under the size limit."""
    route = draw(st.sampled_from(BODY_ROUTES))
    template = farm.template(route)
    if draw(st.integers(0, 3)) == 0:
        for i in range(draw(st.integers(1_000, 50_000))):
            template[f"k{i}"] = i
    else:
        fields = [(p, f) for p, f in field_paths(SPECS[route], template) if f.kind == "str" and f.hi]
        path, fld = draw(st.sampled_from(fields))
        size = draw(st.integers(int(fld.hi) + 1, max(int(fld.hi) + 2, 600_000)))  # (6 bytes a char at most)
        at(template, path[:-1])[path[-1]] = draw(st.sampled_from("x\u00e9\u20ac")) * size
    body = dumps(template)
    assert len(body) <= MAX_SMALL_BODY
    return "POST", route, auth(farm.token_for(route)), body


@st.composite
def oversized(draw: st.DrawFn, farm: Hostile) -> tuple:
    """Bodies over the size limit: refused before the token or the route is looked at."""
    route = draw(st.sampled_from([r for _, r, _ in ROUTES if r.startswith("/v1/") and "{" not in r and r != "/v1/jobs"]
                                 + ["/v1/nowhere", "/v1/jobs/00001/kill"]))
    token = draw(st.sampled_from([farm.tokens["both"], farm.tokens["agent"], "nope", None]))
    headers = dict(JSON_HEADERS) if token is None else auth(token)
    body = b"[" + b"0," * ((MAX_SMALL_BODY + draw(st.integers(0, 500_000))) // 2) + b"0]"
    return draw(st.sampled_from(["POST", "PUT"])), route, headers, body


# (strategy, examples): 10,000 in all.
PLAN = [
    ("broken_bodies", broken_bodies, 3000),
    ("forged_reports", forged_reports, 2000),
    ("bad_credentials", bad_credentials, 2000),
    ("random_paths", random_paths, 1500),
    ("not_json", not_json, 1000),
    ("deep_nesting", deep_nesting, 300),
    ("huge_strings", huge_strings, 150),
    ("oversized", oversized, 50),
]
assert sum(n for _, _, n in PLAN) == 10_000


def hostile_farm(tmp_path: Path) -> tuple[SqliteQueue, Path, dict[str, str], dict[str, Lease], str]:
    db = tmp_path / "queue.db"
    queue = SqliteQueue(db)
    tokens = {name: queue.create_token(name, scopes)[1]
              for name, scopes in (("agent", ["agent"]), ("owner", ["owner"]), ("both", ["agent", "owner"]), ("revoked", ["agent", "owner"]))}
    queue.revoke_token("revoked")
    queue.create_job(JOB, [NewTask(str(f), f"cnode -image_frames_list {f}") for f in (1, 2, 3, 4, 5)])
    fragile = queue.create_job({**JOB, "autoretry_policy": {"preempted": {"max_retries": 0}, "failed": {"max_retries": 0}}},
                               [NewTask("1", "cnode x")])
    queue.create_job(JOB, [NewTask("1", "cnode s", scout=True), NewTask("2", "cnode h")])  # 00003: one task holding
    for worker in ("w-a", "w-b", "w-c"):
        queue.register_worker(worker, {"zone": worker})
    leases = {"a": queue.claim("w-a", 86_400), "b": queue.claim("w-b", 86_400), "done": queue.claim("w-b", 86_400)}
    queue.complete(leases["done"], a_download("img.0003.exr"), uuid.uuid4().hex)
    queue.claim("w-c", 86_400)  # 003: leased by w-c, whose token no request names
    failed = None  # 004 is done on the way to the fragile job's task, which fails for good
    while failed is None or failed.job_id != fragile:
        failed = queue.claim("w-c", 86_400)
        if failed.job_id != fragile:
            queue.complete(failed, None, uuid.uuid4().hex)
    queue.fail(failed, "broken", uuid.uuid4().hex)
    leases["failed"] = failed
    assert all(leases.values())
    download_id = queue.downloads(None, None)[0].download_id
    return queue, db, tokens, leases, download_id  # type: ignore[return-value]


def test_10000_hostile_requests_are_each_refused_with_a_4xx_and_change_nothing(tmp_path: Path, record_property) -> None:
    queue, db, tokens, leases, download_id = hostile_farm(tmp_path)
    before = queue_state(queue, db)
    coordinator = CoordinatorProcess(f"sqlite:///{db}", "--lease-seconds", "86400", "--heartbeat-seconds", "10")
    coordinator.start()
    started = time.monotonic()
    try:
        farm = Hostile(coordinator.url, tokens, leases, download_id)
        seconds_per_strategy = {}
        for name, strategy, examples in PLAN:
            began = time.monotonic()

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(request=strategy(farm))
            def run(request: tuple) -> None:
                farm.send(name, *request)

            run()
            seconds_per_strategy[name] = round(time.monotonic() - began, 1)
        seconds = time.monotonic() - started
        after = queue_state(queue, db)
    finally:
        coordinator.stop()
        queue.close()
    sent = sum(farm.statuses.values())
    figures = {
        "requests_sent": sent,
        "per_status": {str(k): v for k, v in sorted(farm.statuses.items(), key=lambda kv: str(kv[0]))},
        "per_strategy": {name: {str(k): v for k, v in sorted(c.items(), key=lambda kv: str(kv[0]))}
                         for name, c in farm.per_strategy.items()},
        "refused_by_the_http_parser": farm.parser_refusals,
        "megabytes_sent": round(farm.bytes_sent / 1e6, 1),
        "seconds": round(seconds, 1),
        "seconds_per_strategy": seconds_per_strategy,
        "problems": len(farm.problems),
    }
    report(record_property, "hostile requests", figures)
    assert not farm.problems, f"{len(farm.problems)} answers were not a JSON 4xx:\n" + "\n".join(farm.problems[:30])
    assert sent == 10_000
    assert after == before, "a refused request changed the queue"
    log = "\n".join(coordinator.log)
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
    for token in tokens.values():
        assert token.split("_", 2)[2] not in log


# ==================================================================================================
# Agents driving a job through faults
# ==================================================================================================


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        queue: Any = SqliteQueue(tmp_path / "queue.db")
    else:
        from cio_worker.queue.postgres import PostgresQueue

        queue = PostgresQueue(request.getfixturevalue("pg_url"), max_connections=8)
    yield queue
    queue.close()


@dataclass
class Fleet:
    """Agent threads claiming, heartbeating and reporting a job's tasks until it is finished, and
    what they saw."""

    job: str
    is_finished: Callable[[str], bool]
    lease_seconds: float
    heartbeats: int = 2
    heartbeat_pause: float = 0.05
    fail_rate: float = 0.0  # first attempts that fail (a retry follows)
    release_rate: float = 0.0  # attempts given back ("released")
    seed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter = field(default_factory=Counter)
    applied: Counter = field(default_factory=Counter)  # (task, kind) -> reports answered 2xx
    refused: list[tuple[str, str, str, str]] = field(default_factory=list)  # (task, kind, worker, why)
    errors: list[str] = field(default_factory=list)
    holding: dict[str, Lease] = field(default_factory=dict)  # worker -> the lease it holds now
    heartbeat_log: list[tuple[float, str, str]] = field(default_factory=list)  # (when, worker, lease token)
    report_log: list[tuple[float, str, str, str]] = field(default_factory=list)  # (when, worker, lease token, kind)
    stop: threading.Event = field(default_factory=threading.Event)

    def count(self, key: Any, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def run(self, client: Any, worker: str, deadline: float) -> None:
        rng = random.Random(f"{self.seed}-{worker}")
        following = None  # the next task, brought by the last completion (as the agent does)
        while not self.stop.is_set():
            if time.monotonic() > deadline:
                self.errors.append(f"{worker}: the job did not finish before the test's deadline")
                return
            lease, following = following, None
            if lease is None:
                try:
                    lease = client.claim(worker, self.lease_seconds)
                    self.count("claims")
                except QueueError as exc:  # resent for a few seconds, then given up
                    self.count(f"claim failed ({exc.code})")
                    time.sleep(0.05)
                    continue
            if lease is None:
                if self.is_finished(self.job):
                    return
                time.sleep(0.25)
                continue
            task = lease.task_id
            with self.lock:
                self.holding[worker] = lease
            kind = "complete"
            try:
                for _ in range(self.heartbeats):
                    reply = client.heartbeat(lease, self.lease_seconds, WorkerStatus("rendering", 50.0, f"task {task}"))
                    assert not reply.cancel
                    with self.lock:
                        self.heartbeat_log.append((time.monotonic(), worker, lease.token))
                        self.counts["heartbeats"] += 1
                    time.sleep(self.heartbeat_pause)
                roll = rng.random()
                op_id = uuid.uuid4().hex
                if roll < self.fail_rate and lease.document.task.attempt == 1:
                    kind = "fail"
                    assert client.fail(lease, "an injected failure", op_id) == "pending"
                elif roll < self.fail_rate + self.release_rate:
                    kind = "release"
                    assert client.release(lease, "released", "", None, "given back", op_id) == "pending"
                else:
                    following = client.complete(lease, a_download(f"img.{task}.exr"), op_id,
                                                next_lease_seconds=self.lease_seconds)
                    self.count("completions that brought the next task" if following else "completions")
                with self.lock:
                    self.applied[(task, kind)] += 1
                    self.report_log.append((time.monotonic(), worker, lease.token, kind))
            except LeaseLost as exc:
                with self.lock:
                    self.refused.append((task, kind, worker, str(exc)))
            except QueueError as exc:
                with self.lock:
                    self.errors.append(f"{worker} task {task} {kind}: {exc}")
            finally:
                with self.lock:
                    self.holding.pop(worker, None)

    def start(self, clients: dict[str, Any], timeout: float) -> list[threading.Thread]:
        deadline = time.monotonic() + timeout
        threads = [threading.Thread(target=self.run, args=(client, worker, deadline), name=worker, daemon=True)
                   for worker, client in clients.items()]
        for thread in threads:
            thread.start()
        return threads

    def done(self) -> int:
        with self.lock:
            return sum(n for (_, kind), n in self.applied.items() if kind == "complete")


def outcome(queue: Any, job: str, fleet: Fleet) -> dict[str, Any]:
    """Each task's end state and how often each report was applied, from the queue's own record."""
    tasks = queue.tasks(job)
    events = queue.events(job)
    per_task = {t.id: Counter(e.kind for e in events if e.task_id == t.id) for t in tasks}
    downloads = Counter(d.task_id for d in queue.downloads(job, None))
    return {
        "tasks": len(tasks),
        "tasks_done": sum(t.state == "done" for t in tasks),
        "tasks_lost": sum(t.state != "done" for t in tasks),
        "done_events_per_task": sorted(set(c["done"] for c in per_task.values())),
        "completions_applied_twice": sum(max(0, c["done"] - 1) for c in per_task.values()),
        "downloads_applied_twice": sum(max(0, n - 1) for n in downloads.values()),
        "fails_applied": sum(c["failed"] for c in per_task.values()),
        "releases_applied": sum(c["released"] for c in per_task.values()),
        "leases_expired": sum(c["lease_expired"] for c in per_task.values()),
        "attempts_preempted": sum(t.attempts["preempted"] for t in tasks),
        "_per_task": per_task,
        "_not_done": {t.id: (t.state, t.attempts, t.reason) for t in tasks if t.state != "done"},
        "_downloads": downloads,
        "_workers_done": {t.id: [e.worker for e in events if e.task_id == t.id and e.kind == "done"] for t in tasks},
    }


def assert_each_task_done_once(result: dict[str, Any], fleet: Fleet) -> None:
    assert not fleet.errors, fleet.errors[:10]
    assert result["tasks_lost"] == 0, (result["_not_done"], public(result))
    assert result["done_events_per_task"] == [1], result
    assert result["completions_applied_twice"] == 0 and result["downloads_applied_twice"] == 0
    assert set(result["_downloads"].values()) == {1}
    # Every fail and release the agents were told was applied, was applied exactly once; and
    # those refused (their lease had expired under the faults) were not applied at all.
    with fleet.lock:
        told = Counter()
        for (task, kind), n in fleet.applied.items():
            told[(task, kind)] += n
    for task, kinds in result["_per_task"].items():
        assert kinds["failed"] == told[(task, "fail")], (task, kinds, told[(task, "fail")])
        assert kinds["released"] == told[(task, "release")], (task, kinds, told[(task, "release")])
        assert kinds["done"] == told[(task, "complete")] == 1, (task, kinds)
        # Every attempt that ended other than by a report was reaped: lease_expired.
        assert kinds["claimed"] == kinds["done"] + kinds["failed"] + kinds["released"] + kinds["lease_expired"], (task, kinds)


def public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def new_job(queue: Any, tasks: int) -> str:
    return queue.create_job(JOB, [NewTask(str(f), f"cnode -image_frames_list {f}") for f in range(1, tasks + 1)])


def test_a_job_goes_through_a_proxy_that_resets_delays_fails_and_drops_answers(backend: Any, record_property) -> None:
    queue = backend
    _, token = queue.create_token("fleet", ["agent", "owner"])
    job = new_job(queue, 30)
    config = CoordinatorConfig(lease_seconds=4, heartbeat_seconds=1, watch_seconds=0.25)
    with serving(queue, config) as url:
        # Claims get the same faults as every other call: a claim whose answer was lost is resent
        # and gets the lease its first copy made.
        proxy = CoordinatorProxy(url, seed=7, delay_seconds=0.2, timeout_seconds=4.0, rates={
            "reset": 0.06, "status": 0.06, "delay": 0.05, "timeout": 0.03, "drop_response": 0.07, "reset_body": 0.04})
        try:
            clients = {f"agent-{i}": CountingHttpQueue(proxy.url, token, timeout=3.0, retry_seconds=30) for i in range(4)}
            fleet = Fleet(job, queue.is_finished, lease_seconds=4, heartbeats=2, fail_rate=0.15, release_rate=0.1, seed=7)
            for thread in fleet.start(clients, timeout=150):
                thread.join(160)
            result = outcome(queue, job, fleet)
        finally:
            proxy.stop()
            for client in clients.values():
                client.close()
    figures = {
        "backend": type(queue).__name__,
        "requests_sent": len(proxy.seen),
        "faults_injected": dict(sorted(proxy.injected.items())),
        "faults_total": sum(proxy.injected.values()),
        "client_retries": sum(c.retries for c in clients.values()),
        "client_statuses": dict(sorted(sum((c.statuses for c in clients.values()), Counter()).items())),
        "agent_counts": dict(sorted(fleet.counts.items())),
        "reports_refused_lease_lost": len(fleet.refused),
        **public(result),
        "duplicates": result["completions_applied_twice"],
        "lost": result["tasks_lost"],
    }
    report(record_property, f"proxy faults ({type(queue).__name__})", figures)
    assert_each_task_done_once(result, fleet)
    assert result["tasks_done"] == 30
    for kind in ("reset", "delay", "timeout", "drop_response", "reset_body"):
        assert proxy.injected[kind] > 0, f"no {kind} fault was injected: the run proved nothing about it"
    assert any(k.startswith("status_") for k in proxy.injected)
    assert result["fails_applied"] > 0 and result["releases_applied"] > 0


# ==================================================================================================
# Replayed requests
# ==================================================================================================


def replay(url: str, forwarded: Any, times: int, *, concurrently: bool = False, body: bytes | None = None) -> list[tuple[int, str]]:
    headers = {k: v for k, v in forwarded.headers.items() if k.lower() in ("authorization", "content-type")}
    data = forwarded.body if body is None else body

    def send(_: int) -> tuple[int, str]:
        response = requests.post(url + forwarded.path, data=data, headers=headers, timeout=60)
        return response.status_code, response.text

    if not concurrently:
        return [send(i) for i in range(times)]
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(times)

    def together(i: int) -> tuple[int, str]:
        barrier.wait()
        return send(i)

    with ThreadPoolExecutor(times) as pool:
        return list(pool.map(together, range(times)))


def test_replayed_reports_get_the_same_answer_and_are_applied_once(backend: Any, record_property) -> None:
    from cio_worker.queue.http import HttpQueue

    _, token = backend.create_token("fleet", ["agent", "owner"])
    job = new_job(backend, 4)
    times = 20
    with serving(backend, CoordinatorConfig(lease_seconds=600, watch_seconds=0.5)) as url:
        proxy = CoordinatorProxy(url)  # no faults: it keeps what it forwarded
        try:
            client = HttpQueue(proxy.url, token)
            leases = [client.claim("w-1", 600) for _ in range(4)]
            client.complete(leases[0], a_download("img.000.exr"))
            assert client.fail(leases[1], "boom") == "pending"
            assert client.release(leases[2], "preempted", "3", a_download("partial.exr"), "notice") == "pending"
            captured = {path: proxy.bodies(path)[0] for path in ("/v1/complete", "/v1/fail", "/v1/release")}
            # Another agent holds the failed and the released task now: replays must not disturb it.
            other = HttpQueue(url, token)
            again = [other.claim("w-2", 600), other.claim("w-2", 600)]
            assert sorted(l.task_id for l in again) == ["001", "002"]
            before = queue_state(backend)
            expected = {"/v1/complete": {"state": "done"}, "/v1/fail": {"state": "pending"}, "/v1/release": {"state": "pending"}}
            statuses: Counter = Counter()
            for path, forwarded in captured.items():
                answers = replay(url, forwarded, times) + replay(url, forwarded, times, concurrently=True)
                statuses.update(status for status, _ in answers)
                assert {(s, json.dumps(json.loads(t), sort_keys=True)) for s, t in answers} == {
                    (200, json.dumps(expected[path], sort_keys=True))}, (path, Counter(answers).most_common(3))
                # The same op id sent as another worker: refused, not answered with w-1's result.
                forged = json.loads(forwarded.body)
                forged["lease"]["worker"] = "w-2"
                (status, text), = replay(url, forwarded, 1, body=json.dumps(forged).encode())
                assert status == 409 and json.loads(text)["error"] == "lease_lost"
                statuses[status] += 1
            assert queue_state(backend) == before, "a replayed report changed the queue"

            # Duplicates of a report never applied before, all in flight at once (a client that
            # timed out and sent it again while the first was still on its way).
            lease = leases[3]
            body = {"lease": {"job_id": lease.job_id, "task_id": lease.task_id, "token": lease.token, "worker": lease.worker},
                    "download": None, "op_id": uuid.uuid4().hex}
            first_time = replay(url, captured["/v1/complete"], times, concurrently=True, body=json.dumps(body).encode())
            statuses.update(s for s, _ in first_time)
            assert Counter(first_time) == Counter({(200, '{"state":"done"}'): times}), Counter(first_time)
            result = outcome(backend, job, Fleet(job, backend.is_finished, 600))
        finally:
            proxy.stop()
    per_task = result["_per_task"]
    assert [per_task[t]["done"] for t in ("000", "003")] == [1, 1]
    assert per_task["001"]["failed"] == 1 and per_task["002"]["preempted"] == 1  # (the release's cause)
    assert result["_downloads"] == Counter({"000": 1, "002": 1})
    figures = {"backend": type(backend).__name__, "replays_sent": sum(statuses.values()),
               "answers": dict(sorted(statuses.items())), "duplicates": result["completions_applied_twice"]}
    report(record_property, f"replays ({type(backend).__name__})", figures)


def test_a_completion_that_claims_the_next_task_sent_many_times_at_once_claims_one(backend: Any) -> None:
    """Copies of one completion with ``next_lease_seconds`` in flight together (a client that timed
    out and sent it again): it is applied once, one next task is claimed, and every answer that
    carries a next task carries that one."""
    from cio_worker.queue.http import HttpQueue

    _, token = backend.create_token("fleet", ["agent", "owner"])
    job = new_job(backend, 4)
    times = 20
    with serving(backend, CoordinatorConfig(lease_seconds=600, watch_seconds=0.5)) as url:
        lease = HttpQueue(url, token).claim("w-1", 600)
        body = {"lease": {"job_id": lease.job_id, "task_id": lease.task_id, "token": lease.token, "worker": "w-1"},
                "op_id": uuid.uuid4().hex, "next_lease_seconds": 600}
        request = SimpleNamespace(path="/v1/complete", body=json.dumps(body).encode(),
                                  headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        answers = replay(url, request, times, concurrently=True)
    assert {status for status, _ in answers} == {200}
    nexts = [json.loads(text)["next"] for _, text in answers]
    assert all(json.loads(text)["state"] == "done" for _, text in answers)
    assert len({json.dumps(n, sort_keys=True) for n in nexts if n is not None}) == 1, nexts
    states = {t.id: (t.state, t.worker) for t in backend.tasks(job)}
    assert states["000"][0] == "done"
    assert sorted(state for state, _ in states.values()) == ["done", "leased", "pending", "pending"]
    assert [e.kind for e in backend.events(job)].count("done") == 1


@pytest.mark.parametrize("lost", ["reset_body", "cut_body"])
def test_a_claim_whose_answer_was_lost_is_resent_and_gets_the_same_lease(tmp_path: Path, fault_proxy, lost: str) -> None:
    """The coordinator leased a task but its answer was cut on the way: the client sends the claim
    again, marked as a resend, and gets that lease; no second task is leased to the worker."""
    from cio_worker.queue.http import HttpQueue
    from tests.servers import Fault

    backend = SqliteQueue(tmp_path / "queue.db")
    _, token = backend.create_token("fleet", ["agent"])
    job = new_job(backend, 3)
    with serving(backend, CoordinatorConfig(lease_seconds=600, watch_seconds=0.5)) as url:
        proxy = fault_proxy(url)
        proxy.add(Fault(lost, method="POST", path_contains="/v1/claim", times=1))
        client = HttpQueue(proxy.url, token, retry_seconds=10)
        try:
            lease = client.claim("w-1", 600)
            again = client.claim("w-1", 600)  # a fresh claim (a new op id) leases the next task
        finally:
            client.close()
    assert len(proxy.requests("POST", "/v1/claim")) == 3
    assert (lease.task_id, again.task_id) == ("000", "001")
    tasks = {t.id: t for t in backend.tasks(job)}
    assert [tasks[t].state for t in ("000", "001", "002")] == ["leased", "leased", "pending"]
    assert tasks["000"].worker == "w-1" and backend.heartbeat(lease, 600).cancel is False  # the token holds
    assert [e.kind for e in backend.events(job, "000")] == ["claimed"]
    backend.close()


def test_a_coordinator_older_than_next_lease_seconds_gets_the_completion_without_it() -> None:
    """A newer agent before an older coordinator (a fleet upgraded in turn): the coordinator
    refuses the unknown field before acting (422 naming it), and the client sends the completion
    again without it, then no longer asks for the next task."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cio_worker.queue.http import HttpQueue

    bodies: list[dict] = []

    class Older(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            status, answer = 200, {"state": "done"}
            if "next_lease_seconds" in body:  # what a strict model without the field answers
                status, answer = 422, {"error": "bad_document", "field": "next_lease_seconds",
                                       "message": "next_lease_seconds: Extra inputs are not permitted"}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Older)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        client = HttpQueue(f"http://127.0.0.1:{server.server_address[1]}", "a-token", retry_seconds=1)
        lease = Lease(job_id="00001", task_id="000", token="t", worker="w-1", expires_at=0.0, document=None)  # type: ignore[arg-type]
        assert client.complete(lease, op_id="op-1", next_lease_seconds=30) is None
        assert client.complete(lease, op_id="op-2", next_lease_seconds=30) is None
    finally:
        server.shutdown()
        server.server_close()
    assert [(b["op_id"], "next_lease_seconds" in b) for b in bodies] == [("op-1", True), ("op-1", False), ("op-2", False)]


# ==================================================================================================
# The coordinator killed, unreachable; its database restarted
# ==================================================================================================


def test_the_coordinator_sigkilled_and_restarted_mid_job(tmp_path: Path, record_property) -> None:
    db = tmp_path / "queue.db"
    queue = SqliteQueue(db)
    _, token = queue.create_token("fleet", ["agent", "owner"])
    job = new_job(queue, 30)
    lease_seconds = 10.0
    coordinator = CoordinatorProcess(f"sqlite:///{db}", "--lease-seconds", str(lease_seconds), "--heartbeat-seconds", "1")
    coordinator.start()
    clients: dict[str, CountingHttpQueue] = {}
    try:
        clients = {f"agent-{i}": CountingHttpQueue(coordinator.url, token, timeout=5, retry_seconds=30) for i in range(3)}
        fleet = Fleet(job, queue.is_finished, lease_seconds=lease_seconds, heartbeats=6, heartbeat_pause=0.15, seed=5)
        threads = fleet.start(clients, timeout=150)
        wait_for(lambda: fleet.done() >= 8, 60, "eight tasks done")
        wait_for(lambda: len(fleet.holding) >= 2, 30, "leases held")
        with fleet.lock:
            held = {worker: lease.token for worker, lease in fleet.holding.items()}
        coordinator.kill()
        killed = time.monotonic()
        time.sleep(1.0)  # several heartbeat intervals with no coordinator at all
        coordinator.start()
        restarted = time.monotonic()
        for thread in threads:
            thread.join(160)
        result = outcome(queue, job, fleet)
    finally:
        for client in clients.values():
            client.close()
        coordinator.stop()
        queue.close()
    with fleet.lock:
        beat_after = {(w, t) for when, w, t in fleet.heartbeat_log if when > restarted}
        reported_after = {(w, t) for when, w, t, _ in fleet.report_log if when > restarted}
    # A lease held at the kill is kept when the restarted coordinator took its holder's heartbeat
    # or report (one that was between its last heartbeat and its report only reports).
    kept = [w for w, t in held.items() if (w, t) in beat_after | reported_after]
    figures = {
        "coordinator_starts": coordinator.starts,
        "outage_seconds": round(restarted - killed, 2),
        "leases_held_at_the_kill": len(held),
        "of_which_heartbeated_after_the_restart": sum((w, t) in beat_after for w, t in held.items()),
        "of_which_reported_after_the_restart": sum((w, t) in reported_after for w, t in held.items()),
        "client_retries": sum(c.retries for c in clients.values()),
        "client_statuses": dict(sorted(sum((c.statuses for c in clients.values()), Counter()).items())),
        "agent_counts": dict(sorted(fleet.counts.items())),
        "reports_refused_lease_lost": len(fleet.refused),
        **public(result),
        "duplicates": result["completions_applied_twice"],
        "lost": result["tasks_lost"],
    }
    report(record_property, "coordinator SIGKILLed", figures)
    assert coordinator.starts == 2
    assert_each_task_done_once(result, fleet)
    # The leases held when it died outlived it: none was lost or reaped, and each holder was heard
    # by the restarted coordinator (a heartbeat or its report), unless its report had landed just
    # before the kill.
    assert not fleet.refused and result["attempts_preempted"] == 0 and result["leases_expired"] == 0, (held, fleet.refused)
    assert kept, held
    assert any((w, t) in beat_after for w, t in held.items())
    assert not fleet.refused, fleet.refused
    assert sum(c.retries for c in clients.values()) > 0
    log = "\n".join(coordinator.log)
    assert token.split("_", 2)[2] not in log


def test_an_outage_shorter_than_the_lease_keeps_it_and_a_longer_one_loses_it(tmp_path: Path, record_property) -> None:
    from cio_worker.queue.http import HttpQueue

    queue = SqliteQueue(tmp_path / "queue.db")
    _, token = queue.create_token("fleet", ["agent", "owner"])
    # The lease must outlast the outage plus one of the client's backoff waits (at most 5 s, and it
    # may begin just before the coordinator is back): 8 s, for a 1.5 s outage (three heartbeats).
    lease_seconds, heartbeat_seconds = 8.0, 0.5
    config = CoordinatorConfig(lease_seconds=lease_seconds, heartbeat_seconds=heartbeat_seconds, watch_seconds=0.2)
    figures: dict[str, Any] = {"lease_seconds": lease_seconds, "heartbeat_seconds": heartbeat_seconds}
    with serving(queue, config) as url:
        proxy = CoordinatorProxy(url)
        holder = CountingHttpQueue(proxy.url, token, timeout=2, retry_seconds=60)
        other = HttpQueue(url, token, retry_seconds=5)  # another agent, which still reaches the coordinator
        try:
            for case, outage in (("short", 1.5), ("long", lease_seconds + 2.5)):
                job = new_job(queue, 1)
                lease = holder.claim("w-holder", lease_seconds)
                assert lease is not None and lease.job_id == job
                beats: list[tuple[float, str]] = []
                stop = threading.Event()

                def heartbeat() -> None:
                    while not stop.is_set():
                        try:
                            holder.heartbeat(lease, lease_seconds)
                            beats.append((time.monotonic(), "ok"))
                        except LeaseLost:
                            beats.append((time.monotonic(), "lease_lost"))
                            return
                        except QueueError as exc:
                            beats.append((time.monotonic(), exc.code))
                        except Exception as exc:  # noqa: BLE001  (shown by the assertion below)
                            beats.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
                            return
                        stop.wait(heartbeat_seconds)

                beating = threading.Thread(target=heartbeat, daemon=True)
                beating.start()
                wait_for(lambda: len(beats) >= 1, 10, "a first heartbeat")
                retries_before, resets_before = holder.retries, proxy.injected["down"]
                proxy.down = True
                went_down = time.monotonic()
                others_claims = []
                while time.monotonic() - went_down < outage:
                    others_claims.append(other.claim("w-other", 120))  # what a second agent gets meanwhile
                    if others_claims[-1] is not None:
                        break
                    time.sleep(0.1)
                while time.monotonic() - went_down < outage:
                    time.sleep(0.05)
                proxy.down = False
                came_back = time.monotonic()
                if case == "short":
                    wait_for(lambda: any(t > came_back and s == "ok" for t, s in beats), 30, "a heartbeat after the outage",
                             detail=lambda: ([(round(t - came_back, 2), s) for t, s in beats], holder.retries, dict(proxy.injected),
                                      beating.is_alive()))
                    stop.set()
                    beating.join(10)
                    holder.complete(lease, a_download("img.exr"), uuid.uuid4().hex)
                    tasks, events = queue.tasks(job), queue.events(job)
                    assert [t.state for t in tasks] == ["done"] and tasks[0].attempts["preempted"] == 0
                    assert [e.kind for e in events if e.task_id] == ["claimed", "done"]
                    assert all(c is None for c in others_claims), "the task was handed out while its lease held"
                    assert all(s == "ok" for _, s in beats), beats
                else:
                    # The lease was reaped during the outage and the task handed to the other agent.
                    new = next(c for c in others_claims if c is not None)
                    assert (new.job_id, new.task_id) == (lease.job_id, lease.task_id) and new.token != lease.token
                    wait_for(lambda: any(s == "lease_lost" for _, s in beats), 30, "the holder's heartbeat refused")
                    stop.set()
                    beating.join(10)
                    late = {}
                    for kind, report_late in (
                        ("complete", lambda: holder.complete(lease, a_download("late.exr"), uuid.uuid4().hex)),
                        ("fail", lambda: holder.fail(lease, "late", uuid.uuid4().hex)),
                        ("release", lambda: holder.release(lease, "preempted", "1", None, "late", uuid.uuid4().hex)),
                        ("heartbeat", lambda: holder.heartbeat(lease, lease_seconds)),
                    ):
                        with pytest.raises(LeaseLost):
                            report_late()
                        late[kind] = "409 LeaseLost"
                    other.complete(new, a_download("img.exr"), uuid.uuid4().hex)
                    tasks, events = queue.tasks(job), queue.events(job)
                    assert [t.state for t in tasks] == ["done"] and tasks[0].attempts["preempted"] == 1
                    assert [(e.kind, e.worker) for e in events if e.task_id] == [
                        ("claimed", "w-holder"), ("lease_expired", "w-holder"), ("claimed", "w-other"), ("done", "w-other")]
                    assert [d.files[0].relative_path for d in queue.downloads(job, None)] == ["img.exr"]
                    figures["late_reports_of_the_old_holder"] = late
                figures[f"{case}_outage"] = {
                    "outage_seconds": round(came_back - went_down, 2),
                    "requests_refused_by_the_outage": proxy.injected["down"] - resets_before,
                    "holder_retries": holder.retries - retries_before,
                    "heartbeats": dict(Counter(s for _, s in beats)),
                    "claims_by_another_agent_during_it": len(others_claims),
                    "preempted": queue.tasks(job)[0].attempts["preempted"],
                    "done_events": sum(e.kind == "done" for e in queue.events(job)),
                }
        finally:
            proxy.stop()
            holder.close()
            other.close()
    queue.close()
    report(record_property, "outages", figures)
    assert figures["short_outage"]["requests_refused_by_the_outage"] > 0
    assert figures["short_outage"]["holder_retries"] > 0


def test_postgresql_restarted_mid_job(pg_server: Any, pg_url: str, record_property) -> None:
    from cio_worker.queue.postgres import PostgresQueue

    queue = PostgresQueue(pg_url, max_connections=8)
    _, token = queue.create_token("fleet", ["agent", "owner"])
    job = new_job(queue, 30)
    clients: dict[str, CountingHttpQueue] = {}
    config = CoordinatorConfig(lease_seconds=20, heartbeat_seconds=2, watch_seconds=0.5, db_threads=8)
    try:
        with serving(queue, config) as url:
            clients = {f"agent-{i}": CountingHttpQueue(url, token, timeout=15, retry_seconds=60) for i in range(4)}

            def finished(job_id: str) -> bool:
                try:
                    return queue.is_finished(job_id)
                except QueueError:
                    return False

            fleet = Fleet(job, finished, lease_seconds=20, heartbeats=4, heartbeat_pause=0.1, seed=3)
            threads = fleet.start(clients, timeout=200)
            wait_for(lambda: fleet.done() >= 8, 60, "eight tasks done")
            restarted = time.monotonic()
            pg_server.restart(down_seconds=1.0)
            back = time.monotonic()
            for thread in threads:
                thread.join(210)
            result = outcome(queue, job, fleet)
    finally:
        for client in clients.values():
            client.close()
        queue.close()
    statuses = sum((c.statuses for c in clients.values()), Counter())
    figures = {
        "restart_seconds": round(back - restarted, 2),
        "client_retries": sum(c.retries for c in clients.values()),
        "client_statuses": dict(sorted(statuses.items())),
        "agent_counts": dict(sorted(fleet.counts.items())),
        "reports_refused_lease_lost": len(fleet.refused),
        **public(result),
        "duplicates": result["completions_applied_twice"],
        "lost": result["tasks_lost"],
    }
    report(record_property, "PostgreSQL restarted", figures)
    assert_each_task_done_once(result, fleet)
    assert result["tasks_done"] == 30
    # 503 while the database was away, retried; never a 500 (an error the coordinator did not expect).
    assert not [s for s in statuses if s >= 500 and s not in (502, 503, 504)], statuses
    assert not fleet.refused, fleet.refused
