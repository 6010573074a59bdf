"""Hosts of Ingresses in the one ownership decision, beside Tunnels: who holds a host, what the
gateways and the cluster agent are told, and what a tenant learns when refused. Pure: facts in,
the snapshot's projections out."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from kakuremichi.control.addressing import SubnetAllocator, SubnetPool
from kakuremichi.control.credentials import generate_wireguard_keypair
from kakuremichi.control.ingress_routes import (
    ServiceFacts,
    claim_id,
    host_claims,
    ingress_routes,
)
from kakuremichi.control.ownership import TenantRule, TunnelFacts
from kakuremichi.control.snapshot import ControlFacts, Snapshot
from kakuremichi.control.state import ControlState
from kakuremichi.control.store import Sealer
from kakuremichi.control.topology import AgentNode, GatewayNode, agent_config, gateway_config

T0 = datetime(2026, 12, 1, tzinfo=UTC)
NOW = T0 + timedelta(days=5)


def key() -> str:
    return generate_wireguard_keypair().public_key


SYSTEM = "kakuremichi-system"
CLUSTER_AGENT = AgentNode(uuid.uuid4(), SYSTEM, "kakuremichi-cluster-agent", 1,
                          key())  # fmt: skip
HOME = AgentNode(uuid.uuid4(), "alice", "home", 2, key())
GATEWAY = GatewayNode(uuid.uuid4(), "tokyo", 1, "203.0.113.1", key())
WEB = {"metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 80}]}}
SERVICES = {"web": ServiceFacts.of(WEB)}


def ingress(namespace: str, host: str, created: datetime, name: str = "web") -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": name, "uid": str(uuid.uuid4()),
                     "creationTimestamp": created.isoformat().replace("+00:00", "Z"),
                     "generation": 1},
        "spec": {"ingressClassName": "kakuremichi", "rules": [{"host": host, "http": {"paths": [
            {"path": "/", "pathType": "Prefix",
             "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]},
    }  # fmt: skip


def claims(body: dict[str, Any], seen_at: datetime | None = None) -> tuple[TunnelFacts, ...]:
    """An Ingress's claims, as an operator that first saw it at ``seen_at`` (default: when it
    was created) would make them."""
    created = datetime.fromisoformat(body["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    routes = ingress_routes(body, SERVICES)
    seen = {claim_id(body["metadata"]["uid"], host): seen_at or created for host in routes.hosts}
    return host_claims(body, routes, (SYSTEM, CLUSTER_AGENT.name), seen, NOW)


def tunnel(namespace: str, domain: str, created: datetime) -> TunnelFacts:
    return TunnelFacts(
        id=uuid.uuid4(), namespace=namespace, name="site", domain=domain, agent="home",
        target="localhost:8080", enabled=True, created=created, generation=1, certificate="site",
    )  # fmt: skip


def snapshot(*facts: TunnelFacts, routes: tuple[TunnelFacts, ...] = ()) -> Snapshot:
    return Snapshot(ControlFacts(
        tunnels={t.id: t for t in facts}, route_claims={c.id: c for c in routes},
        endpoints={"shop/web:80": ("10.244.1.7:80", "10.244.2.9:80")},
        agents={a.id: a for a in (CLUSTER_AGENT, HOME)}, gateways={GATEWAY.id: GATEWAY},
    ), 1)  # fmt: skip


def test_an_ingress_host_is_served_through_the_cluster_agent_by_its_rules() -> None:
    shop = claims(ingress("shop", "shop.example.com", T0))
    decided = snapshot(tunnel("alice", "alice.example.com", T0), routes=shop)
    gateway = gateway_config(decided.topology, GATEWAY.id, 1)
    served = {t.domain: t for t in gateway.tunnels}
    assert served["shop.example.com"].agent_virtual_ip == CLUSTER_AGENT.virtual_ip
    assert (
        served["shop.example.com"].rules is not None and served["alice.example.com"].rules is None
    )
    agent = agent_config(decided.topology, CLUSTER_AGENT.id, 1)
    assert agent.tunnels == [] and agent.backends is not None
    assert [(b.name, b.endpoints) for b in agent.backends] == [
        ("shop/web:80", ["10.244.1.7:80", "10.244.2.9:80"])]  # fmt: skip
    home = agent_config(decided.topology, HOME.id, 1)
    assert home.backends is None and [t.domain for t in home.tunnels] == ["alice.example.com"]
    rows = {row.route.domain: row.description for row in decided.tunnel_rows}
    assert rows["shop.example.com"] == "Ingress shop/web"


def test_the_oldest_claim_holds_whether_a_tunnel_or_an_ingress_and_refusals_name_no_tenant() -> (
    None
):
    older_tunnel = tunnel("alice", "shop.example.com", T0)
    younger_ingress = claims(ingress("shop", "shop.example.com", T0 + timedelta(hours=1)))
    decided = snapshot(older_tunnel, routes=younger_ingress)
    assert decided.ownership.holders["shop.example.com"].id == older_tunnel.id
    refusal = decided.ownership.refusals[younger_ingress[0].id]
    assert refusal.reason == "DomainConflict" and "alice" not in refusal.message
    assert "another namespace" in refusal.message

    older_ingress = claims(ingress("shop", "shop.example.com", T0 - timedelta(hours=1)))
    decided = snapshot(older_tunnel, routes=older_ingress)
    assert decided.ownership.holders["shop.example.com"].id == older_ingress[0].id
    assert decided.verdicts[older_tunnel.id].reason == "DomainConflict"

    same_namespace = tunnel("shop", "shop.example.com", T0 + timedelta(hours=2))
    decided = snapshot(same_namespace, routes=older_ingress)
    assert "Ingress web of this namespace" in decided.verdicts[same_namespace.id].message


def test_a_claim_keeps_its_id_and_an_ingress_host_its_certificate_name() -> None:
    body = ingress("shop", "shop.example.com", T0)
    first, again = claims(body), claims(body)
    assert first[0].id == again[0].id and first[0].certificate == again[0].certificate
    assert first[0].certificate.startswith("web-") and first[0].namespace == "shop"


def test_facts_go_into_the_state_through_its_methods_and_each_change_is_a_generation() -> None:
    state = ControlState(Sealer(Sealer.generate_key()), SubnetAllocator(SubnetPool()))
    shop = claims(ingress("shop", "shop.example.com", T0))
    before = state.generation
    state.set_route_claims("Ingress shop/web", shop)
    state.set_route_claims("Ingress shop/web", shop)  # (the same: no new generation)
    state.set_endpoints("shop/web:80", ("10.244.1.7:80",))
    assert state.generation == before + 2
    facts = state.snapshot().facts
    assert set(facts.route_claims) == {shop[0].id}
    assert facts.endpoints == {"shop/web:80": ("10.244.1.7:80",)}
    state.set_route_claims("Ingress shop/web", ())
    state.set_endpoints("shop/web:80", None)
    assert state.snapshot().facts.route_claims == {} and state.snapshot().facts.endpoints == {}


def test_an_old_ingress_edited_to_name_a_held_domain_claims_it_from_now() -> None:
    holder = tunnel("bob", "shop.example.com", T0 + timedelta(days=1))
    body = ingress("mallory", "shop.example.com", T0)  # created long before the Tunnel...
    routes = ingress_routes(body, SERVICES)
    # ...but this host is new to the operator (it was edited in today): dated now, not T0
    edited = host_claims(body, routes, (SYSTEM, CLUSTER_AGENT.name), {}, NOW)
    decided = snapshot(holder, routes=edited)
    assert decided.ownership.holders["shop.example.com"].id == holder.id
    assert decided.ownership.refusals[edited[0].id].reason == "DomainConflict"


def test_route_claims_keep_their_dates_and_refusals_from_one_decision_to_the_next() -> None:
    state = ControlState(Sealer(Sealer.generate_key()), SubnetAllocator(SubnetPool()))
    tight = TenantRule("tight", frozenset({"shop"}), suffixes=(".example.com",), max_tunnels=1)
    state.set_tenant_rule(tight)
    shop = claims(ingress("shop", "a.example.com", T0))
    extra = claims(ingress("shop", "b.example.com", T0 + timedelta(hours=1), name="extra"))
    state.set_route_claims("Ingress shop/web", shop)
    state.set_route_claims("Ingress shop/extra", extra)
    state.record_claims(state.snapshot().ownership)
    assert state.claim_since[shop[0].id] == T0 and extra[0].id in state.claim_refused


def test_hosts_the_gateways_would_refuse_never_reach_them_and_never_stop_the_others() -> None:
    body = ingress("shop", "shop.123", T0)
    assert ingress_routes(body, SERVICES).hosts == {}  # (the API server allows it; we do not)
    many = ingress("shop", "many.example.com", T0)
    many["spec"]["rules"][0]["http"]["paths"] = [
        {"path": f"/p{i}", "pathType": "Exact",
         "backend": {"service": {"name": "web", "port": {"number": 80}}}} for i in range(600)
    ]  # fmt: skip
    routes = ingress_routes(many, SERVICES)
    assert len(routes.hosts["many.example.com"].rules) == 500
    assert "at most 500 paths" in routes.problems[0]
    broken = dataclasses.replace(claims(ingress("shop", "ok.example.com", T0))[0],
                                 domain="bad..example.com")  # fmt: skip
    decided = snapshot(tunnel("alice", "alice.example.com", T0), routes=(broken,))
    served = [t.domain for t in gateway_config(decided.topology, GATEWAY.id, 1).tunnels]
    assert served == ["alice.example.com"]
