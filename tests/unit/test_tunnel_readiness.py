"""A Tunnel's readiness follows from the whole picture, and says why it does not serve."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

from kakuremichi.credentials import generate_wireguard_keypair
from kakuremichi.edge_config import AgentNode
from kakuremichi.tunnel_readiness import CertificateVerdict, TunnelFacts, routes, verdicts

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOME = AgentNode(uuid.uuid4(), "default", "home", 1, generate_wireguard_keypair().public_key)
GOOD = CertificateVerdict(True, "Valid", "valid")


def tunnel(name: str, domain: str = "app.example.com", agent: str = "home", minutes: int = 0,
           enabled: bool = True) -> TunnelFacts:  # fmt: skip
    return TunnelFacts(uuid.uuid4(), "default", name, domain, agent, "localhost:8080", enabled,
                       T0 + timedelta(minutes=minutes), 1, name)  # fmt: skip


Verdicts = dict[str, tuple[str, str, str]]


def verdict_of(
    *tunnels: TunnelFacts,
    certificates: dict[str, CertificateVerdict] | None = None,
    agents: tuple[AgentNode, ...] = (HOME,),
) -> Verdicts:
    certs = {("default", t.name): GOOD for t in tunnels}
    certs |= {("default", k): v for k, v in (certificates or {}).items()}
    result = verdicts({t.id: t for t in tunnels}, {a.id: a for a in agents}, certs)
    return {
        t.name: (result[t.id].status, result[t.id].reason, result[t.id].message) for t in tunnels
    }


def test_serving_tunnel() -> None:
    assert verdict_of(tunnel("app"))["app"][:2] == ("True", "Serving")


def test_missing_agent() -> None:
    status, reason, message = verdict_of(tunnel("app", agent="ghost"))["app"]
    assert (status, reason) == ("False", "AgentNotReady")
    assert "default/ghost" in message


def test_conflict_names_the_holder_and_the_holder_keeps_serving() -> None:
    result = verdict_of(tunnel("second", minutes=5), tunnel("first"))
    assert result["first"][:2] == ("True", "Serving")
    assert result["second"][:2] == ("False", "DomainConflict")
    assert "already claimed by Tunnel default/first" in result["second"][2]


def test_certificate_problem_is_passed_through() -> None:
    bad = CertificateVerdict(False, "Expired", "the certificate expired at ...")
    status, reason, message = verdict_of(tunnel("app"), certificates={"app": bad})["app"]
    assert (status, reason) == ("False", "Expired")
    assert message.startswith("Certificate app: the certificate expired")


def test_disabled_tunnel_is_not_ready_but_still_routed_as_disabled() -> None:
    off = tunnel("app", enabled=False)
    assert verdict_of(off)["app"][:2] == ("False", "Disabled")
    (route,) = routes({off.id: off}, {HOME.id: HOME})
    assert route.enabled is False


def test_routes_skip_tunnels_of_missing_agents() -> None:
    ghost = tunnel("ghost", agent="ghost")
    assert routes({ghost.id: ghost}, {HOME.id: HOME}) == ()


def test_an_h2c_tunnel_routes_as_h2c() -> None:
    grpc = dataclasses.replace(tunnel("grpc"), app_protocol="H2C")
    plain = tunnel("web", domain="web.example.com")
    found = {r.domain: r.h2c for r in routes({grpc.id: grpc, plain.id: plain}, {HOME.id: HOME})}
    assert found == {"app.example.com": True, "web.example.com": False}
