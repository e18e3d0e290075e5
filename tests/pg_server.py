"""A real PostgreSQL server on loopback for tests and benchmarks (Debian's ``postgresql`` package).

``PostgresServer`` runs ``initdb`` into a fresh directory and ``postgres`` on a free 127.0.0.1 port,
as the ``postgres`` user when we are root (PostgreSQL refuses to run as root; ``runuser`` does it),
with durability off (a test server). ``stop()`` ends the server it started, by pid. Fixtures:
``pg_server`` (one per session) and ``pg_url`` (a fresh database per test, already initialised
from a template). Tests that need it are skipped with the reason where no PostgreSQL is installed.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

TEMPLATE = "cio_template"


def find_bin_dir() -> Path | None:
    """The directory of ``initdb`` and ``postgres``: PATH first, then Debian's versioned dirs."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(os.path.realpath(found)).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "postgres").exists():
            return Path(candidate)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cio-pg-")))
    port: int = 0
    process: subprocess.Popen | None = None
    _counter: itertools.count = field(default_factory=itertools.count)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        return ["runuser", "-u", "postgres", "--", *argv]

    def start(self, timeout: float = 60.0) -> "PostgresServer":
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        os.chmod(self.root, 0o700)
        subprocess.run(
            self._as_owner([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
                            "-E", "UTF8", "--no-sync", "--locale=C"]),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout,
        )
        for _ in range(5):
            self.port = free_port()
            self._launch()
            if self._wait_ready(timeout):
                self._make_template()
                return self
            self.stop(remove=False)
        raise RuntimeError(f"PostgreSQL did not start; see {self.root / 'server.log'}")

    def _launch(self) -> None:
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                self._as_owner([
                    str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                    "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
                    "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                    "-c", "max_connections=200", "-c", "shared_buffers=128MB",
                ]),
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            )

    def _wait_ready(self, timeout: float) -> bool:
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def _make_template(self) -> None:
        from cio_worker.queue.postgres import init_schema

        self._admin(f"CREATE DATABASE {TEMPLATE}")
        init_schema(self.url(TEMPLATE))

    def create_database(self, initialised: bool = True) -> str:
        """A new database (with the current schema unless ``initialised`` is false); its URL."""
        name = f"t{os.getpid()}_{next(self._counter)}"
        self._admin(f"CREATE DATABASE {name}" + (f" TEMPLATE {TEMPLATE}" if initialised else ""))
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        try:
            self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except Exception:  # noqa: BLE001  (a test that broke its database must not break the next)
            pass

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the server (fast shutdown) and start it again on the same port and data."""
        self.stop(remove=False)
        time.sleep(down_seconds)
        self._launch()
        if not self._wait_ready(60):
            raise RuntimeError(f"PostgreSQL did not come back; see {self.root / 'server.log'}")

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, remove: bool = True) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            # SIGINT is postgres' fast shutdown; signal the postmaster itself (ours: it was started
            # in this data directory), not only runuser in front of it.
            os.kill(self._postmaster_pid() or proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


def postgres_available() -> str | None:
    """None when a server can be started here, else the reason it cannot."""
    if find_bin_dir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'cio-worker[coordinator]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "no 'postgres' user to run PostgreSQL as (it refuses to run as root)"
    return None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    server = PostgresServer(find_bin_dir()).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    url = pg_server.create_database()
    try:
        yield url
    finally:
        pg_server.drop_database(url)
