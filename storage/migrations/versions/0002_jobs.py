"""Jobs: one per routed series (and generation), claimed by workers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

from storage.schema import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("series_id", sa.Integer, sa.ForeignKey("series.id"), nullable=False, index=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(32)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("queued_at", UTCDateTime, nullable=False),
        sa.Column("not_before", UTCDateTime),
        sa.Column("started_at", UTCDateTime),
        sa.Column("heartbeat_at", UTCDateTime),
        sa.Column("finished_at", UTCDateTime),
        sa.Column("worker", sa.String(128)),
        sa.Column("backend", sa.String(32)),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("output_series_uid", sa.String(64)),
        sa.Column("output_count", sa.Integer, nullable=False),
        sa.Column("timings", sa.Text, nullable=False),
    )
    op.create_index("ix_jobs_state", "jobs", ["state", "id"])
    op.create_index("ux_jobs_series_route_generation", "jobs", ["series_id", "route", "generation"], unique=True)


def downgrade() -> None:
    op.drop_table("jobs")
