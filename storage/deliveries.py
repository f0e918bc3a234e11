"""The delivery queue in the ledger (DESIGN 3.3): one delivery per (job, destination, kind),
claimed atomically by a sender, with each instance's C-STORE result recorded as it comes, so
a retry sends only what the destination has not stored yet and a kill loses nothing.

    pending -> sending -> delivered            every instance stored (warnings included)
                       -> pending (backoff)     something not stored, attempts left
                       -> failed                attempts used up: visible, `jobs retry` resubmits

Each operation is one short transaction; claiming takes the write lock first (SQLite: BEGIN
IMMEDIATE, storage/db.py; PostgreSQL: FOR UPDATE SKIP LOCKED).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update

from core.clock import Clock, utcnow
from storage import schema as t
from storage.ledger import EventKind, inserted_id, oldest_due, renew_heartbeat, write_event
from storage.schema import (
    DELIVERY_DELIVERED,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DELIVERY_SENDING,
    INSTANCE_FAILED,
    INSTANCE_PENDING,
    INSTANCE_STORED,
    INSTANCE_WARNING,
)


@dataclass(frozen=True)
class Outgoing:
    """One instance a delivery sends: a file under storage_dir and what its header says."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str


@dataclass(frozen=True)
class Target:
    """A destination as routing resolved it (its name, and max_attempts at that time)."""

    name: str
    max_attempts: int


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int
    destination: str
    kind: str
    series_instance_uid: str
    attempts: int
    max_attempts: int


