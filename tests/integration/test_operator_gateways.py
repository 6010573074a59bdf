"""External Gateways: identity and index from the operator, a config with every agent at the
gateway's address inside each agent's subnet, and each agent told about every gateway."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from kakuremichi import protocol
from kakuremichi.credentials import api_key_role, wireguard_public_key
from kakuremichi.resources import AGENT, GATEWAY, TUNNEL
from tests.infra.cluster import Cluster, unique_name
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import wait_until
from tests.infra.tlsgen import TestCA
from tests.integration.conftest import OperatorProcess


@dataclass
class World:
    gateways: Objects
    agents: Objects
    tunnels: Objects
    secrets: Secrets


@pytest.fixture
def world(kube: Cluster, operator: OperatorProcess) -> Iterator[World]:
    made = World(
        Objects(kube, operator.namespace, GATEWAY),
        Objects(kube, operator.namespace, AGENT),
        Objects(kube, operator.namespace, TUNNEL),
        Secrets(kube, operator.namespace),
    )
    yield made
    made.tunnels.delete_all()
    made.agents.delete_all()
    made.gateways.delete_all()


async def first_config(url: str, api_key: str, until: Any = None) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/ws") as ws:
        await ws.send_str(protocol.encode(protocol.AuthMessage(api_key=api_key)))
        while True:
            config: dict[str, Any] = json.loads((await ws.receive(timeout=15)).data)
            if until is None or until(config):
                return config


def test_external_gateway_serves_every_agent_and_tunnel(
    world: World, operator: OperatorProcess
) -> None:
    gateways, agents, tunnels, secrets = world.gateways, world.agents, world.tunnels, world.secrets
    gateway_name = unique_name("edge")
    gateways.create(
        gateway_name, {"mode": "External", "publicIP": "203.0.113.10", "region": "tokyo"}
    )
    status = gateways.ready(gateway_name)
    (instance,) = status["instances"]
    assert (instance["index"], instance["publicIP"]) == (1, "203.0.113.10")
    credentials = secrets.read(status["credentialsSecret"])
    assert credentials is not None and api_key_role(credentials["apiKey"]) == "gateway"
    assert (
        wireguard_public_key(credentials["wireguardPrivateKey"]) == instance["wireguardPublicKey"]
    )

    agents.create("home")
    agent_status = agents.ready("home")
    domain = f"{unique_name('gw')}.example.com"
    issued = TestCA().issue(domain)
    secrets.put_tls("gw-tls", issued.certificate_pem, issued.private_key_pem)
    tunnels.create("gw", {"domain": domain, "agent": "home", "target": "localhost:8080",
                          "tls": {"issuer": "Secret", "secretName": "gw-tls"}})  # fmt: skip
    tunnels.ready("gw")

    config = asyncio.run(
        first_config(operator.control_url, credentials["apiKey"], lambda c: c["data"]["tunnels"])
    )["data"]
    subnet_number = int(agent_status["subnet"].split(".")[1])
    assert config["gateway"]["publicIp"] == "203.0.113.10"
    assert config["gateway"]["index"] == 1
    assert config["agents"] == [
        {
            "id": config["agents"][0]["id"],
            "virtualIp": agent_status["virtualIP"],
            "subnet": agent_status["subnet"],
            "wireguardPublicKey": agent_status["wireguardPublicKey"],
            "address": f"10.{subnet_number}.0.1",
        }
    ]
    assert config["tunnels"] == [
        {"domain": domain, "agentVirtualIp": agent_status["virtualIP"],
         "target": "localhost:8080", "enabled": True}
    ]  # fmt: skip
    assert [c["domain"] for c in config["certificates"]] == [domain]
    assert config["certificates"][0]["certificate"] == issued.certificate_pem

    agent_key = (secrets.read(agent_status["credentialsSecret"]) or {})["apiKey"]
    agent_config = asyncio.run(first_config(operator.control_url, agent_key))["data"]
    assert agent_config["gateways"] == [
        {"id": config["gateway"]["id"], "publicIp": "203.0.113.10",
         "wireguardPublicKey": instance["wireguardPublicKey"], "wireguardPort": 51820,
         "address": f"10.{subnet_number}.0.1"}
    ]  # fmt: skip
    with sqlite3.connect(operator.db_path) as db:
        rows = db.execute("SELECT name, public_ip, region FROM gateways").fetchall()
    assert (gateway_name, "203.0.113.10", "tokyo") in rows

    gateways.delete(gateway_name)
    wait_until(lambda: secrets.read(status["credentialsSecret"]) is None, "the gateway's Secret")
    emptied = asyncio.run(
        first_config(operator.control_url, agent_key, lambda c: not c["data"]["gateways"])
    )
    assert emptied["data"]["gateways"] == []


@pytest.mark.parametrize(
    ("spec", "reason"),
    [({"mode": "InCluster"}, "Unsupported"), ({"mode": "External"}, "WaitingForAddress")],
)
def test_gateways_that_cannot_run_yet_say_why(
    world: World, spec: dict[str, Any], reason: str
) -> None:
    name = unique_name("pending")
    world.gateways.create(name, spec)
    world.gateways.ready(name, "False", reason)
