"""The job queue (storage/jobs.py, DESIGN 3.3) against a real SQLite ledger file, with an
injected clock (no sleeping): routing, claiming (also from concurrent threads and processes),
heartbeats, completion, retries with backoff and re-queueing of jobs whose worker died."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import threading
from multiprocessing.queues import Queue as MPQueue
from multiprocessing.synchronize import Event as MPEvent
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from sqlalchemy import Engine, Row, func, select

from core.header import InstanceHeader
from node.config import RouteConfig, RouteMatch
from node.routing import route_complete_series, route_for
from storage import schema as t
from storage.db import make_engine
from storage.jobs import RETRY_MAX_S, Job, JobQueue, Routed, SeriesFacts
from storage.ledger import EventKind, Ledger, Received, StoredFile
from tests.helpers import Clock

MAX_ATTEMPTS = 3
IDLE_S = 30.0
STALE_ASSOCIATION_S = 120.0


class NoJitter:
    """A jitter source that always draws 0: every retry waits its whole backoff, so a test can
    name the moment it is due (tests/unit/test_leases.py checks the jitter itself)."""

    def random(self) -> float:
        return 0.0


@pytest.fixture
def queue(engine: Engine, clock: Clock) -> JobQueue:
    return JobQueue(engine, now=clock, rng=NoJitter())


def route(name: str, modality: str = "*", calling_ae: str = "*", description: str = ".*") -> RouteConfig:
    return RouteConfig(name, f"model-{name}", ("pacs",), RouteMatch(modality, calling_ae, description))


ANY = route("any")


def add_instance(ledger: Ledger, series: str, sop: str, modality: str = "CT", desc: str = "", ae: str = "CT01") -> str:
    """Records one instance of `series` (created on first use); returns its path."""
    path = f"objects/1.2.3/{series}/{sop}.dcm"
    h = InstanceHeader(CTImageStorage, sop, "1.2.3", series, ExplicitVRLittleEndian, modality, desc, 1)
    stored = StoredFile(path, hashlib.sha256(path.encode()).hexdigest(), len(path))
    ledger.record_instance(h, Received(stored, ae, "127.0.0.1"))
    return path


def add_series(ledger: Ledger, series: str, modality: str = "CT", desc: str = "", ae: str = "CT01") -> None:
    add_instance(ledger, series, f"{series}.1", modality, desc, ae)


def complete(ledger: Ledger, clock: Clock) -> list[str]:
    clock.advance(IDLE_S + 1)
    return ledger.complete_idle_series(IDLE_S, STALE_ASSOCIATION_S)


def queued_jobs(ledger: Ledger, queue: JobQueue, clock: Clock, n: int, max_attempts: int = MAX_ATTEMPTS) -> list[int]:
    """n complete series routed to n queued jobs, oldest first."""
    for k in range(n):
        add_series(ledger, f"1.2.3.{100 + k}")
    complete(ledger, clock)
    routed = route_complete_series(queue, [ANY], max_attempts)
    ids = sorted(r.job_id for r in routed if r.job_id is not None)
    assert len(ids) == n
    return ids


def job_row(engine: Engine, job_id: int) -> Row[Any]:
    with engine.connect() as conn:
        return conn.execute(select(t.jobs).where(t.jobs.c.id == job_id)).one()


def all_jobs(engine: Engine) -> list[Row[Any]]:
    with engine.connect() as conn:
        return list(conn.execute(select(t.jobs).order_by(t.jobs.c.id)).all())


def series_row(engine: Engine, uid: str) -> Row[Any]:
    with engine.connect() as conn:
        return conn.execute(select(t.series).where(t.series.c.series_instance_uid == uid)).one()


def events(engine: Engine, kind: EventKind) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(select(t.events.c.detail).where(t.events.c.kind == str(kind)).order_by(t.events.c.id))
        return list(rows.scalars())


def event_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(t.events)).scalar_one())


# -- route_for ------------------------------------------------------------------------------


def facts(modality: str = "CT", ae: str = "CT01", desc: str = "") -> SeriesFacts:
    return SeriesFacts(modality, ae, desc)


def test_route_for_first_match_wins_in_config_order() -> None:
    ct, mr = route("ct", modality="CT"), route("mr", modality="MR")
    assert route_for([mr, ct, ANY], facts("CT")) is ct
    assert route_for([mr, ct, ANY], facts("MR")) is mr
    assert route_for([mr, ct, ANY], facts("PT")) is ANY
    assert route_for([ANY, ct], facts("CT")) is ANY  # a catch-all first shadows the rest
    first, second = route("first", modality="CT"), route("second", modality="CT")
    assert route_for([first, second], facts("CT")) is first


def test_route_for_modality_is_case_insensitive_and_star_matches_anything() -> None:
    assert route_for([route("ct", modality="ct")], facts("CT")) is not None
    assert route_for([route("ct", modality="CT")], facts("ct")) is not None
    assert route_for([route("ct", modality="CT")], facts("MR")) is None
    assert route_for([route("ct", modality="CT")], facts("CTX")) is None  # exact, not a prefix
    star = route("star", modality="*")
    for modality in ("CT", "mr", "", "*"):
        assert route_for([star], facts(modality)) is star


def test_route_for_calling_ae_is_a_glob() -> None:
    scanners = route("scanners", calling_ae="CT*")
    assert route_for([scanners], facts(ae="CT01")) is scanners
    assert route_for([scanners], facts(ae="CT")) is scanners
    assert route_for([scanners], facts(ae="MRCT01")) is None  # anchored at the start
    one = route("one", calling_ae="CT0?")
    assert route_for([one], facts(ae="CT07")) is one
    assert route_for([one], facts(ae="CT17")) is None
    assert route_for([route("exact", calling_ae="CT01")], facts(ae="CT011")) is None


def test_route_for_series_description_is_a_regex_searched_anywhere() -> None:
    lung = route("lung", description="lung")
    assert route_for([lung], facts(desc="thin LUNG kernel".lower())) is lung  # not anchored
    assert route_for([lung], facts(desc="Thin Lung kernel")) is None  # case-sensitive unless asked
    assert route_for([route("ci", description="(?i)lung")], facts(desc="Thin Lung kernel")) is not None
    anchored = route("anchored", description="^lung")
    assert route_for([anchored], facts(desc="thin lung")) is None
    assert route_for([anchored], facts(desc="lung thin")) is anchored
    thin = route("thin", description=r"\b[0-9.]+ ?mm\b")
    assert route_for([thin], facts(desc="Chest 0.625 mm")) is thin
    assert route_for([thin], facts(desc="Chest")) is None
    assert route_for([ANY], facts(desc="")) is ANY  # the default matches an empty description


def test_route_for_every_key_must_match() -> None:
    strict = route("strict", modality="CT", calling_ae="CT*", description="head")
    assert route_for([strict], facts("CT", "CT01", "head")) is strict
    assert route_for([strict], facts("MR", "CT01", "head")) is None
    assert route_for([strict], facts("CT", "MR01", "head")) is None
    assert route_for([strict], facts("CT", "CT01", "chest")) is None
    assert route_for([strict, ANY], facts("CT", "CT01", "chest")) is ANY


def test_route_for_without_a_match_is_none() -> None:
    assert route_for([], facts()) is None
    assert route_for([route("mr", modality="MR"), route("us", calling_ae="US*")], facts("CT", "CT01")) is None


# -- route_complete_series ------------------------------------------------------------------


def test_a_complete_series_gets_one_job_on_its_first_matching_route(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    add_series(ledger, "1.2.3.4", modality="CT", desc="head", ae="CT01")
    assert complete(ledger, clock) == ["1.2.3.4"]
    routes = [route("mr", modality="MR"), route("ct", modality="CT"), ANY]

    routed = route_complete_series(queue, routes, MAX_ATTEMPTS)

    jobs = all_jobs(engine)
    assert len(jobs) == 1
    job = jobs[0]
    assert routed == [Routed("1.2.3.4", job.id)]
    assert (job.route, job.model, job.state) == ("ct", "model-ct", t.JOB_QUEUED)
    assert (job.attempts, job.max_attempts, job.generation) == (0, MAX_ATTEMPTS, 0)
    assert job.series_id == series_row(engine, "1.2.3.4").id
    assert job.queued_at == clock.now
    assert (job.worker, job.not_before, job.started_at, job.finished_at) == (None, None, None, None)
    assert series_row(engine, "1.2.3.4").state == t.SERIES_ROUTED
    assert events(engine, EventKind.JOB_QUEUED) == [f"job {job.id} route ct model model-ct"]
    assert events(engine, EventKind.SERIES_UNROUTED) == []


def test_each_complete_series_gets_its_own_job(ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock) -> None:
    add_series(ledger, "1.2.3.4", modality="CT")
    add_series(ledger, "1.2.3.5", modality="MR")
    complete(ledger, clock)
    routed = route_complete_series(queue, [route("ct", modality="CT"), route("mr", modality="MR")], MAX_ATTEMPTS)
    assert sorted(r.series_instance_uid for r in routed) == ["1.2.3.4", "1.2.3.5"]
    by_series = {r.series_instance_uid: job_row(engine, r.job_id).route for r in routed if r.job_id is not None}
    assert by_series == {"1.2.3.4": "ct", "1.2.3.5": "mr"}


def test_a_series_without_a_matching_route_is_routed_with_an_event_and_no_job(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    add_series(ledger, "1.2.3.4", modality="US", ae="US01")
    complete(ledger, clock)

    routed = route_complete_series(queue, [route("ct", modality="CT")], MAX_ATTEMPTS)

    assert routed == [Routed("1.2.3.4", None)]
    assert all_jobs(engine) == []
    assert series_row(engine, "1.2.3.4").state == t.SERIES_ROUTED
    assert events(engine, EventKind.SERIES_UNROUTED) == ["no route matches"]
    with engine.connect() as conn:
        ae, uid = conn.execute(
            select(t.events.c.calling_ae, t.events.c.series_instance_uid).where(
                t.events.c.kind == str(EventKind.SERIES_UNROUTED)
            )
        ).one()
    assert (ae, uid) == ("US01", "1.2.3.4")
    assert events(engine, EventKind.JOB_QUEUED) == []


def test_routing_again_creates_nothing_new(ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock) -> None:
    add_series(ledger, "1.2.3.4", modality="CT")
    add_series(ledger, "1.2.3.5", modality="US")
    complete(ledger, clock)
    routes = [route("ct", modality="CT")]
    assert len(route_complete_series(queue, routes, MAX_ATTEMPTS)) == 2
    jobs, n_events = all_jobs(engine), event_count(engine)

    clock.advance(60)
    assert route_complete_series(queue, routes, MAX_ATTEMPTS) == []
    assert route_complete_series(queue, [ANY], MAX_ATTEMPTS) == []  # even when the routes change

    assert all_jobs(engine) == jobs
    assert event_count(engine) == n_events


def test_a_receiving_series_is_not_routed(ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock) -> None:
    add_series(ledger, "1.2.3.4")
    clock.advance(IDLE_S - 1)
    assert ledger.complete_idle_series(IDLE_S, STALE_ASSOCIATION_S) == []

    assert route_complete_series(queue, [ANY], MAX_ATTEMPTS) == []

    assert series_row(engine, "1.2.3.4").state == t.SERIES_RECEIVING
    assert all_jobs(engine) == []


def test_a_reopened_series_is_routed_again_as_a_new_generation(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    add_series(ledger, "1.2.3.4")
    complete(ledger, clock)
    [first] = route_complete_series(queue, [ANY], MAX_ATTEMPTS)
    assert first.job_id is not None
    job = queue.claim("w1")
    assert job is not None and job.id == first.job_id
    assert queue.finish(job.id, "w1", "9.9.9", 1, "1.0", "onnxruntime", {"infer": 1.0})

    add_instance(ledger, "1.2.3.4", "1.2.3.4.2")  # a late instance reopens the routed series
    series = series_row(engine, "1.2.3.4")
    assert (series.state, series.reopened_count) == (t.SERIES_RECEIVING, 1)
    assert route_complete_series(queue, [ANY], MAX_ATTEMPTS) == []  # not while it is receiving again
    assert complete(ledger, clock) == ["1.2.3.4"]

    [second] = route_complete_series(queue, [ANY], MAX_ATTEMPTS)

    assert second.job_id is not None and second.job_id != first.job_id
    jobs = all_jobs(engine)
    assert [(j.id, j.generation, j.state) for j in jobs] == [
        (first.job_id, 0, t.JOB_DONE),  # the first run's row is kept as it was
        (second.job_id, 1, t.JOB_QUEUED),
    ]
    assert jobs[0].output_series_uid == "9.9.9"
    assert jobs[1].series_id == jobs[0].series_id
    assert series_row(engine, "1.2.3.4").state == t.SERIES_ROUTED
    assert route_complete_series(queue, [ANY], MAX_ATTEMPTS) == []


# -- claim ----------------------------------------------------------------------------------


def test_claim_takes_the_oldest_queued_job(ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock) -> None:
    ids = queued_jobs(ledger, queue, clock, 3)
    clock.advance(10)

    job = queue.claim("w1")

    assert job == Job(ids[0], job_row(engine, ids[0]).series_id, "1.2.3.100", "any", "model-any", 1, MAX_ATTEMPTS)
    row = job_row(engine, ids[0])
    assert (row.state, row.worker, row.attempts) == (t.JOB_RUNNING, "w1", 1)
    assert row.started_at == row.heartbeat_at == clock.now
    assert row.error == ""
    assert [job_row(engine, i).state for i in ids[1:]] == [t.JOB_QUEUED, t.JOB_QUEUED]
    assert events(engine, EventKind.JOB_STARTED) == [f"job {ids[0]} attempt 1 on w1"]
    nxt = queue.claim("w1")
    assert nxt is not None and nxt.id == ids[1]


def test_claim_returns_none_when_nothing_is_queued(ledger: Ledger, queue: JobQueue, clock: Clock) -> None:
    assert queue.claim("w1") is None
    ids = queued_jobs(ledger, queue, clock, 1)
    job = queue.claim("w1")
    assert job is not None and job.id == ids[0]
    assert queue.claim("w2") is None  # the only job is running
    assert queue.finish(job.id, "w1", "9.9", 1, "1", "onnxruntime", {})
    assert queue.claim("w2") is None  # and now done


def test_claim_skips_jobs_whose_backoff_has_not_passed(ledger: Ledger, queue: JobQueue, clock: Clock) -> None:
    [only] = queued_jobs(ledger, queue, clock, 1)
    assert queue.claim("w1") is not None
    assert queue.fail(only, "w1", "OSError: disk", permanent=False) == t.JOB_QUEUED  # not before now + 5 s

    assert queue.claim("w1") is None
    clock.advance(4.999)
    assert queue.claim("w1") is None
    clock.advance(0.001)
    again = queue.claim("w2")
    assert again is not None and (again.id, again.attempts) == (only, 2)


def test_a_job_in_backoff_does_not_hold_up_younger_jobs(ledger: Ledger, queue: JobQueue, clock: Clock) -> None:
    older, younger = queued_jobs(ledger, queue, clock, 2)
    assert queue.claim("w1") is not None
    queue.fail(older, "w1", "OSError: disk", permanent=False)
    job = queue.claim("w1")
    assert job is not None and job.id == younger
    clock.advance(5)
    job = queue.claim("w1")
    assert job is not None and job.id == older


def test_sequential_claims_never_return_the_same_job(ledger: Ledger, queue: JobQueue, clock: Clock) -> None:
    ids = queued_jobs(ledger, queue, clock, 5)
    claimed = []
    for k in range(5):
        job = queue.claim(f"w{k % 2}")
        assert job is not None
        claimed.append(job.id)
    assert claimed == ids
    assert queue.claim("w0") is None


def test_concurrent_claims_from_threads_take_each_job_once(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    ids = queued_jobs(ledger, queue, clock, 40)
    n_threads = 8
    barrier = threading.Barrier(n_threads)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            barrier.wait(timeout=30)
            mine = []
            while (job := queue.claim(name)) is not None:
                mine.append(job.id)
            claimed[name] = mine
        except BaseException as exc:  # surfaced below: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{k}",)) for k in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert errors == []
    assert not any(th.is_alive() for th in threads)
    everything = [i for mine in claimed.values() for i in mine]
    assert sorted(everything) == ids  # every job once, none twice
    for name, mine in claimed.items():
        for job_id in mine:
            row = job_row(engine, job_id)
            assert (row.state, row.worker, row.attempts) == (t.JOB_RUNNING, name, 1)


def _claim_all(url: str, worker: str, start: MPEvent, out: MPQueue[tuple[str, list[int]]]) -> None:
    """A worker process: its own engine on the shared ledger file, claiming until nothing is left."""
    engine = make_engine(url)
    queue = JobQueue(engine)
    try:
        start.wait(60)
        mine = []
        while (job := queue.claim(worker)) is not None:
            mine.append(job.id)
        out.put((worker, mine))
    finally:
        engine.dispose()


def test_concurrent_claims_from_processes_take_each_job_once(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock, db_url: str
) -> None:
    ids = queued_jobs(ledger, queue, clock, 60)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    out: MPQueue[tuple[str, list[int]]] = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(db_url, f"p{k}", start, out)) for k in range(4)]
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
    everything = [i for mine in claimed.values() for i in mine]
    assert sorted(everything) == ids  # every job once, none twice
    for name, mine in claimed.items():
        for job_id in mine:
            row = job_row(engine, job_id)
            assert (row.state, row.worker, row.attempts) == (t.JOB_RUNNING, name, 1)


# -- heartbeat ------------------------------------------------------------------------------


def test_heartbeat_moves_heartbeat_at(ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock) -> None:
    [only] = queued_jobs(ledger, queue, clock, 1)
    assert queue.claim("w1") is not None
    started = clock.now
    clock.advance(5)
    assert queue.heartbeat(only, "w1") is True
    row = job_row(engine, only)
    assert (row.heartbeat_at, row.started_at, row.state) == (clock.now, started, t.JOB_RUNNING)


def test_heartbeat_is_refused_for_another_workers_job(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    [only] = queued_jobs(ledger, queue, clock, 1)
    assert queue.claim("w1") is not None
    beat = clock.now
    clock.advance(5)
    assert queue.heartbeat(only, "w2") is False
    assert job_row(engine, only).heartbeat_at == beat
    assert queue.heartbeat(only + 1000, "w1") is False  # no such job


def test_heartbeat_is_refused_for_a_job_no_longer_running(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    retried, finished, failed = queued_jobs(ledger, queue, clock, 3)
    for _ in range(3):
        assert queue.claim("w1") is not None
    queue.fail(retried, "w1", "OSError", permanent=False)
    queue.finish(finished, "w1", "9.9", 1, "1", "onnxruntime", {})
    queue.fail(failed, "w1", "bad data", permanent=True)
    clock.advance(5)
    for job_id in (retried, finished, failed):
        before = job_row(engine, job_id).heartbeat_at
        assert queue.heartbeat(job_id, "w1") is False
        assert job_row(engine, job_id).heartbeat_at == before


# -- finish ---------------------------------------------------------------------------------


def test_finish_records_the_output(ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock) -> None:
    [only] = queued_jobs(ledger, queue, clock, 1)
    assert queue.claim("w1") is not None
    clock.advance(12)

    assert queue.finish(only, "w1", "2.25.1234", 42, "1.3.0", "torch", {"load": 0.12345, "infer": 3.0, "write": 1})

    row = job_row(engine, only)
    assert row.state == t.JOB_DONE
    assert row.finished_at == clock.now
    assert (row.output_series_uid, row.output_count) == ("2.25.1234", 42)
    assert (row.model_version, row.backend) == ("1.3.0", "torch")
    assert json.loads(row.timings) == {"load": 0.123, "infer": 3.0, "write": 1}
    assert row.worker == "w1"
    assert events(engine, EventKind.JOB_DONE) == [f"job {only}: 42 instances"]


def test_finish_by_a_worker_that_lost_the_job_changes_nothing(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    [only] = queued_jobs(ledger, queue, clock, 1)
    assert queue.claim("w1") is not None
    clock.advance(61)
    assert queue.requeue_stale(60) == [only]

    assert queue.finish(only, "w1", "2.25.1", 1, "1", "torch", {"infer": 1.0}) is False  # re-queued meanwhile
    assert job_row(engine, only).state == t.JOB_QUEUED

    job = queue.claim("w2")
    assert job is not None and job.id == only
    before = job_row(engine, only)
    assert queue.finish(only, "w1", "2.25.1", 1, "1", "torch", {"infer": 1.0}) is False  # now another worker's
    assert job_row(engine, only) == before
    assert (before.state, before.worker, before.output_series_uid) == (t.JOB_RUNNING, "w2", None)
    assert events(engine, EventKind.JOB_DONE) == []
    assert queue.finish(only, "w2", "2.25.1", 1, "1", "torch", {"infer": 1.0}) is True
    assert queue.finish(only, "w2", "2.25.1", 1, "1", "torch", {"infer": 1.0}) is False  # once
    assert len(events(engine, EventKind.JOB_DONE)) == 1


# -- fail -----------------------------------------------------------------------------------


def test_fail_retries_with_doubling_backoff_then_fails(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    [only] = queued_jobs(ledger, queue, clock, 1, max_attempts=3)

    assert queue.claim("w1") is not None
    assert queue.fail(only, "w1", "OSError: first", permanent=False) == t.JOB_QUEUED
    row = job_row(engine, only)
    assert (row.state, row.worker, row.error, row.attempts) == (t.JOB_QUEUED, None, "OSError: first", 1)
    assert row.not_before == clock.now + dt.timedelta(seconds=5)
    assert row.finished_at is None

    clock.advance(5)
    assert queue.claim("w1") is not None
    assert queue.fail(only, "w1", "OSError: second", permanent=False) == t.JOB_QUEUED
    row = job_row(engine, only)
    assert (row.state, row.error, row.attempts) == (t.JOB_QUEUED, "OSError: second", 2)
    assert row.not_before == clock.now + dt.timedelta(seconds=10)

    clock.advance(10)
    assert queue.claim("w1") is not None
    assert queue.fail(only, "w1", "OSError: third", permanent=False) == t.JOB_FAILED
    row = job_row(engine, only)
    assert (row.state, row.error, row.attempts, row.worker) == (t.JOB_FAILED, "OSError: third", 3, None)
    assert row.finished_at == clock.now
    assert row.not_before is None

    clock.advance(3600)
    assert queue.claim("w1") is None
    assert events(engine, EventKind.JOB_RETRY) == [
        f"job {only} attempt 1: OSError: first",
        f"job {only} attempt 2: OSError: second",
    ]
    assert events(engine, EventKind.JOB_FAILED) == [f"job {only} attempt 3: OSError: third"]


def test_backoff_is_capped(ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock) -> None:
    [only] = queued_jobs(ledger, queue, clock, 1, max_attempts=20)
    delays = []
    for _ in range(10):
        clock.advance(RETRY_MAX_S)
        assert queue.claim("w1") is not None
        assert queue.fail(only, "w1", "OSError", permanent=False) == t.JOB_QUEUED
        not_before = job_row(engine, only).not_before
        assert not_before is not None
        delays.append((not_before - clock.now).total_seconds())
    assert delays == [5, 10, 20, 40, 80, 160, 320, RETRY_MAX_S, RETRY_MAX_S, RETRY_MAX_S]


def test_a_permanent_error_fails_at_once(ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock) -> None:
    [only] = queued_jobs(ledger, queue, clock, 1, max_attempts=3)
    assert queue.claim("w1") is not None

    assert queue.fail(only, "w1", "not a CT image", permanent=True) == t.JOB_FAILED

    row = job_row(engine, only)
    assert (row.state, row.attempts, row.error, row.not_before) == (t.JOB_FAILED, 1, "not a CT image", None)
    assert row.finished_at == clock.now
    assert events(engine, EventKind.JOB_FAILED) == [f"job {only} attempt 1: not a CT image"]
    assert events(engine, EventKind.JOB_RETRY) == []
    clock.advance(3600)
    assert queue.claim("w1") is None


def test_a_long_error_is_truncated(ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock) -> None:
    [only] = queued_jobs(ledger, queue, clock, 1)
    assert queue.claim("w1") is not None
    queue.fail(only, "w1", "x" * 10_000, permanent=False)
    assert job_row(engine, only).error == "x" * 2000
    [detail] = events(engine, EventKind.JOB_RETRY)
    assert detail == f"job {only} attempt 1: " + "x" * 500


def test_a_retried_job_clears_its_error_when_claimed_again(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    [only] = queued_jobs(ledger, queue, clock, 1)
    assert queue.claim("w1") is not None
    queue.fail(only, "w1", "OSError", permanent=False)
    clock.advance(5)
    assert queue.claim("w2") is not None
    row = job_row(engine, only)
    assert (row.state, row.worker, row.error, row.attempts) == (t.JOB_RUNNING, "w2", "", 2)


def test_fail_by_a_worker_that_lost_the_job_changes_nothing(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    [only] = queued_jobs(ledger, queue, clock, 1)
    assert queue.claim("w1") is not None
    clock.advance(61)
    assert queue.requeue_stale(60) == [only]
    assert queue.claim("w2") is not None
    before, n_events = job_row(engine, only), event_count(engine)

    queue.fail(only, "w1", "not a CT image", permanent=True)  # w1 wakes up late and gives up

    assert job_row(engine, only) == before  # still running on w2
    assert event_count(engine) == n_events  # and the audit does not say it failed


# -- requeue_stale --------------------------------------------------------------------------


def test_a_job_without_heartbeat_is_requeued_and_claimed_again(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    silent, beating = queued_jobs(ledger, queue, clock, 2)
    assert queue.claim("w1") is not None
    assert queue.claim("w1") is not None
    clock.advance(30)
    assert queue.heartbeat(beating, "w1")
    clock.advance(30)
    assert queue.requeue_stale(60) == []  # exactly at the cutoff: not yet stale
    clock.advance(1)

    assert queue.requeue_stale(60) == [silent]

    row = job_row(engine, silent)
    assert (row.state, row.worker, row.not_before, row.attempts) == (t.JOB_QUEUED, None, None, 1)
    assert (job_row(engine, beating).state, job_row(engine, beating).worker) == (t.JOB_RUNNING, "w1")
    assert events(engine, EventKind.JOB_REQUEUED) == [f"job {silent}: no heartbeat for 60 s (worker died) on attempt 1"]
    assert queue.requeue_stale(60) == []  # once
    assert queue.heartbeat(silent, "w1") is False  # the dead worker's beat, should it resume, is refused

    job = queue.claim("w2")
    assert job is not None and (job.id, job.attempts) == (silent, 2)
    row = job_row(engine, silent)
    assert (row.state, row.worker, row.started_at) == (t.JOB_RUNNING, "w2", clock.now)


def test_requeue_stale_leaves_queued_done_and_failed_jobs_alone(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    done, failed, waiting = queued_jobs(ledger, queue, clock, 3)
    assert queue.claim("w1") is not None
    assert queue.claim("w1") is not None
    queue.finish(done, "w1", "9.9", 1, "1", "onnxruntime", {})
    queue.fail(failed, "w1", "bad", permanent=True)
    clock.advance(3600)
    assert queue.requeue_stale(60) == []
    assert [job_row(engine, i).state for i in (done, failed, waiting)] == [t.JOB_DONE, t.JOB_FAILED, t.JOB_QUEUED]


def test_a_job_whose_worker_dies_every_time_ends_failed(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    """A job that kills its worker (out of memory, a crash in the engine) must not crash-loop
    the workers forever: after max_attempts claims it is failed, not re-queued again."""
    [only] = queued_jobs(ledger, queue, clock, 1, max_attempts=2)
    job = queue.claim("w1")
    assert job is not None and job.attempts == 1
    clock.advance(61)
    assert queue.requeue_stale(60) == [only]  # its worker died; one attempt is left
    job = queue.claim("w2")
    assert job is not None and job.attempts == 2
    clock.advance(61)
    queue.requeue_stale(60)  # its worker died again, on the last attempt

    assert job_row(engine, only).state == t.JOB_FAILED
    assert queue.claim("w3") is None


# -- instance paths -------------------------------------------------------------------------


def test_instance_paths_are_the_series_instances(ledger: Ledger, queue: JobQueue, clock: Clock) -> None:
    mine = [add_instance(ledger, "1.2.3.4", f"1.2.3.4.{k}") for k in range(3)]
    other = add_instance(ledger, "1.2.3.5", "1.2.3.5.1")
    complete(ledger, clock)
    route_complete_series(queue, [ANY], MAX_ATTEMPTS)
    first = queue.claim("w1")
    second = queue.claim("w1")
    assert first is not None and second is not None
    by_uid = {first.series_instance_uid: first.series_id, second.series_instance_uid: second.series_id}
    assert queue.instance_paths(by_uid["1.2.3.4"]) == mine
    assert queue.instance_paths(by_uid["1.2.3.5"]) == [other]
    assert queue.instance_paths(10_000) == []


def test_routing_records_strength_and_qa_policy_and_a_run_keeps_its_qa(
    ledger: Ledger, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    add_series(ledger, "1.2.3.300")
    complete(ledger, clock)
    gentle = RouteConfig("gentle", "m", (), strength="low", on_qa_fail="deliver-with-warning")
    (routed,) = route_complete_series(queue, [gentle], MAX_ATTEMPTS)
    job = queue.claim("w1")
    assert job is not None and job.id == routed.job_id
    assert (job.strength, job.on_qa_fail) == ("low", "deliver-with-warning")
    report = {"figures": {"removed_ratio": 3.1}, "failures": ["removed_ratio 3.10 x noise > 2"], "passed": False}
    assert not queue.record_qa(job.id, "w2", report, "x")  # not this worker's: nothing changes
    assert job_row(engine, job.id).qa == ""
    assert queue.record_qa(job.id, "w1", report, "delivered with a QA warning: removed_ratio 3.10 x noise > 2")
    assert json.loads(job_row(engine, job.id).qa) == report
    (warning,) = events(engine, EventKind.JOB_QA_WARNING)
    assert "removed_ratio 3.10" in warning
