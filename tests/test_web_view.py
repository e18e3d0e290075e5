"""The coordinator's web view over plain HTTP: signing in, sessions kept as digests and ended by a
revoked token, CSRF-checked controls that change nothing when refused, escaping of what users
wrote, previews and stored logs read from the job's storage. (tests/test_web_browser.py drives
it in a real browser while a simulated job runs.)"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from cio_worker.coordinator.app import CoordinatorConfig
from cio_worker.job.hashing import md5_b64_of_bytes
from cio_worker.queue import DownloadFile, NewDownload, NewTask, SqliteQueue
from cio_worker.queue.base import AttemptFigures, preview_key
from cio_worker.sim.png import encode_png
from tests.coordinators import serving
from tests.fleet import queue_state

HOSTILE = '<script>alert("title")</script><img src=x onerror=alert(1)>'
HTML = {"Accept": "text/html,application/xhtml+xml"}
JPEG = b"\xff\xd8\xff\xe0" + b"preview" * 20 + b"\xff\xd9"


@dataclass
class Web:
    """A coordinator over a sqlite queue with one job: task 000 (a scout) running on w-1 with live
    log lines, 001 (a scout) done with a download, a preview and an uploaded log, the rest held;
    an owner, an agent-only and a second owner token."""

    url: str
    queue: SqliteQueue
    db: Path
    storage: Path
    job: str
    owner: str
    agent: str
    other_owner: str
    http: requests.Session = field(default_factory=requests.Session)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.http.get(self.url + path, allow_redirects=False, timeout=30, **kw)

    def post(self, path: str, data: dict | None = None, **kw: Any) -> requests.Response:
        return self.http.post(self.url + path, data=data, allow_redirects=False, timeout=30, **kw)

    def sign_in(self, token: str | None = None, http: requests.Session | None = None) -> requests.Response:
        http = http or self.http
        form = http.get(self.url + "/sign-in", headers=HTML, timeout=30)
        assert form.status_code == 200
        return http.post(self.url + "/sign-in", data={"csrf": csrf_of(form.text), "token": token or self.owner,
                                                      "next": "/"}, allow_redirects=False, timeout=30)

    def csrf(self) -> str:
        page = self.get("/", headers=HTML)
        assert page.status_code == 200, page.status_code
        return csrf_of(page.text)

    def state(self) -> dict[str, Any]:
        return queue_state(self.queue, self.db)

    def sessions(self) -> list[tuple]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute("SELECT digest, token_id FROM web_sessions").fetchall()


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9A-Za-z_-]+)"', html)
    assert found, html[:500]
    return found.group(1)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    db, storage = tmp_path / "queue.db", tmp_path / "storage"
    storage.mkdir()
    queue = SqliteQueue(db)
    _, owner = queue.create_token("alice", ["owner"])
    _, agent = queue.create_token("fleet", ["agent"])
    _, other = queue.create_token("bob", ["owner", "agent"])
    job = queue.create_job(
        {"title": HOSTILE, "project": "default", "storage": f"file://{storage}", "output_path": "/proj/renders",
         "autoretry_policy": {"failed": {"max_retries": 0, "distinct_workers": 1}}},
        [NewTask("1", "cnode a", scout=True), NewTask("2", "cnode b", scout=True),
         *(NewTask(str(f), f"cnode {f}") for f in (3, 4, 5))])
    queue.register_worker("w-1", {"machine_type": "n1-standard-8", "preemptible": True, "provider": "gce"})
    running = queue.claim("w-1", 3600)
    queue.append_log(running, 0, "rendering frame 1\n<b>not bold</b> & done?\n")
    done = queue.claim("w-1", 3600)
    name = "renders/beauty.0002.png"
    log_key = f"_logs/{job}/001/1-x.log"
    (storage / log_key).parent.mkdir(parents=True)
    (storage / log_key).write_text("the stored log of task 001\n<i>escaped</i>\n")
    (storage / preview_key(job, name)).parent.mkdir(parents=True)
    (storage / preview_key(job, name)).write_bytes(JPEG)
    frame = encode_png(4, 3, [bytes(range(12))] * 3)  # the output itself, a real 4 x 3 PNG
    (storage / "hashstore").mkdir()
    (storage / "hashstore" / "x").write_bytes(frame)
    queue.complete(done, NewDownload("/proj/renders", (DownloadFile(name, md5_b64_of_bytes(frame), len(frame),
                                                                    "hashstore/x"),)),
                   uuid.uuid4().hex, AttemptFigures(wall_seconds=12.5, cpu_seconds=20.0, peak_rss_bytes=2_000_000,
                                                    instance_type="n1-standard-8", cost=0.0125, currency="USD",
                                                    log=f"file://{storage}/{log_key}"))
    with serving(queue, CoordinatorConfig(token_cache_seconds=0)) as url:
        yield Web(url, queue, db, storage, job, owner, agent, other)
    queue.close()


def pages(web: Web) -> list[str]:
    return ["/", f"/jobs/{web.job}", f"/jobs/{web.job}/tasks/000", f"/jobs/{web.job}/tasks/001", "/workers",
            f"/jobs/{web.job}/frames/renders/beauty.0002.png"]


def live(web: Web) -> list[str]:
    return ["/live/jobs", f"/live/jobs/{web.job}", f"/live/jobs/{web.job}/tasks/000",
            f"/live/jobs/{web.job}/tasks/000/log?attempt=1", "/live/workers",
            f"/jobs/{web.job}/previews/renders/beauty.0002.png", f"/jobs/{web.job}/full/renders/beauty.0002.png"]


def controls(web: Web) -> list[str]:
    return [f"/jobs/{web.job}/release", f"/jobs/{web.job}/kill", f"/jobs/{web.job}/retry", "/sign-out"]


# -- sessions --------------------------------------------------------------------------------------


def test_every_page_sends_a_person_without_a_session_to_sign_in_and_refuses_a_program(web: Web) -> None:
    for path in pages(web):
        answer = web.get(path, headers=HTML)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/sign-in?next="), path
        refused = web.get(path)  # not asking for HTML: the API's refusal
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized", path
    for path in live(web):
        answer = web.get(path, headers=HTML)
        assert answer.status_code == 401, path
        assert JPEG not in answer.content
    # A bearer token is not a session: the pages are for people signed in.
    assert web.get("/", headers={"Authorization": f"Bearer {web.owner}", **HTML}).status_code == 303


def test_signing_in_with_an_owner_token_opens_a_session_the_database_keeps_only_a_digest_of(web: Web) -> None:
    answer = web.sign_in()
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = next(c for c in answer.headers["set-cookie"].split(", cio_") if c.startswith("cio_session="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie  # plain HTTP here
    session_id = web.http.cookies["cio_session"]
    [(digest, token_id)] = web.sessions()
    assert digest == hashlib.sha256(session_id.encode()).hexdigest() and session_id not in digest
    assert token_id == web.owner.split("_")[1]
    for path in pages(web):
        page = web.get(path, headers=HTML)
        assert page.status_code == 200, path
        assert page.headers["content-type"].startswith("text/html")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for path in live(web):
        assert web.get(path).status_code == 200, path


@pytest.mark.parametrize("token,status", [("agent", 403), ("garbage", 401), ("revoked", 401)])
def test_a_token_that_is_not_an_active_owner_token_opens_no_session(web: Web, token: str, status: int) -> None:
    if token == "revoked":
        web.queue.revoke_token("bob")
    text = {"agent": web.agent, "garbage": "cio_nope", "revoked": web.other_owner}[token]
    answer = web.sign_in(text)
    assert answer.status_code == status
    assert "cio_session" not in web.http.cookies and web.sessions() == []
    assert web.get("/", headers=HTML).status_code == 303


def test_a_sign_in_form_posted_without_its_csrf_token_is_refused(web: Web) -> None:
    web.get("/sign-in", headers=HTML)  # sets the form's cookie
    for data in ({"token": web.owner}, {"token": web.owner, "csrf": "forged"}):
        assert web.post("/sign-in", data).status_code == 403
    other = requests.Session()  # another browser's form token
    stolen = csrf_of(other.get(web.url + "/sign-in", headers=HTML).text)
    assert web.post("/sign-in", {"token": web.owner, "csrf": stolen}).status_code == 403
    assert web.sessions() == []


def test_revoking_the_token_ends_its_sessions_and_signing_out_ends_one(web: Web) -> None:
    web.sign_in()
    second = requests.Session()
    assert web.sign_in(web.other_owner, second).status_code == 303
    assert web.get("/", headers=HTML).status_code == 200
    assert web.queue.revoke_token("alice") == 1
    for path in pages(web):
        assert web.get(path, headers=HTML).status_code == 303, path
    assert web.get("/live/jobs").status_code == 401
    # bob's session is untouched until bob signs out; then his cookie opens nothing.
    assert second.get(web.url + "/workers", headers=HTML, allow_redirects=False).status_code == 200
    csrf = csrf_of(second.get(web.url + "/", headers=HTML).text)
    cookie = second.cookies["cio_session"]
    assert second.post(web.url + "/sign-out", data={"csrf": csrf}, allow_redirects=False).status_code == 303
    replay = requests.get(web.url + "/", headers=HTML, cookies={"cio_session": cookie}, allow_redirects=False)
    assert replay.status_code == 303
    assert [t for _, t in web.sessions()] == [web.owner.split("_")[1]]  # only alice's (dead) row is left


def test_the_session_cookie_is_secure_over_tls(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from tests.test_coordinator_cli import _self_signed

    cert, key = _self_signed(tmp_path)
    queue = SqliteQueue(tmp_path / "queue.db")
    _, owner = queue.create_token("alice", ["owner"])
    try:
        with serving(queue, ssl_certfile=str(cert), ssl_keyfile=str(key)) as url:
            http = requests.Session()
            form = http.get(url + "/sign-in", headers=HTML, timeout=30, verify=str(cert))
            assert "Secure" in form.headers["set-cookie"]
            answer = http.post(url + "/sign-in", data={"csrf": csrf_of(form.text), "token": owner},
                               allow_redirects=False, timeout=30, verify=str(cert))
            assert answer.status_code == 303
            assert re.search(r"cio_session=[^;]+;[^,]*HttpOnly; SameSite=Strict; Max-Age=\d+; Secure",
                             answer.headers["set-cookie"])
    finally:
        queue.close()


# -- controls ---------------------------------------------------------------------------------------


def test_controls_without_a_session_or_csrf_token_are_refused_and_change_nothing(web: Web) -> None:
    before = web.state()
    for path in controls(web):
        assert web.post(path, {}).status_code == 401, path
    web.sign_in()
    csrf = web.csrf()
    before = web.state()
    other = requests.Session()
    web.sign_in(web.other_owner, other)
    others = csrf_of(other.get(web.url + "/", headers=HTML).text)
    for path in controls(web):
        assert web.post(path, {}).status_code == 403, path
        assert web.post(path, {"csrf": "0" * 64}).status_code == 403, path
        assert web.post(path, {"csrf": others}).status_code == 403, path  # another session's token
        # the right token, but not as a form (a cross-site JSON or text body)
        assert web.post(path, data=f'{{"csrf": "{csrf}"}}', headers={"Content-Type": "application/json"}).status_code == 403
        assert requests.post(web.url + path, data={"csrf": csrf}, allow_redirects=False).status_code == 401  # no cookie
    assert {k: v for k, v in web.state().items() if k != "table web_sessions"} == \
        {k: v for k, v in before.items() if k != "table web_sessions"}


def test_release_retry_and_kill_change_what_the_queue_holds(web: Web) -> None:
    web.sign_in()
    answer = web.post(f"/jobs/{web.job}/release", {"csrf": web.csrf()})
    assert answer.status_code == 303 and answer.headers["location"] == f"/jobs/{web.job}?note=released&n=3"
    assert "released 3 held tasks" in web.get(answer.headers["location"], headers=HTML).text
    assert [t.state for t in web.queue.tasks(web.job)] == ["leased", "done", "pending", "pending", "pending"]
    lease = web.queue.claim("w-1", 60)
    assert web.queue.fail(lease, "frame 3 did not render", uuid.uuid4().hex) == "failed"
    assert f'action="/jobs/{web.job}/retry"' in web.get(f"/jobs/{web.job}", headers=HTML).text
    answer = web.post(f"/jobs/{web.job}/retry", {"csrf": web.csrf(), "tasks": lease.task_id})
    assert answer.headers["location"].endswith("note=retried&n=1")
    assert web.queue.tasks(web.job)[2].state == "pending"
    assert [e.kind for e in web.queue.events(web.job, lease.task_id)][-1] == "retried"
    # retrying a task that is not failed is the queue's error, shown as such; nothing changes
    before = web.state()
    refused = web.post(f"/jobs/{web.job}/retry", {"csrf": web.csrf(), "tasks": "001"}, headers=HTML)
    assert 400 <= refused.status_code < 500 and "001" in refused.text
    assert web.state() == before
    answer = web.post(f"/jobs/{web.job}/kill", {"csrf": web.csrf()})
    assert answer.headers["location"].endswith("note=killed&n=4")
    states = {t.id: (t.state, t.cancel_requested) for t in web.queue.tasks(web.job)}
    assert states["000"] == ("leased", True) and states["002"][0] == "failed"
    assert next(j for j in web.queue.jobs() if j.id == web.job).killed


# -- what the pages show ----------------------------------------------------------------------------


def test_what_users_wrote_is_escaped_on_every_page_and_fragment(web: Web) -> None:
    web.sign_in()
    for path in pages(web)[:3] + ["/live/jobs", f"/live/jobs/{web.job}"]:
        text = web.get(path, headers=HTML).text
        assert "<script>alert" not in text and "<img src=x" not in text and "<b>not bold" not in text, path
    assert "&lt;script&gt;alert(&#34;title&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in web.get("/", headers=HTML).text
    running = web.get(f"/jobs/{web.job}/tasks/000", headers=HTML).text
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; done?" in running
    assert 'data-live="/live/jobs/' in running  # a running attempt's log is followed live
    stored = web.get(f"/jobs/{web.job}/tasks/001", headers=HTML).text
    assert "the stored log of task 001\n&lt;i&gt;escaped&lt;/i&gt;" in stored
    # The live log's JSON carries the text as text (the page's script writes it as textContent).
    chunk = web.get(f"/live/jobs/{web.job}/tasks/000/log?attempt=1&after=18").json()
    assert chunk == {"running": True, "text": "<b>not bold</b> & done?\n", "end": 42, "skipped": False}


def test_the_job_page_shows_its_grid_figures_and_frames(web: Web) -> None:
    web.sign_in()
    page = web.get(f"/jobs/{web.job}", headers=HTML).text
    cells = re.findall(r'<i class="c ([hpldf])( sc)?"></i>', page.split('id="grid"')[1])
    assert cells == [("l", " sc"), ("d", " sc"), ("h", ""), ("h", ""), ("h", "")]
    assert "0.0125 USD" in page and "frames 1/5" in page and "tasks 1/5" in page
    assert f'src="/jobs/{web.job}/previews/renders/beauty.0002.png"' in page
    data = web.get(f"/live/jobs/{web.job}").json()
    assert data["states"] == "ldhhh" and data["finished"] is False and "beauty.0002.png" in data["gallery"]
    image = web.get(f"/jobs/{web.job}/previews/renders/beauty.0002.png")
    assert image.status_code == 200 and image.content == JPEG and image.headers["content-type"] == "image/jpeg"
    assert web.get(f"/jobs/{web.job}/previews/renders/beauty.0003.png").status_code == 404
    for bad in ("../../queue.db", "renders/../../x", "%2e%2e/%2e%2e/queue.db"):
        assert 400 <= web.get(f"/jobs/{web.job}/previews/{bad}").status_code < 500
    task = web.get(f"/jobs/{web.job}/tasks/001", headers=HTML).text
    assert "n1-standard-8" in task and "12 s" in task and "2.0 MB" in task and "0.0125 USD" in task
    workers = web.get("/workers", headers=HTML).text
    assert "w-1" in workers and "n1-standard-8" in workers and ">yes<" in workers
    assert web.get("/jobs/99999", headers=HTML).status_code == 404
    assert web.get(f"/jobs/{web.job}/tasks/777", headers=HTML).status_code == 404


def test_no_web_route_is_in_the_api_document_or_under_v1(web: Web) -> None:
    paths = web.get("/openapi.json").json()["paths"]
    assert all(p.startswith("/v1/") or p in ("/healthz", "/metrics") for p in paths), sorted(paths)


# -- the sessions table in both engines ---------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        queue: Any = SqliteQueue(tmp_path / "queue.db")
    else:
        from cio_worker.queue.postgres import PostgresQueue

        queue = PostgresQueue(request.getfixturevalue("pg_url"))
    yield queue
    queue.close()


def test_web_sessions_live_until_they_expire_or_their_token_is_revoked(engine: Any) -> None:
    token, _ = engine.create_token("alice", ["owner"])
    engine.create_web_session("a" * 64, token.id, 3600)
    engine.create_web_session("b" * 64, token.id, -1)  # already expired
    assert engine.web_session("a" * 64).name == "alice"
    assert engine.web_session("b" * 64) is None and engine.web_session("c" * 64) is None
    engine.create_web_session("d" * 64, token.id, 3600)  # removes the expired one on the way
    engine.end_web_session("d" * 64)
    assert engine.web_session("d" * 64) is None
    engine.revoke_token("alice")
    assert engine.web_session("a" * 64) is None


# -- a frame at its full size ----------------------------------------------------------------------


def srgb_encode(linear: Any) -> Any:
    import numpy as np

    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, linear * 12.92, 1.055 * np.power(linear, 1 / 2.4) - 0.055) * 255


def write_exr(path: Path, pixels: Any) -> bytes:
    import OpenImageIO as oiio

    height, width, channels = pixels.shape
    out = oiio.ImageOutput.create(str(path))
    assert out.open(str(path), oiio.ImageSpec(width, height, channels, oiio.HALF)), oiio.geterror()
    assert out.write_image(pixels)
    out.close()
    return path.read_bytes()


def decoded(data: bytes, tmp_path: Path) -> Any:
    import OpenImageIO as oiio

    path = tmp_path / f"got-{uuid.uuid4().hex}.jpg"
    path.write_bytes(data)
    image = oiio.ImageInput.open(str(path))
    assert image is not None and image.format_name() == "jpeg", oiio.geterror()
    spec = image.spec()
    pixels = image.read_image(0, 0, 0, spec.nchannels, oiio.UINT8).reshape(spec.height, spec.width, spec.nchannels)
    image.close()
    return pixels


def complete_with_outputs(web: Web, files: dict[str, bytes], job: str | None = None) -> str:
    """A task of ``job`` (a new job of one task when None) done, with the outputs ``files`` stored
    in the fixture's file:// storage under keys named for their paths."""
    if job is None:
        job = web.queue.create_job({"title": "full size", "project": "default", "storage": f"file://{web.storage}",
                                    "output_path": "/proj/renders"}, [NewTask("1", "cnode x")])
    lease = web.queue.claim("w-2", 3600)
    assert lease is not None and lease.job_id == job
    recorded = []
    for relative, data in files.items():
        key = f"outputs/{job}/{relative}"
        (web.storage / key).parent.mkdir(parents=True, exist_ok=True)
        (web.storage / key).write_bytes(data)
        recorded.append(DownloadFile(relative, md5_b64_of_bytes(data), len(data), key))
    web.queue.complete(lease, NewDownload("/proj/renders", tuple(recorded)), uuid.uuid4().hex)
    return job


