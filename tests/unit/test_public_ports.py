"""TCP and UDP Tunnels' public ports: who holds one (oldest claim, never a Gateway pool's own),
what a refusal says about other tenants (nothing), what the edges are told, and the spec's rules
across fields (the same sentence from the model and from the API server's schema)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kakuremichi.api import crd
from kakuremichi.api.fields import describe_errors
from kakuremichi.api.protocol import PortTrouble, encode
from kakuremichi.api.resources import TUNNEL, TUNNEL_RULES, GatewaySpec, TunnelSpec
from kakuremichi.control.credentials import generate_wireguard_keypair
from kakuremichi.control.ownership import Tenancy, TunnelFacts, decide_domains
from kakuremichi.control.snapshot import ControlFacts, Snapshot
from kakuremichi.control.topology import AgentNode, GatewayNode, agent_config, gateway_config
from kakuremichi.control.tunnel_readiness import CertificateVerdict

T0 = datetime(2026, 1, 1, tzinfo=UTC)
AGENTS = {
    namespace: AgentNode(
        uuid.uuid4(), namespace, "home", number, generate_wireguard_keypair().public_key
    )
    for number, namespace in enumerate(("team-a", "team-b"), start=1)
}
GATEWAY_KEY = generate_wireguard_keypair().public_key
GATEWAY = GatewayNode(
    uuid.uuid4(),
    "node-a",
    1,
    "203.0.113.1",
    GATEWAY_KEY,
    pool="edge",
    https_port=8443,
    tunnel_ports=((1024, 65535),),
)


def tunnel(namespace: str, name: str, domain: str, minutes: int = 0, **changes: Any) -> TunnelFacts:
    made = TunnelFacts(uuid.uuid4(), namespace, name, domain, "home", "localhost:22", True,
                       T0 + timedelta(minutes=minutes), 1, name)  # fmt: skip
    return dataclasses.replace(made, **changes)


def tcp(namespace: str, name: str, port: int, minutes: int = 0, **changes: Any) -> TunnelFacts:
    return tunnel(namespace, name, f"{name}.{namespace}.example.com", minutes,
                  protocol="TCP", port=port, **changes)  # fmt: skip


Troubles = dict[uuid.UUID, tuple[PortTrouble, ...]]


def world(*tunnels: TunnelFacts, unavailable: Troubles | None = None,
          gateways: tuple[GatewayNode, ...] = (GATEWAY,)) -> Snapshot:  # fmt: skip
    return Snapshot(
        ControlFacts(
            tunnels={t.id: t for t in tunnels},
            agents={a.id: a for a in AGENTS.values()},
            gateways={g.id: g for g in gateways},
            certificate_verdicts={
                (t.namespace, t.name): CertificateVerdict(True, "Valid", "") for t in tunnels
            },
            ports_unavailable=unavailable or {},
        ),
        1,
    )


def reasons(snapshot: Snapshot) -> dict[str, tuple[str, str]]:
    tunnels = snapshot.facts.tunnels
    return {tunnels[i].name: (v.reason, v.message) for i, v in snapshot.verdicts.items()}


# --- who holds a port ---------------------------------------------------------------------------


def test_the_oldest_claim_on_a_port_holds_it_and_another_namespace_learns_nothing() -> None:
    holder = tcp("team-a", "db", 5432)
    squatter = tcp("team-b", "probe", 5432, minutes=5)
    snapshot = world(squatter, holder)
    found = reasons(snapshot)
    assert found["db"][0] == "Serving"
    assert found["probe"] == (
        "PortConflict",
        "spec.port: 5432/TCP is already claimed by another namespace",
    )
    config = gateway_config(snapshot.topology, GATEWAY.id, 1)
    assert [(t.domain, t.protocol, t.port) for t in config.tunnels] == [
        ("db.team-a.example.com", "TCP", 5432)
    ]
    # Not even the younger one's domain is routed (it would have no port to be reached on).
    assert not [t for t in agent_config(snapshot.topology, AGENTS["team-b"].id, 1).tunnels]


def test_a_conflict_in_one_namespace_names_the_holder() -> None:
    found = reasons(world(tcp("team-a", "ssh", 2222), tcp("team-a", "ssh2", 2222, minutes=1)))
    assert found["ssh2"] == (
        "PortConflict",
        "spec.port: 2222/TCP is already claimed by Tunnel ssh of this namespace",
    )


def test_tcp_and_udp_of_one_number_are_two_ports() -> None:
    dns_tcp = tcp("team-a", "dns", 5353)
    dns_udp = tunnel("team-b", "dnsu", "dnsu.example.com", minutes=1, protocol="UDP", port=5353)
    found = reasons(world(dns_tcp, dns_udp))
    assert found["dns"][0] == found["dnsu"][0] == "Serving"


def test_a_younger_claim_never_displaces_a_disabled_holder() -> None:
    off = tcp("team-a", "game", 27015, enabled=False)
    found = reasons(world(off, tcp("team-b", "grab", 27015, minutes=3)))
    assert found["game"][0] == "Disabled"
    assert found["grab"][0] == "PortConflict"


def test_a_pools_own_ports_are_nobodys() -> None:
    """A pool configured with https 8443 reserves 8443/TCP: the Tunnel is told which Gateway
    uses it (Gateways are the cluster admin's, no tenant's)."""
    found = reasons(world(tcp("team-a", "alt", 8443)))
    assert found["alt"] == (
        "PortConflict",
        "spec.port: 8443/TCP is Gateway edge's HTTPS port: pick another port",
    )
    wireguard = tunnel("team-a", "wg", "wg.example.com", protocol="UDP", port=51820)
    ownership = decide_domains([wireguard], Tenancy(), ports=world().port_rules)
    assert ownership.refusals[wireguard.id].reason == "PortConflict"


def test_a_tunnel_waiting_for_its_domain_keeps_its_place_for_its_port() -> None:
    """A Tunnel behind an older claim on its domain still claims its port from its own date,
    so a later Tunnel cannot take the port and lose it again when the domain comes free: the
    domain's refusal is what it is told first."""
    holder = tcp("team-a", "db", 5432)
    waiting = dataclasses.replace(tcp("team-b", "dup", 6000, minutes=1), domain=holder.domain)
    later = tcp("team-b", "other", 6000, minutes=2)
    found = reasons(world(holder, waiting, later))
    assert {name: reason for name, (reason, _) in found.items()} == {
        "db": "Serving", "dup": "DomainConflict", "other": "PortConflict",
    }  # fmt: skip
    assert "Tunnel dup of this namespace" in found["other"][1]


