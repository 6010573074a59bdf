"""The SQLite mirror: rows in the data-model document's schema, written from reconcilers.

The cluster is the source of truth, so every write here is an idempotent upsert of what a
reconciler just saw, and the ``prune_*`` methods drop rows whose objects are gone (run at start,
since deletions may have happened while the operator was away). Writes run one at a time in a
thread of their own, so a burst of them never holds the threads other blocking calls need.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from kakuremichi.control.store import (
    Agent,
    Certificate,
    Gateway,
    Tunnel,
    create_engine_for,
    session_factory,
    upgrade,
    utcnow,
)
from kakuremichi.control.topology import Route

T = TypeVar("T")


@dataclass(frozen=True)
class AgentRow:
    id: UUID
    name: str
    namespace: str
    api_key_digest: str
    wireguard_public_key: str
    virtual_ip: str
    subnet: str


@dataclass(frozen=True)
class GatewayRow:
    id: UUID
    name: str
    api_key_digest: str
    public_ip: str
    wireguard_public_key: str
    region: str | None


@dataclass(frozen=True)
class CertificateRow:
    id: UUID
    domain: str
    certificate: str
    sealed_private_key: str
    expires_at: datetime
    auto_renew: bool
    last_renewed_at: datetime | None


@dataclass(frozen=True)
class TunnelRow:
    id: UUID
    route: Route
    description: str | None


class Mirror:
    def __init__(self, url: str) -> None:
        upgrade(url)
        self._sessions = session_factory(create_engine_for(url))
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="mirror")

    async def _run(self, work: Callable[[Session], T]) -> T:
        def in_thread() -> T:
            with self._lock, self._sessions.begin() as session:
                return work(session)

        return await asyncio.get_running_loop().run_in_executor(self._writer, in_thread)

    async def upsert_agent(self, row: AgentRow) -> None:
        def work(session: Session) -> None:
            agent = session.get(Agent, row.id)
            if agent is None:
                agent = Agent(id=row.id, status="offline")
                session.add(agent)
            agent.name = row.name
            agent.api_key = row.api_key_digest
            agent.wireguard_public_key = row.wireguard_public_key
            agent.virtual_ip = row.virtual_ip
            agent.subnet = row.subnet
            agent.metadata_ = {**(agent.metadata_ or {}), "namespace": row.namespace}
            agent.updated_at = utcnow()

        await self._run(work)

    async def delete_agent(self, agent_id: UUID) -> None:
        """Remove the agent's row; its tunnels' rows go with it (ON DELETE CASCADE)."""
        await self._run(lambda session: session.execute(delete(Agent).where(Agent.id == agent_id)))

    async def prune(
        self, table: type[Agent | Gateway | Certificate], keep: Collection[UUID]
    ) -> int:
        """Delete the rows of ``table`` whose ids are not in ``keep``; returns how many."""

        def work(session: Session) -> int:
            wanted = set(keep)
            ids = [i for i in session.scalars(select(table.id)) if i not in wanted]
            if ids:
                session.execute(delete(table).where(table.id.in_(ids)))
            return len(ids)

        return await self._run(work)

    async def agent_row(self, agent_id: UUID) -> dict[str, Any] | None:
        """The row as stored (for status queries and tests)."""

        def work(session: Session) -> dict[str, Any] | None:
            agent = session.get(Agent, agent_id)
            if agent is None:
                return None
            return {c.key: getattr(agent, c.key) for c in Agent.__mapper__.column_attrs}

        return await self._run(work)

    async def sync_certificates(self, rows: Collection[CertificateRow]) -> None:
        """Make the certificates table hold exactly ``rows`` (the certificates being served)."""

        def work(session: Session) -> None:
            wanted = {row.id: row for row in rows}
            existing = {c.id: c for c in session.scalars(select(Certificate))}
            for certificate_id, certificate in existing.items():
                if certificate_id not in wanted:
                    session.delete(certificate)
            session.flush()
            for row in wanted.values():
                certificate = existing.get(row.id) or Certificate(id=row.id)
                certificate.domain = row.domain
                certificate.certificate = row.certificate
                certificate.private_key = row.sealed_private_key
                certificate.expires_at = row.expires_at
                certificate.auto_renew = row.auto_renew
                certificate.last_renewed_at = row.last_renewed_at
                session.add(certificate)

        await self._run(work)

    async def sync_tunnels(self, rows: Collection[TunnelRow]) -> None:
        """Make the tunnels table hold exactly ``rows`` (the routes being served)."""

        def work(session: Session) -> None:
            wanted = {row.id: row for row in rows}
            existing = {tunnel.id: tunnel for tunnel in session.scalars(select(Tunnel))}
            for tunnel_id, tunnel in existing.items():
                if tunnel_id not in wanted:
                    session.delete(tunnel)
            session.flush()
            for row in wanted.values():
                # From the rows just read: a new one is not looked up (a query each).
                tunnel = existing.get(row.id) or Tunnel(id=row.id)
                tunnel.domain = row.route.domain
                assert row.route.agent_id is not None  # (rows are of routes to an agent)
                tunnel.agent_id = row.route.agent_id
                tunnel.target = row.route.target
                tunnel.enabled = row.route.enabled
                tunnel.protocol = row.route.protocol
                tunnel.port = row.route.port
                tunnel.description = row.description
                session.add(tunnel)

        await self._run(work)

    async def set_presence(
        self,
        role: str,
        edge_id: UUID,
        state: str | None,
        last_seen: datetime | None,
        metadata: dict[str, Any] | None,
    ) -> None:
        def work(session: Session) -> None:
            row: Agent | Gateway | None = (
                session.get(Agent, edge_id) if role == "agent" else session.get(Gateway, edge_id)
            )
            if row is None:
                return
            if state is not None:
                row.status = state
            if last_seen is not None:
                row.last_seen_at = last_seen
            if metadata:
                row.metadata_ = {**(row.metadata_ or {}), **metadata}

        await self._run(work)

    async def upsert_gateway(self, row: GatewayRow) -> None:
        def work(session: Session) -> None:
            # public_ip is unique: a row another instance left for this address gives way.
            session.execute(
                delete(Gateway).where(Gateway.public_ip == row.public_ip, Gateway.id != row.id)
            )
            gateway = session.get(Gateway, row.id) or Gateway(id=row.id, status="offline")
            gateway.name = row.name
            gateway.api_key = row.api_key_digest
            gateway.public_ip = row.public_ip
            gateway.wireguard_public_key = row.wireguard_public_key
            gateway.region = row.region
            session.add(gateway)

        await self._run(work)

    async def delete_gateway(self, gateway_id: UUID) -> None:
        await self._run(
            lambda session: session.execute(delete(Gateway).where(Gateway.id == gateway_id))
        )
