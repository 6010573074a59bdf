"""One immutable picture of the control plane per state generation, and what follows from it.

:class:`ControlFacts` is what the reconcilers, presence and the ACME task recorded (a frozen
copy taken from the state). :class:`Snapshot` decides once, from all of it, who holds each
domain (:mod:`kakuremichi.control.ownership`), and projects that one decision into everything that
depends on it:

- the edge configs' topology (routes, the certificate served for each domain, the HTTP-01
  tokens the gateways answer);
- each Tunnel's ``Ready`` verdict and the mirror's tunnels table;
- whether a Certificate may place an ACME order;
- which Agents may have a subnet.

Every part is computed on first use and kept, so the control channel, the status projector and
the reconcilers that ask in the same generation share one computation (a burst of changes
coalesces into one, at 5,000 Tunnels as at 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from uuid import UUID

from kakuremichi.api.protocol import AcmeChallenge, CertificateBundle, PortTrouble
from kakuremichi.api.resources import GATEWAY_OWN_PORTS
from kakuremichi.control.ownership import (
    AgentClaim,
    ClaimHistory,
    DomainOwnership,
    PortRules,
    PublicPort,
    Tenancy,
    TunnelFacts,
    decide_agents,
    decide_domains,
)
from kakuremichi.control.tls_material import names_only
from kakuremichi.control.topology import AgentNode, GatewayNode, Route, Topology
from kakuremichi.control.tunnel_readiness import CertificateVerdict, TunnelVerdict, routes, verdicts

CertificateKey = tuple[str, str]
"""(namespace, Certificate name)."""


@dataclass(frozen=True)
class ControlFacts:
    tunnels: Mapping[UUID, TunnelFacts] = field(default_factory=dict)
    route_claims: Mapping[UUID, TunnelFacts] = field(default_factory=dict)
    """Hosts of routes (Ingress, HTTPRoute), claiming beside the Tunnels."""
    endpoints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Route backend → its ready endpoints (projected into the cluster agent's config only:
    they take no part in the decision)."""
    agent_claims: Mapping[UUID, AgentClaim] = field(default_factory=dict)
    """Every Agent seen, provisioned or not."""
    agents: Mapping[UUID, AgentNode] = field(default_factory=dict)
    """Agents that have their subnet and keys."""
    agents_away: frozenset[UUID] = frozenset()
    """Provisioned Agents known not to be connected to control."""
    gateways: Mapping[UUID, GatewayNode] = field(default_factory=dict)
    gateway_boots: Mapping[UUID, str] = field(default_factory=dict)
    """Each gateway instance's process, as it last connected."""
    certificate_verdicts: Mapping[CertificateKey, CertificateVerdict] = field(default_factory=dict)
    bundles: Mapping[CertificateKey, CertificateBundle] = field(default_factory=dict)
    """The last good certificate and key of each Certificate."""
    challenges: Mapping[CertificateKey, AcmeChallenge] = field(default_factory=dict)
    tenancy: Tenancy = field(default_factory=Tenancy)
    history: ClaimHistory = field(default_factory=ClaimHistory)
    """When each claim began, as earlier decisions (and Tunnel status) recorded it."""
    ports_unavailable: Mapping[UUID, tuple[PortTrouble, ...]] = field(default_factory=dict)
    """Connected gateway instance → the tunnel ports it reports it cannot bind."""


@dataclass(frozen=True)
class TunnelRowFacts:
    """A row of the mirror's tunnels table: a held domain whose Agent is provisioned."""

    tunnel_id: UUID
    route: Route
    description: str | None