def test_a_port_a_gateway_cannot_bind_is_port_unavailable_while_that_gateway_is_connected() -> None:
    db = tcp("team-a", "db", 5432)
    trouble = (PortTrouble(protocol="TCP", port=5432, error="address already in use"),)
    found = reasons(world(db, unavailable={GATEWAY.id: trouble}))
    assert found["db"] == (
        "PortUnavailable",
        "gateway node-a cannot listen on 5432/TCP: another program there holds it; the gateway "
        "retries every 10 s (its log says more)",
    )  # (not the host's own error: what it runs is none of a tenant's business)
    gone = uuid.uuid4()  # a report of an instance no longer known counts for nothing
    assert reasons(world(db, unavailable={gone: trouble}))["db"][0] == "Serving"


def test_urls_and_what_the_edges_are_told() -> None:
    ssh = tcp("team-a", "ssh", 2222, proxy_protocol="V2")
    dns = tunnel("team-a", "dns", "dns.example.com", protocol="UDP", port=5353, proxy_protocol="V2")
    tls = tunnel("team-a", "vault", "vault.example.com", protocol="TLS")
    web = tunnel("team-a", "web", "web.example.com")
    snapshot = world(ssh, dns, tls, web)
    assert {snapshot.facts.tunnels[i].name: v.url for i, v in snapshot.verdicts.items()} == {
        "ssh": "tcp://ssh.team-a.example.com:2222",
        "dns": "udp://dns.example.com:5353",
        "vault": "https://vault.example.com",
        "web": "https://web.example.com",
    }
    agent = agent_config(snapshot.topology, AGENTS["team-a"].id, 1)
    told = {t.domain: (t.protocol, t.port, t.proxy_protocol) for t in agent.tunnels}
    assert told == {
        "ssh.team-a.example.com": ("TCP", 2222, "V2"),
        "dns.example.com": ("UDP", 5353, "V2"),
        "vault.example.com": ("TLS", None, None),
        "web.example.com": (None, None, None),
    }
    # An HTTP tunnel's entry is what edges of earlier releases read (nothing new in it).
    assert '"protocol"' not in encode(agent.tunnels[-1]) and "proxyProtocol" not in encode(
        agent.tunnels[-1]
    )
    gateway = gateway_config(snapshot.topology, GATEWAY.id, 1)
    assert {t.domain: (t.protocol, t.port) for t in gateway.tunnels}["dns.example.com"] == (
        "UDP",
        5353,
    )


def test_only_http_tunnels_have_their_certificate_served() -> None:
    from kakuremichi.api.protocol import CertificateBundle

    tls = tunnel("team-a", "vault", "vault.example.com", protocol="TLS")
    bundle = CertificateBundle(domain="vault.example.com", certificate="C", private_key="K")
    snapshot = Snapshot(
        dataclasses.replace(world(tls).facts, bundles={("team-a", "vault"): bundle}), 1
    )
    assert gateway_config(snapshot.topology, GATEWAY.id, 1).certificates == []


# --- the spec's rules across fields -------------------------------------------------------------

