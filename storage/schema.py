"""Ledger tables (SQLAlchemy Core). Changes go through an alembic migration in migrations/.

No patient names or pixel data live here: UIDs, AE titles, paths, hashes and states.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)

UID = String(64)  # an identifier the ledger keys on: the ledger refuses one that does not fit (never cut)
INT32 = 2**31  # PostgreSQL's INTEGER; SQLite would keep any 64-bit integer


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores naive UTC, returns aware UTC: SQLite has no time zones, PostgreSQL gets UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger; use an aware UTC clock")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        return value.replace(tzinfo=dt.UTC)


# What no text column may hold: NUL (PostgreSQL refuses it in text; SQLite keeps it), the other
# C0 controls but tab and line breaks, DEL, and lone surrogates (from undecodable file names;
# neither backend can encode them).
_UNKEEPABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def fitted(value: str, length: int | None = None) -> str:
    """`value` as a text column of `length` can hold it on every backend: each character no
    column can hold becomes '?', and the rest is cut to `length`."""
    return _UNKEEPABLE.sub("?", value)[:length]


def fits(value: str, length: int | None) -> bool:
    """Whether a text column of `length` holds `value` unchanged on every backend."""
    return (length is None or len(value) <= length) and not _UNKEEPABLE.search(value)


class FittedString(TypeDecorator[str]):
    """Text from outside the node's control (a peer's header or C-STORE comment, an exception's
    message, a host name) stored the same on every backend, as `fitted` makes it. Unchecked,
    SQLite keeps a NUL or an over-long value that PostgreSQL refuses with DataError, which the
    SCP would answer 0xA700, a retryable status, for an instance that can never be stored.
    Values compared with the column (WHERE) are made to fit the same way, so they still match."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else fitted(value, self.length)


class FittedText(FittedString):
    """FittedString without a length (TEXT)."""

    impl = Text
    cache_ok = True


class OrdinalInteger(TypeDecorator[int]):
    """An integer a peer sent that the ledger only sorts by (InstanceNumber): one a 32-bit
    column cannot hold is stored as NULL on every backend (the file keeps what was sent),
    rather than refused by PostgreSQL (DataError) and kept by SQLite."""

    impl = Integer
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        return value if value is not None and -INT32 <= value < INT32 else None


metadata = MetaData()

# Series states (DESIGN 3.3).
SERIES_RECEIVING = "receiving"
SERIES_COMPLETE = "complete"
SERIES_ROUTED = "routed"

