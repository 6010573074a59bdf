"""Who is connected: edge state (online/offline/error) and last-seen times, written to the
resources' status and the mirror.

Heartbeats only touch memory; ``lastSeenAt`` is flushed at most once per ``FLUSH_SECONDS`` per
edge, and state changes (connect, disconnect, a refused config) are written at once. An ack or a
status report that changes nothing written (state, client metadata) is only a sign of life: a
config that fans out to every edge must not cost two API writes per edge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from kakuremichi import protocol
from kakuremichi.control.kube import Kube
from kakuremichi.control.mirror import Mirror
from kakuremichi.control.state import ControlState, EdgeIdentity
from kakuremichi.control.status_locks import StatusLocks
from kakuremichi.resources import AGENT, GATEWAY, EdgeState

FLUSH_SECONDS = 30.0
log = logging.getLogger(__name__)


class Presence:
    def __init__(
        self, state: ControlState, kube: Kube, mirror: Mirror, status_locks: StatusLocks
    ) -> None:
        self.state = state
        self.kube = kube
        self.mirror = mirror
        self.status_locks = status_locks
        self.online: dict[UUID, EdgeIdentity] = {}
        self.last_seen: dict[UUID, datetime] = {}
        self.flushed: dict[UUID, float] = {}
        self.written: dict[UUID, tuple[EdgeState | None, dict[str, Any]]] = {}
        """The state and client metadata last written for each edge."""

    async def connected(self, identity: EdgeIdentity, client: protocol.ClientInfo | None) -> None:
        self.online[identity.id] = identity
        self.seen(identity)
        metadata = client.model_dump(by_alias=True, exclude_none=True) if client else None
        await self._write(identity, "online", metadata)

    def seen(self, identity: EdgeIdentity) -> None:
        self.last_seen[identity.id] = datetime.now(UTC).replace(microsecond=0)

    async def disconnected(self, identity: EdgeIdentity) -> None:
        self.online.pop(identity.id, None)
        await self._write(identity, "offline")

    async def acknowledged(self, identity: EdgeIdentity, ack: protocol.AckMessage) -> None:
        await self._write_if_changed(identity, "online" if ack.ok else "error")

    async def reported(self, identity: EdgeIdentity, report: protocol.StatusReport) -> None:
        metadata = report.client.model_dump(by_alias=True, exclude_none=True)
        state: EdgeState = "error" if report.state == "error" else "online"
        await self._write_if_changed(identity, state, metadata)

    async def _write_if_changed(
        self, identity: EdgeIdentity, state: EdgeState, metadata: dict[str, Any] | None = None
    ) -> None:
        written_state, written_metadata = self.written.get(identity.id, (None, {}))
        if state == written_state and (not metadata or metadata == written_metadata):
            self.seen(identity)
            return
        await self._write(identity, state, metadata)

    async def run(self) -> None:
        """Flush last-seen times of connected edges now and then."""
        while True:
            await asyncio.sleep(FLUSH_SECONDS / 3)
            now = time.monotonic()
            for identity in list(self.online.values()):
                if now - self.flushed.get(identity.id, 0.0) >= FLUSH_SECONDS:
                    try:
                        await self._write(identity, None)
                    except Exception:
                        log.exception("writing last-seen of %s failed", identity.id)

    async def _write(
        self,
        identity: EdgeIdentity,
        state: EdgeState | None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if identity.role == "agent":
            agent = self.state.agents.get(identity.id)
            if agent is None:
                return
            kind, namespace, name = AGENT, agent.namespace, agent.name
        else:
            gateway = self.state.gateways.get(identity.id)
            if gateway is None:
                return
            kind, namespace, name = GATEWAY, "", gateway.pool
        last_seen = self.last_seen.get(identity.id)
        status: dict[str, Any] = {}
        if state is not None:
            status["state"] = state
        if last_seen is not None:
            status["lastSeenAt"] = last_seen.isoformat().replace("+00:00", "Z")
        if metadata:
            status["client"] = metadata
        self.flushed[identity.id] = time.monotonic()
        previous_state, previous_metadata = self.written.get(identity.id, (None, {}))
        self.written[identity.id] = (
            state if state is not None else previous_state,
            metadata or previous_metadata,
        )
        # Under the object's status lock: a reconcile that found the edge away and is about to
        # write "offline" finishes first, so this newer state is the one that stays.
        async with self.status_locks.of(kind, namespace, name):
            await self.kube.patch_status(kind, namespace, name, status)
        await self.mirror.set_presence(identity.role, identity.id, state, last_seen, metadata)
