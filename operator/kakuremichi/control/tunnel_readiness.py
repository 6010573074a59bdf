"""Whether a Tunnel serves, and if not why: a pure function of what the control plane knows.

A Tunnel's readiness depends on other resources (its Agent, the other claims on its domain, its
certificate), so it is computed from the whole picture every time that picture changes, rather
than from the Tunnel's own events alone. That is what lets a Tunnel recover by itself when its
Agent comes back or the holder of its domain goes away.

:data:`READY_RULES` is the one precedence order of the ``Ready`` reasons: the first rule that
applies gives the verdict (docs/resources.md shows the same table).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from kakuremichi.api.conditions import ConditionStatus
from kakuremichi.control.ownership import DomainOwnership, PublicPort, TunnelFacts
from kakuremichi.control.topology import AgentNode, Route


@dataclass(frozen=True)
class CertificateVerdict:
    ready: bool
    reason: str
    message: str


@dataclass(frozen=True)
class TunnelVerdict:
    status: ConditionStatus
    reason: str
    message: str
    url: str
    claimed_since: datetime | None = None
    """When its claim on the domain began (None: it claims nothing)."""


@dataclass(frozen=True)
class Picture:
    """What a rule may look at besides the Tunnel itself."""

    ownership: DomainOwnership
    agents: Mapping[tuple[str, str], AgentNode]
    """(namespace, name) → provisioned Agent."""
    certificates: Mapping[tuple[str, str], CertificateVerdict]
    away: frozenset[UUID] = frozenset()
    """Provisioned Agents not connected to control."""
    unavailable_ports: Mapping[PublicPort, tuple[str, str]] = field(default_factory=dict)
    """Public ports a connected gateway could not bind → (its instance, the error)."""


Finding = tuple[str, str] | None
"""(reason, message) when a rule applies."""


@dataclass(frozen=True)
class ReadyRule:
    reason: str
    """The reason it gives, or ``<Certificate's reason>`` for the certificate rule."""
    meaning: str
    finding: Callable[[TunnelFacts, Picture], Finding]


def _not_holder(standing: str) -> Callable[[TunnelFacts, Picture], Finding]:
    def finding(tunnel: TunnelFacts, picture: Picture) -> Finding:
        refusal = picture.ownership.refusals.get(tunnel.id)
        if refusal is None or refusal.reason != standing:
            return None
        return refusal.reason, refusal.message

    return finding


def _agent_missing(tunnel: TunnelFacts, picture: Picture) -> Finding:
    if tunnel.agent_key in picture.agents:
        return None
    return "AgentNotReady", (
        f"Agent {'/'.join(tunnel.agent_key)} does not exist or is not provisioned "
        f"({tunnel.domain} stays this Tunnel's meanwhile)"
    )


def _agent_offline(tunnel: TunnelFacts, picture: Picture) -> Finding:
    agent = picture.agents.get(tunnel.agent_key)
    if agent is None or agent.id not in picture.away:
        return None
    what = "requests for" if tunnel.protocol == "HTTP" else "clients of"
    fate = "get 502" if tunnel.protocol == "HTTP" else "are closed"
    return "AgentOffline", (
        f"Agent {'/'.join(tunnel.agent_key)} is not connected to control: {what} "
        f"{tunnel.url} {fate} until it is (start its edge, or check its network)"
    )


def _port_unavailable(tunnel: TunnelFacts, picture: Picture) -> Finding:
    port = tunnel.public_port
    trouble = picture.unavailable_ports.get(port) if port is not None else None
    if port is None or trouble is None:
        return None
    instance, _ = trouble  # (the error itself would tell a tenant what the host runs)
    return "PortUnavailable", (
        f"gateway {instance} cannot listen on {port[1]}/{port[0]}: another program there holds "
        "it; the gateway retries every 10 s (its log says more)"
    )


def _certificate_not_ready(tunnel: TunnelFacts, picture: Picture) -> Finding:
    if tunnel.protocol != "HTTP":
        return None  # passed through or forwarded: the gateways need no certificate of its
    certificate = picture.certificates.get(tunnel.certificate_key)
    if certificate is not None and certificate.ready:
        return None
    why = certificate.message if certificate else "not yet reconciled"
    reason = certificate.reason if certificate else "CertificatePending"
    return reason, f"Certificate {tunnel.certificate}: {why}"


def _disabled(tunnel: TunnelFacts, picture: Picture) -> Finding:
    return None if tunnel.enabled else ("Disabled", "spec.enabled is false")


def _serving(tunnel: TunnelFacts, picture: Picture) -> Finding:
    how = " (TLS passed through)" if tunnel.protocol == "TLS" else ""
    # (a passed-through route's target is a placeholder: its backends say where it goes)
    to = ", ".join(tunnel.backends) if tunnel.backends and tunnel.rules is None else tunnel.target
    return "Serving", f"{tunnel.url}{how} routes to {to}"


