"""The delivery queue in the ledger (DESIGN 3.3): one delivery per (job, destination, kind),
claimed atomically by a sender, with each instance's C-STORE result recorded as it comes, so
a retry sends only what the destination has not stored yet and a kill loses nothing.

    pending -> sending -> delivered            every instance stored (warnings included)
                       -> pending (backoff)     something not stored, attempts left
                       -> failed                attempts used up: visible, `jobs retry` resubmits

Each operation is one short transaction. The lease itself (the atomic claim, heartbeats,
guarded state changes, backoff with jitter, the stale sweep) is storage/leases.py, which jobs
share.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Connection, Engine, func, insert, select, update

from core.clock import Clock, utcnow
from storage import schema as t
from storage.leases import EVENT_ERROR_CHARS, Backoff, Lease, Moved, Note, RandomSource
from storage.ledger import EventKind, inserted_id, write_event
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

LEASE = Lease(
    t.deliveries,
    holder=t.deliveries.c.sender,
    due=t.deliveries.c.next_attempt_at,
    waiting=DELIVERY_PENDING,
    leased=DELIVERY_SENDING,
    failed=DELIVERY_FAILED,
    retry_event=EventKind.DELIVERY_RETRY,
    failed_event=EventKind.DELIVERY_FAILED,
    requeued_event=EventKind.DELIVERY_REQUEUED,
    resubmitted_event=EventKind.DELIVERY_RESUBMITTED,
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
    return LEASE.resubmit(conn, now, (d.c.job_id == job_id,), _job_note, columns=(d.c.job_id,))


def cancel_open(conn: Connection, now: dt.datetime, job_id: int, why: str) -> list[int]:
    """The job's deliveries not finished yet end `failed` with `why` (an admin's cancel); a
    sender in the middle of one finds it no longer its own and stops after the instance in flight."""
    d = t.deliveries
    return LEASE.cancel(conn, now, (d.c.job_id == job_id,), why, _job_note, columns=(d.c.job_id,))


class DeliveryQueue:
    def __init__(
        self,
        engine: Engine,
        now: Clock = utcnow,
        retry_base_s: float = 10.0,
        retry_max_s: float = 600.0,
        rng: RandomSource | None = None,
    ) -> None:
        """`rng` draws the retries' jitter (storage/leases.py)."""
        self.engine = engine
        self.now = now
        self.backoff = Backoff(retry_base_s, retry_max_s, rng or random.Random())

    def claim(self, sender: str, destinations: Sequence[str] | None = None) -> Delivery | None:
        """The oldest pending delivery whose backoff has passed, now `sending` for `sender`;
        only to `destinations` when given (the ones this sender's configuration knows, so a
        host that lacks one does not use up another host's attempts)."""
        now = self.now()
        d = t.deliveries
        with self.engine.begin() as conn:
            known = () if destinations is None else (d.c.destination.in_(list(destinations)),)
            delivery_id = LEASE.claim(conn, sender, now, *known)
            if delivery_id is None:
                return None
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
            mine = LEASE.update_held(
                conn,
                delivery_id,
                sender,
                heartbeat_at=now,
                stored_count=d.c.stored_count + int(stored),
                warning_count=d.c.warning_count + int(outcome == INSTANCE_WARNING),
            )
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
        with self.engine.begin() as conn:
            return LEASE.heartbeat(conn, delivery_id, sender, self.now())

    def finish_attempt(self, delivery_id: int, sender: str, error: str = "") -> str | None:
        """Ends an attempt: `delivered` when every instance is stored, else `pending` with
        backoff or, on the last attempt, `failed`. Returns the new state, or None when the
        delivery was no longer this sender's."""
        now = self.now()
        d, i = t.deliveries, t.delivery_instances
        with self.engine.begin() as conn:
            row = LEASE.held(conn, delivery_id, sender, d.c.series_instance_uid, d.c.destination)
            if row is None:
                return None
            unsent = conn.execute(
                select(func.count()).where(
                    i.c.delivery_id == delivery_id, i.c.outcome.in_((INSTANCE_PENDING, INSTANCE_FAILED))
                )
            ).scalar_one()
            if unsent:
                error = error or f"{unsent} instances not stored"
                return LEASE.fail(conn, row, sender, now, error, self.backoff, _attempt_note)
            note = _attempt_note(Moved(row, DELIVERY_DELIVERED))
            kind = EventKind.DELIVERY_DELIVERED
            delivered = LEASE.finish(
                conn,
                delivery_id,
                sender,
                now,
                DELIVERY_DELIVERED,
                kind,
                note,
                error="",
                sender=None,
                next_attempt_at=None,
            )
        return DELIVERY_DELIVERED if delivered else None

    def requeue_stale(self, stale_after_s: float) -> list[int]:
        """Deliveries `sending` whose sender stopped heartbeating (killed) go back to pending,
        or fail when that was their last attempt (a delivery that kills its sender every time
        must not loop)."""
        now = self.now()
        why = f"no heartbeat for {stale_after_s:g} s (sender died)"
        return self._requeue((LEASE.stale(now, stale_after_s),), why, refund=False)

    def requeue_abandoned(self, node_prefix: str, own: str, quiet_s: float) -> list[int]:
        """Deliveries held by an earlier run of this node's senders (`node_prefix`, not this
        process, `own`, nor its slots `own/N`) whose heartbeat stopped `quiet_s` ago resume at
        once, without waiting for `stale_after`: the node restarted. Their attempt is not
        counted against them: the node, not the delivery, failed. A live sender heartbeats
        more often than `quiet_s`. (`own` ends with a PID: `node/sender-0/12` is not
        `node/sender-0/123`'s own.)"""
        d = t.deliveries
        mine = (
            _starts_with(d.c.sender, node_prefix),
            d.c.sender != own,
            ~_starts_with(d.c.sender, f"{own}/"),
            LEASE.stale(self.now(), quiet_s),
        )
        return self._requeue(mine, "the node restarted", refund=True)

    def _requeue(self, where: Sequence[ColumnElement[bool]], why: str, refund: bool) -> list[int]:
        columns = (t.deliveries.c.series_instance_uid,)
        with self.engine.begin() as conn:
            return LEASE.requeue(conn, self.now(), where, lambda _row: why, _requeue_note, refund, columns)


def _starts_with(column: ColumnElement[str], prefix: str) -> ColumnElement[bool]:
    """Case-sensitive on every backend, unlike startswith (LIKE), which SQLite compares
    ignoring ASCII case: host ids `NODE` and `node` are two hosts."""
    return func.substr(column, 1, len(prefix)) == prefix


def _job_note(moved: Moved) -> Note:
    job_id = moved.row.job_id
    return Note(
        f"delivery {moved.row.id} of job {job_id}: {moved.why}"
        if moved.why
        else f"delivery {moved.row.id} of job {job_id}"
    )


def _attempt_note(moved: Moved) -> Note:
    """A delivery's attempt ended: delivered, retried (with the backoff) or failed."""
    row = moved.row
    error = f": {moved.why[:EVENT_ERROR_CHARS]}" if moved.why else ""
    retry = f"; retry in {moved.delay:.1f} s" if moved.delay is not None else ""
    return Note(f"delivery {row.id} to {row.destination} attempt {row.attempts}{error}{retry}", row.series_instance_uid)


def _requeue_note(moved: Moved) -> Note:
    row = moved.row
    return Note(f"delivery {row.id} attempt {row.attempts}: {moved.why}", row.series_instance_uid)
