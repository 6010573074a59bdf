"""ORM schema of the SQLite mirror: ``agents``, ``gateways``, ``tunnels``, ``certificates``.

The tables follow ``data-model.ja.md`` column for column (snake_case names, NOT NULL exactly
where the document marks a column as required, the Drizzle sketch's VARCHAR lengths) and add
nothing else, so the document stays the single description of the data.

Things the document does not say, decided here:

* **ids are Kubernetes object UIDs.** The cluster is the source of truth and this database is
  a mirror that can be rebuilt from it; keying each row by the UID of the object it mirrors
  makes that rebuild idempotent and lets an object and its row be matched without a lookup
  table. The ORM therefore generates no ids: callers must pass the UID. Stored as canonical
  lower-case 36-character text so that the file is readable with the ``sqlite3`` shell.
* **``api_key`` holds a keyed digest, never the key** (see
  :mod:`kakuremichi.control.store.sealing`).
  The digest is deterministic, so the UNIQUE index and lookup-by-key still work, but a copied
  database file does not hand out working credentials.
* **``certificates.private_key`` holds a sealed (AES-GCM encrypted) value**, not PEM. The
  document allows plaintext for the MVP; sealing costs nothing and removes that exposure.
* **Timestamps are timezone-aware UTC in Python** and stored as naive UTC text; naive
  datetimes are rejected on write because their meaning would depend on the host's zone.
* **``tunnels.agent_id`` cascades on delete:** a tunnel cannot exist without its agent (the
  column is required), and in the cluster deleting the owner garbage-collects its tunnels.
* ``status`` is VARCHAR(16) with a named CHECK instead of a native enum (SQLite has none), so
  adding a value is a plain migration.

Any change here needs a matching Alembic revision in ``store/migrations/versions``; the test
suite fails when the two drift apart.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "STATUS_VALUES",
    "Agent",
    "Base",
    "Certificate",
    "Gateway",
    "Tunnel",
    "UTCDateTime",
    "UUIDText",
    "utcnow",
]

STATUS_VALUES: Final = ("online", "offline", "error")
"""Allowed values of the ``status`` columns (enforced by a CHECK constraint)."""

_STATUS_CHECK: Final = "status IN ('online','offline','error')"
_NOW: Final = text("CURRENT_TIMESTAMP")

# Safety net only: every constraint and index below is named explicitly, but a convention
# guarantees that anything added later still gets a stable name, which SQLite batch
# migrations (copy-and-move of tables) need in order to find constraints again.
NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Current time as an aware UTC datetime (the only kind the timestamp columns accept)."""
    return datetime.now(UTC)


