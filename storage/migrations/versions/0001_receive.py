"""Receive: studies, series, associations, instances, superseded instances, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

from storage.schema import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    uid, ae = sa.String(64), sa.String(16)
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", uid, nullable=False, unique=True),
        sa.Column("first_received_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "series",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("series_instance_uid", uid, nullable=False, unique=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False, index=True),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("series_description", sa.String(64), nullable=False),
        sa.Column("calling_ae", ae, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.Column("first_received_at", UTCDateTime, nullable=False),
        sa.Column("last_received_at", UTCDateTime, nullable=False),
        sa.Column("completed_at", UTCDateTime),
        sa.Column("reopened_count", sa.Integer, nullable=False),
    )
    op.create_index("ix_series_state_last", "series", ["state", "last_received_at"])
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("node_id", sa.String(128), nullable=False),
        sa.Column("calling_ae", ae, nullable=False),
        sa.Column("called_ae", ae, nullable=False),
        sa.Column("peer_host", sa.String(64), nullable=False),
        sa.Column("peer_port", sa.Integer, nullable=False),
        sa.Column("tls", sa.Boolean, nullable=False),
        sa.Column("opened_at", UTCDateTime, nullable=False),
        sa.Column("last_activity_at", UTCDateTime, nullable=False),
        sa.Column("closed_at", UTCDateTime),
        sa.Column("outcome", sa.String(16)),
        sa.Column("instances_stored", sa.Integer, nullable=False),
    )
    op.create_index("ix_associations_open", "associations", ["calling_ae", "closed_at"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sop_instance_uid", uid, nullable=False, unique=True),
        sa.Column("sop_class_uid", uid, nullable=False),
        sa.Column("transfer_syntax_uid", uid, nullable=False),
        sa.Column("series_id", sa.Integer, sa.ForeignKey("series.id"), nullable=False, index=True),
        sa.Column("instance_number", sa.Integer),
        sa.Column("path", sa.Text, nullable=False, unique=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("calling_ae", ae, nullable=False),
        sa.Column("association_id", sa.Integer, sa.ForeignKey("associations.id")),
        sa.Column("received_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "superseded_instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("instance_id", sa.Integer, sa.ForeignKey("instances.id"), nullable=False, index=True),
        sa.Column("path", sa.Text, nullable=False, unique=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("received_at", UTCDateTime, nullable=False),
        sa.Column("superseded_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", UTCDateTime, nullable=False, index=True),
        sa.Column("kind", sa.String(48), nullable=False, index=True),
        sa.Column("calling_ae", ae),
        sa.Column("peer_host", sa.String(64)),
        sa.Column("series_instance_uid", uid),
        sa.Column("sop_instance_uid", uid),
        sa.Column("status", sa.Integer),
        sa.Column("detail", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("events", "superseded_instances", "instances", "associations", "series", "studies"):
        op.drop_table(table)