def test_a_frame_opens_at_full_size_made_from_the_output_itself(web: Web, tmp_path: Path) -> None:
    import numpy as np

    # A 96 x 64 half EXR, scene-linear: red ramps from 0 to 2 (clamped past 1), green 0.18, blue 0.5.
    linear = np.zeros((64, 96, 4), dtype=np.float32)
    linear[:, :, 0] = np.linspace(0.0, 2.0, 96)[None, :]
    linear[:, :, 1], linear[:, :, 2], linear[:, :, 3] = 0.18, 0.5, 1.0
    exr = write_exr(tmp_path / "f.exr", linear)
    # A 2 x 2 tiled frame of 40 x 30: tiles of 20 x 15, each a flat colour.
    tiles = {}
    for index, value in enumerate((0.1, 0.3, 0.6, 0.9), start=1):
        tile = np.full((15, 20, 3), value, dtype=np.float32)
        tiles[f"renders/t.tilex4-{index}.0001.exr"] = write_exr(tmp_path / f"t{index}.exr", tile)
    job = complete_with_outputs(web, {"renders/f.0001.exr": exr, "renders/broken.0001.exr": b"not an image",
                                      **tiles})
    web.sign_in()

    got = web.get(f"/jobs/{job}/full/renders/f.0001.exr")
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg", got.text[:300]
    pixels = decoded(got.content, tmp_path).astype(float)
    assert pixels.shape == (64, 96, 3)  # its own size, not the preview's
    wanted = srgb_encode(linear[:, :, :3].astype(np.float16).astype(np.float32))
    assert np.abs(pixels - wanted).mean() < 2.0 and np.abs(pixels - wanted).max() < 16  # JPEG's error only
    assert (pixels[:, 60:, 0] > 250).all()  # past 1.0: clamped to white, not wrapped
    assert web.get(f"/jobs/{job}/full/renders/f.0001.exr").content == got.content

    # The tiled frame: each tile at its own size in its place, in the grid's order.
    page = web.get(f"/jobs/{job}/frames/renders/t.0001.exr", headers=HTML)
    assert page.status_code == 200
    sources = re.findall(r'<img src="([^"]+)"', page.text.split('id="full"')[1])
    assert sources == [f"/jobs/{job}/full/renders/t.tilex4-{i}.0001.exr" for i in range(1, 5)]
    for index, value in enumerate((0.1, 0.3, 0.6, 0.9), start=1):
        tile = decoded(web.get(sources[index - 1]).content, tmp_path)
        assert tile.shape == (15, 20, 3) and abs(tile.mean() - float(srgb_encode(np.float16(value)))) < 2

    # What cannot be shown is refused with its reason; nothing is served without a session.
    broken = web.get(f"/jobs/{job}/full/renders/broken.0001.exr")
    assert broken.status_code == 422 and "not an image OpenImageIO reads" in broken.json()["message"]
    assert web.get(f"/jobs/{job}/full/renders/nothing.0001.exr").status_code == 404
    for bad in ("../../queue.db", "renders/../../x", "%2e%2e/%2e%2e/queue.db"):
        assert 400 <= web.get(f"/jobs/{job}/full/{bad}").status_code < 500
    assert requests.get(f"{web.url}/jobs/{job}/full/renders/f.0001.exr", timeout=30).status_code == 401


