from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import NodeProcess, free_port, toml_config
from tests.postgres import REQUIRE_ENV, PostgresServer, PostgresUnavailable, find_bindir


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[object]:
    """Make (and always stop) `enhance-node serve` subprocesses with a temp config."""
    made: list[NodeProcess] = []

    def make(**config_kwargs: object) -> NodeProcess:
        port = free_port()
        cfg = toml_config(tmp_path, port, **config_kwargs)  # type: ignore[arg-type]
        node = NodeProcess(cfg, port, tmp_path)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session (tests/postgres.py): started on first use
    in a temp directory on a free port, stopped and removed at the end. Without the Debian
    package (or psycopg) the tests that use it skip, unless ENHANCE_NODE_REQUIRE_POSTGRES is
    set (`make test` sets it after installing the package): then they fail."""
    bindir = find_bindir()
    missing = []
    if bindir is None:
        missing.append("the PostgreSQL server (Debian package postgresql: /usr/lib/postgresql/*/bin/pg_ctl)")
    if importlib.util.find_spec("psycopg") is None:
        missing.append("psycopg (the extra `postgres`: pip install -e '.[postgres]')")
    if missing:
        why = f"{' and '.join(missing)} not installed; `make test` installs both"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{why} ({REQUIRE_ENV} is set)")
        pytest.skip(why)
    assert bindir is not None
    server = PostgresServer(bindir)
    try:
        server.start()
    except PostgresUnavailable as exc:
        server.stop()
        pytest.fail(f"PostgreSQL would not start: {exc}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database on the session's server, dropped after the test."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)
