"""The stand-in servers' start-up: a free port taken by someone else before the server binds it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests import servers


class _NotFound(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the handler's name
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_server_whose_port_was_taken_starts_again_on_another(monkeypatch: pytest.MonkeyPatch) -> None:
    squatter = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)  # another test's server, answering 404
    thread = threading.Thread(target=squatter.serve_forever, daemon=True)
    thread.start()
    taken = squatter.server_address[1]
    ports = iter([taken])
    real_free_port = servers.free_port
    monkeypatch.setattr(servers, "free_port", lambda: next(ports, None) or real_free_port())
    try:
        with servers.moto_server() as url:
            assert not url.endswith(f":{taken}")
            assert requests.get(url + "/moto-api/", timeout=10).ok  # moto's own page, not the squatter's 404
    finally:
        squatter.shutdown()
        squatter.server_close()
        thread.join(10)
