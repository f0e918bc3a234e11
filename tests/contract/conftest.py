"""Every contract test runs once per ledger backend (DESIGN 6, huey's pattern): a SQLite file
in the test's temp directory, and a new database on the session's real PostgreSQL server
(tests/conftest.py, tests/postgres.py). Both are brought to the newest schema by the node's
own entry point, storage.db.migrate (alembic): the SQLite file for each test, the PostgreSQL
databases once, in a template each test's database is copied from (then migrate finds it
current)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from storage.db import make_engine, migrate
from storage.deliveries import DeliveryQueue
from storage.jobs import JobQueue
from storage.ledger import Ledger
from tests.helpers import Clock
from tests.postgres import PostgresServer

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ledger_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger database, not migrated yet."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="session")
def postgres_ledger_template(postgres_server: PostgresServer) -> str:
    """A database on the session's server migrated to the newest schema, to copy."""
    name = postgres_server.create_database()
    engine = make_engine(postgres_server.url(name))
    migrate(engine)
    engine.dispose()  # a template is copied only while nobody is connected to it
    return name


@pytest.fixture
def engine(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated ledger: a new SQLite file, or a copy of the migrated PostgreSQL template."""
    server: PostgresServer | None = None
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        server = request.getfixturevalue("postgres_server")
        database = server.create_database(template=request.getfixturevalue("postgres_ledger_template"))
        url = server.url(database)
    engine = make_engine(url)
    migrate(engine)
    yield engine
    engine.dispose()
    if server is not None:
        server.drop_database(database)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(engine: Engine, clock: Clock) -> Ledger:
    return Ledger(engine, now=clock)


@pytest.fixture
def jobs(engine: Engine, clock: Clock) -> JobQueue:
    return JobQueue(engine, now=clock)


@pytest.fixture
def deliveries(engine: Engine, clock: Clock) -> DeliveryQueue:
    return DeliveryQueue(engine, now=clock, retry_base_s=10.0, retry_max_s=60.0, rng=random.Random(0))
