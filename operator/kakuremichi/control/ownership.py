"""Who holds each domain, and what each namespace may claim: one decision from the whole state.

Tunnels and Agents are namespaced, and each namespace is a tenant. Everything that concerns a
domain follows from the decision made here, once per state generation, from every Tunnel the
operator knows (whatever the state of their Agents): the route and the certificate the gateways
serve for it, whether an ACME order may be placed for it, each Tunnel's ``Ready`` and the
mirror's tunnels table (:mod:`kakuremichi.control.snapshot` projects them).

- A Tunnel claims its domain unless its namespace is over its tunnel quota (the Tunnels beyond
  the oldest ``maxTunnels`` are) or may not claim that domain (no TenantPolicy selecting the
  namespace lists it).
- Among the claims on a domain the oldest holds it: a claim dates from when its Tunnel could
  first claim (its creation, or the moment a Tunnel refused for quota or policy came to be
  allowed: an old refused Tunnel never jumps the queue), then uid. ``spec.domain`` cannot be
  changed (the CRD says so), so a claim never moves to another domain. A younger claim never
  displaces the holder, whatever the holder's state (its Agent missing or being re-created,
  the Tunnel disabled): it takes over only once the holder is gone. :class:`ClaimHistory`
  carries those dates from one decision to the next and across restarts (Tunnel status).
- Agents: the oldest ``maxAgents`` of a namespace are admitted; the others get no subnet.

Without any TenantPolicy every namespace may claim every domain and has no quota: the first
claim holds, which fits a single team. With policies, a namespace that none selects may claim
no domain and run no Agent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Literal
from uuid import UUID

from kakuremichi.api.protocol import RequestRule
from kakuremichi.api.resources import (
    AppProtocol,
    Hsts,
    PortProtocol,
    ProxyProtocol,
    TenantPolicySpec,
    TunnelProtocol,
)

PORT_DOMAIN_SUFFIX = ".kakuremichi.invalid"
"""The names that claims on a port alone go by: ``.invalid`` is never published, and no other
claim (a Tunnel's, a host's) may name one."""


@dataclass(frozen=True, order=True)
class Claim:
    """What orders two claims: the older holds, the uid breaks a tie of the same second."""

    created: datetime
    uid: UUID


@dataclass(frozen=True)
class TunnelFacts:
    """What a Tunnel resource says, as the reconciler last saw it."""

    id: UUID
    namespace: str
    name: str
    domain: str
    agent: str
    target: str
    enabled: bool
    created: datetime
    generation: int
    certificate: str
    """Name of the Certificate resource that serves it (same namespace)."""
    description: str | None = None
    app_protocol: AppProtocol = "HTTP1"
    hsts: Hsts | None = None
    protocol: TunnelProtocol = "HTTP"
    port: int | None = None
    proxy_protocol: ProxyProtocol = "None"
    # A host of a route (Ingress, HTTPRoute) claims like a Tunnel, with these besides:
    source: str | None = None
    """The route object, e.g. ``Ingress web`` (None: a Tunnel): how refusals name a holder of
    the same namespace, and the mirror row's description."""
    agent_namespace: str | None = None
    """The Agent's namespace when it is not the claim's own (routes go through the cluster
    agent, in the operator's namespace)."""
    rules: tuple[RequestRule, ...] | None = None
    """Per-request routing to ``backends`` (None: every request to ``target``)."""
    backends: tuple[str, ...] = ()
    """The backend streams (``namespace/service:port``) the rules lead to."""
    shares: tuple[tuple[str | None, int], ...] = ()
    """A TLSRoute's, TCPRoute's or UDPRoute's backends by weight, when it has several: (stream,
    weight), each connection going to one (None: that share is refused)."""
    certificate_namespace: str | None = None
    """The Certificate's namespace when it is not the claim's own (an HTTPRoute's host is
    served with the certificate of the Gateway API Gateway it is attached to)."""
    by_port: bool = False
    """A claim on a public port alone (a TCPRoute's, a UDPRoute's): its ``domain`` is a name
    made up for it under :data:`PORT_DOMAIN_SUFFIX`, which no other claim may name; under
    TenantPolicies, its port must be in a selecting policy's ``ports`` (and, as every port, in
    the Gateway pools' ``tunnelPorts``)."""
    certificate_issuer: str | None = None
    """A route's: the issuer its Certificate was made with ("ACME", "Secret"). Whoever can
    write that Certificate (the Gateway's namespace, the Secret's) cannot turn it to ACME and
    order a key for a host it does not hold. None: a Tunnel's, as its own Certificate says."""

    @property
    def claim(self) -> Claim:
        return Claim(self.created, self.id)

    @property
    def agent_key(self) -> tuple[str, str]:
        """(namespace, name) of the Agent it goes through."""
        return self.agent_namespace or self.namespace, self.agent

    @property
    def certificate_key(self) -> tuple[str, str]:
        """(namespace, name) of the Certificate that serves it."""
        return self.certificate_namespace or self.namespace, self.certificate

    @property
    def kind_and_name(self) -> str:
        return self.source or f"Tunnel {self.name}"

    @property
    def public_port(self) -> PublicPort | None:
        """(TCP or UDP, port) of a tunnel with a port of its own."""
        if self.port is None or self.protocol not in ("TCP", "UDP"):
            return None
        return ("TCP" if self.protocol == "TCP" else "UDP"), self.port

    @property
    def url(self) -> str:
        if self.by_port:
            return f"{self.protocol.lower()}://*:{self.port}"
        if self.public_port is not None:
            return f"{self.protocol.lower()}://{self.domain}:{self.port}"
        return f"https://{self.domain}"


