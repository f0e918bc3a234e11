"""Jobs record the route's denoising strength and QA policy (set at routing) and the QA
figures the worker measured (issue 17).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("strength", sa.String(16), nullable=False, server_default="high"))
        batch.add_column(sa.Column("on_qa_fail", sa.String(32), nullable=False, server_default="fail"))
        batch.add_column(sa.Column("qa", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("qa")
        batch.drop_column("on_qa_fail")
        batch.drop_column("strength")
