"""Deliveries: each job's output (and, when a route forwards them, its source instances) to
each destination, with per-instance C-STORE results.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from storage.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("destinations", sa.Text, nullable=False, server_default="[]"))
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False, index=True),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("next_attempt_at", UTCDateTime),
        sa.Column("started_at", UTCDateTime),
        sa.Column("heartbeat_at", UTCDateTime),
        sa.Column("finished_at", UTCDateTime),
        sa.Column("sender", sa.String(128)),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.Column("stored_count", sa.Integer, nullable=False),
        sa.Column("warning_count", sa.Integer, nullable=False),
    )
    op.create_index("ix_deliveries_state", "deliveries", ["state", "id"])
    op.create_index("ux_deliveries_job_destination_kind", "deliveries", ["job_id", "destination", "kind"], unique=True)
    op.create_table(
        "delivery_instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("delivery_id", sa.Integer, sa.ForeignKey("deliveries.id"), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status", sa.Integer),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("updated_at", UTCDateTime),
    )
    op.create_index("ux_delivery_instances", "delivery_instances", ["delivery_id", "sop_instance_uid"], unique=True)


def downgrade() -> None:
    op.drop_table("delivery_instances")
    op.drop_table("deliveries")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("destinations")
