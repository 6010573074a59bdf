"""External Gateways: identity and index from the operator, a config with every agent at the
gateway's address inside each agent's subnet, and each agent told about every gateway."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kakuremichi.api import protocol
from kakuremichi.api.resources import AGENT, GATEWAY, TUNNEL
from kakuremichi.control.credentials import api_key_role, wireguard_public_key
from tests.infra import kubelet
from tests.infra.cluster import Cluster, unique_name
from tests.infra.edge_sessions import EdgeSessions
from tests.infra.fixtures import OperatorProcess
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import wait_until
from tests.infra.tlsgen import TestCA


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
    world: World, operator: OperatorProcess, kube: Cluster, edges: EdgeSessions
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
    edges.connect_agent(kube, operator.namespace, "home")
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


@pytest.mark.parametrize(("spec", "reason"), [({"mode": "External"}, "WaitingForAddress")])
def test_gateways_that_cannot_run_yet_say_why(
    world: World, spec: dict[str, Any], reason: str
) -> None:
    name = unique_name("pending")
    world.gateways.create(name, spec)
    world.gateways.ready(name, "False", reason)


@pytest.fixture
def nodes(kube: Cluster) -> Iterator[Callable[..., str]]:
    """Node objects (no kubelet behind them): what an InCluster pool admits instances from."""
    core = client.CoreV1Api(kube.api_client())
    made: list[str] = []

    def make(**addresses: str) -> str:
        name = unique_name("node")
        core.create_node(
            client.V1Node(metadata=client.V1ObjectMeta(name=name, labels={"role": "edge"}))
        )
        core.patch_node_status(
            name,
            {"status": {"addresses": [{"type": t, "address": a} for t, a in addresses.items()]}},
        )
        made.append(name)
        return name

    yield make
    for name in made:
        with contextlib.suppress(ApiException):
            core.delete_node(name)


async def node_session(
    url: str, pool_key: str, node: str, token: str | None = None
) -> list[dict[str, Any]]:
    """Connect as a DaemonSet pod: the pool's key, the node name and the pod's token; return
    identity + config (or what came before the close, and the close code)."""
    frames: list[dict[str, Any]] = []
    auth = protocol.AuthMessage(api_key=pool_key, node_name=node, pod_token=token)
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/ws") as ws:
        await ws.send_str(protocol.encode(auth))
        while len(frames) < 2:
            frame = await ws.receive(timeout=15)
            if frame.type != aiohttp.WSMsgType.TEXT:
                frames.append({"closed": ws.close_code})
                break
            frames.append(json.loads(frame.data))
    return frames


@dataclass
class Pool:
    name: str
    key: str
    daemonset: str


@pytest.fixture
def pools(world: World, operator: OperatorProcess, kube: Cluster) -> Iterator[Callable[..., Pool]]:
    """InCluster Gateway pools, Ready, with their key; their pods go at the end (bound pods
    would wait for a kubelet forever)."""

    def make(**spec: Any) -> Pool:
        name = unique_name("pool")
        world.gateways.create(name, {"mode": "InCluster", **spec})
        status = world.gateways.ready(name, "True", "RolledOut")
        key = (world.secrets.read(status["credentialsSecret"]) or {})["apiKey"]
        return Pool(name, key, f"kakuremichi-gateway-{name}")

    yield make
    kubelet.delete_pods(kube.api_client(), operator.namespace)


def pod_token(kube: Cluster, namespace: str, pool: Pool, node: str) -> str:
    """Bind the pool's pod for ``node`` and mint its token, as the scheduler and kubelet do."""
    api = kube.api_client()
    placed = kubelet.place(api, namespace, pool.daemonset, node)
    return kubelet.mint_token(
        api, namespace, placed.service_account, placed.audience, (placed.name, placed.uid)
    )


def test_in_cluster_pool_rolls_out_and_admits_each_node(
    world: World,
    operator: OperatorProcess,
    kube: Cluster,
    nodes: Callable[..., str],
    pools: Callable[..., Pool],
) -> None:
    pool = pools(nodeSelector={"role": "edge"}, region="osaka")
    apps = client.AppsV1Api(kube.api_client())
    daemonset = apps.read_namespaced_daemon_set(pool.daemonset, operator.namespace)
    assert daemonset.spec is not None and daemonset.spec.template.spec is not None
    assert daemonset.spec.template.spec.host_network is True
    assert daemonset.spec.template.spec.node_selector == {"role": "edge"}

    external = nodes(ExternalIP="203.0.113.21", InternalIP="192.168.50.21")
    internal = nodes(InternalIP="192.168.50.22")
    token = pod_token(kube, operator.namespace, pool, external)
    identity, config = asyncio.run(node_session(operator.control_url, pool.key, external, token))
    assert identity["type"] == "identity" and identity["data"]["name"] == external
    assert api_key_role(identity["data"]["apiKey"]) == "gateway"
    assert identity["data"]["apiKey"] != pool.key
    assert (config["data"]["gateway"]["publicIp"], config["data"]["gateway"]["index"]) == (
        "203.0.113.21", 1,
    )  # fmt: skip
    internal_token = pod_token(kube, operator.namespace, pool, internal)
    _, second = asyncio.run(node_session(operator.control_url, pool.key, internal, internal_token))
    assert (second["data"]["gateway"]["publicIp"], second["data"]["gateway"]["index"]) == (
        "192.168.50.22", 2,
    )  # fmt: skip
    # The node's own key works by itself afterwards.
    again = asyncio.run(first_config(operator.control_url, identity["data"]["apiKey"]))
    assert again["data"]["gateway"]["index"] == 1

    def both_instances() -> list[dict[str, Any]] | None:
        found = (world.gateways.get(pool.name) or {}).get("status", {}).get("instances", [])
        return found if len(found) == 2 else None

    instances = wait_until(both_instances, "both instances in status")
    assert [(i["name"], i["index"]) for i in instances] == [(external, 1), (internal, 2)]

    # A proven pod on a node control cannot use is told why.
    bare = nodes()
    refused = asyncio.run(node_session(
        operator.control_url, pool.key, bare, pod_token(kube, operator.namespace, pool, bare)
    ))  # fmt: skip
    assert refused[0]["type"] == "error" and "no usable address" in refused[0]["message"]
    assert refused[1] == {"closed": protocol.CLOSE_BAD_REQUEST}

    client.CoreV1Api(kube.api_client()).delete_node(internal)
    wait_until(
        lambda: (
            [i["name"] for i in (world.gateways.get(pool.name) or {})["status"]["instances"]]
            == [external]
        ),
        "the departed node's instance to be removed",
    )
    world.gateways.delete(pool.name)
    wait_until(lambda: world.secrets.read(f"kakuremichi-gateway-{pool.name}-{external}") is None,
               "the node's Secret to go")  # fmt: skip


