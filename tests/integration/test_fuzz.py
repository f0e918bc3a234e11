"""Issue 19, item 7: a bounded fuzzing run in `make test` (fixed seed, 300 cases): mutated data
sets and A-ASSOCIATE-RQs against a running node (tests/fuzzing.py). bench/fuzz.py runs the same
for as long as asked."""

from __future__ import annotations

import os
from pathlib import Path

from tests.fuzzing import Fuzzer, ledger_problems
from tests.helpers import NodeProcess, wait_for

KNOWN = {"0x0000", "0xA700", "0xA900", "0xB006", "0xB007", "0xC000", "0xC211"}


def test_three_hundred_mutated_cases_get_an_answer_and_leave_the_node_up_and_consistent(node_factory) -> None:  # type: ignore[no-untyped-def]
    node: NodeProcess = node_factory(extra_node="negotiation_timeout = 2").start()
    report = Fuzzer(node.port, seed=19, timeout=20).run(300)
    assert report.problems == []
    assert report.cases == 300
    assert set(report.statuses) <= KNOWN | {"no answer"}, report.statuses
    assert report.statuses["0x0000"] > 0 and report.statuses["0xC000"] > 0  # both kinds of case were made
    assert sum(report.pdu_answers.values()) == 75
    assert node.proc is not None and node.proc.poll() is None
    assert ledger_problems(node.ledger, node.storage) == []
    assert "Traceback" not in node.log_text()  # what a peer sends is answered in one line, never a traceback
    # no connection is left open: not even those whose pynetdicom thread died on garbage
    wait_for(lambda: max(sockets(pid) for pid in node.receivers()) <= 2, timeout=10, what="sockets to close")


def sockets(pid: int) -> int:
    """Open sockets of a process, the listening one included."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            continue
    return count
