"""Who is connected: edge state (online/offline/error) and last-seen times, written to the
resources' status and the mirror.

Heartbeats only touch memory; ``lastSeenAt`` is flushed at most once per ``FLUSH_SECONDS`` per
edge, and state changes (connect, disconnect, a refused config) are written as soon as the
writer gets to them. An ack or a status report that changes nothing written (state, client
metadata) is only a sign of life: a config that fans out to every edge must not cost two API
writes per edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from kakuremichi.api import protocol
from kakuremichi.api.resources import AGENT, GATEWAY, EdgeState
from kakuremichi.control.mirror import Mirror
from kakuremichi.control.state import ControlState, EdgeIdentity
from kakuremichi.control.status_writer import StatusWriter

FLUSH_SECONDS = 30.0
RETRY_SECONDS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
"""Waits between attempts while the API server refuses or is away."""
SETTLE_POLL_SECONDS = 0.5
log = logging.getLogger(__name__)


@dataclass
class Wanted:
    """What an edge's status should say next: the newest state and client metadata, merged."""

    identity: EdgeIdentity
    state: EdgeState | None = None
    metadata: dict[str, Any] | None = None

    def then(self, newer: Wanted) -> Wanted:
        return Wanted(
            newer.identity,
            newer.state if newer.state is not None else self.state,
            newer.metadata or self.metadata,
        )


class Presence:
    """Facts come in from the channel's sessions without waiting (``connected``, ``reported``
    ...); one writer task turns them into status and mirror writes, coalesced per edge (the
    newest state wins), retried with backoff while the API server is away. A session never
    waits on the API server: connected edges stay connected through an outage, and statuses
    catch up when it returns."""

    def __init__(self, state: ControlState, mirror: Mirror, statuses: StatusWriter) -> None:
        self.state = state
        self.mirror = mirror
        self.statuses = statuses
        self.online: dict[UUID, EdgeIdentity] = {}
        self.last_seen: dict[UUID, datetime] = {}
        self.flushed: dict[UUID, float] = {}
        self.written: dict[UUID, tuple[EdgeState | None, dict[str, Any]]] = {}
        """The state and client metadata last written for each edge."""
        self.pending: dict[UUID, Wanted] = {}
        """Writes not done yet, one per edge."""
        self.wake = asyncio.Event()
        self.failures = 0

    def connected(self, identity: EdgeIdentity, client: protocol.ClientInfo | None) -> None:
        self.online[identity.id] = identity
        if identity.role == "agent":
            self.state.agent_connected(identity.id, True)
        self.seen(identity)
        metadata = client.model_dump(by_alias=True, exclude_none=True) if client else None
        self._want(Wanted(identity, "online", metadata))

    def seen(self, identity: EdgeIdentity) -> None:
        self.last_seen[identity.id] = datetime.now(UTC).replace(microsecond=0)

    def disconnected(self, identity: EdgeIdentity) -> None:
        self.online.pop(identity.id, None)
        if identity.role == "agent":
            self.state.agent_connected(identity.id, False)
        else:
            self.state.gateway_ports_unavailable(identity.id, ())
        self._want(Wanted(identity, "offline"))

    def acknowledged(self, identity: EdgeIdentity, ack: protocol.AckMessage) -> None:
        self._want_if_changed(identity, "online" if ack.ok else "error")

    def reported(self, identity: EdgeIdentity, report: protocol.StatusReport) -> None:
        if identity.role == "gateway":
            self.state.gateway_ports_unavailable(identity.id, tuple(report.unavailable_ports))
        metadata = report.client.model_dump(by_alias=True, exclude_none=True)
        state: EdgeState = "error" if report.state == "error" else "online"
        self._want_if_changed(identity, state, metadata)

    def _want_if_changed(
        self, identity: EdgeIdentity, state: EdgeState, metadata: dict[str, Any] | None = None
    ) -> None:
        queued = self.pending.get(identity.id)
        if queued is not None:
            current_state, current_metadata = queued.state, queued.metadata or {}
        else:
            current_state, current_metadata = self.written.get(identity.id, (None, {}))
        if state == current_state and (not metadata or metadata == current_metadata):
            self.seen(identity)
            return
        self._want(Wanted(identity, state, metadata))

    def _want(self, wanted: Wanted) -> None:
        queued = self.pending.get(wanted.identity.id)
        self.pending[wanted.identity.id] = queued.then(wanted) if queued else wanted
        self.wake.set()

    async def run(self) -> None:
        """Write what is pending, and last-seen times of connected edges now and then."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), FLUSH_SECONDS / 3)
            self.wake.clear()
            now = time.monotonic()
            for identity in list(self.online.values()):
                if now - self.flushed.get(identity.id, 0.0) >= FLUSH_SECONDS:
                    self._want(Wanted(identity))
                    self.wake.clear()
            if await self.flush():
                self.failures = 0
            else:
                delay = RETRY_SECONDS[min(self.failures, len(RETRY_SECONDS) - 1)]
                self.failures += 1
                await asyncio.sleep(delay)
                self.wake.set()

    async def flush(self) -> bool:
        """Write everything pending; False when the API server failed a write (what failed
        stays pending, merged under anything newer)."""
        for edge_id in list(self.pending):
            wanted = self.pending.pop(edge_id, None)
            if wanted is None:
                continue
            try:
                await self._write(wanted)
            except Exception as error:
                log.warning("writing the status of %s %s failed (retrying): %s",
                            wanted.identity.role, edge_id, error)  # fmt: skip
                newer = self.pending.get(edge_id)
                self.pending[edge_id] = wanted.then(newer) if newer else wanted
                return False
        return True

    async def _write(self, wanted: Wanted) -> None:
        identity, state, metadata = wanted.identity, wanted.state, wanted.metadata
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
        # Under the object's status lock: a reconcile that found the edge away and is about to
        # write "offline" finishes first, so this newer state is the one that stays.
        await self.statuses.write(kind, namespace, name, status)
        await self.mirror.set_presence(identity.role, identity.id, state, last_seen, metadata)
        self.flushed[identity.id] = time.monotonic()
        previous_state, previous_metadata = self.written.get(identity.id, (None, {}))
        self.written[identity.id] = (
            state if state is not None else previous_state,
            metadata or previous_metadata,
        )


async def settle_after_start(state: ControlState, heartbeat_timeout: float) -> None:
    """After the startup window and one heartbeat timeout more, every edge that still runs has
    reconnected: an Agent not connected by then is away (its Tunnels say AgentOffline)."""
    while state.startup.open:  # noqa: ASYNC110 - it closes by time as well as by events
        await asyncio.sleep(SETTLE_POLL_SECONDS)
    await asyncio.sleep(heartbeat_timeout)
    state.settle_presence()
