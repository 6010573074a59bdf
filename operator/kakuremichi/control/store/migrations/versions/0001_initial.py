"""Initial schema: agents, gateways, tunnels, certificates (data-model.ja.md, MVP).

Revision ID: 0001
Revises:
Create Date: 2025-11-28

Written by hand to match ``kakuremichi.control.store.schema``. Plain SQLAlchemy types are used on
purpose (VARCHAR(36) for UUIDs, DATETIME for UTC timestamps) so this file keeps meaning the
same thing when the ORM's Python-side type decorators change.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUS_CHECK = "status IN ('online','offline','error')"


def _timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column(
            "created_at", sa.DateTime(), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
    ]


def upgrade() -> None:
    """Create the four MVP tables with their indexes."""
    op.create_table(
        "agents",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("api_key", sa.String(length=64), nullable=False),
        sa.Column("wireguard_public_key", sa.String(length=256), nullable=False),
        sa.Column("virtual_ip", sa.String(length=15), nullable=False),
        sa.Column("subnet", sa.String(length=18), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="offline", nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        *_timestamps(),
        sa.CheckConstraint(_STATUS_CHECK, name="ck_agents_status"),
        sa.PrimaryKeyConstraint("id", name="pk_agents"),
    )
    op.create_index("uq_agents_api_key", "agents", ["api_key"], unique=True)
    op.create_index(
        "uq_agents_wireguard_public_key", "agents", ["wireguard_public_key"], unique=True
    )
    op.create_index("uq_agents_virtual_ip", "agents", ["virtual_ip"], unique=True)
    op.create_index("uq_agents_subnet", "agents", ["subnet"], unique=True)

    op.create_table(
        "gateways",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("api_key", sa.String(length=64), nullable=False),
        sa.Column("public_ip", sa.String(length=15), nullable=False),
        sa.Column("wireguard_public_key", sa.String(length=256), nullable=False),
        sa.Column("region", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="offline", nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        *_timestamps(),
        sa.CheckConstraint(_STATUS_CHECK, name="ck_gateways_status"),
        sa.PrimaryKeyConstraint("id", name="pk_gateways"),
    )
    op.create_index("uq_gateways_api_key", "gateways", ["api_key"], unique=True)
    op.create_index("uq_gateways_public_ip", "gateways", ["public_ip"], unique=True)
    op.create_index(
        "uq_gateways_wireguard_public_key", "gateways", ["wireguard_public_key"], unique=True
    )

    op.create_table(
        "tunnels",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("domain", sa.String(length=255), nullable=False),
        sa.Column("agent_id", sa.String(length=36), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        *_timestamps(),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name="fk_tunnels_agent_id_agents", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_tunnels"),
    )
    op.create_index("uq_tunnels_domain", "tunnels", ["domain"], unique=True)
    op.create_index("ix_tunnels_agent_id", "tunnels", ["agent_id"], unique=False)

    op.create_table(
        "certificates",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("domain", sa.String(length=255), nullable=False),
        sa.Column("certificate", sa.Text(), nullable=False),
        sa.Column("private_key", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("auto_renew", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("last_renewed_at", sa.DateTime(), nullable=True),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="pk_certificates"),
    )
    op.create_index("uq_certificates_domain", "certificates", ["domain"], unique=True)
    op.create_index("ix_certificates_expires_at", "certificates", ["expires_at"], unique=False)


def downgrade() -> None:
    """Drop everything, children first."""
    op.drop_index("ix_certificates_expires_at", table_name="certificates")
    op.drop_index("uq_certificates_domain", table_name="certificates")
    op.drop_table("certificates")
    op.drop_index("ix_tunnels_agent_id", table_name="tunnels")
    op.drop_index("uq_tunnels_domain", table_name="tunnels")
    op.drop_table("tunnels")
    op.drop_index("uq_gateways_wireguard_public_key", table_name="gateways")
    op.drop_index("uq_gateways_public_ip", table_name="gateways")
    op.drop_index("uq_gateways_api_key", table_name="gateways")
    op.drop_table("gateways")
    op.drop_index("uq_agents_subnet", table_name="agents")
    op.drop_index("uq_agents_virtual_ip", table_name="agents")
    op.drop_index("uq_agents_wireguard_public_key", table_name="agents")
    op.drop_index("uq_agents_api_key", table_name="agents")
    op.drop_table("agents")
