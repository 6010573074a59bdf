"""What the control plane knows right now, shared by the reconcilers and the control channel.

It is rebuilt from the cluster on every start (allocations from status, keys from Secrets), so
it never holds anything that is not also in the resources. Every change bumps ``generation`` and
wakes whoever waits in :meth:`ControlState.changed` (the status projector, config pushes), which
coalesce bursts of changes into one pass.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from kakuremichi.addressing import GatewayIndexAllocator, SubnetAllocator
from kakuremichi.conditions import Condition
from kakuremichi.control.startup_window import StartupWindow
from kakuremichi.edge_config import AgentNode, GatewayNode, Topology, domain_holders
from kakuremichi.protocol import AcmeChallenge, CertificateBundle
from kakuremichi.resources import GatewaySpec
from kakuremichi.store import Sealer
from kakuremichi.tunnel_readiness import CertificateVerdict, TunnelFacts, routes


@dataclass(frozen=True)
class EdgeIdentity:
    role: Literal["agent", "gateway", "pool"]
    """``pool``: the shared key of an InCluster Gateway's DaemonSet, which only buys a node its
    own ``gateway`` identity."""
    id: UUID


@dataclass(frozen=True)
class GatewayPool:
    """What control needs to admit the nodes of an InCluster Gateway."""

    uid: UUID
    name: str
    owner: dict[str, Any]
    spec: GatewaySpec


@dataclass
class ControlState:
    sealer: Sealer
    subnets: SubnetAllocator
    agents: dict[UUID, AgentNode] = field(default_factory=dict)
    gateways: dict[UUID, GatewayNode] = field(default_factory=dict)
    """Gateway instances whose public address is known (only those can be peers)."""
    gateway_indexes: GatewayIndexAllocator = field(default_factory=GatewayIndexAllocator)
    pools: dict[UUID, GatewayPool] = field(default_factory=dict)
    pending_gateways: dict[UUID, tuple[GatewayNode, str, str | None]] = field(default_factory=dict)
    """External instances waiting for their first connection to learn their address:
    (node without address, API-key digest, region)."""
    credentials: dict[str, EdgeIdentity] = field(default_factory=dict)
    """API-key digest → the edge it authenticates."""
    credential_secrets: dict[UUID, tuple[str, str]] = field(default_factory=dict)
    """Edge id → (namespace, name) of the Secret with its keys."""
    startup: StartupWindow = field(default_factory=StartupWindow)
    """While open, an unknown key may belong to an object not reconciled again yet."""
    tunnels: dict[UUID, TunnelFacts] = field(default_factory=dict)
    certificate_verdicts: dict[tuple[str, str], CertificateVerdict] = field(default_factory=dict)
    """(namespace, Certificate name) → whether it can be served."""
    bundles: dict[tuple[str, str], CertificateBundle] = field(default_factory=dict)
    """(namespace, Certificate name) → the last good certificate and key."""
    certificate_expiry: dict[tuple[str, str], datetime] = field(default_factory=dict)
    """(namespace, Certificate name) → when its (good) certificate expires."""
    secret_users: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    """(namespace, Secret name) → the Certificates that read it."""
    challenges: dict[tuple[str, str], AcmeChallenge] = field(default_factory=dict)
    """(namespace, Certificate name) → its pending HTTP-01 challenge, served by gateways."""
    tunnel_conditions: dict[UUID, list[Condition]] = field(default_factory=dict)
    """Conditions each Tunnel had when first seen, so transition times survive restarts."""
    generation: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def touch(self) -> None:
        self.generation += 1
        self._changed.set()

    async def changed(self, since: int) -> int:
        """Wait until the state is newer than ``since``; return the new generation."""
        while self.generation == since:
            self._changed.clear()
            await self._changed.wait()
        return self.generation

    # --- agents ---------------------------------------------------------------------------

    def add_agent(self, agent: AgentNode, api_key: str) -> str:
        """Record an agent and its key; returns the key's digest."""
        digest = self.sealer.digest_api_key(api_key)
        self._forget_credentials(agent.id)
        self.credentials[digest] = EdgeIdentity("agent", agent.id)
        if self.agents.get(agent.id) != agent:
            self.agents[agent.id] = agent
            self.touch()
        return digest

    def remove_agent(self, agent_id: UUID) -> None:
        self.agents.pop(agent_id, None)
        self._forget_credentials(agent_id)
        self.subnets.release(agent_id)
        self.touch()

    def _forget_credentials(self, edge_id: UUID) -> None:
        self.credential_secrets.pop(edge_id, None)
        for stale in [d for d, who in self.credentials.items() if who.id == edge_id]:
            del self.credentials[stale]

    def authenticate(self, api_key: str) -> EdgeIdentity | None:
        return self.credentials.get(self.sealer.digest_api_key(api_key))

    # --- gateways -------------------------------------------------------------------------

    def add_gateway_credentials(self, gateway_id: UUID, api_key: str) -> str:
        """Let a gateway instance connect (even before its address is known)."""
        digest = self.sealer.digest_api_key(api_key)
        self._forget_credentials(gateway_id)
        self.credentials[digest] = EdgeIdentity("gateway", gateway_id)
        return digest

    def add_pool(self, pool: GatewayPool, api_key: str) -> None:
        self._forget_credentials(pool.uid)
        self.credentials[self.sealer.digest_api_key(api_key)] = EdgeIdentity("pool", pool.uid)
        self.pools[pool.uid] = pool

    def remove_pool(self, pool_uid: UUID) -> None:
        self._forget_credentials(pool_uid)
        self.pools.pop(pool_uid, None)

    def set_gateway(self, gateway: GatewayNode) -> None:
        if self.gateways.get(gateway.id) != gateway:
            self.gateways[gateway.id] = gateway
            self.touch()

    def remove_gateway(self, gateway_id: UUID) -> None:
        self._forget_credentials(gateway_id)
        self.pending_gateways.pop(gateway_id, None)
        self.gateway_indexes.release(gateway_id)
        if self.gateways.pop(gateway_id, None) is not None:
            self.touch()

    # --- tunnels and certificates -----------------------------------------------------------

    def set_tunnel(self, tunnel: TunnelFacts) -> None:
        if self.tunnels.get(tunnel.id) != tunnel:
            self.tunnels[tunnel.id] = tunnel
            self.touch()

    def remove_tunnel(self, tunnel_id: UUID) -> None:
        self.tunnel_conditions.pop(tunnel_id, None)
        if self.tunnels.pop(tunnel_id, None) is not None:
            self.touch()

    def set_certificate(
        self, key: tuple[str, str], verdict: CertificateVerdict, bundle: CertificateBundle | None
    ) -> None:
        """Record a Certificate's verdict; a ``bundle`` replaces the served one. Without one the
        last good bundle stays served until it expires, as a user expects of a bad update."""
        changed = self.certificate_verdicts.get(key) != verdict
        self.certificate_verdicts[key] = verdict
        if verdict.reason == "Expired" and self.bundles.pop(key, None) is not None:
            changed = True
        if bundle is not None and self.bundles.get(key) != bundle:
            self.bundles[key] = bundle
            changed = True
        if changed:
            self.touch()

    def use_secret(self, namespace: str, certificate: str, secret: str | None) -> None:
        """Record which Secret a Certificate reads (None: none), so changes to it are noticed."""
        for key in [k for k, users in self.secret_users.items() if k[0] == namespace]:
            self.secret_users[key].discard(certificate)
            if not self.secret_users[key]:
                del self.secret_users[key]
        if secret is not None:
            self.secret_users.setdefault((namespace, secret), set()).add(certificate)

    def remove_certificate(self, key: tuple[str, str]) -> None:
        self.certificate_verdicts.pop(key, None)
        self.certificate_expiry.pop(key, None)
        self.bundles.pop(key, None)
        self.touch()

    def set_challenge(self, key: tuple[str, str], challenge: AcmeChallenge | None) -> None:
        if challenge is None:
            changed = self.challenges.pop(key, None) is not None
        else:
            changed = self.challenges.get(key) != challenge
            self.challenges[key] = challenge
        if changed:
            self.touch()

    def topology(self) -> Topology:
        # Each domain is served with the certificate of the Tunnel that holds it.
        holders = domain_holders((t.domain, t.claim) for t in self.tunnels.values())
        certificates = {}
        for tunnel in self.tunnels.values():
            bundle = self.bundles.get((tunnel.namespace, tunnel.certificate))
            if holders[tunnel.domain] == tunnel.claim and bundle and bundle.domain == tunnel.domain:
                certificates[tunnel.domain] = bundle
        return Topology(
            agents=dict(self.agents),
            gateways=dict(self.gateways),
            routes=routes(self.tunnels, self.agents),
            certificates=certificates,
            challenges=tuple(self.challenges[k] for k in sorted(self.challenges)),
        )
