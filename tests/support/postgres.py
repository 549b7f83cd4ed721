"""A throwaway PostgreSQL server for the tests: Debian's `postgresql` binaries, a temp directory, loopback only.

`postgres_server` (session-scoped fixture, registered in tests/conftest.py) runs `initdb` into a fresh directory
owned by the `postgres` user when the tests run as root (the server refuses to run as root), starts the server
on a free 127.0.0.1 port with its socket in that directory, and stops it and removes the directory at the end.
TCP connections need a password (scram-sha-256, generated per run), so the URLs the tests use carry a real
secret that the code under test must never show. `new_database()` gives each test a database of its own.

A machine without the server binaries fails the tests that need it with a message naming the package: the
PostgreSQL store is part of what `make test` proves, so it is never skipped quietly.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

USER = "x402"
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
MISSING = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found in {where}: install Debian's `postgresql` package "
    "(`make test` does: apt-get install postgresql)"
)


class PostgresMissing(RuntimeError):
    """The server binaries are not installed."""


def find_bin_dir(candidates: Sequence[str] | None = None) -> Path:
    """The newest directory holding initdb and pg_ctl: Debian's /usr/lib/postgresql/<N>/bin, else the PATH."""
    if candidates is None:
        versioned = sorted(
            glob.glob(DEBIAN_BIN_GLOB),
            key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        )
        on_path = [str(Path(found).parent) for found in [shutil.which("initdb")] if found]
        candidates = [*reversed(versioned), *on_path]
    for directory in candidates:
        if (Path(directory) / "initdb").is_file() and (Path(directory) / "pg_ctl").is_file():
            return Path(directory)
    raise PostgresMissing(MISSING.format(where=", ".join(candidates) or f"{DEBIAN_BIN_GLOB} or the PATH"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    bin_dir: Path
    base: Path  # owned by the server's user: data/, the socket, the log
    port: int
    password: str
    run_as: str | None  # the OS user the server runs as when we are root
    _databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "server.log"

    def url(self, database: str = "postgres", *, password: str | None = None, port: int | None = None) -> str:
        secret = self.password if password is None else password
        return f"postgresql://{USER}:{secret}@127.0.0.1:{port or self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.base,
            user=self.run_as,
            group=self.run_as,
            extra_groups=[] if self.run_as else None,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
                f"{self._log_tail()}"
            )
        return proc

    def _log_tail(self) -> str:
        try:
            return "\nserver log:\n" + self.log.read_text()[-3000:]
        except OSError:
            return ""

    def initdb(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        os.chmod(pwfile, 0o600)
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            USER,
            "--auth-local=trust",  # the socket lives in our private directory
            "--auth-host=scram-sha-256",  # TCP (what the store uses) needs the password
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        pwfile.unlink()

    def start(self) -> None:
        # A throwaway server: durability of the test cluster itself is not under test (fsync off keeps
        # CREATE DATABASE fast on a shared disk); the store still asks for synchronous commits.
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def is_running(self) -> bool:
        proc = subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "status"],
            capture_output=True,
            text=True,
            check=False,
            user=self.run_as,
            group=self.run_as,
            extra_groups=[] if self.run_as else None,
            cwd=self.base,
        )
        return proc.returncode == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through the private socket (trust): for setting up, never for what is under test."""
        return self._run(
            "psql",
            "-h",
            str(self.base),
            "-p",
            str(self.port),
            "-U",
            USER,
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-qAt",
            "-c",
            sql,
        ).stdout

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; returns its URL (with the password)."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        self.psql(f'CREATE DATABASE "{name}"')
        self._databases.append(name)
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(RuntimeError):
            self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def launch() -> PostgresServer:
    bin_dir = find_bin_dir()
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresMissing(
                "running as root and there is no `postgres` user to run the server as: install Debian's "
                "`postgresql` package (it creates the user)"
            ) from None
        run_as = "postgres"
    base = Path(tempfile.mkdtemp(prefix="x402-pg-"))
    if run_as:
        entry = pwd.getpwnam(run_as)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    os.chmod(base, 0o700)
    server = PostgresServer(bin_dir, base, free_port(), secrets.token_urlsafe(18), run_as)
    try:
        server.initdb()
        for attempt in range(3):
            try:
                server.start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                server.port = free_port()  # taken between free_port() and the bind
                time.sleep(0.2)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = launch()
    except PostgresMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if server.is_running():
                server.stop("immediate")
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database on the throwaway server, dropped after the test."""
    url = postgres_server.new_database()
    yield url
    if postgres_server.is_running():
        postgres_server.drop_database(url)
