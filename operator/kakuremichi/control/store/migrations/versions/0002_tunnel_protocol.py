"""Tunnels: the protocol the gateways serve the domain as, and a TCP or UDP tunnel's port.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06

Rows of older releases were all HTTP tunnels (the server default says so). SQLite cannot add a
column with a default in place the way the ORM declares it, so the table is rebuilt (batch mode).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamps() -> tuple[sa.Column[object], ...]:
    """As 0001 declared them (reflection would read their default back in parentheses)."""
    return tuple(
        sa.Column(name, sa.DateTime(), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False)
        for name in ("created_at", "updated_at")
    )


def upgrade() -> None:
    with op.batch_alter_table("tunnels", recreate="always", reflect_args=_timestamps()) as batch:
        batch.add_column(
            sa.Column("protocol", sa.String(length=8), server_default="HTTP", nullable=False)
        )
        batch.add_column(sa.Column("port", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tunnels", recreate="always", reflect_args=_timestamps()) as batch:
        batch.drop_column("port")
        batch.drop_column("protocol")