SPEC = {"domain": "db.example.com", "agent": "home", "target": "localhost:5432"}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"protocol": "TCP"}, ".port"),
        ({"protocol": "UDP"}, ".port"),
        ({"port": 5432}, ".port"),
        ({"protocol": "TLS", "port": 5432}, ".port"),
        ({"protocol": "TCP", "port": 443}, ".port"),
        ({"protocol": "TCP", "port": 80}, ".port"),
        ({"protocol": "UDP", "port": 51820}, ".port"),
        ({"proxyProtocol": "V2"}, ".proxyProtocol"),
        ({"protocol": "UDP", "port": 53, "proxyProtocol": "V1"}, ".proxyProtocol"),
        ({"protocol": "TCP", "port": 5432, "appProtocol": "H2C"}, ".appProtocol"),
    ],
)
def test_a_spec_that_does_not_fit_its_protocol_is_refused_with_one_sentence(
    spec: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        TUNNEL.model.model_validate(
            {"apiVersion": "kakuremichi.io/v1alpha1", "kind": "Tunnel", "metadata": {"name": "x"},
             "spec": SPEC | spec}
        )  # fmt: skip
    (line,) = describe_errors(refused.value)
    broken = [r for r in TUNNEL_RULES if line == f"spec: {r.message}"]
    assert broken, line
    assert broken[0].field_path == field
    rules = yaml.safe_load(crd.render(TUNNEL))["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"
    ]["spec"]["x-kubernetes-validations"]
    assert {"rule": broken[0].cel, "message": broken[0].message, "fieldPath": field} in rules


@pytest.mark.parametrize(
    "spec",
    [
        {"protocol": "TCP", "port": 22},
        {"protocol": "TCP", "port": 5432, "proxyProtocol": "V1"},
        {"protocol": "UDP", "port": 53, "proxyProtocol": "V2"},
        {"protocol": "TLS", "proxyProtocol": "V2"},
        {"protocol": "TLS"},
        {"protocol": "TCP", "port": 8443},  # (a pool's port is decided with the claims)
        {"appProtocol": "H2C"},
        {"protocol": "UDP", "port": 443},  # 443/UDP is no gateway's
    ],
)
def test_specs_that_fit_their_protocol_pass(spec: dict[str, Any]) -> None:
    TunnelSpec.model_validate(SPEC | spec)


def test_accept_proxy_protocol_needs_trusted_proxies() -> None:
    with pytest.raises(ValidationError, match="acceptProxyProtocol needs trustedProxies"):
        GatewaySpec.model_validate({"acceptProxyProtocol": True})
    GatewaySpec.model_validate({"acceptProxyProtocol": True, "trustedProxies": ["10.0.0.0/8"]})


def test_a_port_a_pool_does_not_open_is_nobodys() -> None:
    """None by default: a tenant cannot take a node's 22, a kubelet's 10250 or a CNI's 8472,
    nor one a node's service binds after the Tunnel; the admin opens ranges meant for them."""
    ssh = tcp("team-a", "ssh", 22)
    found = reasons(world(ssh))
    assert found["ssh"] == (
        "PortNotAllowed",
        "spec.port: 22/TCP is not among the ports Gateway edge opens to Tunnels (its "
        "spec.tunnelPorts: 1024-65535)",
    )
    shut = dataclasses.replace(GATEWAY, tunnel_ports=())
    kubelet = tcp("team-a", "kubelet", 10250)
    assert reasons(world(kubelet, gateways=(shut,)))["kubelet"][1].endswith(
        "(its spec.tunnelPorts: none)"
    )
    opened = dataclasses.replace(GATEWAY, tunnel_ports=((22, 22), (1024, 65535)))
    assert reasons(world(ssh, gateways=(opened,)))["ssh"][0] == "Serving"
    # A Tunnel that may not have its port keeps no one else from it.
    later = tcp("team-b", "ssh2", 22, minutes=1)
    assert reasons(world(ssh, later, gateways=(opened,)))["ssh2"][0] == "PortConflict"


def test_a_tunnel_that_comes_to_hold_its_domain_late_takes_no_port_held_meanwhile() -> None:
    """The sleeper: an attacker's TCP Tunnel waits behind its own HTTP Tunnel on the same
    domain; a victim takes port 5000 later; the attacker deletes the HTTP Tunnel so that the
    sleeper holds its domain. Its claim on the port was there all along, so the victim never
    got the port in the first place (and never loses a port it serves)."""
    blocker = tunnel("team-b", "blocker", "evil.example.com", minutes=0)
    sleeper = tunnel("team-b", "sleeper", "evil.example.com", minutes=1, protocol="TCP", port=5000)
    victim = tcp("team-a", "db", 5000, minutes=2)
    before = reasons(world(blocker, sleeper, victim))
    assert before["sleeper"][0] == "DomainConflict"
    assert before["db"] == (
        "PortConflict",
        "spec.port: 5000/TCP is already claimed by another namespace",
    )
    after = reasons(world(sleeper, victim))
    assert after["sleeper"][0] == "Serving" and after["db"][0] == "PortConflict"
    # Without a sleeper, whoever serves a port keeps it while it exists.
    alone = reasons(world(victim, tunnel("team-b", "late", "late.example.com", minutes=3,
                                          protocol="TCP", port=5000)))  # fmt: skip
    assert alone["db"][0] == "Serving" and alone["late"][0] == "PortConflict"
