"""node/serve.ProcessGroup's restarts: real child processes, spawned as the node spawns them,
that count themselves, signal ready and exit at once (a child that keeps dying); the restart
delays are read on an injected clock, and from the supervisor's log lines."""

from __future__ import annotations

import logging
import multiprocessing
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from node.serve import RESTART_DELAY_S, RESTART_MAX_DELAY_S, ProcessGroup
from tests.helpers import wait_for


def count_ready_exit(counter: Any, stop: Any, ready: Any, log_settings: Any, parent: int) -> None:
    with counter.get_lock():
        counter.value += 1
    ready.set()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Dying:
    group: ProcessGroup
    counter: Any  # how many children have started
    clock: Clock
    stop: threading.Event


@pytest.fixture
def dying(caplog: pytest.LogCaptureFixture) -> Iterator[Dying]:
    """A group of one child that keeps dying, started; stopped after the test."""
    caplog.set_level(logging.ERROR, logger="node.serve")
    clock, counter = Clock(), multiprocessing.get_context("spawn").Value("i", 0)
    group = ProcessGroup("test", 1, count_ready_exit, lambda _index: (counter,), clock=clock)
    group.start()
    yield Dying(group, counter, clock, threading.Event())
    group.stop()


def logged_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [float(m.group(1)) for r in caplog.records if (m := re.search(r"restarting it in (\S+) s", r.getMessage()))]


def test_a_child_that_keeps_dying_is_restarted_after_doubling_delays_up_to_the_cap(
    dying: Dying, caplog: pytest.LogCaptureFixture
) -> None:
    group, clock, stop = dying.group, dying.clock, dying.stop
    expected = [min(RESTART_DELAY_S * 2**n, RESTART_MAX_DELAY_S) for n in range(8)]
    for n, delay in enumerate(expected):
        wait_for(lambda: not group.pids(), timeout=30, what="the child to exit")
        group.restart_dead(stop)  # notes the death and when to restart
        clock.now += delay - 0.1
        group.restart_dead(stop)  # not yet due
        assert dying.counter.value == n + 1
        clock.now += 0.1
        group.restart_dead(stop)  # due: a replacement starts (and is ready)
        assert dying.counter.value == n + 2
    assert logged_delays(caplog) == expected == [1, 2, 4, 8, 16, 32, 60, 60]


def test_a_child_that_ran_long_enough_starts_the_count_again_and_no_restart_once_stopping(
    dying: Dying, caplog: pytest.LogCaptureFixture
) -> None:
    group, clock, stop = dying.group, dying.clock, dying.stop
    wait_for(lambda: not group.pids(), timeout=30, what="the child to exit")
    group.restart_dead(stop)  # a quick death: 1 s
    clock.now += 1.0
    group.restart_dead(stop)
    wait_for(lambda: not group.pids(), timeout=30, what="the replacement to exit")
    clock.now += RESTART_MAX_DELAY_S  # the replacement "ran" a minute before it died
    group.restart_dead(stop)  # so the count starts again: 1 s, not 2
    clock.now += 1.0
    stop.set()  # the node is stopping: nothing is restarted, however due
    group.restart_dead(stop)
    assert dying.counter.value == 2
    assert logged_delays(caplog) == [1, 1]
