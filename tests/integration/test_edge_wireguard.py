"""The edge's WireGuard driver (wireguard-go through its UAPI socket, addresses by netlink)
connects a gateway host and an agent host from plans made of pushed configs; the agent's plan
goes from no gateway to one as an incremental change."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from kakuremichi.api.protocol import (
    AgentConfig,
    AgentPeer,
    AgentSelf,
    GatewayConfig,
    GatewayPeer,
    GatewaySelf,
)
from kakuremichi.control.credentials import generate_wireguard_keypair
from kakuremichi.edge.wireguard_plan import agent_plan, gateway_plan
from tests.infra import netns, wireguard
from tests.infra.polling import wait_until

# Runs inside a host: applies each plan it reads (one JSON line each) and stays up.
DRIVER = """
import asyncio, json, sys
from kakuremichi.edge.wireguard import UserspaceWireGuard
from kakuremichi.edge.wireguard_plan import InterfacePlan, Peer
async def main():
    wg = UserspaceWireGuard(sys.argv[1])
    await wg.start()
    for line in open(sys.argv[2]):
        raw = json.loads(line)
        raw["peers"] = tuple(Peer(p["public_key"], tuple(p["allowed_ips"]), p["endpoint"],
                                  p["keepalive"]) for p in raw["peers"])
        raw["addresses"] = tuple(raw["addresses"])
        await wg.apply(InterfacePlan(**raw))
    print("applied", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def plan_line(plan: object) -> str:
    assert hasattr(plan, "peers")
    return json.dumps({
        "private_key": plan.private_key, "addresses": list(plan.addresses),  # type: ignore[attr-defined]
        "listen_port": plan.listen_port,  # type: ignore[attr-defined]
        "peers": [{"public_key": p.public_key, "allowed_ips": list(p.allowed_ips),
                   "endpoint": p.endpoint, "keepalive": p.keepalive} for p in plan.peers],
    }) + "\n"  # fmt: skip


def test_gateway_and_agent_connect_from_their_configs(
    make_host: netns.HostFactory, tmp_path: Path
) -> None:
    missing = wireguard.userspace_wireguard_missing()
    if missing:
        pytest.skip(missing)
    gateway, agent = make_host("gateway"), make_host("agent")
    netns.link(gateway, agent, "192.168.244.0")
    gw_keys, agent_keys = generate_wireguard_keypair(), generate_wireguard_keypair()
    agent_id, gateway_id = uuid.uuid4(), uuid.uuid4()
    gateway_config = GatewayConfig(
        version=1,
        gateway=GatewaySelf(id=gateway_id, public_ip=gateway.address, index=1),
        agents=[AgentPeer(id=agent_id, virtual_ip="10.5.0.100", subnet="10.5.0.0/24",
                          wireguard_public_key=agent_keys.public_key, address="10.5.0.1")],
    )  # fmt: skip
    agent_config = AgentConfig(
        version=1,
        agent=AgentSelf(id=agent_id, virtual_ip="10.5.0.100", subnet="10.5.0.0/24"),
        gateways=[GatewayPeer(id=gateway_id, public_ip=gateway.address,
                              wireguard_public_key=gw_keys.public_key, address="10.5.0.1")],
    )  # fmt: skip
    gateway_plans = tmp_path / "gateway.jsonl"
    gateway_plans.write_text(plan_line(gateway_plan(gateway_config, gw_keys.private_key)))
    # The agent first knows no gateway, then learns of one: an incremental change.
    empty = agent_config.model_copy(update={"gateways": []})
    agent_plans = tmp_path / "agent.jsonl"
    agent_plans.write_text(
        plan_line(agent_plan(empty, agent_keys.private_key))
        + plan_line(agent_plan(agent_config, agent_keys.private_key))
    )
    names = [f"wg{uuid.uuid4().hex[:6]}" for _ in range(2)]
    for host, name, plans in ((gateway, names[0], gateway_plans), (agent, names[1], agent_plans)):
        host.spawn([sys.executable, "-c", DRIVER, name, str(plans)], log=tmp_path / f"{name}.log")
    try:
        for name in names:
            wait_until(lambda n=name: "applied" in (tmp_path / f"{n}.log").read_text(),  # type: ignore[misc]
                       f"{name}'s plans to be applied")  # fmt: skip
        agent.spawn(["python3", "-m", "http.server", "8080", "--bind", "10.5.0.100"])
        wait_until(
            lambda: gateway.exec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                 "--max-time", "3", "http://10.5.0.100:8080/",
                                 check=False) == "200",
            "HTTP from the gateway to the agent's virtual IP over WireGuard",
        )  # fmt: skip
    finally:
        for name in names:
            Path(f"/var/run/wireguard/{name}.sock").unlink(missing_ok=True)
