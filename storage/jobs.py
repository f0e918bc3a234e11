"""The job queue in the ledger (DESIGN 3.3): recording the job routing gives each complete
series (node/routing.py decides it), claiming a job atomically, heartbeats, completion,
retries with backoff and jitter, and re-queueing jobs whose worker died. Each operation is one
short transaction.

The lease itself (the atomic claim, heartbeats, guarded state changes, backoff, the stale
sweep) is storage/leases.py, which deliveries share: `queued -> running -> done | failed`.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Row, insert, select, update

from core.clock import Clock, utcnow
from core.images import ImageFacts
from storage import schema as t
from storage.deliveries import Outgoing, Target, add_delivery, cancel_open, resubmit_failed
from storage.leases import EVENT_ERROR_CHARS, Backoff, Lease, Moved, Note, RandomSource
from storage.ledger import EventKind, inserted_id, write_event
from storage.schema import (
    DELIVER_DERIVED,
    DELIVER_ORIGINAL,
    JOB_DONE,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    SERIES_COMPLETE,
    SERIES_ROUTED,
)

RETRY_BASE_S = 5.0
RETRY_MAX_S = 600.0

LEASE = Lease(
    t.jobs,
    holder=t.jobs.c.worker,
    due=t.jobs.c.not_before,
    waiting=JOB_QUEUED,
    leased=JOB_RUNNING,
    failed=JOB_FAILED,
    retry_event=EventKind.JOB_RETRY,
    failed_event=EventKind.JOB_FAILED,
    requeued_event=EventKind.JOB_REQUEUED,
    resubmitted_event=EventKind.JOB_RESUBMITTED,
)


@dataclass(frozen=True)
class SeriesFacts:
    modality: str
    calling_ae: str
    description: str
    images: tuple[ImageFacts, ...] = ()  # every instance's header facts (none before migration 0005)


@dataclass(frozen=True)
class JobSpec:
    """A job as the ledger records it: its route's name and model, how the worker processes
    it, where its output goes and whether the originals are forwarded too (routing makes one
    from the route it chose)."""

    route: str
    model: str
    targets: tuple[Target, ...]
    forward_original: bool
    strength: str
    on_qa_fail: str
    no_destination: str = ""  # why a destination routing wanted has none: a delivery.no_destination event


@dataclass(frozen=True)
class Assignment:
    """What routing makes of a complete series: a job, or none (`skipped` says why when a rule,
    not the absence of a matching route, decided it)."""

    job: JobSpec | None
    skipped: str = ""


Assign = Callable[[SeriesFacts], Assignment]


@dataclass(frozen=True)
class Job:
    id: int
    series_id: int
    series_instance_uid: str
    route: str
    model: str
    attempts: int
    max_attempts: int
    strength: str = "high"
    on_qa_fail: str = "fail"


@dataclass(frozen=True)
class Routed:
    series_instance_uid: str
    job_id: int | None  # None: no route matched


class JobQueue:
    def __init__(self, engine: Engine, now: Clock = utcnow, rng: RandomSource | None = None) -> None:
        """`rng` draws the retries' jitter (storage/leases.py)."""
        self.engine = engine
        self.now = now
        self.backoff = Backoff(RETRY_BASE_S, RETRY_MAX_S, rng or random.Random())

    # -- routing -------------------------------------------------------------------------
    def route_complete_series(self, assign: Assign, max_attempts: int) -> list[Routed]:
        """Every complete series gets the job `assign` gives it (or an event saying why it has
        none: `series.unrouted`, or `series.skipped` with the reason, which the series row
        keeps too) and becomes `routed`. A reopened series is routed again as a new
        generation; its output UIDs are the same (node/derive.py), so PACS sees one copy.
        The job records where its output goes; a route that forwards originals gets their
        deliveries now, so they do not wait for (or depend on) the processing.

        Sweeps may run at once (the `completion` role on several hosts): each series is routed
        by exactly one of them, which alone writes its job and events; the others skip it,
        without waiting for it or failing on the jobs' unique key."""
        now = self.now()
        s = t.series
        out: list[Routed] = []
        with self.engine.begin() as conn:
            query = select(
                s.c.id,
                s.c.series_instance_uid,
                s.c.modality,
                s.c.calling_ae,
                s.c.series_description,
                s.c.reopened_count,
            ).where(s.c.state == SERIES_COMPLETE)
            if conn.dialect.name == "postgresql":  # what another sweep is routing is skipped, not waited for
                query = query.with_for_update(skip_locked=True)
            for row in conn.execute(query.order_by(s.c.id)).all():
                facts = SeriesFacts(row.modality, row.calling_ae, row.series_description, _series_facts(conn, row.id))
                assignment = assign(facts)
                # The series is this sweep's to route only if this UPDATE moves it: still complete,
                # in the generation read (not routed by another sweep, not reopened since). On
                # SQLite the transaction's write lock and on PostgreSQL the row lock make that
                # certain already; the guard keeps it so however the rows were read.
                moved = conn.execute(
                    update(s)
                    .where(s.c.id == row.id, s.c.state == SERIES_COMPLETE, s.c.reopened_count == row.reopened_count)
                    .values(state=SERIES_ROUTED, skip_reason=assignment.skipped[:1000])
                ).rowcount
                if moved != 1:
                    continue
                job_id = _record_routing(conn, row, assignment, max_attempts, now)
                out.append(Routed(row.series_instance_uid, job_id))
        return out

    # -- claiming and running ------------------------------------------------------------
    def claim(self, worker: str) -> Job | None:
        """The oldest runnable queued job, now `running` for `worker`, or None."""
        now = self.now()
        j, s = t.jobs, t.series
        with self.engine.begin() as conn:
            job_id = LEASE.claim(conn, worker, now, error="")
            if job_id is None:
                return None
            row = conn.execute(
                select(j, s.c.series_instance_uid).join(s, s.c.id == j.c.series_id).where(j.c.id == job_id)
            ).one()
            write_event(
                conn,
                now,
                EventKind.JOB_STARTED,
                series_instance_uid=row.series_instance_uid,
                detail=f"job {job_id} attempt {row.attempts} on {worker}",
            )
        return Job(
            row.id,
            row.series_id,
            row.series_instance_uid,
            row.route,
            row.model,
            row.attempts,
            row.max_attempts,
            row.strength,
            row.on_qa_fail,
        )

    def record_qa(self, job_id: int, worker: str, qa: dict[str, object], warning: str | None) -> bool:
        """Keeps the QA figures of this run of the job; a series delivered although its QA
        failed (the route's policy) leaves a `job.qa_warning` event saying why."""
        now = self.now()
        with self.engine.begin() as conn:
            mine = LEASE.update_held(conn, job_id, worker, qa=json.dumps(qa))
            if mine and warning:
                uid = conn.execute(
                    select(t.series.c.series_instance_uid)
                    .join(t.jobs, t.jobs.c.series_id == t.series.c.id)
                    .where(t.jobs.c.id == job_id)
                ).scalar_one()
                detail = f"job {job_id}: {warning}"
                write_event(conn, now, EventKind.JOB_QA_WARNING, series_instance_uid=uid, detail=detail)
            return mine

    def heartbeat(self, job_id: int, worker: str) -> bool:
        """False when the job is no longer this worker's (re-queued as stale, or cancelled)."""
        with self.engine.begin() as conn:
            return LEASE.heartbeat(conn, job_id, worker, self.now())

    def finish(
        self,
        job_id: int,
        worker: str,
        output_series_uid: str,
        count: int,
        model_version: str,
        backend: str,
        timings: dict[str, float],
        outputs: Sequence[Outgoing] = (),
    ) -> bool:
        """The job is done and, in the same transaction, its output is queued for delivery to
        every destination routing gave it: a done job always has its deliveries."""
        now = self.now()
        with self.engine.begin() as conn:
            done = LEASE.finish(
                conn,
                job_id,
                worker,
                now,
                JOB_DONE,
                EventKind.JOB_DONE,
                Note(f"job {job_id}: {count} instances", output_series_uid),
                output_series_uid=output_series_uid,
                output_count=count,
                model_version=model_version,
                backend=backend,
                timings=json.dumps({k: round(v, 3) for k, v in timings.items()}),
            )
            if done:
                destinations = conn.execute(select(t.jobs.c.destinations).where(t.jobs.c.id == job_id)).scalar_one()
                for target in _decode_targets(destinations):
                    add_delivery(conn, now, job_id, target, DELIVER_DERIVED, output_series_uid, outputs)
            return done

    def fail(self, job_id: int, worker: str, error: str, permanent: bool) -> str | None:
        """Records the error; the job is re-queued with backoff until max_attempts, or when the
        error is permanent (bad data, bad model) fails at once. Returns the new state, or None
        when the job was no longer this worker's (re-queued meanwhile): then nothing changes."""
        now = self.now()
        with self.engine.begin() as conn:
            row = LEASE.held(conn, job_id, worker)
            if row is None:
                return None
            return LEASE.fail(conn, row, worker, now, error, self.backoff, _attempt_note, permanent)

    def requeue_stale(self, stale_after_s: float) -> list[int]:
        """Jobs `running` whose worker stopped heartbeating (killed) go back to the queue, or
        fail when that was their last attempt (a job that kills its worker every time must
        not loop). Returns the re-queued job ids; a job another sweeper moved first is left
        to it."""
        now = self.now()

        def why(row: Row[Any]) -> str:
            return f"no heartbeat for {stale_after_s:g} s (worker died) on attempt {row.attempts}"

        with self.engine.begin() as conn:
            return LEASE.requeue(conn, now, (LEASE.stale(now, stale_after_s),), why, _job_note)

    def resubmit(self, job_id: int) -> tuple[bool, list[int]]:
        """An admin's retry: a failed job is queued again with fresh attempts, and the job's
        failed deliveries go back to pending. Returns (job requeued, resubmitted deliveries)."""
        now = self.now()
        with self.engine.begin() as conn:
            requeued = LEASE.resubmit(conn, now, (t.jobs.c.id == job_id,), _job_note)
            return bool(requeued), resubmit_failed(conn, now, job_id)

    def cancel(self, job_id: int) -> tuple[bool, list[int]]:
        """An admin's cancel: a queued or running job ends `failed` ("cancelled"; a running
        worker finds it no longer its own and its result is not delivered), and the job's
        unfinished deliveries end `failed` too. `resubmit` undoes it. Returns (job cancelled,
        deliveries cancelled)."""
        now = self.now()
        why = "cancelled by an admin"
        with self.engine.begin() as conn:
            cancelled = LEASE.cancel(conn, now, (t.jobs.c.id == job_id,), why, _job_note)
            return bool(cancelled), cancel_open(conn, now, job_id, why)

    def instance_paths(self, series_id: int) -> list[str]:
        with self.engine.connect() as conn:
            i = t.instances
            return list(conn.execute(select(i.c.path).where(i.c.series_id == series_id).order_by(i.c.id)).scalars())