class Snapshot:
    def __init__(self, facts: ControlFacts, generation: int) -> None:
        self.facts = facts
        self.generation = generation

    @cached_property
    def ownership(self) -> DomainOwnership:
        facts = self.facts
        claims = [*facts.tunnels.values(), *facts.route_claims.values()]
        return decide_domains(claims, facts.tenancy, facts.history, self.port_rules)

    @cached_property
    def port_rules(self) -> PortRules:
        """Ports no Tunnel may hold (the gateways' defaults and every pool's own), and the
        ranges each pool opens to Tunnels."""
        reserved: dict[PublicPort, str] = dict(GATEWAY_OWN_PORTS)
        opened: dict[str, tuple[tuple[int, int], ...]] = {}
        for gateway in self.facts.gateways.values():
            pool = gateway.pool or gateway.name
            whose = f"Gateway {pool}'s"
            reserved.setdefault(("TCP", gateway.http_port), f"{whose} HTTP port")
            reserved.setdefault(("TCP", gateway.https_port), f"{whose} HTTPS port")
            reserved.setdefault(("UDP", gateway.wireguard_port), f"{whose} WireGuard port")
            opened[pool] = gateway.tunnel_ports
        return PortRules(reserved, opened)

    @cached_property
    def unavailable_ports(self) -> Mapping[PublicPort, tuple[str, str]]:
        """Public port → (a gateway instance that cannot bind it, why), from the reports of
        the gateways connected now."""
        found: dict[PublicPort, tuple[str, str]] = {}
        for gateway_id, troubles in sorted(self.facts.ports_unavailable.items()):
            gateway = self.facts.gateways.get(gateway_id)
            if gateway is None:
                continue
            for trouble in troubles:
                found.setdefault((trouble.protocol, trouble.port), (gateway.name, trouble.error))
        return found

    @cached_property
    def agent_refusals(self) -> Mapping[UUID, str]:
        """Agents beyond their namespace's quota → why they get no subnet."""
        return decide_agents(self.facts.agent_claims.values(), self.facts.tenancy)

    @cached_property
    def routes(self) -> tuple[Route, ...]:
        return routes(self.ownership, self.facts.agents)

    @cached_property
    def served_certificates(self) -> Mapping[str, tuple[CertificateKey, CertificateBundle]]:
        """Domain → the Certificate whose certificate is served for it (its holder's)."""
        served = {}
        for domain, holder in self.ownership.holders.items():
            key = holder.certificate_key
            bundle = self.facts.bundles.get(key)
            if bundle is not None and bundle.domain == domain:
                if _too_broad(holder, bundle):
                    continue
                served[domain] = (key, bundle)
        return served

    @cached_property
    def topology(self) -> Topology:
        facts = self.facts
        certificates = {domain: bundle for domain, (_, bundle) in self.served_certificates.items()}
        return Topology(
            agents=facts.agents,
            gateways=facts.gateways,
            gateway_boots=facts.gateway_boots,
            routes=self.routes,
            endpoints=facts.endpoints,
            certificates=certificates,
            challenges=tuple(
                facts.challenges[key]
                for key in sorted(facts.challenges)
                if self.may_issue(key, facts.challenges[key].domain)
            ),
        )

    @cached_property
    def verdicts(self) -> Mapping[UUID, TunnelVerdict]:
        facts = self.facts
        return verdicts(
            facts.tunnels, self.ownership, facts.agents, facts.certificate_verdicts,
            facts.agents_away, self.unavailable_ports,
        )  # fmt: skip

    @cached_property
    def route_verdicts(self) -> Mapping[UUID, TunnelVerdict]:
        """Whether each host of a route is served, and why not, as for Tunnels."""
        facts = self.facts
        found = dict(verdicts(
            facts.route_claims, self.ownership, facts.agents, facts.certificate_verdicts,
            facts.agents_away, self.unavailable_ports,
        ))  # fmt: skip
        for claim in facts.route_claims.values():
            bundle = facts.bundles.get(claim.certificate_key)
            if claim.id in found and bundle is not None and _too_broad(claim, bundle):
                found[claim.id] = TunnelVerdict(
                    "False", "CertificateTooBroad",
                    f"Certificate {claim.certificate} names more than {claim.domain}: a gRPC "
                    "host's HTTP/2 connections go whole to its backend, and clients reuse a "
                    "connection for every name its certificate covers. Give it a certificate "
                    "for this host alone (an HTTPS listener of that hostname, or ACME).",
                    found[claim.id].url, found[claim.id].claimed_since,
                )  # fmt: skip
        return found

    @cached_property
    def tunnel_rows(self) -> tuple[TunnelRowFacts, ...]:
        claims = {**self.facts.tunnels, **self.facts.route_claims}
        return tuple(
            TunnelRowFacts(route.tunnel_id, route, claims[route.tunnel_id].description)
            for route in self.routes
            if route.agent_id is not None
        )

    def may_issue(self, certificate: CertificateKey, domain: str) -> bool:
        """Whether a Certificate may hold an ACME order for ``domain``: only when the claim it
        serves (a Tunnel's, a route's) holds that domain now."""
        holder = self.ownership.holders.get(domain)
        return (
            holder is not None
            and holder.certificate_key == certificate
            and holder.certificate_issuer in (None, "ACME")
        )


def _too_broad(holder: TunnelFacts, bundle: CertificateBundle) -> bool:
    """A route's HTTP/2 host passed whole to one backend (a GRPCRoute's) whose certificate
    names other hosts too: never served (Tunnels with appProtocol H2C are their owner's
    choice, and unchanged)."""
    return (
        holder.source is not None
        and holder.app_protocol == "H2C"
        and holder.rules is None  # (calls routed one by one: each call's authority is checked)
        and not names_only(bundle.certificate, holder.domain)
    )
