"""API keys: which came from config (reconciled at start-up), and per-key limits.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.add_column(
            sa.Column("from_config", sa.Boolean, nullable=False, server_default=sa.false())
        )
        table.add_column(sa.Column("requests_per_minute", sa.Integer, nullable=True))
        table.add_column(sa.Column("tokens_per_minute", sa.Integer, nullable=True))
        table.add_column(sa.Column("concurrent_requests", sa.Integer, nullable=True))
    # Keys stored from config by an older version cannot be told apart from others: they
    # stay as they are (from_config false) until the config names them again.


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.drop_column("concurrent_requests")
        table.drop_column("tokens_per_minute")
        table.drop_column("requests_per_minute")
        table.drop_column("from_config")
