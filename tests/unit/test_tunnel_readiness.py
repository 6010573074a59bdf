"""A Tunnel's readiness follows from the whole picture, says why it does not serve, and takes its
reasons from one precedence table (which docs/resources.md shows)."""

from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

from kakuremichi.control.addressing import SubnetAllocator, SubnetPool
from kakuremichi.control.credentials import generate_wireguard_keypair
from kakuremichi.control.ownership import (
    PortRules,
    PublicPort,
    Tenancy,
    TenantRule,
    TunnelFacts,
    decide_domains,
)
from kakuremichi.control.state import ControlState
from kakuremichi.control.store import Sealer
from kakuremichi.control.topology import AgentNode
from kakuremichi.control.tunnel_readiness import (
    READY_RULES,
    CertificateVerdict,
    routes,
    verdicts,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOME = AgentNode(uuid.uuid4(), "default", "home", 1, generate_wireguard_keypair().public_key)
GOOD = CertificateVerdict(True, "Valid", "valid")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "resources.md"


def tunnel(name: str, domain: str = "app.example.com", agent: str = "home", minutes: int = 0,
           enabled: bool = True, namespace: str = "default") -> TunnelFacts:  # fmt: skip
    return TunnelFacts(uuid.uuid4(), namespace, name, domain, agent, "localhost:8080", enabled,
                       T0 + timedelta(minutes=minutes), 1, name)  # fmt: skip


Verdicts = dict[str, tuple[str, str, str]]


def verdict_of(
    *tunnels: TunnelFacts,
    certificates: dict[str, CertificateVerdict] | None = None,
    agents: tuple[AgentNode, ...] = (HOME,),
    tenancy: Tenancy | None = None,
    away: frozenset[UUID] = frozenset(),
    reserved: dict[PublicPort, str] | None = None,
    unavailable: dict[PublicPort, tuple[str, str]] | None = None,
    opened: dict[str, tuple[tuple[int, int], ...]] | None = None,
) -> Verdicts:
    certs = {(t.namespace, t.name): GOOD for t in tunnels}
    certs |= {("default", k): v for k, v in (certificates or {}).items()}
    rules = PortRules(reserved or {}, opened or {})
    ownership = decide_domains(tunnels, tenancy or Tenancy(), ports=rules)
    result = verdicts(
        {t.id: t for t in tunnels}, ownership, {a.id: a for a in agents}, certs, away,
        unavailable,
    )  # fmt: skip
    return {
        t.name: (result[t.id].status, result[t.id].reason, result[t.id].message) for t in tunnels
    }


def test_serving_tunnel() -> None:
    assert verdict_of(tunnel("app"))["app"][:2] == ("True", "Serving")


def test_missing_agent() -> None:
    status, reason, message = verdict_of(tunnel("app", agent="ghost"))["app"]
    assert (status, reason) == ("False", "AgentNotReady")
    assert "default/ghost" in message


def test_conflict_in_one_namespace_names_the_holder_which_keeps_serving() -> None:
    result = verdict_of(tunnel("second", minutes=5), tunnel("first"))
    assert result["first"][:2] == ("True", "Serving")
    assert result["second"][:2] == ("False", "DomainConflict")
    assert "already claimed by Tunnel first of this namespace" in result["second"][2]


def test_a_conflict_with_another_namespace_names_nobody() -> None:
    holder = tunnel("secret-project", namespace="team-a")
    result = verdict_of(tunnel("probe", minutes=5, namespace="team-b"), holder)
    reason, message = result["probe"][1:]
    assert reason == "DomainConflict"
    assert message == "app.example.com is already claimed by another namespace"
    assert "team-a" not in message and "secret-project" not in message


def test_certificate_problem_is_passed_through() -> None:
    bad = CertificateVerdict(False, "Expired", "the certificate expired at ...")
    status, reason, message = verdict_of(tunnel("app"), certificates={"app": bad})["app"]
    assert (status, reason) == ("False", "Expired")
    assert message.startswith("Certificate app: the certificate expired")


def test_disabled_tunnel_is_not_ready_but_keeps_its_domain() -> None:
    off = tunnel("app", enabled=False)
    later = tunnel("later", minutes=1, namespace="other")
    assert verdict_of(off, later)["app"][:2] == ("False", "Disabled")
    ownership = decide_domains([off, later], Tenancy())
    (route,) = routes(ownership, {HOME.id: HOME})
    assert (route.tunnel_id, route.enabled) == (off.id, False)


def test_a_holder_without_agent_keeps_its_domain_unrouted() -> None:
    holder = tunnel("holder", agent="ghost")
    younger = tunnel("younger", minutes=1, namespace="other")
    ownership = decide_domains([holder, younger], Tenancy())
    (route,) = routes(ownership, {HOME.id: HOME})
    assert (route.tunnel_id, route.agent_id) == (holder.id, None)


def test_an_h2c_tunnel_routes_as_h2c() -> None:
    grpc = dataclasses.replace(tunnel("grpc"), app_protocol="H2C")
    plain = tunnel("web", domain="web.example.com")
    ownership = decide_domains([grpc, plain], Tenancy())
    found = {r.domain: r.h2c for r in routes(ownership, {HOME.id: HOME})}
    assert found == {"app.example.com": True, "web.example.com": False}


def test_precedence_follows_the_table() -> None:
    """A TCP Tunnel that is over quota, not allowed its domain, without its port, agent,
    enablement or a gateway able to listen reports the first rule of the table, and each fix
    uncovers the next; the certificate rule (HTTP Tunnels only) comes before Disabled."""
    policy = TenantRule("team", match_names=frozenset({"default"}), domains=frozenset(
        {"ok.example.com"}), max_tunnels=1)  # fmt: skip
    tenancy = Tenancy((policy,))
    older = tunnel("older", domain="ok.example.com", minutes=-1)
    worst = dataclasses.replace(
        tunnel("worst", domain="app.example.com", agent="ghost", enabled=False),
        protocol="TCP", port=2222,
    )  # fmt: skip
    taken: dict[PublicPort, str] = {("TCP", 2222): "Gateway edge's HTTPS port"}
    refused: dict[PublicPort, tuple[str, str]] = {("TCP", 2222): ("node-a", "Address in use")}
    seen = [verdict_of(older, worst, tenancy=tenancy)["worst"][1]]
    seen.append(verdict_of(worst, tenancy=tenancy)["worst"][1])
    allowed = Tenancy((dataclasses.replace(policy, domains=frozenset({"app.example.com"})),))
    holder = tunnel("holder", domain="app.example.com", minutes=-5, namespace="x")
    seen.append(verdict_of(holder, worst, tenancy=Tenancy())["worst"][1])
    shut: dict[str, tuple[tuple[int, int], ...]] = {"edge": ((10000, 20000),)}
    seen.append(verdict_of(worst, tenancy=allowed, reserved=taken, opened=shut)["worst"][1])
    seen.append(verdict_of(worst, tenancy=allowed, reserved=taken)["worst"][1])
    seen.append(verdict_of(worst, tenancy=allowed)["worst"][1])
    fixed = dataclasses.replace(worst, agent="home")
    seen.append(verdict_of(fixed, tenancy=allowed, away=frozenset({HOME.id}))["worst"][1])
    web = dataclasses.replace(fixed, protocol="HTTP", port=None)
    bad = CertificateVerdict(False, "SecretNotFound", "no Secret")
    seen.append(verdict_of(web, tenancy=allowed, certificates={"worst": bad})["worst"][1])
    seen.append(verdict_of(fixed, tenancy=allowed, unavailable=refused)["worst"][1])
    enabled = dataclasses.replace(fixed, enabled=True)
    seen.append(verdict_of(enabled, tenancy=allowed, unavailable=refused)["worst"][1])
    seen.append(verdict_of(enabled, tenancy=allowed)["worst"][1])
    table = [r.reason for r in READY_RULES]
    assert seen == [
        "QuotaExceeded", "DomainNotAllowed", "DomainConflict", "PortNotAllowed", "PortConflict",
        "AgentNotReady",
        "AgentOffline", "SecretNotFound", "Disabled", "PortUnavailable", "Serving",
    ]  # fmt: skip
    assert [table.index(r if r in table else "<Certificate's reason>") for r in seen] == list(
        range(len(table))
    )


def test_the_documented_table_is_the_codes() -> None:
    text = DOCS.read_text()
    section = text[text.index("### Why a Tunnel is not Ready") :]
    documented = re.findall(r"^\| \d+ \| `?([^`|]+?)`? \|", section, flags=re.MULTILINE)
    assert documented == [r.reason for r in READY_RULES]


def test_a_tunnel_whose_agent_is_away_says_so_without_losing_its_domain() -> None:
    status, reason, message = verdict_of(tunnel("app"), away=frozenset({HOME.id}))["app"]
    assert (status, reason) == ("False", "AgentOffline")
    assert "not connected" in message and "502" in message


def test_agents_are_away_only_once_presence_is_settled_or_seen_to_leave() -> None:
    """After an operator restart, an Agent not back yet is not called away at once: its edge
    may still be reconnecting; one seen to leave is, and so is any not back after the grace."""
    state = ControlState(Sealer(Sealer.generate_key()), SubnetAllocator(SubnetPool()))
    state.restore_agent(HOME)
    assert state.agents_away() == frozenset()
    state.agent_connected(HOME.id, True)
    state.agent_connected(HOME.id, False)
    assert state.agents_away() == {HOME.id}
    state.agent_connected(HOME.id, True)
    assert state.agents_away() == frozenset()
    other = dataclasses.replace(HOME, id=uuid.uuid4(), name="other", subnet_number=2)
    state.restore_agent(other)
    assert state.agents_away() == frozenset()
    state.settle_presence()
    assert state.agents_away() == {other.id}
