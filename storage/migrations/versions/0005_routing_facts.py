"""Instances keep the header facts routing decides on (core.images.ImageFacts as JSON), and a
series routing processed none of says why (issue 18).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("facts", sa.Text, nullable=False, server_default=""))
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("skip_reason", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("skip_reason")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("facts")
