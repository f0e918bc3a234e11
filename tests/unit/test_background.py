"""Refusals are recorded off the accept loop (node/background.py): a ledger whose write lock
another process holds must not stall the SCP's accepting, and the events arrive once it is
free. The busy ledger is real: a second SQLite connection holding BEGIN IMMEDIATE."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from threading import Event

import pytest

from node import handlers
from node.background import BackgroundWriter
from node.guard import Throttle
from storage.ledger import Ledger


def _refusals(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        return [row[0] for row in con.execute("SELECT detail FROM events WHERE kind = 'association.rejected'")]


def test_a_refusal_returns_at_once_while_the_ledger_is_locked_and_is_recorded_after(
    ledger: Ledger, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.db"
    writer = BackgroundWriter("test-refusals")
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        started = time.monotonic()
        handlers.connection_refused(writer, ledger, Throttle(60.0), "10.0.0.9", "half-open", "no A-ASSOCIATE-RQ in 5 s")
        handlers.tls_refused(writer, ledger, "10.0.0.8", "TLS handshake failed: no certificate")
        assert time.monotonic() - started < 0.5  # the caller (the accept loop) was not held
        time.sleep(0.3)
        assert _refusals(db) == []  # still waiting for the lock
    finally:
        locker.execute("COMMIT")
        locker.close()
    writer.close(timeout=10.0)
    assert sorted(_refusals(db)) == ["TLS handshake failed: no certificate", "no A-ASSOCIATE-RQ in 5 s"]


def test_a_full_queue_drops_with_a_log_line_and_a_failing_write_does_not_stop_the_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release, done = Event(), []
    writer = BackgroundWriter("test-backlog", capacity=2)
    writer.submit(release.wait, "blocker")  # taken by the thread, which then waits
    time.sleep(0.1)
    assert writer.submit(lambda: done.append(1), "first") and writer.submit(lambda: done.append(2), "second")
    with caplog.at_level(logging.WARNING, logger="node.background"):
        assert not writer.submit(lambda: done.append(3), "refusal of 10.0.0.7")
    assert "ledger writes are backed up; not recorded: refusal of 10.0.0.7" in caplog.text
    release.set()
    deadline = time.monotonic() + 5.0
    while len(done) < 2 and time.monotonic() < deadline:  # the backlog drains
        time.sleep(0.01)
    writer.submit(lambda: 1 / 0, "a broken write")  # type: ignore[func-returns-value]
    writer.submit(lambda: done.append(4), "after it")
    writer.close(timeout=5.0)
    assert done == [1, 2, 4]
