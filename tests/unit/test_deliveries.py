"""The delivery queue (storage/deliveries.py, DESIGN 3.3) against a real SQLite ledger file with
an injected clock: deliveries made with the job's completion (and at routing for forwarded
originals), atomic claims, per-instance results, backoff with jitter to max_attempts, never
looping, stale and abandoned deliveries, an admin's resubmission; the C-STORE status rules."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, Row, select

from core.status import stored
from node.config import DestinationConfig, RouteConfig
from node.routing import route_complete_series
from node.sender import contexts, outcome_of
from storage import schema as t
from storage.deliveries import DeliveryQueue, Outgoing, PendingInstance
from storage.jobs import JobQueue
from storage.leases import Backoff
from storage.ledger import EventKind, Ledger
from tests.helpers import Clock
from tests.unit.test_jobs import add_instance, complete, events

PACS = DestinationConfig("pacs", "PACS", "127.0.0.1", 4242, max_attempts=3)
ARCHIVE = DestinationConfig("archive", "ARCHIVE", "127.0.0.1", 4243, max_attempts=5)
SCANNER = DestinationConfig("scanner", "CT01", "10.0.0.5", 104, max_attempts=2)
DESTINATIONS = (PACS, ARCHIVE, SCANNER)
OUTPUTS = [
    Outgoing(f"2.25.9.{k}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", f"outbox/x/{k}.dcm") for k in range(3)
]


@pytest.fixture
def queue(engine: Engine, clock: Clock) -> DeliveryQueue:
    return DeliveryQueue(engine, now=clock, retry_base_s=10.0, retry_max_s=60.0, rng=random.Random(0))


def routed_job(
    ledger: Ledger,
    jobs: JobQueue,
    clock: Clock,
    route: RouteConfig,
    series: str = "1.2.3.100",
    instances: int = 2,
) -> int:
    for k in range(instances):
        add_instance(ledger, series, f"{series}.{k}")
    complete(ledger, clock)
    [routed] = route_complete_series(jobs, [route], 3, DESTINATIONS)
    assert routed.job_id is not None
    return routed.job_id


def finished_job(ledger: Ledger, engine: Engine, clock: Clock, route: RouteConfig | None = None) -> int:
    jobs = JobQueue(engine, now=clock)
    job_id = routed_job(ledger, jobs, clock, route or RouteConfig("ct", "m", ("pacs", "archive")))
    assert jobs.claim("w1") is not None
    assert jobs.finish(job_id, "w1", "2.25.9", len(OUTPUTS), "1.0.0", "onnxruntime", {}, OUTPUTS)
    return job_id


def delivery_rows(engine: Engine) -> list[Row[Any]]:
    with engine.connect() as conn:
        return list(conn.execute(select(t.deliveries).order_by(t.deliveries.c.id)))


def instance_rows(engine: Engine, delivery_id: int) -> list[Row[Any]]:
    i = t.delivery_instances
    with engine.connect() as conn:
        return list(conn.execute(select(i).where(i.c.delivery_id == delivery_id).order_by(i.c.id)))


def send_all(queue: DeliveryQueue, delivery_id: int, sender: str, status: int | None) -> None:
    for inst in queue.pending_instances(delivery_id):
        assert queue.record(delivery_id, sender, inst.id, outcome_of(status), status, "")


# -- status rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB006, 0xB007, 0xB123, 0x0001, 0x0107, 0x0116])
def test_success_and_the_storage_warnings_count_as_stored(status: int) -> None:
    assert stored(status)


@pytest.mark.parametrize("status", [None, 0xA700, 0xA7FF, 0xA900, 0xC000, 0xCFFF, 0x0122, 0x0211, 0xFE00])
def test_out_of_resources_mismatch_cannot_understand_and_no_answer_are_failures(status: int | None) -> None:
    assert not stored(status)
    assert outcome_of(status) == t.INSTANCE_FAILED


def test_outcomes_tell_warnings_apart() -> None:
    assert [outcome_of(s) for s in (0x0000, 0xB000)] == [t.INSTANCE_STORED, t.INSTANCE_WARNING]


def test_contexts_propose_each_syntax_and_explicit_little_endian_separately() -> None:
    jpeg = PendingInstance(1, "2.25.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.4.90", "a.dcm")
    plain = PendingInstance(2, "2.25.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1", "b.dcm")
    got = sorted((str(cx.abstract_syntax), tuple(cx.transfer_syntax)) for cx in contexts([jpeg, plain, plain]))
    assert got == [
        ("1.2.840.10008.5.1.4.1.1.2", ("1.2.840.10008.1.2.1",)),
        ("1.2.840.10008.5.1.4.1.1.2", ("1.2.840.10008.1.2.4.90",)),
        ("1.2.840.10008.5.1.4.1.1.4", ("1.2.840.10008.1.2.1",)),
    ]


def test_more_contexts_than_an_association_holds_is_an_error() -> None:
    many = [PendingInstance(k, f"2.25.{k}", f"1.2.3.{k}", "1.2.840.10008.1.2.4.90", "a") for k in range(70)]
    with pytest.raises(ValueError, match="at most 128"):
        contexts(many)


def test_backoff_doubles_with_jitter_in_its_upper_half_and_is_capped() -> None:
    backoff = Backoff(10, 60, random.Random(1))
    for attempt, full in [(1, 10), (2, 20), (3, 40), (4, 60), (9, 60)]:
        draws = [backoff.delay(attempt) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in draws)
        assert max(draws) - min(draws) > full / 4  # jittered, not constant


# -- creation -------------------------------------------------------------------------------


def test_finishing_a_job_queues_one_delivery_per_destination_with_its_instances(
    ledger: Ledger, engine: Engine, queue: DeliveryQueue, clock: Clock
) -> None:
    finished_job(ledger, engine, clock)
    rows = delivery_rows(engine)
    assert [(r.destination, r.kind, r.state, r.max_attempts, r.instance_count) for r in rows] == [
        ("pacs", "derived", "pending", 3, 3),
        ("archive", "derived", "pending", 5, 3),
    ]
    assert all(r.series_instance_uid == "2.25.9" for r in rows)
    assert [i.sop_instance_uid for i in instance_rows(engine, rows[0].id)] == [o.sop_instance_uid for o in OUTPUTS]
    assert len(events(engine, EventKind.DELIVERY_QUEUED)) == 2


def test_a_job_finished_by_a_worker_that_lost_it_queues_nothing(ledger: Ledger, engine: Engine, clock: Clock) -> None:
    jobs = JobQueue(engine, now=clock)
    job_id = routed_job(ledger, jobs, clock, RouteConfig("ct", "m", ("pacs",)))
    assert jobs.claim("w1") is not None
    assert not jobs.finish(job_id, "w2", "2.25.9", 3, "1", "ort", {}, OUTPUTS)
    assert delivery_rows(engine) == []


def test_a_route_without_destinations_queues_no_delivery(ledger: Ledger, engine: Engine, clock: Clock) -> None:
    finished_job(ledger, engine, clock, RouteConfig("ct", "m", ()))
    assert delivery_rows(engine) == []


def test_forwarded_originals_are_queued_at_routing_before_processing(
    ledger: Ledger, engine: Engine, clock: Clock
) -> None:
    jobs = JobQueue(engine, now=clock)
    routed_job(ledger, jobs, clock, RouteConfig("ct", "m", ("pacs",), forward_original=True), instances=4)
    [row] = delivery_rows(engine)
    assert (row.kind, row.series_instance_uid, row.instance_count, row.state) == ("original", "1.2.3.100", 4, "pending")
    assert {i.path for i in instance_rows(engine, row.id)} == {
        f"objects/1.2.3/1.2.3.100/1.2.3.100.{k}.dcm" for k in range(4)
    }


def test_send_back_adds_the_destination_with_the_callers_ae_title(ledger: Ledger, engine: Engine, clock: Clock) -> None:
    finished_job(ledger, engine, clock, RouteConfig("ct", "m", ("pacs",), send_back=True))  # calling AE CT01
    assert [r.destination for r in delivery_rows(engine)] == ["pacs", "scanner"]


def test_send_back_without_a_matching_destination_is_an_event(ledger: Ledger, engine: Engine, clock: Clock) -> None:
    jobs = JobQueue(engine, now=clock)
    for k in range(2):
        add_instance(ledger, "1.2.3.7", f"1.2.3.7.{k}", ae="MR02")
    complete(ledger, clock)
    route_complete_series(jobs, [RouteConfig("mr", "m", (), send_back=True)], 3, DESTINATIONS)
    assert events(engine, EventKind.DELIVERY_NO_DESTINATION) == [
        "route mr: send_back, but no destination has AE title MR02"
    ]


# -- claim, record, finish ----------------------------------------------------------------


def test_every_instance_stored_makes_the_delivery_delivered(
    ledger: Ledger, engine: Engine, queue: DeliveryQueue, clock: Clock
) -> None:
    finished_job(ledger, engine, clock)
    d = queue.claim("s1")
    assert d is not None and (d.destination, d.attempts) == ("pacs", 1)
    assert delivery_rows(engine)[0].state == "sending"
    send_all(queue, d.id, "s1", 0x0000)
    assert queue.finish_attempt(d.id, "s1") == "delivered"
    row = delivery_rows(engine)[0]
    assert (row.state, row.stored_count, row.warning_count, row.error, row.finished_at) == (
        "delivered",
        3,
        0,
        "",
        clock.now,
    )
    assert queue.pending_instances(d.id) == []
    assert len(events(engine, EventKind.DELIVERY_DELIVERED)) == 1


def test_a_failed_attempt_keeps_what_was_stored_and_retries_only_the_rest_after_backoff(
    ledger: Ledger, engine: Engine, queue: DeliveryQueue, clock: Clock
) -> None:
    finished_job(ledger, engine, clock)
    d = queue.claim("s1")
    assert d is not None
    first, second, third = queue.pending_instances(d.id)
    assert queue.record(d.id, "s1", first.id, t.INSTANCE_STORED, 0x0000, "")
    assert queue.record(d.id, "s1", second.id, t.INSTANCE_FAILED, 0xA700, "status 0xA700 disk full")
    assert queue.finish_attempt(d.id, "s1", "association ended") == "pending"
    row = delivery_rows(engine)[0]
    wait = (row.next_attempt_at - clock.now).total_seconds()
    assert 5.0 <= wait <= 10.0  # attempt 1: base 10 s, jittered into its upper half
    assert (row.stored_count, row.error, row.sender) == (1, "association ended", None)
    assert [p.id for p in queue.pending_instances(d.id)] == [second.id, third.id]
    statuses = [(i.outcome, i.status, i.attempts) for i in instance_rows(engine, d.id)]
    assert statuses == [("stored", 0, 1), ("failed", 0xA700, 1), ("pending", None, 0)]

    other = queue.claim("s1")
    assert other is not None and other.destination == "archive"  # pacs is in backoff
    clock.advance(wait)
    again = queue.claim("s2")
    assert again is not None and (again.id, again.attempts) == (d.id, 2)


def test_the_last_failed_attempt_ends_failed_and_is_never_claimed_again(
    ledger: Ledger, engine: Engine, queue: DeliveryQueue, clock: Clock
) -> None:
    finished_job(ledger, engine, clock, RouteConfig("ct", "m", ("pacs",)))
    for attempt in range(1, 4):
        d = queue.claim("s1")
        assert d is not None and d.attempts == attempt
        send_all(queue, d.id, "s1", 0xA700)
        state = queue.finish_attempt(d.id, "s1")
        assert state == ("failed" if attempt == 3 else "pending")
        clock.advance(3600)
    row = delivery_rows(engine)[0]
    assert (row.state, row.attempts, row.error, row.next_attempt_at) == ("failed", 3, "3 instances not stored", None)
    assert queue.claim("s1") is None
    assert len(events(engine, EventKind.DELIVERY_RETRY)) == 2 and len(events(engine, EventKind.DELIVERY_FAILED)) == 1


def test_a_sender_that_lost_the_delivery_records_nothing(
    ledger: Ledger, engine: Engine, queue: DeliveryQueue, clock: Clock
) -> None:
    finished_job(ledger, engine, clock, RouteConfig("ct", "m", ("pacs",)))
    d = queue.claim("s1")
    assert d is not None
    clock.advance(200)
    assert queue.requeue_stale(120) == [d.id]
    inst = queue.pending_instances(d.id)[0]
    assert not queue.record(d.id, "s1", inst.id, t.INSTANCE_STORED, 0, "")
    assert not queue.heartbeat(d.id, "s1")
    assert queue.finish_attempt(d.id, "s1") is None
    assert instance_rows(engine, d.id)[0].outcome == "pending"


def test_heartbeat_and_records_keep_a_delivery_from_going_stale(
    ledger: Ledger, engine: Engine, queue: DeliveryQueue, clock: Clock
) -> None:
    finished_job(ledger, engine, clock, RouteConfig("ct", "m", ("pacs",)))
    d = queue.claim("s1")
    assert d is not None
    clock.advance(100)
    assert queue.heartbeat(d.id, "s1")
    clock.advance(100)
    inst = queue.pending_instances(d.id)[0]
    assert queue.record(d.id, "s1", inst.id, t.INSTANCE_STORED, 0, "")
    clock.advance(100)
    assert queue.requeue_stale(120) == []
    clock.advance(30)
    assert queue.requeue_stale(120) == [d.id]
    assert events(engine, EventKind.DELIVERY_REQUEUED)


def test_a_delivery_whose_sender_dies_every_time_ends_failed(
    ledger: Ledger, engine: Engine, queue: DeliveryQueue, clock: Clock
) -> None:
    finished_job(ledger, engine, clock, RouteConfig("ct", "m", ("pacs",)))
    for _ in range(3):
        assert queue.claim("s1") is not None
        clock.advance(200)
        queue.requeue_stale(120)
    assert delivery_rows(engine)[0].state == "failed"
    assert queue.claim("s1") is None


def test_deliveries_abandoned_by_a_restarted_node_resume_without_losing_an_attempt(
    ledger: Ledger, engine: Engine, queue: DeliveryQueue, clock: Clock
) -> None:
    finished_job(ledger, engine, clock)
    mine, theirs = queue.claim("host:11112/sender-0/77/0"), queue.claim("other:11112/sender-0/5/0")
    assert mine is not None and theirs is not None
    me = "host:11112/sender-0/78"
    assert queue.requeue_abandoned("host:11112/sender-", me, quiet_s=10) == []  # it may still be alive
    clock.advance(11)
    assert queue.requeue_abandoned("host:11112/sender-", "host:11112/sender-0/77", quiet_s=10) == []  # our own
    assert queue.requeue_abandoned("host:11112/sender-", me, quiet_s=10) == [mine.id]
    rows = {r.id: r for r in delivery_rows(engine)}
    assert (rows[mine.id].state, rows[mine.id].attempts) == ("pending", 0)
    assert rows[theirs.id].state == "sending"
    again = queue.claim("host:11112/sender-0/78/0")
    assert again is not None and (again.id, again.attempts) == (mine.id, 1)


def test_a_sender_claims_only_deliveries_to_destinations_it_knows(
    ledger: Ledger, engine: Engine, queue: DeliveryQueue, clock: Clock
) -> None:
    finished_job(ledger, engine, clock)  # pacs, then archive
    d = queue.claim("s1", ["archive"])
    assert d is not None and d.destination == "archive"
    assert queue.claim("s1", ["archive", "elsewhere"]) is None
    assert queue.claim("s1", []) is None


def test_concurrent_claims_take_each_delivery_once(ledger: Ledger, engine: Engine, clock: Clock) -> None:
    for k in range(6):
        jobs = JobQueue(engine, now=clock)
        job_id = routed_job(ledger, jobs, clock, RouteConfig("ct", "m", ("pacs", "archive")), series=f"1.2.3.{200 + k}")
        assert jobs.claim("w") is not None and jobs.finish(job_id, "w", f"2.25.{k}", 3, "1", "ort", {}, OUTPUTS)
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer(n: int) -> None:
        q = DeliveryQueue(engine, now=clock)
        while (d := q.claim(f"s{n}")) is not None:
            with lock:
                claimed.append(d.id)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(claimed) == [r.id for r in delivery_rows(engine)] and len(claimed) == 12


# -- an admin's retry -----------------------------------------------------------------------


def test_resubmit_puts_failed_deliveries_back_with_fresh_attempts(
    ledger: Ledger, engine: Engine, queue: DeliveryQueue, clock: Clock
) -> None:
    job_id = finished_job(ledger, engine, clock)
    for _ in range(3):
        d = queue.claim("s1")
        assert d is not None and d.destination == "pacs"
        send_all(queue, d.id, "s1", 0xA700)
        queue.finish_attempt(d.id, "s1")
        clock.advance(3600)
    archive = queue.claim("s1")
    assert archive is not None
    send_all(queue, archive.id, "s1", 0)
    assert queue.finish_attempt(archive.id, "s1") == "delivered"

    requeued, resubmitted = JobQueue(engine, now=clock).resubmit(job_id)
    assert (requeued, resubmitted) == (False, [delivery_rows(engine)[0].id])  # the job itself was done
    row = delivery_rows(engine)[0]
    assert (row.state, row.attempts, row.next_attempt_at) == ("pending", 0, None)
    assert delivery_rows(engine)[1].state == "delivered"  # left alone
    assert JobQueue(engine, now=clock).resubmit(job_id) == (False, [])
    assert events(engine, EventKind.DELIVERY_RESUBMITTED)


def test_resubmit_queues_a_failed_job_again(ledger: Ledger, engine: Engine, clock: Clock) -> None:
    jobs = JobQueue(engine, now=clock)
    job_id = routed_job(ledger, jobs, clock, RouteConfig("ct", "m", ("pacs",)))
    assert jobs.claim("w1") is not None
    jobs.fail(job_id, "w1", "bad model", permanent=True)
    assert jobs.resubmit(job_id) == (True, [])
    job = jobs.claim("w2")
    assert job is not None and (job.id, job.attempts) == (job_id, 1)


def test_cancel_fails_a_queued_job_and_its_unfinished_deliveries_and_retry_undoes_it(
    ledger: Ledger, engine: Engine, queue: DeliveryQueue, clock: Clock
) -> None:
    jobs = JobQueue(engine, now=clock)
    job_id = routed_job(ledger, jobs, clock, RouteConfig("ct", "m", ("pacs",), forward_original=True))
    original = queue.claim("s1")  # the forwarded originals are being sent
    assert original is not None
    assert jobs.cancel(job_id) == (True, [original.id])
    with engine.connect() as conn:
        job = conn.execute(select(t.jobs).where(t.jobs.c.id == job_id)).one()
    assert (job.state, job.error) == ("failed", "cancelled by an admin")
    assert delivery_rows(engine)[0].state == "failed"
    inst = queue.pending_instances(original.id)[0]
    assert not queue.record(original.id, "s1", inst.id, t.INSTANCE_STORED, 0, "")  # the sender stops
    assert jobs.claim("w1") is None
    assert jobs.cancel(job_id) == (False, [])
    assert jobs.resubmit(job_id) == (True, [original.id])
    assert jobs.claim("w1") is not None


def test_cancel_of_a_running_job_keeps_its_result_from_being_delivered(
    ledger: Ledger, engine: Engine, clock: Clock
) -> None:
    jobs = JobQueue(engine, now=clock)
    job_id = routed_job(ledger, jobs, clock, RouteConfig("ct", "m", ("pacs",)))
    assert jobs.claim("w1") is not None
    assert jobs.cancel(job_id) == (True, [])
    assert not jobs.heartbeat(job_id, "w1")
    assert not jobs.finish(job_id, "w1", "2.25.9", 3, "1", "ort", {}, OUTPUTS)
    assert delivery_rows(engine) == []
