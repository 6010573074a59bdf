"""Writes what follows from the whole state: Tunnel conditions and the tunnels table.

It waits for the state to change, lets a burst of changes settle for a moment, then writes only
what differs from what it wrote before, so a steady cluster costs no API calls.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from uuid import UUID

from kakuremichi.conditions import READY, Condition, set_ready
from kakuremichi.control.context import Context
from kakuremichi.control.mirror import TunnelRow
from kakuremichi.resources import TUNNEL
from kakuremichi.tunnel_readiness import TunnelFacts, TunnelVerdict, verdicts

SETTLE_SECONDS = 0.05
RETRY_SECONDS = 2.0
log = logging.getLogger(__name__)


class Projector:
    def __init__(self, context: Context) -> None:
        self.context = context
        self.written: dict[UUID, tuple[TunnelVerdict, int, list[Condition]]] = {}

    async def run(self) -> None:
        seen = -1
        while True:
            seen = await self.context.state.changed(seen)
            await asyncio.sleep(SETTLE_SECONDS)
            try:
                await self.project()
            except Exception:  # keep projecting: try again shortly, not only on a next change
                log.exception("projecting tunnel status failed; retrying")
                await asyncio.sleep(RETRY_SECONDS)
                seen = -1

    async def _event(self, tunnel: TunnelFacts, verdict: TunnelVerdict) -> None:
        """An Event for each transition, so ``kubectl describe tunnel`` tells the story."""
        try:
            await self.context.kube.post_event(
                TUNNEL, tunnel.namespace, tunnel.name, str(tunnel.id),
                warning=verdict.status != "True", reason=verdict.reason, message=verdict.message,
            )  # fmt: skip
        except Exception:  # an Event is worth a log line, not a failed projection
            log.warning("could not post an Event for Tunnel %s/%s", tunnel.namespace, tunnel.name)

    async def project(self) -> None:
        state = self.context.state
        tunnels = dict(state.tunnels)
        results = verdicts(tunnels, state.agents, state.certificate_verdicts)
        for tunnel_id, verdict in results.items():
            tunnel = tunnels[tunnel_id]
            previous = self.written.get(tunnel_id)
            if previous and previous[0] == verdict and previous[1] == tunnel.generation:
                continue
            conditions = set_ready(
                previous[2] if previous else state.tunnel_conditions.get(tunnel_id, []),
                verdict.status, verdict.reason, verdict.message, tunnel.generation,
            )  # fmt: skip
            status: dict[str, Any] = {
                "conditions": [
                    c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in conditions
                ],
                "observedGeneration": tunnel.generation,
                "url": verdict.url,
                "certificate": tunnel.certificate,
            }
            if await self.context.kube.patch_status(TUNNEL, tunnel.namespace, tunnel.name, status):
                self.written[tunnel_id] = (verdict, tunnel.generation, conditions)
                seeded = state.tunnel_conditions.get(tunnel_id, [])
                prior = (
                    previous[0].reason
                    if previous
                    else next((c.reason for c in seeded if c.type == READY), None)
                )
                if prior != verdict.reason:
                    await self._event(tunnel, verdict)
        for gone in set(self.written) - set(tunnels):
            del self.written[gone]
        served = state.topology().served_routes()
        by_claim = {t.claim: t for t in tunnels.values()}
        await self.context.mirror.sync_tunnels(
            [TunnelRow(by_claim[r.claim].id, r, by_claim[r.claim].description) for r in served]
        )
