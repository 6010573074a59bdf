"""The WireGuard boundary, with the real gateway and agent over wireguard-go in network
namespaces: only gateways reach the agent's relay, and an agent (even one whose owner rewrote its
WireGuard config, holding its own key) reaches nothing of the gateway's node: no listener, and
nothing the node routes to. The tunnel itself still works (WebSocket, large bodies: the first-path
tests run with the same filters on)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.e2e.world import World, serving_world
from tests.infra import netns
from tests.infra.cluster import Cluster
from tests.infra.polling import wait_until
from tests.infra.probes import listen, reachable


@pytest.fixture(scope="module")
def world(
    kube: Cluster, namespaces_supported: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    with serving_world(kube, tmp_path_factory.mktemp("boundary")) as made:
        yield made


def addresses(world: World) -> tuple[str, str]:
    """(the agent's virtual IP, the gateway's WireGuard address in the agent's subnet)."""
    status = world.agents.get("web")
    assert status is not None
    virtual_ip = status["status"]["virtualIP"]
    return virtual_ip, virtual_ip.rsplit(".", 1)[0] + ".1"


def test_the_relay_is_unreachable_from_the_agents_lan(world: World) -> None:
    """A LAN neighbour of the agent (a pod on the same bridge, a host on the same switch) with a
    route to the virtual IP: Linux would take those packets on any interface."""
    virtual_ip, _ = addresses(world)
    neighbour = netns.Host("neighbour")
    world.extra_hosts.append(neighbour)
    agent_side, _ = netns.link(world.agent_host, neighbour, "192.168.246.0")
    neighbour.exec("ip", "route", "add", f"{virtual_ip}/32", "via", str(agent_side.ip))
    listen(world.agent_host, 9302)  # what listens on every address is reachable that way
    assert reachable(neighbour, virtual_ip, 9302)
    assert not reachable(neighbour, virtual_ip, 8471)
    assert world.get("/")[0] == 200  # the gateway still is served through the relay


def test_an_agent_reaches_nothing_of_the_gateways_node(world: World) -> None:
    virtual_ip, gateway_address = addresses(world)
    listen(world.gateway_host, 9300)  # any listener of the node (InCluster: hostNetwork)
    assert reachable(world.client_host, world.gateway_client_ip, 9300)  # it is up
    # Behind the gateway: something the node routes to (pods, Services), forwarding on as on
    # every Kubernetes node.
    behind = netns.Host("behind")
    world.extra_hosts.append(behind)
    inner, behind_side = netns.link(world.gateway_host, behind, "192.168.247.0")
    behind.exec("ip", "route", "add", f"{virtual_ip}/32", "via", str(inner.ip))
    world.gateway_host.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
    listen(behind, 9301)
    # The agent's owner holds its key: it rewrites its own WireGuard config to send anything
    # to the gateway, and routes the network behind it there.
    agent = world.agent_host
    (peer,) = agent.exec("wg", "show", "kmagent0", "peers").split()
    agent.exec("wg", "set", "kmagent0", "peer", peer, "allowed-ips", "0.0.0.0/0")
    agent.exec("ip", "route", "add", "192.168.247.0/24", "dev", "kmagent0", "src", virtual_ip)

    def blocked() -> bool:
        return not any((
            reachable(agent, gateway_address, 9300),
            reachable(agent, gateway_address, 443),  # the gateway's own HTTPS port too
            reachable(agent, world.gateway_client_ip, 9300),  # the node's other addresses
            reachable(agent, str(behind_side.ip), 9301),
        ))  # fmt: skip

    assert blocked()
    # The same attempts succeed once the gateway's table is gone: the test would see a hole.
    world.gateway_host.exec("nft", "delete", "table", "inet", "kakuremichi_kmgateway0")
    try:
        assert reachable(agent, gateway_address, 9300)
        assert reachable(agent, str(behind_side.ip), 9301)
    finally:
        # A gateway started again (as after a crash) installs its table afresh.
        assert world.gateway is not None
        world.gateway.kill()
        world.gateway.start()
        time.sleep(1)
        wait_until(lambda: world.get("/")[0] == 200, "the restarted gateway serving", timeout=60)
    assert blocked()
    tables = world.gateway_host.exec("nft", "list", "tables")
    assert tables.count("kakuremichi_") == 1, tables
