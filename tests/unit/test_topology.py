"""Each edge's config follows from the topology: every agent peers with every gateway, an agent
gets only its own tunnels, a held domain without an agent is pushed without one (503). Who holds
a domain is decided before (tests/unit/test_ownership.py)."""

from __future__ import annotations

import uuid

from kakuremichi.api.protocol import CertificateBundle, GatewayConfigMessage
from kakuremichi.control.credentials import generate_wireguard_keypair
from kakuremichi.control.topology import (
    AgentNode,
    GatewayNode,
    Route,
    Topology,
    agent_config,
    agent_inputs,
    gateway_config,
    gateway_inputs,
)


def key() -> str:
    return generate_wireguard_keypair().public_key


HOME = AgentNode(uuid.uuid4(), "default", "home", 1, key())
OFFICE = AgentNode(uuid.uuid4(), "team", "office", 2, key())
TOKYO = GatewayNode(uuid.uuid4(), "tokyo", 1, "203.0.113.1", key())
OSAKA = GatewayNode(uuid.uuid4(), "osaka", 2, "203.0.113.2", key(), wireguard_port=51821)


def route(domain: str, agent: AgentNode | None, **kw: object) -> Route:
    return Route(domain, uuid.uuid5(uuid.NAMESPACE_DNS, domain), agent.id if agent else None,
                 str(kw.get("target", "localhost:8080")), bool(kw.get("enabled", True)),
                 bool(kw.get("h2c", False)))  # fmt: skip


def topology(*routes: Route) -> Topology:
    return Topology(
        agents={a.id: a for a in (HOME, OFFICE)},
        gateways={g.id: g for g in (TOKYO, OSAKA)},
        routes=routes,
        certificates={
            "app.example.com": CertificateBundle(
                domain="app.example.com", certificate="CHAIN", private_key="KEY"
            ),
            "gone.example.com": CertificateBundle(
                domain="gone.example.com", certificate="CHAIN", private_key="KEY"
            ),
        },
    )


def test_agent_sees_every_gateway_at_its_address_in_the_agents_subnet() -> None:
    config = agent_config(topology(route("app.example.com", OFFICE)), OFFICE.id, version=4)
    assert config.version == 4
    assert (config.agent.virtual_ip, config.agent.subnet) == ("10.2.0.100", "10.2.0.0/24")
    assert [(g.address, g.public_ip, g.wireguard_port) for g in config.gateways] == [
        ("10.2.0.1", "203.0.113.1", 51820),
        ("10.2.0.2", "203.0.113.2", 51821),
    ]
    assert [(t.domain, t.target) for t in config.tunnels] == [("app.example.com", "localhost:8080")]
    assert config.agent.wireguard_private_key is None


def test_agent_gets_only_its_own_tunnels() -> None:
    config = agent_config(
        topology(route("app.example.com", OFFICE), route("home.example.com", HOME)), HOME.id, 1
    )
    assert [t.domain for t in config.tunnels] == ["home.example.com"]


def test_gateway_sees_every_agent_and_its_own_addresses() -> None:
    config = gateway_config(topology(route("app.example.com", HOME)), OSAKA.id, version=9)
    assert config.gateway.index == 2
    assert [(a.virtual_ip, a.address) for a in config.agents] == [
        ("10.1.0.100", "10.1.0.2"),
        ("10.2.0.100", "10.2.0.2"),
    ]
    assert [(t.domain, t.agent_virtual_ip) for t in config.tunnels] == [
        ("app.example.com", "10.1.0.100")
    ]
    # Certificates only for domains that are served.
    assert [c.domain for c in config.certificates] == ["app.example.com"]


def test_agents_of_an_enlarged_pool_use_their_third_octet_everywhere() -> None:
    far = AgentNode(uuid.uuid4(), "default", "far", 2 * 256 + 1, key())  # 10.1.2.0/24
    routes = (route("far.example.com", far),)
    world = Topology(agents={a.id: a for a in (far, HOME)},
                     gateways={g.id: g for g in (TOKYO, OSAKA)}, routes=routes)  # fmt: skip
    mine = agent_config(world, far.id, version=1)
    assert (mine.agent.virtual_ip, mine.agent.subnet) == ("10.1.2.100", "10.1.2.0/24")
    assert [g.address for g in mine.gateways] == ["10.1.2.1", "10.1.2.2"]
    theirs = gateway_config(world, OSAKA.id, version=1)
    # The document's subnets first, as allocated.
    assert [(a.subnet, a.address) for a in theirs.agents] == [
        ("10.1.0.0/24", "10.1.0.2"),
        ("10.1.2.0/24", "10.1.2.2"),
    ]
    assert [t.agent_virtual_ip for t in theirs.tunnels] == ["10.1.2.100"]