@dataclass(frozen=True)
class PendingInstance:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: about base * 2^(attempt-1), capped, drawn from its upper
    half so that deliveries failed together (a PACS restart) do not all come back at once."""
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return float(delay * rng.uniform(0.5, 1.0))


def add_delivery(
    conn: Connection,
    now: dt.datetime,
    job_id: int,
    target: Target,
    kind: str,
    series_instance_uid: str,
    instances: Sequence[Outgoing],
) -> int:
    """A pending delivery with its instances, inside the caller's transaction (the job's
    completion or its routing); idempotent per (job, destination, kind)."""
    d = t.deliveries
    existing = conn.execute(
        select(d.c.id).where(d.c.job_id == job_id, d.c.destination == target.name, d.c.kind == kind)
    ).scalar()
    if existing is not None:
        return int(existing)
    delivery_id = inserted_id(
        conn.execute(
            insert(d).values(
                job_id=job_id,
                destination=target.name,
                kind=kind,
                series_instance_uid=series_instance_uid,
                state=DELIVERY_PENDING,
                attempts=0,
                max_attempts=target.max_attempts,
                created_at=now,
                error="",
                instance_count=len(instances),
                stored_count=0,
                warning_count=0,
            )
        )
    )
    if instances:
        conn.execute(
            insert(t.delivery_instances),
            [
                {
                    "delivery_id": delivery_id,
                    "sop_instance_uid": i.sop_instance_uid,
                    "sop_class_uid": i.sop_class_uid,
                    "transfer_syntax_uid": i.transfer_syntax_uid,
                    "path": i.path,
                    "outcome": INSTANCE_PENDING,
                    "attempts": 0,
                    "detail": "",
                }
                for i in instances
            ],
        )
    write_event(
        conn,
        now,
        EventKind.DELIVERY_QUEUED,
        series_instance_uid=series_instance_uid,
        detail=f"delivery {delivery_id} of job {job_id}: {len(instances)} {kind} instances to {target.name}",
    )
    return delivery_id


def resubmit_failed(conn: Connection, now: dt.datetime, job_id: int) -> list[int]:
    """The job's failed deliveries back to pending with fresh attempts (an admin's retry)."""
    d = t.deliveries
    ids = list(conn.execute(select(d.c.id).where(d.c.job_id == job_id, d.c.state == DELIVERY_FAILED)).scalars())
    for delivery_id in ids:
        conn.execute(
            update(d)
            .where(d.c.id == delivery_id)
            .values(state=DELIVERY_PENDING, attempts=0, next_attempt_at=None, finished_at=None, sender=None)
        )
        write_event(conn, now, EventKind.DELIVERY_RESUBMITTED, detail=f"delivery {delivery_id} of job {job_id}")
    return ids


def cancel_open(conn: Connection, now: dt.datetime, job_id: int, why: str) -> list[int]:
    """The job's deliveries not finished yet end `failed` with `why` (an admin's cancel); a
    sender in the middle of one finds it no longer its own and stops after the instance in flight."""
    d = t.deliveries
    ids = list(
        conn.execute(
            select(d.c.id).where(d.c.job_id == job_id, d.c.state.in_((DELIVERY_PENDING, DELIVERY_SENDING)))
        ).scalars()
    )
    for delivery_id in ids:
        conn.execute(
            update(d)
            .where(d.c.id == delivery_id)
            .values(state=DELIVERY_FAILED, error=why, sender=None, next_attempt_at=None, finished_at=now)
        )
        write_event(conn, now, EventKind.DELIVERY_FAILED, detail=f"delivery {delivery_id} of job {job_id}: {why}")
    return ids


class DeliveryQueue:
    def __init__(
        self,
        engine: Engine,
        now: Clock = utcnow,
        retry_base_s: float = 10.0,
        retry_max_s: float = 600.0,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.now = now
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.rng = rng or random.Random()
        self._skip_locked = engine.dialect.name == "postgresql"

    def claim(self, sender: str, destinations: Sequence[str] | None = None) -> Delivery | None:
        """The oldest pending delivery whose backoff has passed, now `sending` for `sender`;
        only to `destinations` when given (the ones this sender's configuration knows, so a
        host that lacks one does not use up another host's attempts)."""
        now = self.now()
        d = t.deliveries
        with self.engine.begin() as conn:
            known = () if destinations is None else (d.c.destination.in_(list(destinations)),)
            delivery_id = oldest_due(conn, d, DELIVERY_PENDING, d.c.next_attempt_at, now, self._skip_locked, *known)
            if delivery_id is None:
                return None
            conn.execute(
                update(d)
                .where(d.c.id == delivery_id)
                .values(
                    state=DELIVERY_SENDING,
                    sender=sender,
                    attempts=d.c.attempts + 1,
                    started_at=now,
                    heartbeat_at=now,
                )
            )
            row = conn.execute(select(d).where(d.c.id == delivery_id)).one()
        return Delivery(
            row.id, row.job_id, row.destination, row.kind, row.series_instance_uid, row.attempts, row.max_attempts
        )

    def pending_instances(self, delivery_id: int) -> list[PendingInstance]:
        """What the destination has not stored yet, in the order the series was written."""
        i = t.delivery_instances
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(i.c.id, i.c.sop_instance_uid, i.c.sop_class_uid, i.c.transfer_syntax_uid, i.c.path)
                .where(i.c.delivery_id == delivery_id, i.c.outcome.in_((INSTANCE_PENDING, INSTANCE_FAILED)))
                .order_by(i.c.id)
            ).all()
        return [PendingInstance(*row) for row in rows]

    def record(
        self, delivery_id: int, sender: str, instance_id: int, outcome: str, status: int | None, detail: str
    ) -> bool:
        """One instance's C-STORE result (also the delivery's heartbeat). False when the
        delivery is no longer this sender's (re-queued as stale): then nothing is recorded."""
        now = self.now()
        d, i = t.deliveries, t.delivery_instances
        stored = outcome in (INSTANCE_STORED, INSTANCE_WARNING)
        with self.engine.begin() as conn:
            mine = conn.execute(
                update(d)
                .where(d.c.id == delivery_id, d.c.sender == sender, d.c.state == DELIVERY_SENDING)
                .values(
                    heartbeat_at=now,
                    stored_count=d.c.stored_count + int(stored),
                    warning_count=d.c.warning_count + int(outcome == INSTANCE_WARNING),
                )
            ).rowcount
            if not mine:
                return False
            conn.execute(
                update(i)
                .where(i.c.id == instance_id)
                .values(outcome=outcome, status=status, attempts=i.c.attempts + 1, detail=detail[:500], updated_at=now)
            )
        return True

    def heartbeat(self, delivery_id: int, sender: str) -> bool:
        """False when the delivery is no longer this sender's (re-queued as stale, or cancelled)."""
        d = t.deliveries
        return renew_heartbeat(self.engine, d, delivery_id, d.c.sender, sender, DELIVERY_SENDING, self.now())

    def finish_attempt(self, delivery_id: int, sender: str, error: str = "") -> str | None:
        """Ends an attempt: `delivered` when every instance is stored, else `pending` with
        backoff or, on the last attempt, `failed`. Returns the new state, or None when the
        delivery was no longer this sender's."""
        now = self.now()
        d, i = t.deliveries, t.delivery_instances
        with self.engine.begin() as conn:
            row = conn.execute(
                select(d.c.attempts, d.c.max_attempts, d.c.series_instance_uid, d.c.destination).where(
                    d.c.id == delivery_id, d.c.sender == sender, d.c.state == DELIVERY_SENDING
                )
            ).first()
            if row is None:
                return None
            unsent = conn.execute(
                select(func.count()).where(
                    i.c.delivery_id == delivery_id, i.c.outcome.in_((INSTANCE_PENDING, INSTANCE_FAILED))
                )
            ).scalar_one()
            if not unsent:
                state, kind, detail, next_at = DELIVERY_DELIVERED, EventKind.DELIVERY_DELIVERED, "", None
                error = ""
            else:
                error = error or f"{unsent} instances not stored"
                retry = row.attempts < row.max_attempts
                state = DELIVERY_PENDING if retry else DELIVERY_FAILED
                kind = EventKind.DELIVERY_RETRY if retry else EventKind.DELIVERY_FAILED
                delay = backoff_seconds(row.attempts, self.retry_base_s, self.retry_max_s, self.rng)
                next_at = now + dt.timedelta(seconds=delay) if retry else None
                detail = f"; retry in {delay:.1f} s" if retry else ""
            changed = conn.execute(
                update(d)
                .where(d.c.id == delivery_id, d.c.sender == sender, d.c.state == DELIVERY_SENDING)
                .values(
                    state=state,
                    error=error[:2000],
                    sender=None,
                    next_attempt_at=next_at,
                    finished_at=None if state == DELIVERY_PENDING else now,
                )
            ).rowcount
            if not changed:  # taken over between the read and the write (PostgreSQL, READ COMMITTED)
                return None
            write_event(
                conn,
                now,
                kind,
                series_instance_uid=row.series_instance_uid,
                detail=f"delivery {delivery_id} to {row.destination} attempt {row.attempts}"
                + (f": {error[:500]}" if error else "")
                + detail,
            )
        return state

    def requeue_stale(self, stale_after_s: float) -> list[int]:
        """Deliveries `sending` whose sender stopped heartbeating (killed) go back to pending,
        or fail when that was their last attempt (a delivery that kills its sender every time
        must not loop)."""
        cutoff = self.now() - dt.timedelta(seconds=stale_after_s)
        d = t.deliveries
        return self._requeue(
            (d.c.heartbeat_at < cutoff,), f"no heartbeat for {stale_after_s:g} s (sender died)", last_fails=True
        )

    def requeue_abandoned(self, node_prefix: str, own: str, quiet_s: float) -> list[int]:
        """Deliveries held by an earlier run of this node's senders (`node_prefix`, not this
        process, `own`) whose heartbeat stopped `quiet_s` ago resume at once, without waiting
        for `stale_after`: the node restarted. Their attempt is not counted against them: the
        node, not the delivery, failed. A live sender heartbeats more often than `quiet_s`."""
        d = t.deliveries
        cutoff = self.now() - dt.timedelta(seconds=quiet_s)
        mine = (
            d.c.sender.startswith(node_prefix, autoescape=True),
            ~d.c.sender.startswith(own, autoescape=True),
            d.c.heartbeat_at < cutoff,
        )
        return self._requeue(mine, "the node restarted", last_fails=False)

    def _requeue(self, where: tuple[Any, ...], why: str, last_fails: bool) -> list[int]:
        now = self.now()
        d = t.deliveries
        requeued = []
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(d.c.id, d.c.sender, d.c.attempts, d.c.max_attempts, d.c.series_instance_uid).where(
                    d.c.state == DELIVERY_SENDING, *where
                )
            ).all()
            for row in rows:
                last = last_fails and row.attempts >= row.max_attempts
                changed = conn.execute(
                    update(d)
                    # the same conditions again: another host may have moved it since the read
                    .where(d.c.id == row.id, d.c.state == DELIVERY_SENDING, d.c.sender == row.sender, *where)
                    .values(
                        state=DELIVERY_FAILED if last else DELIVERY_PENDING,
                        sender=None,
                        next_attempt_at=None,
                        attempts=d.c.attempts if last_fails else d.c.attempts - 1,
                        error=why if last else "",
                        finished_at=now if last else None,
                    )
                ).rowcount
                if not changed:
                    continue
                write_event(
                    conn,
                    now,
                    EventKind.DELIVERY_FAILED if last else EventKind.DELIVERY_REQUEUED,
                    series_instance_uid=row.series_instance_uid,
                    detail=f"delivery {row.id} attempt {row.attempts}: {why}",
                )
                if not last:
                    requeued.append(row.id)
        return requeued
