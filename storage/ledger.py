"""Ledger operations for receiving: each is one short transaction, so a kill at any moment
leaves the ledger either before or after it, never in between."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    CursorResult,
    Engine,
    and_,
    bindparam,
    delete,
    exists,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from core import status
from core.clock import Clock, utcnow
from core.errors import InvalidDataset
from core.header import InstanceHeader
from storage import schema as t
from storage.schema import SERIES_COMPLETE, SERIES_RECEIVING, fits

RECORD_TRIES = 4  # the study, the series and the instance may each be lost to another process once


class EventKind(enum.StrEnum):
    ASSOCIATION_REJECTED = "association.rejected"
    STORE_REFUSED = "store.refused"
    INSTANCE_DUPLICATE = "instance.duplicate"
    INSTANCE_REPLACED = "instance.replaced"
    INSTANCE_RECOVERED = "instance.recovered"
    INSTANCE_ELEMENTS_DISCARDED = "instance.elements_discarded"  # stored without group 0002 it carried
    INSTANCE_MALFORMED = "instance.malformed"  # stored as sent with a warning status; the worker refuses it
    INSTANCE_MISSING = "instance.missing"
    FILE_QUARANTINED = "file.quarantined"
    TEMP_DISCARDED = "temp.discarded"
    ASSOCIATION_LOST = "association.lost"
    SERIES_REOPENED = "series.reopened"
    SERIES_COMPLETE = "series.complete"
    SERIES_UNROUTED = "series.unrouted"
    SERIES_SKIPPED = "series.skipped"  # routing processed none of it, with the reason (own output, no model applies)
    JOB_QUEUED = "job.queued"
    JOB_STARTED = "job.started"
    JOB_DONE = "job.done"
    JOB_RETRY = "job.retry"
    JOB_FAILED = "job.failed"
    JOB_QA_WARNING = "job.qa_warning"  # delivered although the QA gate failed it (route policy)
    JOB_REQUEUED = "job.requeued"
    JOB_RESUBMITTED = "job.resubmitted"  # by an admin: `enhance-node jobs retry`
    DELIVERY_QUEUED = "delivery.queued"
    DELIVERY_DELIVERED = "delivery.delivered"
    DELIVERY_RETRY = "delivery.retry"
    DELIVERY_FAILED = "delivery.failed"
    DELIVERY_REQUEUED = "delivery.requeued"
    DELIVERY_RESUBMITTED = "delivery.resubmitted"
    DELIVERY_NO_DESTINATION = "delivery.no_destination"


class StoreOutcome(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: stored once
    REPLACED = "replaced"  # same SOP Instance UID, new bytes: newest wins, older version kept


@dataclass(frozen=True)
class StoredFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Received:
    """What the SCP knows about one received instance besides its header."""

    file: StoredFile
    calling_ae: str
    peer_host: str | None = None
    association_id: int | None = None


class Ledger:
    def __init__(self, engine: Engine, now: Clock = utcnow) -> None:
        self.engine = engine
        self.now = now

    # -- events -------------------------------------------------------------------------
    def add_event(self, kind: EventKind, **fields: object) -> None:
        with self.engine.begin() as conn:
            write_event(conn, self.now(), kind, **fields)

    # -- associations -------------------------------------------------------------------
    def open_association(
        self, node_id: str, calling_ae: str, called_ae: str, peer_host: str, peer_port: int, tls: bool
    ) -> int:
        now = self.now()
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(t.associations).values(
                    node_id=node_id,
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    peer_host=peer_host,
                    peer_port=peer_port,
                    tls=tls,
                    opened_at=now,
                    last_activity_at=now,
                    instances_stored=0,
                )
            )
            return inserted_id(result)

    def close_association(self, association_id: int, outcome: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(t.associations)
                .where(t.associations.c.id == association_id, t.associations.c.closed_at.is_(None))
                .values(closed_at=self.now(), outcome=outcome)
            )

    def close_lost_associations(self, node_id: str) -> int:
        """Associations this SCP held when it died: closed, so their series can complete."""
        now = self.now()
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(t.associations)
                .where(t.associations.c.node_id == node_id, t.associations.c.closed_at.is_(None))
                .values(closed_at=now, outcome="lost")
                .returning(t.associations.c.calling_ae)
            ).all()
            for (ae,) in rows:
                write_event(conn, now, EventKind.ASSOCIATION_LOST, calling_ae=ae, detail=node_id)
            return len(rows)

    # -- instances ------------------------------------------------------------------------
    def record_instance(
        self, header: InstanceHeader, received: Received, before_commit: Callable[[], None] | None = None
    ) -> StoreOutcome:
        """Record a durably written file as the instance's current version, in one transaction.
        `before_commit` runs last inside it (the SCP waits there for its file's sync: the
        statements run while the file is flushed, and a row is never committed before its file
        is durable); what it raises rolls the transaction back and propagates. It runs once
        per attempt (the retry below runs it again), so it must be idempotent.
        InvalidDataset (permanent) when its UIDs cannot be ledger keys (`check_identifiers`);
        its other text is kept as far as the columns hold it (storage.schema.FittedString).

        On PostgreSQL (READ COMMITTED) two receiving processes can both read that a study,
        series or instance is new and both insert it; the loser's unique key fails once the
        winner commits, and it records again, now finding the winner's row (without this it
        answered 0xA700). On SQLite, BEGIN IMMEDIATE makes them take turns.

        Runs once per received instance, so its statements are built once (module level).
        """
        check_identifiers(header)
        for _ in range(RECORD_TRIES - 1):
            try:
                return self._record_once(header, received, before_commit)
            except IntegrityError:
                continue  # another process inserted a row this one was about to: read again
        return self._record_once(header, received, before_commit)

    def _record_once(
        self, header: InstanceHeader, received: Received, before_commit: Callable[[], None] | None
    ) -> StoreOutcome:
        now = self.now()
        f = received.file
        with self.engine.begin() as conn:
            old = conn.execute(_SELECT_INSTANCE, {"sop": header.sop_instance_uid}).first()
            if old is not None and old.sha256 == f.sha256:
                outcome = StoreOutcome.DUPLICATE  # identical re-send: the series is not reopened
            else:
                outcome = StoreOutcome.NEW if old is None else StoreOutcome.REPLACED
                # a new instance is counted in the same statement that touches its series
                series_id = self._touch_series(conn, header, received, now, 1 if old is None else 0)
                fields = {
                    "sop_class_uid": header.sop_class_uid,
                    "transfer_syntax_uid": header.transfer_syntax_uid,
                    "series_id": series_id,
                    "instance_number": header.instance_number,
                    "path": f.path,
                    "sha256": f.sha256,
                    "size": f.size,
                    "calling_ae": received.calling_ae,
                    "association_id": received.association_id,
                    "received_at": now,
                    "facts": header.facts.to_json(),
                }
                if old is None:
                    conn.execute(_INSERT_INSTANCE, {"sop_instance_uid": header.sop_instance_uid, **fields})
                else:
                    # a version sent again after another (A, B, A): current again, no longer
                    # superseded, so that its path is listed once whatever the order of re-sends
                    conn.execute(delete(t.superseded_instances).where(t.superseded_instances.c.path == f.path))
                    conn.execute(
                        insert(t.superseded_instances).values(
                            instance_id=old.id,
                            path=old.path,
                            sha256=old.sha256,
                            size=old.size,
                            received_at=old.received_at,
                            superseded_at=now,
                        )
                    )
                    conn.execute(update(t.instances).where(t.instances.c.id == old.id).values(**fields))
                    if old.series_id != series_id:
                        conn.execute(_COUNT_SERIES, {"sid": old.series_id, "delta": -1})
                        conn.execute(_COUNT_SERIES, {"sid": series_id, "delta": 1})
            if old is not None:
                write_event(
                    conn,
                    now,
                    EventKind.INSTANCE_DUPLICATE if outcome is StoreOutcome.DUPLICATE else EventKind.INSTANCE_REPLACED,
                    calling_ae=received.calling_ae,
                    peer_host=received.peer_host,
                    series_instance_uid=header.series_instance_uid,
                    sop_instance_uid=header.sop_instance_uid,
                    detail="" if outcome is StoreOutcome.DUPLICATE else f"sha256 {old.sha256[:12]} -> {f.sha256[:12]}",
                )
            if received.association_id is not None:
                conn.execute(_TOUCH_ASSOCIATION, {"aid": received.association_id, "now": now})
            if before_commit is not None:
                before_commit()
        return outcome

    def _touch_series(
        self, conn: Connection, h: InstanceHeader, received: Received, now: dt.datetime, delta: int
    ) -> int:
        """The series row of `h`, created, touched or reopened, its instance count moved by delta."""
        touch = {"uid": h.series_instance_uid, "now": now, "ae": received.calling_ae, "delta": delta}
        touched = conn.execute(_TOUCH_RECEIVING_SERIES, touch).scalar()  # the common case, in one statement
        if touched is not None:
            return int(touched)
        row = conn.execute(_SELECT_SERIES, {"uid": h.series_instance_uid}).first()
        if row is None:
            study_id = conn.execute(_SELECT_STUDY, {"uid": h.study_instance_uid}).scalar()
            if study_id is None:
                study_id = inserted_id(
                    conn.execute(
                        insert(t.studies).values(study_instance_uid=h.study_instance_uid, first_received_at=now)
                    )
                )
            return inserted_id(
                conn.execute(
                    insert(t.series).values(
                        series_instance_uid=h.series_instance_uid,
                        study_id=study_id,
                        modality=h.modality,
                        series_description=h.series_description,
                        calling_ae=received.calling_ae,
                        state=SERIES_RECEIVING,
                        instance_count=delta,
                        first_received_at=now,
                        last_received_at=now,
                        reopened_count=0,
                    )
                )
            )
        if row.state == SERIES_RECEIVING and conn.execute(_TOUCH_RECEIVING_SERIES, touch).scalar() is not None:
            return int(row.id)  # made by another process since the first UPDATE (PostgreSQL)
        # A late instance: the series is received again and will complete (and be
        # reprocessed with the same deterministic output UIDs) after a new quiet period.
        conn.execute(
            update(t.series)
            .where(t.series.c.id == row.id)
            .values(
                last_received_at=now,
                calling_ae=received.calling_ae,
                state=SERIES_RECEIVING,
                completed_at=None,
                reopened_count=t.series.c.reopened_count + 1,
                instance_count=t.series.c.instance_count + delta,
            )
        )
        write_event(
            conn,
            now,
            EventKind.SERIES_REOPENED,
            calling_ae=received.calling_ae,
            series_instance_uid=h.series_instance_uid,
            sop_instance_uid=h.sop_instance_uid,
            detail=f"was {row.state}",
        )
        return int(row.id)

    # -- completion -------------------------------------------------------------------------
    def complete_idle_series(self, idle_seconds: float, stale_association_seconds: float) -> list[str]:
        """Mark complete every receiving series quiet for `idle_seconds` whose sender has no
        open association (one silent for `stale_association_seconds` counts as gone)."""
        now = self.now()
        quiet_since = now - dt.timedelta(seconds=idle_seconds)
        alive_since = now - dt.timedelta(seconds=stale_association_seconds)
        s, a = t.series, t.associations
        sender_busy = exists().where(
            and_(a.c.calling_ae == s.c.calling_ae, a.c.closed_at.is_(None), a.c.last_activity_at > alive_since)
        )
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(s)
                .where(s.c.state == SERIES_RECEIVING, s.c.last_received_at <= quiet_since, ~sender_busy)
                .values(state=SERIES_COMPLETE, completed_at=now)
                .returning(s.c.series_instance_uid, s.c.calling_ae, s.c.instance_count)
            ).all()
            for uid, ae, count in rows:
                detail = f"{count} instances"
                write_event(conn, now, EventKind.SERIES_COMPLETE, calling_ae=ae, series_instance_uid=uid, detail=detail)
        return [r[0] for r in rows]

    # -- start-up reconciliation ------------------------------------------------------------
    def known_paths(self) -> set[str]:
        with self.engine.connect() as conn:
            current = conn.execute(select(t.instances.c.path)).scalars()
            older = conn.execute(select(t.superseded_instances.c.path)).scalars()
            return set(current) | set(older)

    def add_events(self, kind: EventKind, details: Iterable[str]) -> None:
        with self.engine.begin() as conn:
            now = self.now()
            for d in details:
                write_event(conn, now, kind, detail=d)


def inserted_id(result: CursorResult[Any]) -> int:
    """The primary key of the row an INSERT just made."""
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def write_event(conn: Connection, now: dt.datetime, kind: EventKind, **fields: object) -> None:
    """An audit event, inside the caller's transaction (shared with the queues). Its text may
    come from a hostile peer (a refused UID): the events table's text columns keep it as far as
    they can (storage.schema.FittedString: NUL, which PostgreSQL refuses in text, becomes '?'
    and each value is cut to its column), so a refusal can always be recorded."""
    fields.setdefault("detail", "")
    conn.execute(insert(t.events).values(at=now, kind=str(kind), **fields))


def check_identifiers(header: InstanceHeader) -> None:
    """InvalidDataset (0xA900, permanent) when one of the header's UIDs cannot be a ledger key
    as it is: longer than its column or holding a character no column holds (NUL). The ledger
    keys on them, so it never cuts or replaces them; SQLite would store them and PostgreSQL
    refuse them (DataError, which the SCP answers 0xA700: retry, forever). parse_header
    refuses them first; this keeps the ledger's answer the same for any caller."""
    for name, value in (
        ("SOPInstanceUID", header.sop_instance_uid),
        ("SOPClassUID", header.sop_class_uid),
        ("TransferSyntaxUID", header.transfer_syntax_uid),
        ("SeriesInstanceUID", header.series_instance_uid),
        ("StudyInstanceUID", header.study_instance_uid),
    ):
        if not fits(value, t.UID.length):
            raise InvalidDataset(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"{name} cannot be kept in the ledger: longer than {t.UID.length} or holds a control character",
            )


