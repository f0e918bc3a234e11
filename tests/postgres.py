"""A real PostgreSQL server for the tests (DESIGN 4): Debian's `postgresql` binaries, a
cluster made by initdb in a temp directory, started by pg_ctl on a free loopback port with its
unix socket in that directory, and removed at the end. Nothing outside the temp directory is
touched: the Debian package's own cluster (if any) is not used.

PostgreSQL refuses to run as root, so as root every server command runs as the unprivileged
`postgres` user (which the Debian package creates) and the temp directory is given to it; as
any other user the commands run as that user.

Speed over durability: the cluster is thrown away, so fsync and synchronous commit are off.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import free_port

REQUIRE_ENV = "ENHANCE_NODE_REQUIRE_POSTGRES"  # set by `make test`: a missing server fails, never skips
SERVER_USER = "postgres"
SUPERUSER = "postgres"  # the cluster's superuser (initdb -U), whoever runs the server


def find_bindir() -> Path | None:
    """The newest installed server's bin directory (/usr/lib/postgresql/<major>/bin), or the
    one holding pg_ctl on PATH."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")]
    if found:
        return max(found, key=lambda p: _major(p.parent.name))
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _major(name: str) -> float:
    try:
        return float(name)
    except ValueError:
        return -1.0


class PostgresUnavailable(Exception):
    """The server binaries are missing, or the server would not start (with why)."""


@dataclass
class PostgresServer:
    bindir: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="enpg-")))
    port: int = 0
    _running: bool = False

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    def start(self) -> PostgresServer:
        """initdb (trust authentication: nothing listens beyond loopback and a private socket
        directory), then pg_ctl start on a free port."""
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PostgresUnavailable(f"no user {SERVER_USER!r} to run the server as (root may not)") from None
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o700)
        initdb = ["--pgdata", str(self.datadir), "--username", SUPERUSER, "--auth", "trust"]
        self._run("initdb", *initdb, "--encoding", "UTF8", "--locale", "C", "--no-sync")
        log = self.root / "server.log"
        for _ in range(5):  # a free port may be taken between the probe and the server's bind
            self.port = free_port()
            options = [
                f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1",
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            ]
            pg_ctl = ["--pgdata", str(self.datadir), "--wait", "--log", str(log), "-o", " ".join(options)]
            done = self._run("pg_ctl", "start", *pg_ctl, check=False)
            if done.returncode == 0:
                self._running = True
                return self
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise PostgresUnavailable(f"pg_ctl start failed: {done.stdout}{done.stderr}\n{tail}")

    def stop(self) -> None:
        """Stop the server (immediate: nothing in it is kept) and remove its directory."""
        if self._running:
            self._run("pg_ctl", "stop", "--pgdata", str(self.datadir), "--mode", "immediate", "--wait", check=False)
            self._running = False
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, template: str = "template1") -> str:
        """A new database, a copy of `template` (by default empty); returns its name. Copied as
        files, which for a small database is several times faster than PostgreSQL 15's default
        (through the WAL)."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        return name

    def drop_database(self, name: str) -> None:
        """Drop it, closing any connection a test left open."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def psql(self, sql: str, database: str = "postgres") -> str:
        server = ["--host", str(self.socket_dir), "--port", str(self.port), "--username", SUPERUSER]
        options = ["--no-psqlrc", "--quiet", "--tuples-only", "--set", "ON_ERROR_STOP=1"]
        return self._run("psql", *server, *options, "--dbname", database, "--command", sql).stdout.strip()

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and done.returncode != 0:
            why = done.stderr.strip() or done.stdout.strip()
            raise PostgresUnavailable(f"{tool} failed ({done.returncode}): {why}")
        return done
