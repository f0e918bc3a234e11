from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from storage.db import make_engine, migrate
from storage.ledger import Ledger
from tests.helpers import Clock


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Tiny nets on a shared 2-core machine: one intra-op thread is several times faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def engine(db_url: str) -> Engine:
    """A real SQLite ledger file, migrated to the newest schema."""
    engine = make_engine(db_url)
    migrate(engine)
    return engine


@pytest.fixture
def ledger(engine: Engine, clock: Clock) -> Ledger:
    return Ledger(engine, now=clock)
