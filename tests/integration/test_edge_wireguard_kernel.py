"""The edge's kernel WireGuard driver (rtnetlink link, genl configuration) connects a gateway host
and an agent host from plans made of pushed configs; a later change on the gateway (a second
agent) leaves the first agent's session alone: same handshake, traffic still flowing."""

from __future__ import annotations

import base64
import dataclasses
import json
import sys
import uuid
from pathlib import Path

from kakuremichi.api.protocol import (
    AgentConfig,
    AgentPeer,
    AgentSelf,
    GatewayConfig,
    GatewayPeer,
    GatewaySelf,
)
from kakuremichi.control.credentials import generate_wireguard_keypair
from kakuremichi.edge.wireguard_plan import InterfacePlan, agent_plan, gateway_plan
from tests.infra import netns
from tests.infra.polling import wait_until

# Runs inside a host and follows a command file, one line each: a plan (JSON) to apply,
# "peers" to print peer handshakes, "stop" to delete the interface and exit.
DRIVER = """
import asyncio, json, sys
from kakuremichi.edge.wireguard import KernelWireGuard
from kakuremichi.edge.wireguard_plan import InterfacePlan, Peer
async def main():
    wg = KernelWireGuard(sys.argv[1])
    await wg.start()
    pending = ""
    with open(sys.argv[2]) as commands:
        while True:
            pending += commands.readline()
            if not pending.endswith("\\n"):  # nothing new yet, or half a line
                await asyncio.sleep(0.05)
                continue
            command, pending = json.loads(pending), ""
            if command == "stop":
                await wg.stop()
                print("stopped", flush=True)
                return
            if command == "peers":
                handshakes = {p.public_key_hex: p.last_handshake_seconds for p in await wg.peers()}
                print("peers", json.dumps(handshakes), flush=True)
                continue
            command["peers"] = tuple(Peer(**{**p, "allowed_ips": tuple(p["allowed_ips"])})
                                     for p in command["peers"])
            command["addresses"] = tuple(command["addresses"])
            await wg.apply(InterfacePlan(**command))
            print("applied", flush=True)
asyncio.run(main())
"""


def plan_line(plan: InterfacePlan) -> str:
    return json.dumps({
        "private_key": plan.private_key, "addresses": list(plan.addresses),
        "listen_port": plan.listen_port, "peers": [dataclasses.asdict(p) for p in plan.peers],
    }) + "\n"  # fmt: skip


class Driver:
    """The driver process in one host: send it commands, read what it printed."""

    def __init__(self, host: netns.Host, tmp_path: Path) -> None:
        self.host = host
        self.name = f"wg{uuid.uuid4().hex[:6]}"
        self.commands = tmp_path / f"{self.name}.commands"
        self.log = tmp_path / f"{self.name}.log"
        self.commands.touch()
        host.spawn([sys.executable, "-c", DRIVER, self.name, str(self.commands)], log=self.log)

    def send(self, line: str) -> None:
        with self.commands.open("a") as commands:
            commands.write(line)

    def wait_for(self, word: str, count: int) -> None:
        wait_until(lambda: self.printed(word) >= count,
                   f"{self.name} to print {word!r} {count} time(s); log: {self.log}")  # fmt: skip

    def printed(self, word: str) -> int:
        return sum(1 for line in self.log.read_text().splitlines() if line.split()[:1] == [word])

    def handshakes(self) -> dict[str, int]:
        """Latest handshake per peer (hex key), asked of the driver's own ``peers()``."""
        asked = self.printed("peers")
        self.send('"peers"\n')
        self.wait_for("peers", asked + 1)
        last = [line for line in self.log.read_text().splitlines() if line.startswith("peers ")]
        handshakes: dict[str, int] = json.loads(last[-1].removeprefix("peers "))
        return handshakes


def hex_of(key: str) -> str:
    return base64.b64decode(key).hex()


def http_status(host: netns.Host, url: str) -> str:
    return host.exec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                     url, check=False)  # fmt: skip


def test_kernel_wireguard_connects_and_changes_incrementally(
    kernel_wireguard: None, make_host: netns.HostFactory, tmp_path: Path
) -> None:
    gateway, agent = make_host("gateway"), make_host("agent")
    netns.link(gateway, agent, "192.168.245.0")
    gw_keys, agent_keys, other_keys = (generate_wireguard_keypair() for _ in range(3))
    agent_id, gateway_id = uuid.uuid4(), uuid.uuid4()
    first_agent = AgentPeer(
        id=agent_id,
        virtual_ip="10.5.0.100",
        subnet="10.5.0.0/24",
        wireguard_public_key=agent_keys.public_key,
        address="10.5.0.1",
    )
    other_agent = AgentPeer(
        id=uuid.uuid4(),
        virtual_ip="10.6.0.100",
        subnet="10.6.0.0/24",
        wireguard_public_key=other_keys.public_key,
        address="10.6.0.1",
    )
    gateway_config = GatewayConfig(
        version=1,
        gateway=GatewaySelf(id=gateway_id, public_ip=gateway.address, index=1),
        agents=[first_agent],
    )
    agent_config = AgentConfig(
        version=1,
        agent=AgentSelf(id=agent_id, virtual_ip="10.5.0.100", subnet="10.5.0.0/24"),
        gateways=[GatewayPeer(id=gateway_id, public_ip=gateway.address,
                              wireguard_public_key=gw_keys.public_key, address="10.5.0.1")],
    )  # fmt: skip
    gateway_driver, agent_driver = Driver(gateway, tmp_path), Driver(agent, tmp_path)
    gateway_driver.send(plan_line(gateway_plan(gateway_config, gw_keys.private_key)))
    # The agent first knows no gateway, then learns of one: an incremental change.
    empty = agent_config.model_copy(update={"gateways": []})
    agent_driver.send(plan_line(agent_plan(empty, agent_keys.private_key)))
    agent_driver.send(plan_line(agent_plan(agent_config, agent_keys.private_key)))
    gateway_driver.wait_for("applied", 1)
    agent_driver.wait_for("applied", 2)

    agent.spawn(["python3", "-m", "http.server", "8080", "--bind", "10.5.0.100"])
    url = "http://10.5.0.100:8080/"
    wait_until(lambda: http_status(gateway, url) == "200",
               "HTTP from the gateway to the agent's virtual IP over kernel WireGuard")  # fmt: skip
    before = gateway_driver.handshakes()
    assert before[hex_of(agent_keys.public_key)] > 0

    # A second agent joins: the gateway gets a peer and an address, the first agent nothing.
    two_agents = gateway_config.model_copy(update={"agents": [first_agent, other_agent]})
    gateway_driver.send(plan_line(gateway_plan(two_agents, gw_keys.private_key)))
    gateway_driver.wait_for("applied", 2)
    after = gateway_driver.handshakes()
    assert after == {
        hex_of(agent_keys.public_key): before[hex_of(agent_keys.public_key)],  # same session
        hex_of(other_keys.public_key): 0,
    }
    assert "10.6.0.1/24" in gateway.exec("ip", "-o", "addr", "show", "dev", gateway_driver.name)
    assert http_status(gateway, url) == "200"

    gateway_driver.send('"stop"\n')
    gateway_driver.wait_for("stopped", 1)
    assert gateway_driver.name not in gateway.exec("ip", "-o", "link", "show")
