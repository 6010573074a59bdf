"""The edges' packet filter, applied with the real nft in network namespaces: a gateway takes
nothing new from its WireGuard-side interface and forwards nothing from it; an agent takes only
the relay port from its gateways' addresses. The interface here is a veth renamed to the edge's
prefix (the rules match by name, whatever the link type); the same rules over real WireGuard,
with the edges themselves: ``tests/e2e/test_wireguard_boundary.py``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.infra import netns
from tests.infra.polling import wait_until
from tests.infra.probes import listen, reachable

FILTER = """
import asyncio, sys
from kakuremichi.edge.firewall import PacketFilter
async def main():
    packet_filter = PacketFilter(sys.argv[1], sys.argv[2], 8471)
    await packet_filter.set_gateways(sys.argv[3:])
    await packet_filter.install()
    print("installed", flush=True)
    for line in sys.stdin:
        word, *rest = line.split()
        if word == "gateways":
            await packet_filter.set_gateways(rest)
        elif word == "remove":
            await packet_filter.remove()
        print("done", flush=True)
asyncio.run(main())
"""


def rename_link(host: netns.Host, peer_address: str, name: str) -> None:
    """Give the host's end of the link toward ``peer_address`` the edge's interface name."""
    route = host.exec("ip", "-o", "route", "get", peer_address)
    device = route.split(" dev ")[1].split()[0]
    host.exec("ip", "link", "set", device, "down")
    host.exec("ip", "link", "set", device, "name", name)
    host.exec("ip", "link", "set", name, "up")
    subnet = peer_address.rsplit(".", 1)[0] + ".0/24"
    host.exec("ip", "route", "replace", subnet, "dev", name)


def tables(host: netns.Host) -> list[str]:
    listed = host.exec("nft", "list", "tables").splitlines()
    return [line for line in listed if "kakuremichi" in line]


@contextmanager
def packet_filter(host: netns.Host, role: str, interface: str, *gateways: str) -> Iterator[
    subprocess.Popen[str]
]:  # fmt: skip
    process = subprocess.Popen(
        host.command(sys.executable, "-c", FILTER, role, interface, *gateways),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None and process.stdin is not None
    try:
        assert process.stdout.readline().strip() == "installed"
        yield process
    finally:
        if process.poll() is None:
            process.stdin.close()
            process.wait(timeout=10)


def command(process: subprocess.Popen[str], line: str) -> None:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(line + "\n")
    process.stdin.flush()
    assert process.stdout.readline().strip() == "done"


@pytest.fixture
def nft_present() -> None:
    if subprocess.run(["sh", "-c", "command -v nft"], capture_output=True).returncode != 0:
        pytest.skip("nft is not installed (hack/install-deps.sh installs nftables)")


def test_a_gateway_takes_nothing_new_from_the_wireguard_side_and_forwards_nothing(
    make_host: netns.HostFactory, nft_present: None
) -> None:
    gateway, agent, behind = make_host("gateway"), make_host("agent"), make_host("behind")
    gateway_side, agent_side = netns.link(gateway, agent, "192.168.230.0")
    inner, behind_side = netns.link(gateway, behind, "192.168.231.0")
    rename_link(gateway, str(agent_side.ip), "kmgwtest0")
    gateway.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
    agent.exec("ip", "route", "add", "192.168.231.0/24", "via", str(gateway_side.ip))
    behind.exec("ip", "route", "add", "192.168.230.0/24", "via", str(inner.ip))
    listen(gateway, 9000)
    listen(behind, 9001)
    listen(agent, 8471)
    wait_until(lambda: reachable(agent, str(gateway_side.ip), 9000), "the gateway's listener")
    assert reachable(agent, str(behind_side.ip), 9001)  # forwarded, before the filter

    with packet_filter(gateway, "gateway", "kmgwtest0") as running:
        assert not reachable(agent, str(gateway_side.ip), 9000)  # the node's listeners
        assert not reachable(agent, str(inner.ip), 9000)  # its other addresses too
        assert not reachable(agent, str(behind_side.ip), 9001)  # nothing forwarded
        assert reachable(gateway, str(agent_side.ip), 8471)  # its own connections' replies
        assert reachable(behind, str(inner.ip), 9000)  # other interfaces: the host's business
        assert len(tables(gateway)) == 1
        command(running, "remove")
        assert tables(gateway) == []
    assert reachable(agent, str(gateway_side.ip), 9000)  # nothing left behind


def test_an_agent_takes_only_the_relay_port_from_its_gateways(
    make_host: netns.HostFactory, nft_present: None
) -> None:
    agent, gateway = make_host("agent"), make_host("gateway")
    gateway_side, agent_side = netns.link(gateway, agent, "192.168.232.0")
    rename_link(agent, str(gateway_side.ip), "kmagtest0")
    other = "192.168.232.3"  # a second address on the gateway's side, not a gateway of the config
    gateway.exec("ip", "addr", "add", f"{other}/24", "dev",
                 gateway.exec("ip", "-o", "route", "get", str(agent_side.ip)).split(" dev ")[1]
                 .split()[0])  # fmt: skip
    listen(agent, 8471, 9000)
    wait_until(lambda: reachable(gateway, str(agent_side.ip), 9000), "the agent's listeners")

    with packet_filter(agent, "agent", "kmagtest0", str(gateway_side.ip)) as running:
        assert reachable(gateway, str(agent_side.ip), 8471)
        assert not reachable(gateway, str(agent_side.ip), 9000)
        assert not reachable(gateway, str(agent_side.ip), 8471, source=other)
        command(running, f"gateways {other}")  # the config now names the other gateway only
        assert reachable(gateway, str(agent_side.ip), 8471, source=other)
        assert not reachable(gateway, str(agent_side.ip), 8471)
    assert len(tables(agent)) == 1  # (closed without remove: as after a crash)


def test_a_killed_edges_table_is_replaced_at_the_next_start(
    make_host: netns.HostFactory, nft_present: None
) -> None:
    host = make_host("edge")
    first = subprocess.Popen(host.command(sys.executable, "-c", FILTER, "gateway", "kmgw0"),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert first.stdout is not None and first.stdout.readline().strip() == "installed"
    first.kill()
    first.wait(timeout=10)
    ruleset = host.exec("nft", "list", "table", "inet", "kakuremichi_kmgw0")
    with packet_filter(host, "gateway", "kmgw0") as running:
        assert tables(host) == ["table inet kakuremichi_kmgw0"]
        assert host.exec("nft", "list", "table", "inet", "kakuremichi_kmgw0") == ruleset
        command(running, "remove")
    assert tables(host) == []
