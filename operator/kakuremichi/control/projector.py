"""Writes what follows from the whole state: Tunnel conditions and the tunnels table, both
projections of the state's snapshot (:mod:`kakuremichi.control.snapshot`).

It waits for the state to change, lets a burst of changes settle for a moment, then writes only
what differs from what it wrote before, so a steady cluster costs no API calls. The tunnels table
is synced first (one transaction), then the statuses are patched a few at a time.

A Tunnel that was just created, or every Tunnel right after a start (their claims are restored
before any reconcile), has a Certificate nobody has looked at yet; for a short while
(:data:`PENDING_GRACE_SECONDS`) it gets no ``CertificatePending`` condition, since the
Certificate's own reconcile normally decides within that time: that saves each new Tunnel a
status write and a Warning Event that would be stale a moment later, and a restart a flap of
every Tunnel's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from kakuremichi.api.conditions import READY, Condition, find_condition, set_ready
from kakuremichi.api.resources import TUNNEL, TunnelStatus
from kakuremichi.control.context import Context
from kakuremichi.control.mirror import CertificateRow, TunnelRow
from kakuremichi.control.ownership import TunnelFacts
from kakuremichi.control.store import Sealer
from kakuremichi.control.tunnel_readiness import TunnelVerdict

SETTLE_SECONDS = 0.05
RETRY_SECONDS = 2.0
PENDING_GRACE_SECONDS = 60.0
"""Long enough for a burst of thousands of new Tunnels: under such load a Certificate waits its
turn for tens of seconds, and a ``CertificatePending`` write (and Warning Event) per Tunnel in the
meantime doubled the writes the burst costs."""
CONCURRENT_WRITES = 16
WRITES_PER_PASS = 512
"""A pass writes at most this many statuses, then the next begins at once: the tunnels table is
synced at the start of every pass, and a pass of thousands of writes held it (and the verdicts
being written) back for a minute during a burst."""
PENDING = "CertificatePending"
log = logging.getLogger(__name__)
Written = tuple[TunnelVerdict, int, list[Condition]]
Write = tuple[TunnelFacts, TunnelVerdict, Written | None, list[Condition]]


def claim_proof(sealer: Sealer, tunnel: TunnelFacts, since: datetime) -> str:
    """A keyed digest of the claim, so a date written into status by anyone else (status is
    not always the operator's alone) is not believed at the next start."""
    return sealer.digest_api_key(f"claim:{tunnel.id}:{tunnel.domain}:{since.isoformat()}")


def restored_claim(sealer: Sealer, tunnel: TunnelFacts, status: TunnelStatus) -> datetime | None:
    """The claim date the Tunnel's status holds, when the operator wrote it."""
    claim = status.claim
    if claim is None:
        return None
    since = claim.since if claim.since.tzinfo else claim.since.replace(tzinfo=UTC)
    expected = claim_proof(sealer, tunnel, since)
    return since if hmac.compare_digest(expected.encode(), claim.proof.encode()) else None


class Projector:
    def __init__(self, context: Context) -> None:
        self.context = context
        self.written: dict[UUID, tuple[TunnelVerdict, int, list[Condition]]] = {}
        self.first_seen: dict[UUID, float] = {}
        self.certificate_rows: tuple[CertificateRow, ...] | None = None

    async def run(self) -> None:
        seen = -1
        due: float | None = None
        while True:
            if due is None:
                seen = await self.context.state.changed(seen)
            else:  # a held-back Tunnel's grace ends: look again even without a change
                with contextlib.suppress(TimeoutError):
                    seen = await asyncio.wait_for(
                        self.context.state.changed(seen), max(0.0, due - time.monotonic())
                    )
            await asyncio.sleep(SETTLE_SECONDS)
            try:
                due = await self.project()
            except Exception:  # keep projecting: try again shortly, not only on a next change
                log.exception("projecting tunnel status failed; retrying")
                await asyncio.sleep(RETRY_SECONDS)
                seen, due = -1, None

    async def _event(self, tunnel: TunnelFacts, verdict: TunnelVerdict) -> None:
        """An Event for each transition, so ``kubectl describe tunnel`` tells the story."""
        try:
            await self.context.kube.post_event(
                TUNNEL, tunnel.namespace, tunnel.name, str(tunnel.id),
                warning=verdict.status != "True", reason=verdict.reason, message=verdict.message,
            )  # fmt: skip
        except Exception:  # an Event is worth a log line, not a failed projection
            log.warning("could not post an Event for Tunnel %s/%s", tunnel.namespace, tunnel.name)

    async def project(self) -> float | None:
        """One pass; returns when the earliest held-back Tunnel is due (monotonic), if any."""
        state = self.context.state
        snapshot = state.snapshot()
        tunnels = snapshot.facts.tunnels
        state.record_claims(snapshot.ownership)
        # The tables first: one transaction each, and they need not wait for the API writes.
        await self.context.mirror.sync_tunnels(
            [TunnelRow(r.tunnel_id, r.route, r.description) for r in snapshot.tunnel_rows]
        )
        rows = tuple(
            state.certificate_rows[key]
            for key in sorted(key for key, _ in snapshot.served_certificates.values())
            if key in state.certificate_rows
        )
        if rows != self.certificate_rows:  # (a sealed key differs at each sealing: only news)
            await self.context.mirror.sync_certificates(rows)
            self.certificate_rows = rows
        results = snapshot.verdicts
        now = time.monotonic()
        due: float | None = None
        writes: list[Write] = []  # (tunnel, verdict, what was written before, seeded conditions)
        for tunnel_id, verdict in results.items():
            tunnel = tunnels[tunnel_id]
            previous = self.written.get(tunnel_id)
            if previous and previous[0] == verdict and previous[1] == tunnel.generation:
                continue
            seeded = state.tunnel_conditions.get(tunnel_id, [])
            if verdict.reason == PENDING and previous is None:
                held_until = self.first_seen.setdefault(tunnel_id, now) + PENDING_GRACE_SECONDS
                if now < held_until:
                    due = held_until if due is None else min(due, held_until)
                    continue
            writes.append((tunnel, verdict, previous, seeded))
        for gone in set(self.first_seen) - set(tunnels):
            del self.first_seen[gone]
        for gone in set(self.written) - set(tunnels):
            del self.written[gone]
        if len(writes) > WRITES_PER_PASS:
            writes, due = writes[:WRITES_PER_PASS], now  # the rest in the next pass, at once
        limit = asyncio.Semaphore(CONCURRENT_WRITES)

        async def bounded(write: Write) -> None:
            async with limit:
                await self._write(*write)

        outcomes = await asyncio.gather(*(bounded(w) for w in writes), return_exceptions=True)
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            raise failure
        return due

    async def _write(
        self,
        tunnel: TunnelFacts,
        verdict: TunnelVerdict,
        previous: tuple[TunnelVerdict, int, list[Condition]] | None,
        seeded: list[Condition],
    ) -> None:
        conditions = set_ready(
            previous[2] if previous else seeded,
            verdict.status, verdict.reason, verdict.message, tunnel.generation,
        )  # fmt: skip
        status: dict[str, Any] = {
            "conditions": [
                c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in conditions
            ],
            "observedGeneration": tunnel.generation,
            "url": verdict.url,
            "certificate": tunnel.certificate if tunnel.protocol == "HTTP" else None,
            "claim": None
            if verdict.claimed_since is None
            else {
                "since": verdict.claimed_since.isoformat(),
                "proof": claim_proof(self.context.state.sealer, tunnel, verdict.claimed_since),
            },
        }
        if await self.context.statuses.write(TUNNEL, tunnel.namespace, tunnel.name, status):
            self.written[tunnel.id] = (verdict, tunnel.generation, conditions)
            prior = (
                previous[0].reason
                if previous
                else getattr(find_condition(seeded, READY), "reason", None)
            )
            if prior != verdict.reason:
                await self._event(tunnel, verdict)
