"""The fleet's commands as an operator and an artist type them: `queue init`, `token`, `serve` (plain
and TLS), and the artist's commands against a real coordinator process with --token-file."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from cio_worker.sim.examples import example_job_path, example_root
from tests.pg_server import PostgresServer, free_port

CLI = [sys.executable, "-m", "cio_worker"]


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


@contextmanager
def coordinator(db_url: str, log: Path, *extra: str) -> Iterator[str]:
    """`cio-worker serve` as its own process; yields its URL; stops it (by pid) after."""
    with open(log, "ab") as out:
        process = subprocess.Popen([*CLI, "serve", "--queue", db_url, "--listen", "127.0.0.1:0", *extra],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            found = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("coordinator at ")]
            if found:
                url = found[-1].split()[2]
                break
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_queue_init_creates_then_leaves_a_postgres_schema(pg_server: PostgresServer) -> None:
    url = pg_server.create_database(initialised=False)
    try:
        status = cli("status", "--queue", url)
        assert status.returncode == 2 and "cio-worker queue init" in status.stderr
        first = cli("queue", "init", url)
        assert first.returncode == 0 and "schema created version" in first.stdout, first.stderr
        again = cli("queue", "init", url)
        assert again.returncode == 0 and "already at version" in again.stdout
        assert cli("status", "--queue", url).returncode == 0
    finally:
        pg_server.drop_database(url)


def test_an_artist_drives_a_job_through_a_coordinator_with_token_files(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'queue.db'}"
    assert cli("queue", "init", db).returncode == 0
    owner = cli("token", "create", "--queue", db, "--scope", "owner", "--name", "alice")
    agent = cli("token", "create", "--queue", db, "--scope", "agent", "--name", "fleet")
    assert owner.returncode == 0 and agent.returncode == 0
    (tmp_path / "owner.token").write_text(owner.stdout)
    (tmp_path / "agent.token").write_text(agent.stdout)
    listing = cli("token", "list", "--queue", db)
    assert "alice" in listing.stdout and owner.stdout.strip() not in listing.stdout
    store = f"file://{tmp_path / 'store'}"
    log = tmp_path / "coordinator.log"
    with coordinator(db, log) as url:
        as_owner = ["--queue", url, "--token-file", str(tmp_path / "owner.token")]
        submit = cli("submit", str(example_job_path()), "--root", str(example_root()), "--storage", store,
                     "--md5-cache", str(tmp_path / "md5.db"), *as_owner)
        assert submit.returncode == 0, submit.stderr
        job = submit.stdout.split()[1].rstrip(":")
        status = cli("status", job, *as_owner)
        assert status.returncode == 0 and "holding" in status.stdout, status.stderr
        assert cli("release", job, *as_owner).returncode == 0
        # The agent's token may not act as an owner; none at all is refused too; both say so in one line.
        wrong = cli("kill", job, "--queue", url, "--token-file", str(tmp_path / "agent.token"))
        assert wrong.returncode == 2 and "needs 'owner'" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
        bare = cli("status", "--queue", url, env={"CIO_TOKEN": ""})
        assert bare.returncode == 2 and "needs a token" in bare.stderr
        env_token = cli("workers", "--queue", url, env={"CIO_TOKEN": owner.stdout.strip()})
        assert env_token.returncode == 0 and "no worker has registered" in env_token.stdout
        killed = cli("kill", job, *as_owner)
        assert killed.returncode == 0 and "killed" in killed.stdout
    text = log.read_text()
    for token in (owner.stdout.strip(), agent.stdout.strip()):
        assert token not in text and token.split("_", 2)[2] not in text  # the whole secret (it may hold "_")


def test_an_unreachable_coordinator_is_one_line_naming_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = cli("status", "--queue", url, env={"CIO_TOKEN": "cio_0123456789ab_" + "x" * 43})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "Check that the coordinator runs" in lines[0]
    assert "x" * 43 not in done.stderr


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_serve_over_tls(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    db = f"sqlite:///{tmp_path / 'queue.db'}"
    assert cli("queue", "init", db).returncode == 0
    token = cli("token", "create", "--queue", db, "--scope", "owner", "--name", "tls").stdout.strip()
    with coordinator(db, tmp_path / "coordinator.log", "--tls-cert", str(cert), "--tls-key", str(key)) as url:
        assert url.startswith("https://")
        trusted = cli("status", "--queue", url, env={"CIO_TOKEN": token, "REQUESTS_CA_BUNDLE": str(cert)})
        assert trusted.returncode == 0, trusted.stderr
        untrusted = cli("status", "--queue", url, env={"CIO_TOKEN": token, "REQUESTS_CA_BUNDLE": ""})
        assert untrusted.returncode == 2 and "TLS failed" in untrusted.stderr
    half = cli("serve", "--queue", db, "--tls-cert", str(cert))
    assert half.returncode == 2 and "go together" in half.stderr