READY_RULES: tuple[ReadyRule, ...] = (
    ReadyRule(
        "QuotaExceeded",
        "the namespace has more Tunnels than a TenantPolicy selecting it allows "
        "(`maxTunnels`) and this one is not among the oldest: it claims nothing",
        _not_holder("QuotaExceeded"),
    ),
    ReadyRule(
        "DomainNotAllowed",
        "TenantPolicies exist and none that selects the namespace lists the domain: it "
        "claims nothing",
        _not_holder("DomainNotAllowed"),
    ),
    ReadyRule(
        "DomainConflict",
        "an older Tunnel holds the domain (the message names it only when it is in the same "
        "namespace); this one takes over once the holder is deleted",
        _not_holder("DomainConflict"),
    ),
    ReadyRule(
        "PortNotAllowed",
        "the Tunnel (TCP, UDP) holds its domain, but a Gateway pool does not open its port to "
        "Tunnels (`Gateway.spec.tunnelPorts`: none until the admin opens a range): it claims "
        "no port",
        _not_holder("PortNotAllowed"),
    ),
    ReadyRule(
        "PortConflict",
        "the Tunnel holds its domain but not its port (TCP, UDP): an older Tunnel holds that "
        "protocol and port (named only when in the same namespace), or a Gateway pool uses "
        "it; it takes over once the holder is deleted",
        _not_holder("PortConflict"),
    ),
    ReadyRule(
        "AgentNotReady",
        "the Tunnel holds the domain but its Agent does not exist or has no subnet yet "
        "(`PoolExhausted`, `QuotaExceeded`): the gateways answer 503 for the domain, which "
        "no other Tunnel gets meanwhile",
        _agent_missing,
    ),
    ReadyRule(
        "AgentOffline",
        "the Agent is provisioned but its edge is not connected to control (stopped, cut off, "
        "never started; after an operator restart, not back within a heartbeat timeout): the "
        "gateways answer 502; `Serving` again within seconds of its return",
        _agent_offline,
    ),
    ReadyRule(
        "<Certificate's reason>",
        "the Certificate is not ready, and its reason is passed on: `CertificatePending`, "
        "`SecretNotFound`, `SecretNotOwned`, `DomainMismatch`, `Expired`, `Issuing`, "
        "`NoGatewayOnline`, `DomainNotHeld`, `Acme…`",
        _certificate_not_ready,
    ),
    ReadyRule(
        "Disabled",
        "`spec.enabled` is false: routed, answered 404 (TLS: closed; TCP, UDP: the port is "
        "not listened on)",
        _disabled,
    ),
    ReadyRule(
        "PortUnavailable",
        "a connected gateway cannot listen on the Tunnel's port (another program there holds "
        "it); it retries every 10 s, and the Tunnel is `Serving` once every gateway listens",
        _port_unavailable,
    ),
    ReadyRule("Serving", "`Ready=True`: the domain routes to the target", _serving),
)


def agents_by_name(agents: Mapping[UUID, AgentNode]) -> dict[tuple[str, str], AgentNode]:
    return {(agent.namespace, agent.name): agent for agent in agents.values()}


def verdicts(
    tunnels: Mapping[UUID, TunnelFacts],
    ownership: DomainOwnership,
    agents: Mapping[UUID, AgentNode],
    certificates: Mapping[tuple[str, str], CertificateVerdict],
    away: frozenset[UUID] = frozenset(),
    unavailable_ports: Mapping[PublicPort, tuple[str, str]] | None = None,
) -> dict[UUID, TunnelVerdict]:
    picture = Picture(
        ownership, agents_by_name(agents), certificates, away, unavailable_ports or {}
    )
    result: dict[UUID, TunnelVerdict] = {}
    for tunnel in tunnels.values():
        for rule in READY_RULES:
            found = rule.finding(tunnel, picture)
            if found is not None:
                reason, message = found
                status: ConditionStatus = "True" if reason == "Serving" else "False"
                result[tunnel.id] = TunnelVerdict(
                    status, reason, message, tunnel.url, ownership.claims.get(tunnel.id)
                )
                break
    return result


def routes(ownership: DomainOwnership, agents: Mapping[UUID, AgentNode]) -> tuple[Route, ...]:
    """One route per held domain, sorted by domain: to the holder's Agent, or to none (the
    gateways answer 503) while that Agent is not provisioned. Never to a younger claim. A
    holder without the port it asks for (PortConflict) has none."""
    by_name = agents_by_name(agents)
    found = []
    for domain in sorted(ownership.holders):
        holder = ownership.holders[domain]
        if not ownership.serves(holder):
            continue
        agent = by_name.get(holder.agent_key)
        found.append(
            Route(
                domain,
                holder.id,
                agent.id if agent is not None else None,
                holder.target,
                holder.enabled,
                h2c=holder.app_protocol == "H2C",
                hsts=holder.hsts,
                protocol=holder.protocol,
                port=holder.port if holder.public_port is not None else None,
                proxy_protocol=holder.proxy_protocol,
                rules=holder.rules,
                backends=holder.backends,
                shares=holder.shares,
            )
        )
    return tuple(found)