def test_the_pool_key_yields_no_node_without_that_nodes_pod(
    operator: OperatorProcess,
    kube: Cluster,
    nodes: Callable[..., str],
    pools: Callable[..., Pool],
) -> None:
    """An attacker holding a pool's key (read from a Secret, a pod's filesystem, a backup)
    tries to get a node's identity and WireGuard private key without being its pod."""
    pool = pools(nodeSelector={"role": "edge"})
    other_pool = pools(nodeSelector={"role": "edge"})
    node_a = nodes(ExternalIP="203.0.113.31")
    node_b = nodes(ExternalIP="203.0.113.32")
    namespace, api = operator.namespace, kube.api_client()
    token_a = pod_token(kube, namespace, pool, node_a)
    placed_a = kubelet.place(api, namespace, pool.daemonset, node_a)
    account = placed_a.service_account

    # A pod of the namespace that is not the DaemonSet's, running as the pool's account.
    impostor: Any = client.CoreV1Api(api).create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=unique_name("impostor")),
        spec=client.V1PodSpec(service_account_name=account, node_name=node_b,
                              automount_service_account_token=False,
                              containers=[client.V1Container(name="x", image="x")]),
    ))  # fmt: skip

    def mint(pod: tuple[str, str] | None, audience: str = "kakuremichi", sa: str = account) -> str:
        return kubelet.mint_token(api, namespace, sa, audience, pod)

    attempts = {
        "the pool's key alone": (pool.key, node_a, None),
        "a token that is not one": (pool.key, node_a, "eyJhbGciOiJub25lIn0.e30."),
        "node A's pod claiming node B": (pool.key, node_b, token_a),
        "a token bound to no pod": (pool.key, node_a, mint(None)),
        "a token for the API server's audience": (
            pool.key, node_a,
            mint((placed_a.name, placed_a.uid), "https://kubernetes.default.svc.cluster.local"),
        ),
        "a pod outside the DaemonSet": (
            pool.key, node_b, mint((impostor.metadata.name, impostor.metadata.uid))
        ),
        "another pool's pod with this pool's key": (
            pool.key, node_a, pod_token(kube, namespace, other_pool, node_a)
        ),
        "this pool's pod with another pool's key": (other_pool.key, node_a, token_a),
    }  # fmt: skip
    for attempt, (key, node, token) in attempts.items():
        frames = asyncio.run(node_session(operator.control_url, key, node, token))
        assert frames == [{"closed": protocol.CLOSE_UNAUTHORIZED}], attempt
    # ... while the pod itself is admitted, to its own node only.
    identity, _ = asyncio.run(node_session(operator.control_url, pool.key, node_a, token_a))
    assert identity["type"] == "identity" and identity["data"]["name"] == node_a
    client.CoreV1Api(api).delete_namespaced_pod(placed_a.name, namespace, grace_period_seconds=0)
    frames = asyncio.run(node_session(operator.control_url, pool.key, node_a, token_a))
    assert frames == [{"closed": protocol.CLOSE_UNAUTHORIZED}], "a deleted pod's token"
    assert "refused a pool's key" in operator.log()


def test_in_cluster_pool_pods_get_the_resources_asked_for(
    world: World, operator: OperatorProcess, kube: Cluster
) -> None:
    """The gateway sizes its HTTPS processes from its pod's limits, so these are the knob."""
    name = unique_name("sized")
    apps = client.AppsV1Api(kube.api_client())

    def container_resources() -> dict[str, Any]:
        found = apps.read_namespaced_daemon_set(f"kakuremichi-gateway-{name}", operator.namespace)
        assert found.spec is not None and found.spec.template.spec is not None
        resources = found.spec.template.spec.containers[0].resources
        assert resources is not None
        return {"requests": resources.requests, "limits": resources.limits}

    world.gateways.create(name, {"mode": "InCluster"})
    world.gateways.ready(name, "True", "RolledOut")
    assert container_resources() == {
        "requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"},
    }  # fmt: skip
    world.gateways.patch_spec(name, {"resources": {"limits": {"cpu": 4, "memory": "1Gi"}}})
    wait_until(
        lambda: container_resources()["limits"] == {"cpu": "4", "memory": "1Gi"},
        "the DaemonSet to carry the new limits",
    )
    assert container_resources()["requests"] == {"cpu": "50m", "memory": "64Mi"}
