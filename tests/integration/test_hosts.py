"""The test hosts behave like separate machines: own addresses, own names, own processes,
traffic only over the links and tunnels the test builds."""

from __future__ import annotations

import subprocess

import pytest

from tests.infra import netns, wireguard
from tests.infra.polling import wait_until

HTTP_SERVER = ["python3", "-m", "http.server", "--bind"]


def curl(host: netns.Host, url: str, *extra: str) -> str:
    return host.exec("curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}",
                     *extra, url, check=False)  # fmt: skip


def test_linked_hosts_reach_each_other_and_names_resolve(make_host: netns.HostFactory) -> None:
    client, server = make_host("client"), make_host("server")
    netns.link(client, server, "192.168.240.0")
    server.spawn([*HTTP_SERVER, server.address, "8080"])
    client.set_hosts({"app.example.test": server.address})
    wait_until(lambda: curl(client, "http://app.example.test:8080/") == "200", "HTTP via link")
    # Nothing outside the link: the root namespace's loopback is not the client's.
    assert curl(client, f"http://{server.address}:1/") == "000"


def test_destroy_stops_processes_left_inside(make_host: netns.HostFactory) -> None:
    host = make_host("sleeper")
    process = subprocess.Popen(host.command("sleep", "600"))
    wait_until(lambda: host.pids(), "sleep to start inside the namespace")
    host.destroy()
    assert process.wait(timeout=10) != 0
    assert host.name not in netns.run("ip", "netns", "list")


@pytest.mark.parametrize("mode", ["kernel", "userspace"])
def test_hosts_talk_over_wireguard(make_host: netns.HostFactory, mode: wireguard.Mode) -> None:
    missing = (
        wireguard.kernel_wireguard_missing()
        if mode == "kernel"
        else wireguard.userspace_wireguard_missing()
    )
    if missing:
        pytest.skip(missing)
    gateway, agent = make_host("gateway"), make_host("agent")
    netns.link(gateway, agent, "192.168.241.0")
    gw = wireguard.create(gateway, mode, "10.7.0.1/24", listen_port=51820)
    ag = wireguard.create(agent, mode, "10.7.0.100/24")
    try:
        gw.set_peer(ag.public_key, "10.7.0.100/32")
        ag.set_peer(gw.public_key, "10.7.0.1/32", endpoint=f"{gateway.address}:51820", keepalive=5)
        agent.spawn([*HTTP_SERVER, "10.7.0.100", "8080"])
        wait_until(lambda: curl(gateway, "http://10.7.0.100:8080/") == "200", "HTTP over WireGuard")
        assert gw.latest_handshakes()[ag.public_key] > 0
    finally:
        gw.destroy()
        ag.destroy()