# Statements of the per-instance path, built once.
_SELECT_INSTANCE = select(t.instances).where(t.instances.c.sop_instance_uid == bindparam("sop"))
_INSERT_INSTANCE = insert(t.instances)
_SELECT_SERIES = select(t.series.c.id, t.series.c.state).where(t.series.c.series_instance_uid == bindparam("uid"))
_SELECT_STUDY = select(t.studies.c.id).where(t.studies.c.study_instance_uid == bindparam("uid"))
_TOUCH_RECEIVING_SERIES = (
    update(t.series)
    .where(t.series.c.series_instance_uid == bindparam("uid"), t.series.c.state == SERIES_RECEIVING)
    .values(
        last_received_at=bindparam("now"),
        calling_ae=bindparam("ae"),
        instance_count=t.series.c.instance_count + bindparam("delta"),
    )
    .returning(t.series.c.id)
)
_COUNT_SERIES = (
    update(t.series)
    .where(t.series.c.id == bindparam("sid"))
    .values(instance_count=t.series.c.instance_count + bindparam("delta"))
)
_TOUCH_ASSOCIATION = (
    update(t.associations)
    .where(t.associations.c.id == bindparam("aid"))
    .values(last_activity_at=bindparam("now"), instances_stored=t.associations.c.instances_stored + 1)
)
