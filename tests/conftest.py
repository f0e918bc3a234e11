from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import NodeProcess, free_port, toml_config


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
