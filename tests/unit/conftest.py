from __future__ import annotations

from collections.abc import Iterator

import pytest

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
