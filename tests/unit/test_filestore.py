"""The file store's group commit (storage.filestore.GroupSync) and what a write does when the
sync fails. The sync function is a dependency (a real syncfs in the node); here it is one that
records when it ran, so the tests can check each writer waited for a flush that began after it
asked: a real flush's timing cannot be controlled, and the question is the ordering. The
failure is injected because a disk's write-back error cannot be made on demand here."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from core.errors import OutOfResources
from storage import filestore
from storage.filestore import FileStore, GroupSync, syncfs
from tests.helpers import wait_for


class RecordedSync:
    def __init__(self, seconds: float = 0.02, failures: int = 0) -> None:
        self.seconds = seconds
        self.failures = failures
        self.runs: list[tuple[float, float]] = []  # (start, end) of each sync that succeeded
        self.lock = threading.Lock()

    def __call__(self) -> None:
        start = time.monotonic()
        time.sleep(self.seconds)
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise OSError(5, "Input/output error")
            self.runs.append((start, time.monotonic()))


def test_writers_waiting_together_share_a_sync_that_began_after_each_asked() -> None:
    sync = RecordedSync()
    group = GroupSync(sync)
    calls: list[tuple[float, float]] = []
    lock = threading.Lock()

    def writer() -> None:
        for _ in range(5):
            asked = time.monotonic()
            group.wait(group.request())
            with lock:
                calls.append((asked, time.monotonic()))

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 40
    for asked, returned in calls:  # each write was covered by a flush that started after it asked
        assert any(asked <= start and end <= returned for start, end in sync.runs)


class GatedSync:
    """A sync that starts when the syncer thread calls it and ends when the test says so."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.go = threading.Semaphore(0)
        self.fail_next = False
        self.runs = 0

    def __call__(self) -> None:
        self.started.release()
        assert self.go.acquire(timeout=10)
        self.runs += 1
        if self.fail_next:
            self.fail_next = False
            raise OSError(5, "Input/output error")

    def run_one(self, fail: bool = False) -> None:
        assert self.started.acquire(timeout=10)
        self.fail_next = fail
        self.go.release()


def test_writers_asking_while_a_sync_runs_share_the_next_one() -> None:
    """How many flushes N writers cost, made deterministic: seven ask while the first one's
    sync runs, and one more sync covers all seven."""
    sync = GatedSync()
    group = GroupSync(sync)
    first = group.request()
    assert sync.started.acquire(timeout=10)
    later = [group.request() for _ in range(7)]
    assert all(batch is later[0] for batch in later)  # one batch: one sync to come for them all
    sync.go.release()
    group.wait(first)
    sync.run_one()
    for batch in later:
        group.wait(batch)
    assert sync.runs == 2


def test_a_writer_works_while_its_sync_runs() -> None:
    sync = GatedSync()
    group = GroupSync(sync)
    ticket = group.request()
    assert sync.started.acquire(timeout=10)  # running before the writer waits (its ledger work meanwhile)
    sync.go.release()
    group.wait(ticket)
    assert sync.runs == 1


def test_a_failed_sync_fails_every_writer_it_covered_and_the_next_request_syncs_again() -> None:
    sync = GatedSync()
    group = GroupSync(sync)
    first = group.request()
    assert sync.started.acquire(timeout=10)  # the first ticket's sync is running
    second, third = group.request(), group.request()  # asked meanwhile: the next sync covers both
    sync.fail_next = True
    sync.go.release()
    with pytest.raises(OSError):
        group.wait(first)
    sync.run_one(fail=True)
    for ticket in (second, third):
        with pytest.raises(OSError):
            group.wait(ticket)
    fourth = group.request()
    sync.run_one()
    group.wait(fourth)
    assert sync.runs == 3


def test_a_write_whose_sync_fails_is_refused_and_its_whole_file_left_for_a_re_send(tmp_path: Path) -> None:
    """The file is whole under its name (renamed after its last byte) but perhaps not durable:
    the write is refused (0xA700 for the SCP), the file stays (another association's identical
    re-send may be relying on it), and a re-send makes it durable with make_durable."""
    store = FileStore(tmp_path / "store", 0, sync=RecordedSync(seconds=0.0, failures=1))
    rel = "objects/1/2/a_000000000000.dcm"
    with pytest.raises(OutOfResources, match="cannot make the instance file durable"):
        store.write(rel, b"bytes")
    assert (store.root / rel).read_bytes() == b"bytes"
    with store.existing(rel) as durable:
        durable.wait()
    with pytest.raises(OutOfResources):
        store.existing("objects/1/2/missing_000000000000.dcm")


def test_syncfs_flushes_the_real_file_system(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    syncfs(tmp_path)  # raises OSError when the call fails
    with pytest.raises(OSError):
        syncfs(tmp_path / "missing")


def test_the_sync_thread_ends_when_idle_and_the_next_request_starts_another(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filestore, "SYNCER_IDLE_S", 0.05)
    threads: list[threading.Thread] = []
    group = GroupSync(lambda: threads.append(threading.current_thread()))
    group.wait(group.request())
    wait_for(lambda: not threads[0].is_alive(), timeout=10)
    group.wait(group.request())
    assert len(threads) == 2 and threads[1] is not threads[0]


def test_a_failed_sync_is_reported_to_its_writer_however_many_syncs_follow() -> None:
    sync = GatedSync()
    group = GroupSync(sync)
    first = group.request()
    sync.run_one(fail=True)
    for _ in range(100):  # the first writer is slow to look (its ledger statements, say)
        later = group.request()
        sync.run_one(fail=True)
        with pytest.raises(OSError):
            group.wait(later)
    with pytest.raises(OSError, match="Input/output error"):
        group.wait(first)


def test_a_sync_thread_that_dies_fails_its_writers_and_the_next_request_starts_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(threading, "excepthook", lambda _args: None)  # the thread's end is on purpose here
    calls: list[str] = []

    def sync() -> None:
        calls.append("sync")
        if len(calls) == 1:
            raise SystemExit  # not an Exception: it ends the thread

    group = GroupSync(sync)
    with pytest.raises(OSError, match="the sync thread ended"):
        group.wait(group.request())
    group.wait(group.request())
    assert calls == ["sync", "sync"]