class UUIDText(TypeDecorator[uuid.UUID]):
    """UUID stored as canonical 36-character lower-case text, seen as :class:`uuid.UUID`.

    SQLAlchemy's own ``Uuid`` type stores 32 hex digits without dashes on SQLite; Kubernetes
    UIDs are conventionally written with dashes, so this keeps the file greppable by UID.
    Strings are accepted on write and canonicalised, so upper-case input cannot create a
    second spelling of the same id.
    """

    impl = String
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(length=36)

    def process_bind_param(self, value: uuid.UUID | str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = uuid.UUID(value)
        return str(value)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> uuid.UUID | None:
        if value is None:
            return None
        return uuid.UUID(str(value))


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetime in Python, naive UTC in storage.

    SQLite has no time-zone-aware type; normalising to UTC on write and re-attaching UTC on
    read makes values comparable both in SQL (text order) and in Python.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            msg = f"naive datetime {value!r} is ambiguous; pass an aware datetime (UTC)"
            raise ValueError(msg)
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base holding the metadata shared with the Alembic environment."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Agent(Base):
    """Edge client on the origin side (mirrors an Agent resource)."""

    __tablename__ = "agents"

    id: Mapped[uuid.UUID] = mapped_column(UUIDText(), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    api_key: Mapped[str] = mapped_column(String(64), nullable=False)
    wireguard_public_key: Mapped[str] = mapped_column(String(256), nullable=False)
    virtual_ip: Mapped[str] = mapped_column(String(15), nullable=False)
    subnet: Mapped[str] = mapped_column(String(18), nullable=False)
    status: Mapped[str] = mapped_column(
        String(16), nullable=False, default="offline", server_default="offline"
    )
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column(
        "metadata", JSON(none_as_null=True), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, server_default=_NOW
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, onupdate=utcnow, server_default=_NOW
    )

    tunnels: Mapped[list[Tunnel]] = relationship(
        back_populates="agent", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        CheckConstraint(_STATUS_CHECK, name="ck_agents_status"),
        Index("uq_agents_api_key", "api_key", unique=True),
        Index("uq_agents_wireguard_public_key", "wireguard_public_key", unique=True),
        Index("uq_agents_virtual_ip", "virtual_ip", unique=True),
        Index("uq_agents_subnet", "subnet", unique=True),
    )


class Gateway(Base):
    """Ingress node receiving public traffic (mirrors a Gateway resource)."""

    __tablename__ = "gateways"

    id: Mapped[uuid.UUID] = mapped_column(UUIDText(), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    api_key: Mapped[str] = mapped_column(String(64), nullable=False)
    public_ip: Mapped[str] = mapped_column(String(15), nullable=False)
    wireguard_public_key: Mapped[str] = mapped_column(String(256), nullable=False)
    region: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status: Mapped[str] = mapped_column(
        String(16), nullable=False, default="offline", server_default="offline"
    )
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column(
        "metadata", JSON(none_as_null=True), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, server_default=_NOW
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, onupdate=utcnow, server_default=_NOW
    )

    __table_args__ = (
        CheckConstraint(_STATUS_CHECK, name="ck_gateways_status"),
        Index("uq_gateways_api_key", "api_key", unique=True),
        Index("uq_gateways_public_ip", "public_ip", unique=True),
        Index("uq_gateways_wireguard_public_key", "wireguard_public_key", unique=True),
    )


class Tunnel(Base):
    """Route from a public domain to a target behind an agent (mirrors a Tunnel resource)."""

    __tablename__ = "tunnels"

    id: Mapped[uuid.UUID] = mapped_column(UUIDText(), primary_key=True)
    domain: Mapped[str] = mapped_column(String(255), nullable=False)
    agent_id: Mapped[uuid.UUID] = mapped_column(
        UUIDText(),
        ForeignKey("agents.id", name="fk_tunnels_agent_id_agents", ondelete="CASCADE"),
        nullable=False,
    )
    target: Mapped[str] = mapped_column(String(255), nullable=False)
    enabled: Mapped[bool] = mapped_column(
        Boolean(), nullable=False, default=True, server_default=true()
    )
    description: Mapped[str | None] = mapped_column(Text(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, server_default=_NOW
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, onupdate=utcnow, server_default=_NOW
    )
    # Beyond the document (docs/departures.md): what the gateways serve the domain as, and a
    # TCP or UDP tunnel's public port.
    protocol: Mapped[str] = mapped_column(
        String(8), nullable=False, default="HTTP", server_default="HTTP"
    )
    port: Mapped[int | None] = mapped_column(Integer(), nullable=True)

    agent: Mapped[Agent] = relationship(back_populates="tunnels")

    __table_args__ = (
        Index("uq_tunnels_domain", "domain", unique=True),
        Index("ix_tunnels_agent_id", "agent_id"),
    )


class Certificate(Base):
    """TLS certificate for a tunnel's domain; ``private_key`` is sealed, not PEM."""

    __tablename__ = "certificates"

    id: Mapped[uuid.UUID] = mapped_column(UUIDText(), primary_key=True)
    domain: Mapped[str] = mapped_column(String(255), nullable=False)
    certificate: Mapped[str] = mapped_column(Text(), nullable=False)
    private_key: Mapped[str] = mapped_column(Text(), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    auto_renew: Mapped[bool] = mapped_column(
        Boolean(), nullable=False, default=True, server_default=true()
    )
    last_renewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, server_default=_NOW
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, onupdate=utcnow, server_default=_NOW
    )

    __table_args__ = (
        Index("uq_certificates_domain", "domain", unique=True),
        Index("ix_certificates_expires_at", "expires_at"),
    )
