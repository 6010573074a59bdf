"""What the control plane knows right now, shared by the reconcilers and the control channel.

It is rebuilt from the cluster on every start (allocations from status, keys from Secrets), so
it never holds anything that is not also in the resources. Every change bumps ``generation`` and
wakes whoever waits in :meth:`ControlState.changed` (the status projector, config pushes), which
coalesce bursts of changes into one pass. What follows from the facts (who holds each domain,
routes, verdicts) is decided once per generation, in :meth:`ControlState.snapshot`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from kakuremichi.api.conditions import Condition
from kakuremichi.api.protocol import AcmeChallenge, CertificateBundle, PortTrouble
from kakuremichi.api.resources import GatewaySpec
from kakuremichi.control.addressing import GatewayIndexAllocator, SubnetAllocator
from kakuremichi.control.mirror import CertificateRow
from kakuremichi.control.ownership import (
    AgentClaim,
    ClaimHistory,
    DomainOwnership,
    Tenancy,
    TenantRule,
    TunnelFacts,
)
from kakuremichi.control.snapshot import ControlFacts, Snapshot
from kakuremichi.control.startup_window import StartupWindow
from kakuremichi.control.store import Sealer
from kakuremichi.control.topology import AgentNode, GatewayNode
from kakuremichi.control.tunnel_readiness import CertificateVerdict


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
    daemonset_uid: str
    """The pool's DaemonSet: only its pods may claim a node's identity."""


@dataclass
class ControlState:
    sealer: Sealer
    subnets: SubnetAllocator
    agents: dict[UUID, AgentNode] = field(default_factory=dict)
    """Agents that have their subnet and keys."""
    agent_claims: dict[UUID, AgentClaim] = field(default_factory=dict)
    """Every Agent that exists, provisioned or not (quotas count them oldest first)."""
    agents_connected: set[UUID] = field(default_factory=set)
    """Agents with a control channel session now."""
    agents_left: set[UUID] = field(default_factory=set)
    """Agents seen to disconnect since the start (and not back)."""
    presence_settled: bool = False
    """Set a heartbeat timeout after the startup window: from then on an Agent that is not
    connected is away, whether or not it was seen since the start (before, it may simply not
    have reconnected to this control yet)."""
    quota_refused: set[UUID] = field(default_factory=set)
    """Agents the reconciler refused for their namespace's quota."""
    tenant_rules: dict[str, TenantRule] = field(default_factory=dict)
    """TenantPolicy name → what it says."""
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    gateways: dict[UUID, GatewayNode] = field(default_factory=dict)
    """Gateway instances whose public address is known (only those can be peers)."""
    gateway_indexes: GatewayIndexAllocator = field(default_factory=GatewayIndexAllocator)
    pools: dict[UUID, GatewayPool] = field(default_factory=dict)
    pending_gateways: dict[UUID, tuple[GatewayNode, str, str | None]] = field(default_factory=dict)
    """External instances waiting for their first connection to learn their address:
    (node without address, API-key digest, region)."""
    gateway_boots: dict[UUID, str] = field(default_factory=dict)
    """Gateway instance → the boot id of its process, as it last connected."""
    credentials: dict[str, EdgeIdentity] = field(default_factory=dict)
    """API-key digest → the edge it authenticates."""
    credential_secrets: dict[UUID, tuple[str, str]] = field(default_factory=dict)
    """Edge id → (namespace, name) of the Secret with its keys."""
    startup: StartupWindow = field(default_factory=StartupWindow)
    """While open, an unknown key may belong to an object not reconciled again yet."""
    tunnels: dict[UUID, TunnelFacts] = field(default_factory=dict)
    route_claims: dict[str, tuple[TunnelFacts, ...]] = field(default_factory=dict)
    """Route object (e.g. ``Ingress shop/web``) → the claims of its hosts."""
    endpoints: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Route backend → its ready endpoints."""
    certificate_verdicts: dict[tuple[str, str], CertificateVerdict] = field(default_factory=dict)
    """(namespace, Certificate name) → whether it can be served."""
    bundles: dict[tuple[str, str], CertificateBundle] = field(default_factory=dict)
    """(namespace, Certificate name) → the last good certificate and key."""
    certificate_rows: dict[tuple[str, str], CertificateRow] = field(default_factory=dict)
    """(namespace, Certificate name) → its mirror row (written only while it is served)."""
    certificate_expiry: dict[tuple[str, str], datetime] = field(default_factory=dict)
    """(namespace, Certificate name) → when its (good) certificate expires."""
    secret_users: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    """(namespace, Secret name) → the Certificates that read it."""
    secret_of: dict[tuple[str, str], str] = field(default_factory=dict)
    """(namespace, Certificate name) → the Secret it reads."""
    secret_versions: dict[tuple[str, str], tuple[str, bool]] = field(default_factory=dict)
    """(namespace, Secret name) → its resourceVersion when last read ("": it did not exist) and
    whether it carries the label the operator watches, so a change to one it does not watch
    is noticed by reading it again."""
    challenges: dict[tuple[str, str], AcmeChallenge] = field(default_factory=dict)
    """(namespace, Certificate name) → its pending HTTP-01 challenge, served by gateways."""
    acme_wanted: dict[tuple[str, str], int] = field(default_factory=dict)
    """Certificates with issuer ACME (→ how often their reconcile has looked: each look is
    news for their ACME task, which may be waiting)."""
    acme_progress: dict[tuple[str, str], CertificateVerdict] = field(default_factory=dict)
    """What each Certificate's ACME task says of where it stands (none: nothing to say, the
    certificate in its Secret speaks)."""
    claim_since: dict[UUID, datetime] = field(default_factory=dict)
    """Tunnel → when its claim on its domain began (decided, or restored from status)."""
    claim_refused: set[UUID] = field(default_factory=set)
    """Tunnels found unable to claim (quota, policy): a claim of theirs begins when allowed."""
    tunnel_conditions: dict[UUID, list[Condition]] = field(default_factory=dict)
    """Conditions each Tunnel had when first seen, so transition times survive restarts."""
    ports_unavailable: dict[UUID, tuple[PortTrouble, ...]] = field(default_factory=dict)
    """Connected gateway instance → the tunnel ports it last reported it cannot bind."""
    generation: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _snapshot: Snapshot | None = None

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

    def add_agent(self, agent: AgentNode, api_key: str, secret: tuple[str, str]) -> str:
        """Record an agent, its key and the Secret (namespace, name) holding its keys; returns
        the key's digest."""
        digest = self.sealer.digest_api_key(api_key)
        self._forget_credentials(agent.id)
        self.credentials[digest] = EdgeIdentity("agent", agent.id)
        self.credential_secrets[agent.id] = secret
        self.quota_refused.discard(agent.id)
        if self.agents.get(agent.id) != agent:
            self.agents[agent.id] = agent
            self.touch()
        return digest

    def restore_agent(self, agent: AgentNode) -> None:
        """An Agent's addresses and public key as its status had them, at start: its Tunnels
        are served before its reconcile re-learns its API key."""
        if self.agents.get(agent.id) != agent:
            self.agents[agent.id] = agent
            self.touch()

    def agent_connected(self, agent_id: UUID, connected: bool) -> None:
        """An Agent's control channel session began (True) or ended (False)."""
        before = (agent_id in self.agents_connected, agent_id in self.agents_left)
        if connected:
            self.agents_connected.add(agent_id)
            self.agents_left.discard(agent_id)
        else:
            self.agents_connected.discard(agent_id)
            self.agents_left.add(agent_id)
        if before != (agent_id in self.agents_connected, agent_id in self.agents_left):
            self.touch()

    def settle_presence(self) -> None:
        """Every Agent that still runs has had its chance to reconnect since the start."""
        if not self.presence_settled:
            self.presence_settled = True
            self.touch()

    def agents_away(self) -> frozenset[UUID]:
        """Provisioned Agents known not to be connected."""
        return frozenset(
            agent_id
            for agent_id in self.agents
            if agent_id not in self.agents_connected
            and (self.presence_settled or agent_id in self.agents_left)
        )

    def remove_agent(self, agent_id: UUID) -> None:
        """The Agent is gone: its claim, addresses and keys with it."""
        self.agents_connected.discard(agent_id)
        self.agents_left.discard(agent_id)
        if self.agent_claims.pop(agent_id, None) is not None:
            self.touch()  # (a younger Agent over quota may fit now)
        self.quota_refused.discard(agent_id)
        self.withdraw_agent(agent_id)

    def refuse_agent(self, agent_id: UUID) -> None:
        """The Agent is beyond its namespace's quota: no subnet, no keys, until it fits."""
        self.quota_refused.add(agent_id)
        self.withdraw_agent(agent_id)

    def claim_agent(self, claim: AgentClaim) -> None:
        """An Agent exists (provisioned or not): it counts against its namespace's quota."""
        if self.agent_claims.get(claim.id) != claim:
            self.agent_claims[claim.id] = claim
            self.touch()

    def withdraw_agent(self, agent_id: UUID) -> None:
        """The Agent keeps its claim but loses its subnet and keys (over quota)."""
        known = self.agents.pop(agent_id, None) is not None
        self._forget_credentials(agent_id)
        if self.subnets.release(agent_id) is not None or known:
            self.touch()

    def _forget_credentials(self, edge_id: UUID) -> None:
        self.credential_secrets.pop(edge_id, None)
        for stale in [d for d, who in self.credentials.items() if who.id == edge_id]:
            del self.credentials[stale]

    def authenticate(self, api_key: str) -> EdgeIdentity | None:
        return self.credentials.get(self.sealer.digest_api_key(api_key))

    # --- gateways -------------------------------------------------------------------------

    def add_gateway_credentials(
        self, gateway_id: UUID, api_key: str, secret: tuple[str, str]
    ) -> str:
        """Let a gateway instance connect (even before its address is known); ``secret``
        (namespace, name) holds its keys. Returns the key's digest."""
        digest = self.sealer.digest_api_key(api_key)
        self._forget_credentials(gateway_id)
        self.credentials[digest] = EdgeIdentity("gateway", gateway_id)
        self.credential_secrets[gateway_id] = secret
        return digest

    def await_address(self, gateway: GatewayNode, digest: str, region: str | None) -> None:
        """An External instance without an address: its first connection's source address
        will be its public address (:meth:`set_gateway` then)."""
        self.pending_gateways[gateway.id] = (gateway, digest, region)

    def add_pool(self, pool: GatewayPool, api_key: str) -> None:
        self._forget_credentials(pool.uid)
        self.credentials[self.sealer.digest_api_key(api_key)] = EdgeIdentity("pool", pool.uid)
        self.pools[pool.uid] = pool

    def remove_pool(self, pool_uid: UUID) -> None:
        self._forget_credentials(pool_uid)
        self.pools.pop(pool_uid, None)

    def set_gateway(self, gateway: GatewayNode) -> None:
        """A gateway instance with its public address: a peer of every agent."""
        self.pending_gateways.pop(gateway.id, None)
        if self.gateways.get(gateway.id) != gateway:
            self.gateways[gateway.id] = gateway
            self.touch()

    def gateway_booted(self, gateway_id: UUID, boot: str) -> None:
        """A gateway instance connected from a process that started as ``boot``: a new one
        means it restarted, and its agents must start new WireGuard sessions with it."""
        if self.gateway_boots.get(gateway_id) != boot:
            self.gateway_boots[gateway_id] = boot
            self.touch()

    def gateway_ports_unavailable(
        self, gateway_id: UUID, troubles: tuple[PortTrouble, ...]
    ) -> None:
        """What a connected gateway instance reports it cannot bind (nothing once it left)."""
        if self.ports_unavailable.get(gateway_id, ()) != troubles:
            if troubles:
                self.ports_unavailable[gateway_id] = troubles
            else:
                self.ports_unavailable.pop(gateway_id, None)
            self.touch()

    def remove_gateway(self, gateway_id: UUID) -> None:
        self._forget_credentials(gateway_id)
        self.ports_unavailable.pop(gateway_id, None)
        self.gateway_boots.pop(gateway_id, None)
        self.pending_gateways.pop(gateway_id, None)
        self.gateway_indexes.release(gateway_id)
        if self.gateways.pop(gateway_id, None) is not None:
            self.touch()

    # --- tunnels and certificates -----------------------------------------------------------

    def set_tunnel(self, tunnel: TunnelFacts) -> None:
        if self.tunnels.get(tunnel.id) != tunnel:
            self.tunnels[tunnel.id] = tunnel
            self.touch()

    def set_route_claims(self, source: str, claims: tuple[TunnelFacts, ...]) -> None:
        """What one route object claims now (none: it claims nothing, or is gone)."""
        if self.route_claims.get(source, ()) != claims:
            if claims:
                self.route_claims[source] = claims
            else:
                self.route_claims.pop(source, None)
            self.touch()

    def set_endpoints(self, backend: str, endpoints: tuple[str, ...] | None) -> None:
        """A route backend's ready endpoints (None: it is no longer watched)."""
        if self.endpoints.get(backend) != endpoints:
            if endpoints is None:
                self.endpoints.pop(backend, None)
            else:
                self.endpoints[backend] = endpoints
            self.touch()

    def seed_tunnel_conditions(self, tunnel_id: UUID, conditions: list[Condition]) -> None:
        """The conditions a Tunnel had when first seen, so transition times survive restarts."""
        self.tunnel_conditions.setdefault(tunnel_id, conditions)

    def restore_claim(self, tunnel_id: UUID, since: datetime | None, refused: bool) -> None:
        """What a Tunnel's status says of its claim, at start (before any decision)."""
        if since is not None:
            self.claim_since[tunnel_id] = since
        elif refused:
            self.claim_refused.add(tunnel_id)

    def record_claims(self, ownership: DomainOwnership) -> None:
        """Remember when each claim began, so the next decision dates it the same."""
        known = set(self.tunnels) | {c.id for cs in self.route_claims.values() for c in cs}
        refused = set(ownership.unable) & known
        since = {uid: when for uid, when in ownership.claims.items() if uid in known}
        if since != self.claim_since or refused != self.claim_refused:
            self.claim_since, self.claim_refused = since, refused
            self.touch()

    def remove_tunnel(self, tunnel_id: UUID) -> None:
        self.tunnel_conditions.pop(tunnel_id, None)
        self.claim_since.pop(tunnel_id, None)
        self.claim_refused.discard(tunnel_id)
        if self.tunnels.pop(tunnel_id, None) is not None:
            self.touch()

    def set_certificate(
        self,
        key: tuple[str, str],
        verdict: CertificateVerdict,
        bundle: CertificateBundle | None,
        expires: datetime | None = None,
    ) -> None:
        """Record a Certificate's verdict; a ``bundle`` replaces the served one. Without one the
        last good bundle stays served until it expires, as a user expects of a bad update.
        ``expires``: when the certificate in its Secret expires (None: there is none good)."""
        if expires is None:
            self.certificate_expiry.pop(key, None)
        else:
            self.certificate_expiry[key] = expires
        changed = self.certificate_verdicts.get(key) != verdict
        self.certificate_verdicts[key] = verdict
        if verdict.reason == "Expired" and self.bundles.pop(key, None) is not None:
            changed = True
        if bundle is not None and self.bundles.get(key) != bundle:
            self.bundles[key] = bundle
            changed = True
        if changed:
            self.touch()

    def saw_secret(self, key: tuple[str, str], version: str, watched: bool) -> None:
        """A Secret as last read (version "": it does not exist), so a change to one that is not
        watched is noticed by reading it again."""
        self.secret_versions[key] = (version, watched)

    def use_secret(self, namespace: str, certificate: str, secret: str | None) -> None:
        """Record which Secret a Certificate reads (None: none), so changes to it are noticed."""
        before = self.secret_of.pop((namespace, certificate), None)
        if before is not None:
            users = self.secret_users.get((namespace, before), set())
            users.discard(certificate)
            if not users:
                self.secret_users.pop((namespace, before), None)
                self.secret_versions.pop((namespace, before), None)
        if secret is not None:
            self.secret_of[(namespace, certificate)] = secret
            self.secret_users.setdefault((namespace, secret), set()).add(certificate)

    def set_certificate_row(self, key: tuple[str, str], row: CertificateRow) -> None:
        """The row of a good certificate; kept as it was while the certificate is the same
        (its sealed key differs at every sealing)."""
        known = self.certificate_rows.get(key)
        if known is None or known != dataclasses.replace(
            row, sealed_private_key=known.sealed_private_key
        ):
            self.certificate_rows[key] = row
            self.touch()

    def remove_certificate(self, key: tuple[str, str]) -> None:
        self.certificate_rows.pop(key, None)
        self.certificate_verdicts.pop(key, None)
        self.certificate_expiry.pop(key, None)
        self.bundles.pop(key, None)
        self.touch()

    def want_acme(self, key: tuple[str, str], wanted: bool) -> None:
        """A Certificate's reconcile looked at it: ACME should (go on to) issue it, or not."""
        if wanted:
            self.acme_wanted[key] = self.acme_wanted.get(key, 0) + 1
        elif self.acme_wanted.pop(key, None) is None:
            return
        self.touch()

    def set_acme_progress(self, key: tuple[str, str], progress: CertificateVerdict | None) -> None:
        """The ACME task's news on a Certificate (None: none to tell)."""
        if progress is None:
            changed = self.acme_progress.pop(key, None) is not None
        else:
            changed = self.acme_progress.get(key) != progress
            self.acme_progress[key] = progress
        if changed:
            self.touch()

    def set_challenge(self, key: tuple[str, str], challenge: AcmeChallenge | None) -> None:
        if challenge is None:
            changed = self.challenges.pop(key, None) is not None
        else:
            changed = self.challenges.get(key) != challenge
            self.challenges[key] = challenge
        if changed:
            self.touch()

    # --- tenancy ----------------------------------------------------------------------------

    def set_tenant_rule(self, rule: TenantRule) -> None:
        if self.tenant_rules.get(rule.name) != rule:
            self.tenant_rules[rule.name] = rule
            self.touch()

    def remove_tenant_rule(self, name: str) -> None:
        if self.tenant_rules.pop(name, None) is not None:
            self.touch()

    def set_namespace_labels(self, namespace: str, labels: dict[str, str] | None) -> None:
        """A namespace's labels (None: it is gone); TenantPolicies select by them."""
        if labels is None:
            changed = self.namespace_labels.pop(namespace, None) is not None
        else:
            changed = self.namespace_labels.get(namespace) != labels
            self.namespace_labels[namespace] = dict(labels)
        if changed and self.tenant_rules:
            self.touch()

    # --- the decision -----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The decision on the current facts, made once per generation and shared by all who
        ask in it (the control channel, the projector, the reconcilers, the ACME tasks)."""
        if self._snapshot is None or self._snapshot.generation != self.generation:
            facts = ControlFacts(
                tunnels=dict(self.tunnels),
                route_claims={c.id: c for claims in self.route_claims.values() for c in claims},
                endpoints=dict(self.endpoints),
                agent_claims=dict(self.agent_claims),
                agents=dict(self.agents),
                agents_away=self.agents_away(),
                gateways=dict(self.gateways),
                gateway_boots=dict(self.gateway_boots),
                certificate_verdicts=dict(self.certificate_verdicts),
                bundles=dict(self.bundles),
                challenges=dict(self.challenges),
                ports_unavailable=dict(self.ports_unavailable),
                tenancy=Tenancy(
                    tuple(self.tenant_rules[name] for name in sorted(self.tenant_rules)),
                    {ns: dict(labels) for ns, labels in self.namespace_labels.items()},
                ),
                history=ClaimHistory(
                    dict(self.claim_since), frozenset(self.claim_refused), datetime.now(UTC)
                ),
            )
            self._snapshot = Snapshot(facts, self.generation)
        return self._snapshot