def test_a_re_rendered_output_is_shown_anew_and_a_damaged_one_is_refused(web: Web, tmp_path: Path) -> None:
    import numpy as np

    dark = write_exr(tmp_path / "dark.exr", np.full((8, 8, 3), 0.05, dtype=np.float32))
    bright = write_exr(tmp_path / "bright.exr", np.full((8, 8, 3), 0.8, dtype=np.float32))
    job = web.queue.create_job({"title": "again", "project": "default", "storage": f"file://{web.storage}",
                                "output_path": "/proj/renders"}, [NewTask("1", "cnode 1"), NewTask("2", "cnode 2")])
    web.sign_in()
    complete_with_outputs(web, {"renders/r.0001.exr": dark}, job)
    url = f"/jobs/{job}/full/renders/r.0001.exr"
    first = decoded(web.get(url).content, tmp_path).mean()
    # The same name uploaded again under the same key with other pixels (a second render of it):
    # the newest record's content is shown, not the picture made of the first.
    complete_with_outputs(web, {"renders/r.0001.exr": bright}, job)
    second = decoded(web.get(url).content, tmp_path).mean()
    assert first < 80 < second, (first, second)
    # An object changed behind its record's back is refused by the MD5 check, with the output named.
    tampered = complete_with_outputs(web, {"renders/g.0001.exr": bright})
    (web.storage / f"outputs/{tampered}/renders/g.0001.exr").write_bytes(dark)
    damaged = web.get(f"/jobs/{tampered}/full/renders/g.0001.exr")
    assert damaged.status_code == 502 and "renders/g.0001.exr" in damaged.json()["message"], damaged.text