def _job_note(moved: Moved) -> Note:
    return Note(f"job {moved.row.id}: {moved.why}" if moved.why else f"job {moved.row.id}")


def _attempt_note(moved: Moved) -> Note:
    return Note(f"job {moved.row.id} attempt {moved.row.attempts}: {moved.why[:EVENT_ERROR_CHARS]}")


def _record_routing(
    conn: Connection, row: Row[*tuple[Any, ...]], assignment: Assignment, max_attempts: int, now: dt.datetime
) -> int | None:
    """The job (and the forwarded originals' deliveries) or the event `assignment` makes of a
    series the caller's sweep routes; the job's id, or None."""
    spec = assignment.job
    if assignment.skipped:
        write_event(
            conn,
            now,
            EventKind.SERIES_SKIPPED,
            calling_ae=row.calling_ae,
            series_instance_uid=row.series_instance_uid,
            detail=assignment.skipped,
        )
        return None
    if spec is None:
        write_event(
            conn,
            now,
            EventKind.SERIES_UNROUTED,
            calling_ae=row.calling_ae,
            series_instance_uid=row.series_instance_uid,
            detail="no route matches",
        )
        return None
    exists = conn.execute(
        select(t.jobs.c.id).where(
            t.jobs.c.series_id == row.id,
            t.jobs.c.route == spec.route,
            t.jobs.c.generation == row.reopened_count,
        )
    ).scalar()
    if spec.no_destination:
        write_event(
            conn,
            now,
            EventKind.DELIVERY_NO_DESTINATION,
            calling_ae=row.calling_ae,
            series_instance_uid=row.series_instance_uid,
            detail=spec.no_destination,
        )
    job_id: int = exists or _insert_job(conn, row.id, row.reopened_count, spec, max_attempts, now)
    if spec.forward_original:
        originals = _series_instances(conn, row.id)
        for target in spec.targets:
            add_delivery(conn, now, job_id, target, DELIVER_ORIGINAL, row.series_instance_uid, originals)
    write_event(
        conn,
        now,
        EventKind.JOB_QUEUED,
        calling_ae=row.calling_ae,
        series_instance_uid=row.series_instance_uid,
        detail=f"job {job_id} route {spec.route} model {spec.model}",
    )
    return job_id