studies = Table(
    "studies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_instance_uid", UID, nullable=False, unique=True),
    Column("first_received_at", UTCDateTime, nullable=False),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("series_instance_uid", UID, nullable=False, unique=True),
    Column("study_id", ForeignKey("studies.id"), nullable=False, index=True),
    Column("modality", FittedString(16), nullable=False, default=""),
    Column("series_description", FittedString(64), nullable=False, default=""),
    Column("calling_ae", FittedString(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("instance_count", Integer, nullable=False, default=0),
    Column("first_received_at", UTCDateTime, nullable=False),
    Column("last_received_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime),
    Column("reopened_count", Integer, nullable=False, default=0),
    # why routing processed none of it (own output, no model applies, ...); "" when it did
    Column("skip_reason", FittedText, nullable=False, default=""),
    Index("ix_series_state_last", "state", "last_received_at"),
)

associations = Table(
    "associations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("node_id", FittedString(128), nullable=False),  # which SCP (host:port) holds it
    Column("calling_ae", FittedString(16), nullable=False),
    Column("called_ae", FittedString(16), nullable=False),
    Column("peer_host", FittedString(64), nullable=False),
    Column("peer_port", Integer, nullable=False),
    Column("tls", Boolean, nullable=False, default=False),
    Column("opened_at", UTCDateTime, nullable=False),
    Column("last_activity_at", UTCDateTime, nullable=False),
    Column("closed_at", UTCDateTime),
    Column("outcome", String(16)),  # released | aborted | lost
    Column("instances_stored", Integer, nullable=False, default=0),
    Index("ix_associations_open", "calling_ae", "closed_at"),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", UID, nullable=False, unique=True),
    Column("sop_class_uid", UID, nullable=False),
    Column("transfer_syntax_uid", UID, nullable=False),
    Column("series_id", ForeignKey("series.id"), nullable=False, index=True),
    Column("instance_number", OrdinalInteger),
    Column("path", Text, nullable=False, unique=True),  # relative to storage_dir
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("calling_ae", FittedString(16), nullable=False),
    Column("association_id", ForeignKey("associations.id")),
    Column("received_at", UTCDateTime, nullable=False),
    Column("facts", Text, nullable=False, default=""),  # core.images.ImageFacts as JSON; "" before 0005
)

# Earlier versions of an instance re-sent with different bytes: kept, never deleted.
superseded_instances = Table(
    "superseded_instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("instance_id", ForeignKey("instances.id"), nullable=False, index=True),
    Column("path", Text, nullable=False, unique=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("superseded_at", UTCDateTime, nullable=False),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", UTCDateTime, nullable=False, index=True),
    Column("kind", String(48), nullable=False, index=True),
    # copies of what a refused peer sent: kept as far as they fit, never a reason to lose the event
    Column("calling_ae", FittedString(16)),
    Column("peer_host", FittedString(64)),
    Column("series_instance_uid", FittedString(64)),
    Column("sop_instance_uid", FittedString(64)),
    Column("status", Integer),  # DIMSE status answered, when there was one
    Column("detail", FittedText, nullable=False, default=""),
)

# Job states (DESIGN 3.3).
JOB_QUEUED = "queued"
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("series_id", ForeignKey("series.id"), nullable=False, index=True),
    Column("generation", Integer, nullable=False),  # the series' reopened_count when routed
    Column("route", FittedString(64), nullable=False),
    Column("model", FittedString(64), nullable=False),
    Column("model_version", FittedString(32)),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("queued_at", UTCDateTime, nullable=False),
    Column("not_before", UTCDateTime),  # retry backoff
    Column("started_at", UTCDateTime),
    Column("heartbeat_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("worker", FittedString(128)),
    Column("backend", FittedString(32)),
    Column("error", FittedText, nullable=False, default=""),
    Column("output_series_uid", UID),
    Column("output_count", Integer, nullable=False, default=0),
    Column("timings", Text, nullable=False, default=""),  # JSON: seconds per stage
    Column("destinations", Text, nullable=False, default="[]"),  # JSON: where the output goes (routing)
    Column("strength", String(16), nullable=False, default="high"),  # the route's, at routing
    Column("on_qa_fail", String(32), nullable=False, default="fail"),  # the route's QA policy, at routing
    Column("qa", Text, nullable=False, default=""),  # JSON: the worker's QA figures, failures and verdict
    Index("ix_jobs_state", "state", "id"),
    Index("ux_jobs_series_route_generation", "series_id", "route", "generation", unique=True),
)

# Delivery states (DESIGN 3.3).
DELIVERY_PENDING = "pending"
DELIVERY_SENDING = "sending"
DELIVERY_DELIVERED = "delivered"
DELIVERY_FAILED = "failed"

# What a delivery sends.
DELIVER_DERIVED = "derived"  # the job's output series
DELIVER_ORIGINAL = "original"  # the source series, forwarded as received (inline node)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", ForeignKey("jobs.id"), nullable=False, index=True),
    Column("destination", FittedString(64), nullable=False),  # a [[destinations]] name
    Column("kind", String(16), nullable=False),
    Column("series_instance_uid", UID, nullable=False),  # the series it sends
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("next_attempt_at", UTCDateTime),  # retry backoff
    Column("started_at", UTCDateTime),
    Column("heartbeat_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("sender", FittedString(128)),
    Column("error", FittedText, nullable=False, default=""),
    Column("instance_count", Integer, nullable=False),
    Column("stored_count", Integer, nullable=False, default=0),  # warnings included
    Column("warning_count", Integer, nullable=False, default=0),
    Index("ix_deliveries_state", "state", "id"),
    Index("ux_deliveries_job_destination_kind", "job_id", "destination", "kind", unique=True),
)

# Per-instance C-STORE results of a delivery: a retry sends only what is not stored yet.
INSTANCE_PENDING = "pending"
INSTANCE_STORED = "stored"
INSTANCE_WARNING = "warning"  # stored, with a warning status (B000, B006, B007...)
INSTANCE_FAILED = "failed"

delivery_instances = Table(
    "delivery_instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("delivery_id", ForeignKey("deliveries.id"), nullable=False),
    Column("sop_instance_uid", UID, nullable=False),
    Column("sop_class_uid", UID, nullable=False),
    Column("transfer_syntax_uid", UID, nullable=False),
    Column("path", Text, nullable=False),  # relative to storage_dir
    Column("outcome", String(16), nullable=False),
    Column("status", Integer),  # the last C-STORE status; None: not answered (association failed)
    Column("attempts", Integer, nullable=False, default=0),
    Column("detail", FittedText, nullable=False, default=""),  # the destination's Error Comment
    Column("updated_at", UTCDateTime),
    Index("ux_delivery_instances", "delivery_id", "sop_instance_uid", unique=True),
)