PublicPort = tuple[PortProtocol, int]


@dataclass(frozen=True)
class AgentClaim:
    """An Agent the operator has seen, provisioned or not: it counts against its namespace's
    quota in creation order."""

    id: UUID
    namespace: str
    name: str
    created: datetime

    @property
    def claim(self) -> Claim:
        return Claim(self.created, self.id)


# --- TenantPolicy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantRule:
    """One TenantPolicy, as the decision reads it."""

    name: str
    match_names: frozenset[str] = frozenset()
    match_labels: tuple[tuple[str, str], ...] | None = None
    """None: the policy does not select by labels; empty: it selects every namespace (as an
    empty Kubernetes label selector does)."""
    domains: frozenset[str] = frozenset()
    """Exact names the selected namespaces may claim."""
    suffixes: tuple[str, ...] = ()
    """From ``*.example.com``: ``.example.com``, any name below it (not the name itself)."""
    ports: tuple[tuple[int, int], ...] = ()
    """(first, last) ranges of public ports the selected namespaces' routes may claim."""
    max_agents: int | None = None
    max_tunnels: int | None = None

    @classmethod
    def from_spec(cls, name: str, spec: TenantPolicySpec) -> TenantRule:
        labels = spec.namespaces.match_labels
        return cls(
            name=name,
            match_names=frozenset(spec.namespaces.match_names),
            match_labels=None if labels is None else tuple(sorted(labels.items())),
            domains=frozenset(d for d in spec.domains if not d.startswith("*.")),
            suffixes=tuple(sorted({d[1:] for d in spec.domains if d.startswith("*.")})),
            ports=tuple((r.first, r.last) for r in spec.ports),
            max_agents=spec.max_agents,
            max_tunnels=spec.max_tunnels,
        )

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if namespace in self.match_names:
            return True
        if self.match_labels is None:
            return False
        return all(labels.get(key) == value for key, value in self.match_labels)

    def allows(self, domain: str) -> bool:
        return domain in self.domains or any(domain.endswith(s) for s in self.suffixes)

    def allows_port(self, port: int) -> bool:
        return any(first <= port <= last for first, last in self.ports)


@dataclass(frozen=True)
class Quota:
    limit: int
    policy: str
    """The policy that sets it (the smallest limit among those selecting the namespace)."""


@dataclass(frozen=True)
class Grant:
    """What the TenantPolicies give one namespace."""

    namespace: str
    governed: bool
    """Some TenantPolicy exists in the cluster (else: no limits at all)."""
    policies: tuple[TenantRule, ...] = ()
    """The policies that select this namespace."""

    def allows(self, domain: str) -> bool:
        return not self.governed or any(p.allows(domain) for p in self.policies)

    def allows_port(self, port: int | None) -> bool:
        """Whether it may claim a port without a domain (routes of a TCP or UDP listener)."""
        return not self.governed or (
            port is not None and any(p.allows_port(port) for p in self.policies)
        )

    @cached_property
    def max_agents(self) -> Quota | None:
        if self.governed and not self.policies:
            return Quota(0, "")
        return _smallest((p.max_agents, p.name) for p in self.policies)

    @cached_property
    def max_tunnels(self) -> Quota | None:
        return _smallest((p.max_tunnels, p.name) for p in self.policies)