def test_a_held_domain_whose_agent_is_missing_is_pushed_without_an_agent() -> None:
    """The gateway then answers 503: the domain stays its holder's, under its certificate."""
    world = topology(route("app.example.com", None), route("home.example.com", HOME))
    config = gateway_config(world, TOKYO.id, 1)
    assert [(t.domain, t.agent_virtual_ip) for t in config.tunnels] == [
        ("app.example.com", None),
        ("home.example.com", "10.1.0.100"),
    ]
    assert [c.domain for c in config.certificates] == ["app.example.com"]
    assert [r.domain for r in world.served_routes()] == ["home.example.com"]
    assert [t.domain for t in agent_config(world, HOME.id, 1).tunnels] == ["home.example.com"]


def test_disabled_tunnels_are_pushed_with_enabled_false() -> None:
    config = gateway_config(topology(route("app.example.com", HOME, enabled=False)), TOKYO.id, 1)
    assert [(t.domain, t.enabled) for t in config.tunnels] == [("app.example.com", False)]
    assert [c.domain for c in config.certificates] == ["app.example.com"]


def test_inputs_change_exactly_when_a_config_may_change() -> None:
    """The control channel skips rendering an edge whose inputs are equal: a change that
    concerns other edges must leave them equal, one that concerns this edge must not."""
    before = topology(route("app.example.com", HOME))
    same = topology(route("app.example.com", HOME))
    assert agent_inputs(before, HOME.id) == agent_inputs(same, HOME.id)
    assert gateway_inputs(before, TOKYO.id) == gateway_inputs(same, TOKYO.id)
    # A new agent: every gateway's config changes, no other agent's.
    newcomer = AgentNode(uuid.uuid4(), "default", "new", 3, key())
    grown = Topology(agents={**before.agents, newcomer.id: newcomer},
                     gateways=before.gateways, routes=before.routes,
                     certificates=before.certificates)  # fmt: skip
    assert agent_inputs(grown, HOME.id) == agent_inputs(before, HOME.id)
    assert gateway_inputs(grown, TOKYO.id) != gateway_inputs(before, TOKYO.id)
    # A new gateway: every agent's config changes, no other gateway's.
    third = GatewayNode(uuid.uuid4(), "kyoto", 3, "203.0.113.3", key())
    wider = Topology(agents=before.agents, gateways={**before.gateways, third.id: third},
                     routes=before.routes, certificates=before.certificates)  # fmt: skip
    assert agent_inputs(wider, HOME.id) != agent_inputs(before, HOME.id)
    assert gateway_inputs(wider, TOKYO.id) == gateway_inputs(before, TOKYO.id)
    # A tunnel of another agent: gateways, not the first agent.
    routed = topology(route("app.example.com", HOME), route("office.example.com", OFFICE))
    assert agent_inputs(routed, HOME.id) == agent_inputs(before, HOME.id)
    assert agent_inputs(routed, OFFICE.id) != agent_inputs(before, OFFICE.id)
    assert gateway_inputs(routed, TOKYO.id) != gateway_inputs(before, TOKYO.id)
    # Equal inputs render equal configs.
    assert agent_config(grown, HOME.id, 1) == agent_config(before, HOME.id, 1)
    assert gateway_config(wider, TOKYO.id, 1) == gateway_config(before, TOKYO.id, 1)


def test_configs_rendered_from_shared_parts_stay_apart() -> None:
    """Agents share each gateway's validated peer; a copy per agent carries its own address."""
    world = topology()
    home, office = agent_config(world, HOME.id, 1), agent_config(world, OFFICE.id, 1)
    assert [g.address for g in home.gateways] == ["10.1.0.1", "10.1.0.2"]
    assert [g.address for g in office.gateways] == ["10.2.0.1", "10.2.0.2"]
    assert agent_config(world, HOME.id, 1) == home


def test_gateways_learn_which_targets_speak_h2c_and_older_messages_stay_as_they_were() -> None:
    config = gateway_config(
        topology(route("app.example.com", HOME), route("grpc.example.com", HOME, h2c=True)),
        TOKYO.id, 1,
    )  # fmt: skip
    protocols = {t.domain: t.app_protocol for t in config.tunnels}
    assert protocols == {"app.example.com": None, "grpc.example.com": "H2C"}
    encoded = GatewayConfigMessage(data=config).model_dump_json(by_alias=True, exclude_none=True)
    assert encoded.count('"appProtocol"') == 1


def test_a_gateway_that_restarted_reaches_every_agent_and_no_gateway() -> None:
    """Its new boot id goes to every agent (they start new sessions with it); gateways'
    configs do not change."""
    before = topology(route("app.example.com", HOME))
    restarted = Topology(agents=before.agents, gateways=before.gateways, routes=before.routes,
                         certificates=before.certificates,
                         gateway_boots={TOKYO.id: "3f2a9c"})  # fmt: skip
    assert agent_inputs(restarted, HOME.id) != agent_inputs(before, HOME.id)
    assert gateway_inputs(restarted, TOKYO.id) == gateway_inputs(before, TOKYO.id)
    config = agent_config(restarted, HOME.id, 1)
    assert [g.boot for g in config.gateways] == ["3f2a9c", None]  # (by index: Tokyo, Osaka)
