"""The leased queue (storage/leases.py) against a real SQLite ledger file, on a table of its own
(`tasks`: the module knows no queue's columns but the common ones), with an injected clock and
jitter source: claims exclusive across processes, heartbeats only by the holder, a stale lease
re-queued and logged once however many sweepers race for it, backoff that doubles with jitter
within its bounds (here and through both queues), an admin's cancel and resubmit."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import random
import threading
from multiprocessing.queues import Queue as MPQueue
from multiprocessing.synchronize import Event as MPEvent
from typing import Any

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, Row, String, Table, Text, func, insert, select

from core.clock import utcnow
from node.config import RouteConfig
from storage import schema as t
from storage.db import make_engine
from storage.deliveries import DeliveryQueue
from storage.jobs import RETRY_BASE_S, RETRY_MAX_S, JobQueue
from storage.leases import JITTER, Backoff, Lease, Moved, Note
from storage.ledger import EventKind, Ledger, inserted_id
from tests.helpers import Clock
from tests.unit.test_deliveries import finished_job, send_all
from tests.unit.test_jobs import NoJitter, events, job_row, queued_jobs

WAITING, LEASED, DONE, FAILED = "waiting", "leased", "done", "failed"

META = MetaData()
TASKS = Table(
    "tasks",
    META,
    Column("id", Integer, primary_key=True),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("due_at", t.UTCDateTime),
    Column("started_at", t.UTCDateTime),
    Column("heartbeat_at", t.UTCDateTime),
    Column("finished_at", t.UTCDateTime),
    Column("holder", String(128)),
    Column("error", Text, nullable=False, default=""),
    Column("result", Text, nullable=False, default=""),
)
# the job queue's event kinds stand in for the tasks' own
LEASE = Lease(
    TASKS,
    holder=TASKS.c.holder,
    due=TASKS.c.due_at,
    waiting=WAITING,
    leased=LEASED,
    failed=FAILED,
    retry_event=EventKind.JOB_RETRY,
    failed_event=EventKind.JOB_FAILED,
    requeued_event=EventKind.JOB_REQUEUED,
    resubmitted_event=EventKind.JOB_RESUBMITTED,
)
STALE_S = 60.0


def note(moved: Moved) -> Note:
    return Note(f"task {moved.row.id} attempt {moved.row.attempts}: {moved.why}")


def why(row: Row[Any]) -> str:
    return "no heartbeat"


@pytest.fixture
def tasks(engine: Engine) -> Engine:
    """The migrated ledger (its events table) with the tasks table beside it."""
    META.create_all(engine)
    return engine


def add_tasks(engine: Engine, n: int, max_attempts: int = 3, due: dt.datetime | None = None) -> list[int]:
    with engine.begin() as conn:
        new = insert(TASKS).values(state=WAITING, max_attempts=max_attempts, due_at=due)
        return [inserted_id(conn.execute(new)) for _ in range(n)]


def task(engine: Engine, task_id: int) -> Row[Any]:
    with engine.connect() as conn:
        return conn.execute(select(TASKS).where(TASKS.c.id == task_id)).one()


def claim(engine: Engine, holder: str, now: dt.datetime) -> int | None:
    with engine.begin() as conn:
        return LEASE.claim(conn, holder, now)


def heartbeat(engine: Engine, task_id: int, holder: str, now: dt.datetime) -> bool:
    with engine.begin() as conn:
        return LEASE.heartbeat(conn, task_id, holder, now)


def fail(
    engine: Engine, task_id: int, holder: str, now: dt.datetime, backoff: Backoff, permanent: bool = False
) -> str | None:
    with engine.begin() as conn:
        row = LEASE.held(conn, task_id, holder)
        return None if row is None else LEASE.fail(conn, row, holder, now, "OSError", backoff, note, permanent)


def requeue_stale(engine: Engine, now: dt.datetime) -> list[int]:
    with engine.begin() as conn:
        return LEASE.requeue(conn, now, (LEASE.stale(now, STALE_S),), why, note)


def event_count(engine: Engine, kind: EventKind | None = None) -> int:
    query = select(func.count()).select_from(t.events)
    if kind is not None:
        query = query.where(t.events.c.kind == str(kind))
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


# -- backoff --------------------------------------------------------------------------------


class Draw:
    """A jitter source that draws the given values in turn."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_backoff_doubles_from_its_base_to_its_cap() -> None:
    backoff = Backoff(5, 600, NoJitter())
    assert [backoff.ceiling(n) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert [backoff.delay(n) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 320, 600, 600]  # no jitter drawn
    assert backoff.ceiling(0) == 5  # before a first attempt: the base
    assert backoff.ceiling(100_000) == 600  # no overflow however many attempts


def test_jitter_takes_up_to_its_share_off_the_ceiling() -> None:
    backoff = Backoff(10, 60, Draw(0.0, 0.5, 0.999999))
    assert backoff.delay(2) == 20  # draw 0: the whole wait
    assert backoff.delay(2) == 20 * (1 - JITTER / 2)
    assert 20 * (1 - JITTER) < backoff.delay(2) < 20 * (1 - JITTER) + 1e-4  # draws are below 1: never less


def test_jittered_delays_stay_within_their_bounds_and_spread() -> None:
    backoff = Backoff(10, 60, random.Random(3))
    for attempt in range(1, 8):
        ceiling = backoff.ceiling(attempt)
        draws = [backoff.delay(attempt) for _ in range(500)]
        assert all(ceiling * (1 - JITTER) < d <= ceiling for d in draws)
        assert max(draws) - min(draws) > ceiling * JITTER * 0.9  # spread over the whole band


# -- claim ----------------------------------------------------------------------------------


def test_claim_leases_the_oldest_due_row(tasks: Engine, clock: Clock) -> None:
    later = add_tasks(tasks, 1, due=clock.now + dt.timedelta(seconds=30))[0]
    first, second = add_tasks(tasks, 2)

    assert claim(tasks, "h1", clock.now) == first  # the older row is not due yet
    row = task(tasks, first)
    assert (row.state, row.holder, row.attempts) == (LEASED, "h1", 1)
    assert row.started_at == row.heartbeat_at == clock.now
    assert claim(tasks, "h2", clock.now) == second
    assert claim(tasks, "h2", clock.now) is None
    clock.advance(30)
    assert claim(tasks, "h2", clock.now) == later
    assert claim(tasks, "h3", clock.now) is None


def test_claim_sets_the_queues_own_values_and_honours_its_conditions(tasks: Engine, clock: Clock) -> None:
    first, second = add_tasks(tasks, 2)
    with tasks.begin() as conn:
        assert LEASE.claim(conn, "h1", clock.now, TASKS.c.id == second, result="claimed") == second
    with tasks.begin() as conn:
        assert LEASE.claim(conn, "h1", clock.now, TASKS.c.id == second) is None
    assert (task(tasks, first).state, task(tasks, second).result) == (WAITING, "claimed")


def _claim_all(url: str, holder: str, start: MPEvent, out: MPQueue[tuple[str, list[int]]]) -> None:
    """A claimer process: its own engine on the shared ledger file, claiming until none is left."""
    engine = make_engine(url)
    try:
        start.wait(60)
        mine = []
        while (task_id := claim(engine, holder, utcnow())) is not None:
            mine.append(task_id)
        out.put((holder, mine))
    finally:
        engine.dispose()


def test_claims_from_processes_with_their_own_engines_take_each_row_once(tasks: Engine, db_url: str) -> None:
    ids = add_tasks(tasks, 40)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    out: MPQueue[tuple[str, list[int]]] = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(db_url, f"p{k}", start, out)) for k in range(3)]
    for p in procs:
        p.start()
    try:
        start.set()
        claimed = dict(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert sorted(i for mine in claimed.values() for i in mine) == ids  # every row once, none twice
    for holder, mine in claimed.items():
        assert all((task(tasks, i).holder, task(tasks, i).attempts) == (holder, 1) for i in mine)


# -- the holder's writes ----------------------------------------------------------------------


def test_heartbeat_by_anyone_but_the_holder_changes_nothing(tasks: Engine, clock: Clock) -> None:
    [only] = add_tasks(tasks, 1)
    assert claim(tasks, "h1", clock.now) == only
    claimed = clock.now
    clock.advance(10)

    assert heartbeat(tasks, only, "h2", clock.now) is False
    assert heartbeat(tasks, only + 1, "h1", clock.now) is False  # no such row
    assert task(tasks, only).heartbeat_at == claimed
    assert heartbeat(tasks, only, "h1", clock.now) is True
    assert task(tasks, only).heartbeat_at == clock.now

    clock.advance(STALE_S + 1)
    assert requeue_stale(tasks, clock.now) == [only]
    assert heartbeat(tasks, only, "h1", clock.now) is False  # its lease is gone: no beat revives it
    row = task(tasks, only)
    assert (row.state, row.holder, row.heartbeat_at) == (WAITING, None, claimed + dt.timedelta(seconds=10))


def test_finish_and_fail_by_a_holder_that_lost_the_lease_change_and_log_nothing(tasks: Engine, clock: Clock) -> None:
    [only] = add_tasks(tasks, 1)
    assert claim(tasks, "h1", clock.now) == only
    clock.advance(STALE_S + 1)
    assert requeue_stale(tasks, clock.now) == [only]
    assert claim(tasks, "h2", clock.now) == only
    before, logged = task(tasks, only), event_count(tasks)

    with tasks.begin() as conn:  # h1 wakes up and reports
        assert not LEASE.update_held(conn, only, "h1", result="h1's")
        assert not LEASE.finish(conn, only, "h1", clock.now, DONE, EventKind.JOB_DONE, Note("done"), result="h1's")
        assert LEASE.held(conn, only, "h1") is None
    assert fail(tasks, only, "h1", clock.now, Backoff(5, 60, NoJitter())) is None

    assert task(tasks, only) == before
    assert event_count(tasks) == logged
    with tasks.begin() as conn:
        assert LEASE.finish(conn, only, "h2", clock.now, DONE, EventKind.JOB_DONE, Note("done"), result="h2's")
        assert not LEASE.finish(conn, only, "h2", clock.now, DONE, EventKind.JOB_DONE, Note("done"))  # once
    row = task(tasks, only)
    assert (row.state, row.holder, row.result, row.finished_at) == (DONE, "h2", "h2's", clock.now)
    assert events(tasks, EventKind.JOB_DONE) == ["done"]


def test_fail_retries_after_a_growing_jittered_backoff_then_fails(tasks: Engine, clock: Clock) -> None:
    [only] = add_tasks(tasks, 1, max_attempts=6)
    backoff = Backoff(10, 60, random.Random(7))
    waits = []
    for attempt in range(1, 6):
        assert claim(tasks, "h1", clock.now) == only
        assert fail(tasks, only, "h1", clock.now, backoff) == WAITING
        row = task(tasks, only)
        assert (row.state, row.holder, row.error, row.finished_at) == (WAITING, None, "OSError", None)
        wait = (row.due_at - clock.now).total_seconds()
        ceiling = min(60, 10 * 2 ** (attempt - 1))
        assert ceiling * (1 - JITTER) < wait <= ceiling
        waits.append(wait)
        assert claim(tasks, "h1", clock.now + dt.timedelta(seconds=wait * 0.999)) is None  # not before
        clock.advance(wait)
    assert len(set(waits)) == len(waits) and any(w < c for w, c in zip(waits, (10, 20, 40, 60, 60), strict=True))

    assert claim(tasks, "h1", clock.now) == only
    assert fail(tasks, only, "h1", clock.now, backoff) == FAILED  # the sixth and last attempt
    row = task(tasks, only)
    assert (row.state, row.due_at, row.finished_at, row.attempts) == (FAILED, None, clock.now, 6)
    assert len(events(tasks, EventKind.JOB_RETRY)) == 5
    assert events(tasks, EventKind.JOB_FAILED) == [f"task {only} attempt 6: OSError"]
    clock.advance(3600)
    assert claim(tasks, "h1", clock.now) is None


def test_a_permanent_failure_fails_at_once(tasks: Engine, clock: Clock) -> None:
    [only] = add_tasks(tasks, 1)
    assert claim(tasks, "h1", clock.now) == only
    assert fail(tasks, only, "h1", clock.now, Backoff(5, 60), permanent=True) == FAILED
    assert (task(tasks, only).state, task(tasks, only).due_at) == (FAILED, None)
    assert events(tasks, EventKind.JOB_RETRY) == []


# -- the stale sweep --------------------------------------------------------------------------


def test_a_stale_lease_is_requeued_and_logged_once_when_two_sweepers_race(tasks: Engine, clock: Clock) -> None:
    """On PostgreSQL (READ COMMITTED) two sweepers read the same stale row; the second one's
    UPDATE waits for the first's commit, then finds the row no longer leased. Here the
    interleaving is made explicit: B reads, A sweeps and commits, B writes."""
    stale, beating = add_tasks(tasks, 2)
    assert claim(tasks, "h1", clock.now) == stale
    assert claim(tasks, "h2", clock.now) == beating
    clock.advance(STALE_S + 1)
    assert heartbeat(tasks, beating, "h2", clock.now)
    where = (LEASE.stale(clock.now, STALE_S),)
    with tasks.begin() as conn:  # sweeper B reads
        seen = LEASE.leased_rows(conn, where)
    assert [r.id for r in seen] == [stale]

    assert requeue_stale(tasks, clock.now) == [stale]  # sweeper A moves it

    with tasks.begin() as conn:  # sweeper B writes what it read
        assert LEASE.requeue_row(conn, clock.now, seen[0], where, "no heartbeat", note) is None
    assert events(tasks, EventKind.JOB_REQUEUED) == [f"task {stale} attempt 1: no heartbeat"]
    assert event_count(tasks, EventKind.JOB_FAILED) == 0
    assert (task(tasks, stale).state, task(tasks, beating).state) == (WAITING, LEASED)

    assert claim(tasks, "h3", clock.now) == stale  # claimed again before B's write: still left alone
    with tasks.begin() as conn:
        assert LEASE.requeue_row(conn, clock.now, seen[0], where, "no heartbeat", note) is None
    row = task(tasks, stale)
    assert (row.state, row.holder, row.attempts) == (LEASED, "h3", 2)
    assert event_count(tasks, EventKind.JOB_REQUEUED) == 1


def test_a_lease_that_beat_after_the_sweepers_read_is_left_alone(tasks: Engine, clock: Clock) -> None:
    [slow] = add_tasks(tasks, 1)
    assert claim(tasks, "h1", clock.now) == slow
    clock.advance(STALE_S + 1)
    where = (LEASE.stale(clock.now, STALE_S),)
    with tasks.begin() as conn:
        [seen] = LEASE.leased_rows(conn, where)
    assert heartbeat(tasks, slow, "h1", clock.now + dt.timedelta(seconds=1))  # it was only slow
    with tasks.begin() as conn:
        assert LEASE.requeue_row(conn, clock.now, seen, where, "no heartbeat", note) is None
    assert (task(tasks, slow).state, task(tasks, slow).holder) == (LEASED, "h1")
    assert event_count(tasks) == 0


def test_concurrent_sweepers_with_their_own_engines_requeue_once(tasks: Engine, clock: Clock, db_url: str) -> None:
    ids = add_tasks(tasks, 5)
    for _ in ids:
        assert claim(tasks, "h1", clock.now) is not None
    clock.advance(STALE_S + 1)
    barrier = threading.Barrier(4)
    found: list[list[int]] = []
    errors: list[BaseException] = []

    def sweep() -> None:
        engine = make_engine(db_url)
        try:
            barrier.wait(30)
            found.append(requeue_stale(engine, clock.now))
        except BaseException as exc:  # a thread's exception would be lost
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert errors == []
    assert sorted(i for ids_ in found for i in ids_) == ids
    assert event_count(tasks, EventKind.JOB_REQUEUED) == len(ids)


def test_the_last_attempt_fails_unless_the_attempt_is_refunded(tasks: Engine, clock: Clock) -> None:
    killed, abandoned = add_tasks(tasks, 2, max_attempts=1)
    assert claim(tasks, "old-node/1", clock.now) == killed
    assert claim(tasks, "old-node/2", clock.now) == abandoned
    clock.advance(STALE_S + 1)
    with tasks.begin() as conn:
        mine = (TASKS.c.holder == "old-node/2", LEASE.stale(clock.now, 1))
        assert LEASE.requeue(conn, clock.now, mine, why, note, refund=True) == [abandoned]
    assert requeue_stale(tasks, clock.now) == []  # failed, not re-queued

    row = task(tasks, killed)
    assert (row.state, row.error, row.finished_at, row.attempts) == (FAILED, "no heartbeat", clock.now, 1)
    row = task(tasks, abandoned)
    assert (row.state, row.error, row.finished_at, row.attempts) == (WAITING, "", None, 0)
    assert events(tasks, EventKind.JOB_FAILED) == [f"task {killed} attempt 1: no heartbeat"]


# -- an admin's cancel and resubmit -------------------------------------------------------------


def test_cancel_and_resubmit_move_each_row_and_log_it_once(tasks: Engine, clock: Clock) -> None:
    waiting, leased, finished = add_tasks(tasks, 3)
    assert claim(tasks, "h1", clock.now) == waiting
    assert claim(tasks, "h1", clock.now) == leased
    assert claim(tasks, "h1", clock.now) == finished
    with tasks.begin() as conn:
        assert LEASE.finish(conn, finished, "h1", clock.now, DONE, EventKind.JOB_DONE, Note("done"))
    assert fail(tasks, waiting, "h1", clock.now, Backoff(5, 60)) == WAITING
    everything = (TASKS.c.id.in_([waiting, leased, finished]),)

    with tasks.begin() as conn:
        assert LEASE.cancel(conn, clock.now, everything, "cancelled", note) == [waiting, leased]
        assert LEASE.cancel(conn, clock.now, everything, "cancelled", note) == []
    assert [task(tasks, i).state for i in (waiting, leased, finished)] == [FAILED, FAILED, DONE]
    assert task(tasks, leased).error == "cancelled"
    assert heartbeat(tasks, leased, "h1", clock.now) is False  # its holder finds it gone
    assert event_count(tasks, EventKind.JOB_FAILED) == 2

    with tasks.begin() as conn:
        assert LEASE.resubmit(conn, clock.now, everything, note) == [waiting, leased]
        assert LEASE.resubmit(conn, clock.now, everything, note) == []
    for i in (waiting, leased):
        row = task(tasks, i)
        assert (row.state, row.attempts, row.holder, row.due_at, row.finished_at) == (WAITING, 0, None, None, None)
    assert event_count(tasks, EventKind.JOB_RESUBMITTED) == 2


# -- both queues: backoff with jitter ------------------------------------------------------------


def test_job_retries_wait_a_doubling_backoff_with_jitter(ledger: Ledger, engine: Engine, clock: Clock) -> None:
    queue = JobQueue(engine, now=clock, rng=random.Random(11))
    [only] = queued_jobs(ledger, queue, clock, 1, max_attempts=12)
    waits = []
    for _ in range(11):
        assert queue.claim("w1") is not None
        assert queue.fail(only, "w1", "OSError", permanent=False) == t.JOB_QUEUED
        not_before = job_row(engine, only).not_before
        assert not_before is not None
        waits.append((not_before - clock.now).total_seconds())
        clock.advance(RETRY_MAX_S)
    ceilings = [min(RETRY_MAX_S, RETRY_BASE_S * 2**n) for n in range(11)]
    assert ceilings[:3] == [5, 10, 20] and ceilings[-1] == 600
    assert all(c * (1 - JITTER) < w <= c for w, c in zip(waits, ceilings, strict=True))
    assert len(set(waits)) == len(waits)  # jittered: two jobs failed together come back apart


def test_delivery_retries_wait_a_doubling_backoff_with_jitter(ledger: Ledger, engine: Engine, clock: Clock) -> None:
    queue = DeliveryQueue(engine, now=clock, retry_base_s=10.0, retry_max_s=60.0, rng=random.Random(5))
    finished_job(ledger, engine, clock, RouteConfig("ct", "m", ("archive",)))  # 5 attempts
    waits = []
    for attempt in range(1, 5):
        d = queue.claim("s1")
        assert d is not None and d.attempts == attempt
        send_all(queue, d.id, "s1", 0xA700)
        assert queue.finish_attempt(d.id, "s1") == t.DELIVERY_PENDING
        with engine.connect() as conn:
            due = conn.execute(select(t.deliveries.c.next_attempt_at).where(t.deliveries.c.id == d.id)).scalar_one()
        waits.append((due - clock.now).total_seconds())
        clock.advance(60)
    assert all(c * (1 - JITTER) < w <= c for w, c in zip(waits, [10, 20, 40, 60], strict=True))
    assert len(set(waits)) == len(waits)
    retries = events(engine, EventKind.DELIVERY_RETRY)
    assert [r.rsplit("retry in ", 1)[1] for r in retries] == [f"{w:.1f} s" for w in waits]
    assert all("attempt" in r and ": 3 instances not stored; retry in" in r for r in retries)