def _smallest(limits: Iterable[tuple[int | None, str]]) -> Quota | None:
    found = [(limit, name) for limit, name in limits if limit is not None]
    return Quota(*min(found)) if found else None


@dataclass(frozen=True)
class Tenancy:
    """Every TenantPolicy and the labels of every namespace (policies select by them)."""

    rules: tuple[TenantRule, ...] = ()
    namespace_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def grant(self, namespace: str) -> Grant:
        labels = self.namespace_labels.get(namespace, {})
        return Grant(
            namespace,
            governed=bool(self.rules),
            policies=tuple(r for r in self.rules if r.selects(namespace, labels)),
        )


# --- The decision -----------------------------------------------------------------------------

Standing = Literal[
    "QuotaExceeded", "DomainNotAllowed", "DomainConflict", "PortNotAllowed", "PortConflict"
]


@dataclass(frozen=True)
class Refusal:
    """Why a Tunnel does not hold its domain. Messages name another tenant's objects never:
    only a holder in the same namespace is named."""

    reason: Standing
    message: str


@dataclass(frozen=True)
class ClaimHistory:
    """What earlier decisions found, so that a claim keeps its date."""

    since: Mapping[UUID, datetime] = field(default_factory=dict)
    """Tunnel → when its current claim began (recorded after it was decided)."""
    refused: frozenset[UUID] = frozenset()
    """Tunnels found unable to claim (quota, policy) and not claiming since."""
    now: datetime | None = None
    """The moment of this decision: the date of a claim that begins in it (a refused Tunnel
    that came to be allowed). None: such a claim dates from its creation."""

    def since_of(self, tunnel: TunnelFacts) -> datetime:
        recorded = self.since.get(tunnel.id)
        if recorded is not None:
            return max(recorded, tunnel.created)
        if tunnel.id in self.refused and self.now is not None:
            return max(self.now, tunnel.created)
        return tunnel.created


@dataclass(frozen=True)
class DomainOwnership:
    holders: Mapping[str, TunnelFacts]
    """Domain → the Tunnel that holds it."""
    refusals: Mapping[UUID, Refusal]
    """Tunnel → why it does not hold its domain (absent: it does)."""
    claims: Mapping[UUID, datetime] = field(default_factory=dict)
    """Tunnel → when its claim began, for every Tunnel that claims (holders and those waiting
    behind them): what the next decision and a restart must remember."""
    ports: Mapping[PublicPort, TunnelFacts] = field(default_factory=dict)
    """(TCP or UDP, port) → the domain holder that holds that public port too."""

    @property
    def unable(self) -> frozenset[UUID]:
        """The Tunnels that claim nothing (quota, policy)."""
        return frozenset(uid for uid in self.refusals if uid not in self.claims)

    def holds(self, tunnel: TunnelFacts) -> bool:
        holder = self.holders.get(tunnel.domain)
        return holder is not None and holder.id == tunnel.id

    def serves(self, tunnel: TunnelFacts) -> bool:
        """It holds its domain and, with a port of its own, that port."""
        if not self.holds(tunnel):
            return False
        port = tunnel.public_port
        return port is None or (port in self.ports and self.ports[port].id == tunnel.id)


def _grants(tenancy: Tenancy, namespaces: Iterable[str]) -> dict[str, Grant]:
    return {namespace: tenancy.grant(namespace) for namespace in set(namespaces)}


def _beyond_quota(
    claims: Iterable[tuple[Claim, UUID, str]], quotas: Mapping[str, Quota | None]
) -> dict[UUID, Quota]:
    """The ids of the claims beyond their namespace's quota, the oldest ``limit`` being
    within it."""
    by_namespace: dict[str, list[tuple[Claim, UUID]]] = {}
    for claim, uid, namespace in claims:
        if quotas.get(namespace) is not None:
            by_namespace.setdefault(namespace, []).append((claim, uid))
    beyond: dict[UUID, Quota] = {}
    for namespace, members in by_namespace.items():
        quota = quotas[namespace]
        assert quota is not None
        if len(members) > quota.limit:
            members.sort()
            for _, uid in members[quota.limit :]:
                beyond[uid] = quota
    return beyond