def test_download_record_reads_for_the_view_agree_on_both_engines(engine: Any) -> None:
    job = engine.create_job({"title": "t", "project": "default", "storage": "file:///nowhere",
                             "output_path": "/proj/renders"}, [NewTask(str(f), f"cnode {f}") for f in (1, 2, 3)])
    assert engine.downloads_mark(job) == (0, 0.0) and engine.recent_downloads(job, 5) == []
    marks = []
    for frame in (1, 2, 3):
        lease = engine.claim("w-1", 3600)
        name = f"renders/b.{frame:04d}.png"
        engine.complete(lease, NewDownload("/proj/renders", (DownloadFile(name, md5_b64_of_bytes(name.encode()), 1,
                                                                           f"k/{name}"),)), uuid.uuid4().hex)
        marks.append(engine.downloads_mark(job))
    assert [count for count, _ in marks] == [1, 2, 3]  # each record changes the mark
    assert marks[0][1] <= marks[1][1] <= marks[2][1] and marks[2][1] > 0
    newest = engine.recent_downloads(job, 2)
    assert [r.files[0].relative_path for r in newest] == ["renders/b.0003.png", "renders/b.0002.png"]
    engine.mark_downloaded(newest[0].download_id)
    assert engine.downloads_mark(job) == marks[2]  # a state change adds no output
    with pytest.raises(Exception, match="99999"):
        engine.downloads_mark("99999")
