"""WireGuard plans follow the address plan, and changes touch only the peers that changed."""

from __future__ import annotations

import base64
import uuid

from kakuremichi.api.protocol import (
    AgentConfig,
    AgentPeer,
    AgentSelf,
    GatewayConfig,
    GatewayPeer,
    GatewaySelf,
)
from kakuremichi.control.credentials import generate_wireguard_keypair
from kakuremichi.edge.wireguard_plan import (
    address_changes,
    agent_plan,
    gateway_plan,
    keep_sessions,
    uapi_set,
)

GW1, GW2, AG1, AG2 = (generate_wireguard_keypair() for _ in range(4))


def hex_of(key: str) -> str:
    return base64.b64decode(key).hex()


def agent_config(*gateways: tuple[str, int]) -> AgentConfig:
    keys = {1: GW1, 2: GW2}
    return AgentConfig(
        version=1,
        agent=AgentSelf(id=uuid.uuid4(), virtual_ip="10.3.0.100", subnet="10.3.0.0/24"),
        gateways=[
            GatewayPeer(
                id=uuid.uuid4(),
                public_ip=ip,
                wireguard_public_key=keys[g].public_key,
                wireguard_port=51820,
                address=f"10.3.0.{g}",
            )
            for ip, g in gateways
        ],
    )


def test_agent_plan_dials_every_gateway_with_keepalive() -> None:
    plan = agent_plan(agent_config(("203.0.113.1", 1), ("203.0.113.2", 2)), AG1.private_key)
    assert plan.addresses == ("10.3.0.100/24",)
    assert plan.listen_port is None
    assert [(p.allowed_ips, p.endpoint, p.keepalive) for p in plan.peers] == [
        (("10.3.0.1/32",), "203.0.113.1:51820", 25),
        (("10.3.0.2/32",), "203.0.113.2:51820", 25),
    ]


def test_gateway_plan_holds_its_address_in_every_agent_subnet() -> None:
    config = GatewayConfig(
        version=1,
        gateway=GatewaySelf(
            id=uuid.uuid4(), public_ip="203.0.113.1", index=1, wireguard_port=51821
        ),
        agents=[
            AgentPeer(id=uuid.uuid4(), virtual_ip=f"10.{n}.0.100", subnet=f"10.{n}.0.0/24",
                      wireguard_public_key=key.public_key, address=f"10.{n}.0.1")
            for n, key in ((1, AG1), (2, AG2))
        ],
    )  # fmt: skip
    plan = gateway_plan(config, GW1.private_key)
    assert plan.listen_port == 51821
    assert plan.addresses == ("10.1.0.1/24", "10.2.0.1/24")
    assert [(p.public_key, p.allowed_ips, p.endpoint) for p in plan.peers] == [
        (AG1.public_key, ("10.1.0.100/32",), None),
        (AG2.public_key, ("10.2.0.100/32",), None),
    ]


def test_fresh_interface_gets_everything_in_hex() -> None:
    request = uapi_set(agent_plan(agent_config(("203.0.113.1", 1)), AG1.private_key))
    assert request.startswith(f"set=1\nprivate_key={hex_of(AG1.private_key)}\n")
    assert f"public_key={hex_of(GW1.public_key)}\nreplace_allowed_ips=true\n" in request
    assert "allowed_ip=10.3.0.1/32\nendpoint=203.0.113.1:51820\n" in request
    assert request.endswith("persistent_keepalive_interval=25\n\n")


def test_changes_touch_only_changed_peers() -> None:
    before = agent_plan(agent_config(("203.0.113.1", 1)), AG1.private_key)
    after = agent_plan(agent_config(("203.0.113.1", 1), ("203.0.113.2", 2)), AG1.private_key)
    request = uapi_set(after, before)
    assert "private_key" not in request
    assert hex_of(GW1.public_key) not in request  # the unchanged gateway keeps its session
    assert hex_of(GW2.public_key) in request
    removal = uapi_set(before, after)
    assert f"public_key={hex_of(GW2.public_key)}\nremove=true\n" in removal
    assert uapi_set(after, after) == "set=1\n\n"


def test_address_changes() -> None:
    before = agent_plan(agent_config(), AG1.private_key)
    moved = agent_plan(
        agent_config().model_copy(update={"agent": AgentSelf(
            id=uuid.uuid4(), virtual_ip="10.4.0.100", subnet="10.4.0.0/24")}),
        AG1.private_key,
    )  # fmt: skip
    assert address_changes(moved, before) == (["10.4.0.100/24"], ["10.3.0.100/24"])
    assert address_changes(before, None) == (["10.3.0.100/24"], [])


def booted(config: AgentConfig, boot: str | None) -> AgentConfig:
    return config.model_copy(update={"gateways": [
        g.model_copy(update={"boot": boot}) for g in config.gateways
    ]})  # fmt: skip


def test_a_restarted_gateway_gets_a_fresh_session_and_nothing_else_does() -> None:
    """Behind NAT only the agent can start a handshake, and WireGuard would start one on its
    own only when the old session is two minutes old: a gateway that restarted (a new boot id)
    is removed and added again, which sends its first handshake at once."""
    config = agent_config(("203.0.113.1", 1))
    first = agent_plan(booted(config, "boot-a"), AG1.private_key)
    again = agent_plan(booted(config, "boot-a"), AG1.private_key)
    assert uapi_set(again, first) == "set=1\n\n"  # same process: its session goes on
    restarted = agent_plan(booted(config, "boot-b"), AG1.private_key)
    request = uapi_set(restarted, first)
    removal = f"public_key={hex_of(GW1.public_key)}\nremove=true\n"
    readded = f"public_key={hex_of(GW1.public_key)}\nreplace_allowed_ips=true\n"
    assert removal in request and readded in request
    assert request.index(removal) < request.index(readded)
    assert request.endswith("persistent_keepalive_interval=25\n\n")  # (sent at once)
    # Learning the boot id for the first time (a control of an older release before) is no
    # restart: the session goes on.
    unknown = agent_plan(booted(config, None), AG1.private_key)
    assert "remove=true" not in uapi_set(first, unknown)


def test_a_config_without_the_boot_id_does_not_hide_a_later_restart() -> None:
    """A control that restarted has not seen the gateway reconnect yet: its configs carry no
    boot id for it. The agent keeps the one it knew, so the gateway's new one still counts."""
    config = agent_config(("203.0.113.1", 1))
    known = agent_plan(booted(config, "boot-a"), AG1.private_key)
    unknown = keep_sessions(agent_plan(booted(config, None), AG1.private_key), known)
    assert unknown.peers[0].session == "boot-a"
    assert uapi_set(unknown, known) == "set=1\n\n"
    later = agent_plan(booted(config, "boot-b"), AG1.private_key)
    assert "remove=true" in uapi_set(keep_sessions(later, unknown), unknown)