@dataclass(frozen=True)
class PortRules:
    """What the Gateway pools say of Tunnels' ports."""

    reserved: Mapping[PublicPort, str] = field(default_factory=dict)
    """A pool's own ports (and the gateways' defaults) → whose: no Tunnel's."""
    open: Mapping[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    """Pool → the ranges it opens to Tunnels (``tunnelPorts``); a port must be in every
    pool's (every gateway serves every Tunnel)."""

    def closed_by(self, port: int) -> tuple[str, str] | None:
        """(a pool that does not open ``port``, its ranges as text), if any."""
        for pool, ranges in sorted(self.open.items()):
            if not any(first <= port <= last for first, last in ranges):
                listed = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
                return pool, listed or "none"
        return None


def decide_domains(
    tunnels: Iterable[TunnelFacts],
    tenancy: Tenancy,
    history: ClaimHistory | None = None,
    ports: PortRules | None = None,
) -> DomainOwnership:
    """Who holds each domain, and each TCP and UDP port: among the holders of their domains,
    the oldest claim on a port holds it, unless a Gateway pool has it or does not open it
    (``ports``). Linear in the Tunnels but for one sort per namespace over quota."""
    tunnels = list(tunnels)
    history = history or ClaimHistory()
    grants = _grants(tenancy, (t.namespace for t in tunnels))
    over = _beyond_quota(
        ((t.claim, t.id, t.namespace) for t in tunnels),
        {namespace: grant.max_tunnels for namespace, grant in grants.items()},
    )
    refusals: dict[UUID, Refusal] = {}
    holders: dict[str, TunnelFacts] = {}
    claims: dict[UUID, Claim] = {}
    for tunnel in tunnels:
        quota = over.get(tunnel.id)
        grant = grants[tunnel.namespace]
        if quota is not None:
            refusals[tunnel.id] = Refusal(
                "QuotaExceeded",
                f"namespace {tunnel.namespace} may have {quota.limit} Tunnels (TenantPolicy "
                f"{quota.policy}); this one is younger than the {quota.limit} oldest (hosts "
                "of Ingresses count as Tunnels)",
            )
        elif not tunnel.by_port and tunnel.domain.endswith(PORT_DOMAIN_SUFFIX):
            # (whether such a name is held would say which namespace holds which port)
            refusals[tunnel.id] = Refusal(
                "DomainNotAllowed",
                f"spec.domain: names under {PORT_DOMAIN_SUFFIX[1:]} are kakuremichi's own "
                "(the ports of TCP and UDP routes go by them)",
            )
        elif not (
            grant.allows_port(tunnel.port) if tunnel.by_port else grant.allows(tunnel.domain)
        ):
            refusals[tunnel.id] = Refusal("DomainNotAllowed", _not_allowed(tunnel, grant))
        else:
            claim = claims[tunnel.id] = Claim(history.since_of(tunnel), tunnel.id)
            holder = holders.get(tunnel.domain)
            if holder is None or claim < claims[holder.id]:
                holders[tunnel.domain] = tunnel
    for tunnel in tunnels:
        holder = holders.get(tunnel.domain)
        if tunnel.id in refusals or holder is None or holder.id == tunnel.id:
            continue
        refusals[tunnel.id] = Refusal(
            "DomainConflict", f"{tunnel.domain} is already claimed by {_named(holder, tunnel)}"
        )
    # Every claimant claims its port too, whether or not it holds its domain now (one waiting
    # behind an older claim on its domain keeps its place for the port): a Tunnel that comes
    # to hold its domain later never takes a port from one that held it meanwhile.
    claimants = [t for t in tunnels if t.id in claims]
    held_ports = _decide_ports(claimants, claims, ports or PortRules(), refusals)
    dates = {uid: c.created for uid, c in claims.items()}
    return DomainOwnership(holders, refusals, dates, held_ports)


def _decide_ports(
    claimants: Iterable[TunnelFacts],
    claims: Mapping[UUID, Claim],
    rules: PortRules,
    refusals: dict[UUID, Refusal],
) -> dict[PublicPort, TunnelFacts]:
    """The oldest claim on each port among the Tunnels that claim (a younger never displaces
    it, as with domains; protocol and port cannot be changed, so a claim on a port dates as
    its claim on its domain does); the others are refused with PortConflict, which names a
    holder in the same namespace only, unless they are refused for their domain already. A
    port a pool does not open is PortNotAllowed and claims nothing."""
    holders = list(claimants)
    closed = {
        tunnel.id: found
        for tunnel in holders
        if tunnel.public_port is not None
        and (found := rules.closed_by(tunnel.public_port[1])) is not None
    }
    ports: dict[PublicPort, TunnelFacts] = {}
    for tunnel in holders:
        port = tunnel.public_port
        if port is None or port in rules.reserved or tunnel.id in closed:
            continue
        holder = ports.get(port)
        if holder is None or claims[tunnel.id] < claims[holder.id]:
            ports[port] = tunnel
    for tunnel in holders:
        port = tunnel.public_port
        if port is None:
            continue
        name = f"{port[1]}/{port[0]}"
        where = "the listener's port" if tunnel.by_port else "spec.port"
        if tunnel.id in refusals:  # (DomainConflict says it first)
            continue
        if tunnel.id in closed:
            pool, listed = closed[tunnel.id]
            refusals[tunnel.id] = Refusal(
                "PortNotAllowed",
                f"{where}: {name} is not among the ports Gateway {pool} opens to Tunnels "
                f"(its spec.tunnelPorts: {listed})",
            )
            continue
        if port in rules.reserved:
            refusals[tunnel.id] = Refusal(
                "PortConflict",
                f"{where}: {name} is {rules.reserved[port]}: pick another port",
            )
            continue
        holder = ports[port]
        if holder.id == tunnel.id:
            continue
        refusals[tunnel.id] = Refusal(
            "PortConflict", f"{where}: {name} is already claimed by {_named(holder, tunnel)}"
        )
    return ports


def _named(holder: TunnelFacts, claimant: TunnelFacts) -> str:
    """The holder as a refusal names it: by kind and name in the claimant's own namespace,
    never anything of another tenant's."""
    if holder.namespace == claimant.namespace:
        return f"{holder.kind_and_name} of this namespace"
    return "another namespace"


def _not_allowed(tunnel: TunnelFacts, grant: Grant) -> str:
    if tunnel.by_port and not grant.policies:
        return f"no TenantPolicy selects namespace {tunnel.namespace}, so it may claim no port"
    if tunnel.by_port:
        names = ", ".join(sorted(p.name for p in grant.policies))
        return (
            f"the listener's port: {tunnel.port}/{tunnel.protocol} is not among the ports that "
            f"namespace {tunnel.namespace} may claim (TenantPolicy {names}: spec.ports)"
        )
    if not grant.policies:
        return (
            f"spec.domain: no TenantPolicy selects namespace {tunnel.namespace}, so it may "
            "claim no domain"
        )
    names = ", ".join(sorted(p.name for p in grant.policies))
    return (
        f"spec.domain: {tunnel.domain} is not among the domains that namespace "
        f"{tunnel.namespace} may claim (TenantPolicy {names})"
    )


def decide_agents(agents: Iterable[AgentClaim], tenancy: Tenancy) -> dict[UUID, str]:
    """Agent → why it gets no subnet, for the Agents beyond their namespace's quota."""
    agents = list(agents)
    if not tenancy.rules:
        return {}
    grants = _grants(tenancy, (a.namespace for a in agents))
    over = _beyond_quota(
        ((a.claim, a.id, a.namespace) for a in agents),
        {namespace: grant.max_agents for namespace, grant in grants.items()},
    )
    refusals = {}
    for agent in agents:
        quota = over.get(agent.id)
        if quota is None:
            continue
        if not quota.policy:
            refusals[agent.id] = (
                f"no TenantPolicy selects namespace {agent.namespace}, so it may run no Agent"
            )
        else:
            refusals[agent.id] = (
                f"namespace {agent.namespace} may run {quota.limit} Agents (TenantPolicy "
                f"{quota.policy}); this one is younger than the {quota.limit} oldest, so it "
                "gets no subnet"
            )
    return refusals