def _series_facts(conn: Connection, series_id: int) -> tuple[ImageFacts, ...]:
    rows = conn.execute(select(t.instances.c.facts).where(t.instances.c.series_id == series_id)).scalars()
    return tuple(ImageFacts.from_json(text) for text in rows if text)


def _decode_targets(text: str) -> list[Target]:
    return [Target(item["name"], int(item["max_attempts"])) for item in json.loads(text or "[]")]


def _series_instances(conn: Connection, series_id: int) -> list[Outgoing]:
    i = t.instances
    rows = conn.execute(
        select(i.c.sop_instance_uid, i.c.sop_class_uid, i.c.transfer_syntax_uid, i.c.path)
        .where(i.c.series_id == series_id)
        .order_by(i.c.instance_number.nulls_last(), i.c.id)  # unnumbered last, on SQLite as on PostgreSQL
    ).all()
    return [Outgoing(*row) for row in rows]


def _insert_job(
    conn: Connection,
    series_id: int,
    generation: int,
    spec: JobSpec,
    max_attempts: int,
    now: dt.datetime,
) -> int:
    return inserted_id(
        conn.execute(
            insert(t.jobs).values(
                series_id=series_id,
                generation=generation,
                route=spec.route,
                model=spec.model,
                state=JOB_QUEUED,
                attempts=0,
                max_attempts=max_attempts,
                queued_at=now,
                error="",
                output_count=0,
                timings="",
                destinations=json.dumps([{"name": x.name, "max_attempts": x.max_attempts} for x in spec.targets]),
                strength=spec.strength,
                on_qa_fail=spec.on_qa_fail,
                qa="",
            )
        )
    )
