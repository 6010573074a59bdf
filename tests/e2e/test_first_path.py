"""The first end-to-end path: a user's service behind an agent, reached over HTTPS through a
gateway and WireGuard.

The operator runs against the local API server with its control channel on TLS. The gateway and
the agent each run in a network namespace of their own, started with exactly the command,
arguments and credentials of the DaemonSet and the injected sidecar the operator produced (the
Secret volumes become folders; there is no kubelet). The origin runs beside the agent, and a
client namespace resolves the tunnel's domain to the gateway. Everything is driven by creating
resources in the API server, and checked the way a user would: curl from the client.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.origin import pattern_bytes
from tests.e2e.world import (
    CONTROL_NAME,
    HEARTBEAT_TIMEOUT,
    World,
    serving_world,
)
from tests.infra import netns
from tests.infra.cluster import Cluster
from tests.infra.polling import wait_until

GRPC_ORIGIN = str(Path(__file__).with_name("grpc_origin.py"))


@pytest.fixture(scope="module")
def world(
    kube: Cluster, namespaces_supported: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """The world, serving one Tunnel whose certificate comes from a Secret the test CA signed."""
    with serving_world(kube, tmp_path_factory.mktemp("e2e")) as made:
        yield made


# --- what a user sees ---------------------------------------------------------------------------


def test_https_reaches_the_origin_with_forwarded_headers(world: World) -> None:
    code, body = world.get("/headers?q=1", "-H", "X-Forwarded-For: 6.6.6.6")
    assert code == 200, body
    seen = json.loads(body)
    assert seen["path"] == "/headers?q=1"
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-forwarded-for"] == world.client_host.address  # not the client's claim
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-host"] == world.domain
    assert headers["host"] == world.domain


def test_plain_http_redirects_to_https(world: World) -> None:
    done = world.curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                      f"http://{world.domain}/a/b?c=d")  # fmt: skip
    assert done.stdout == f"308 https://{world.domain}/a/b?c=d"


def test_websocket_echo_and_server_sent_events(world: World) -> None:
    script = (
        "import asyncio, aiohttp, ssl, sys\n"
        "async def main():\n"
        "    tls = ssl.create_default_context(cafile=sys.argv[2])\n"
        "    async with aiohttp.ClientSession() as s, s.ws_connect(sys.argv[1], ssl=tls) as ws:\n"
        "        for word in ('one', 'two'):\n"
        "            await ws.send_str(word)\n"
        "            print((await ws.receive(timeout=10)).data)\n"
        "asyncio.run(main())\n"
    )
    out = world.client_host.exec(
        sys.executable, "-c", script, f"wss://{world.domain}/ws", str(world.ca_file)
    )
    assert out.split("\n")[:2] == ["echo: one", "echo: two"]
    started = time.monotonic()
    done = world.curl("-N", f"https://{world.domain}/events")
    assert [line for line in done.stdout.splitlines() if line] == [
        f"data: event {n}" for n in range(5)
    ]
    assert time.monotonic() - started >= 0.8  # streamed as sent, not all at once at the end


def test_large_download_and_upload_arrive_intact(world: World) -> None:
    size = 50 * 1024 * 1024
    target = world.workdir / "download.bin"
    done = world.curl("-o", str(target), "-w", "%{http_code}",
                      f"https://{world.domain}/bytes/{size}")  # fmt: skip
    assert done.stdout == "200", done.stderr
    assert target.stat().st_size == size
    expected = hashlib.sha256(pattern_bytes(size)).hexdigest()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == expected
    upload = world.workdir / "upload.bin"
    upload.write_bytes(pattern_bytes(10 * 1024 * 1024))
    echoed = world.workdir / "echoed.bin"
    done = world.curl("-o", str(echoed), "--data-binary", f"@{upload}",
                      "-H", "Content-Type: application/octet-stream",
                      f"https://{world.domain}/echo")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert echoed.read_bytes() == upload.read_bytes()


def test_an_unknown_name_gets_no_certificate(world: World) -> None:
    other = f"other.{world.domain}"
    done = world.curl("--resolve", f"{other}:443:{world.gateway_host.addresses[1].ip}",
                      f"https://{other}/")  # fmt: skip
    assert done.returncode == 35, (done.returncode, done.stderr)  # TLS handshake failed


def test_disabled_tunnel_answers_404_within_two_seconds(world: World) -> None:
    world.tunnels.patch_spec("app", {"enabled": False})
    started = time.monotonic()
    wait_until(lambda: world.get("/")[0] == 404, "404 for the disabled tunnel", timeout=10)
    assert time.monotonic() - started < 2.0
    world.tunnels.patch_spec("app", {"enabled": True})
    wait_until(lambda: world.get("/")[0] == 200, "the tunnel back", timeout=10)


def test_stopped_origin_gives_502(world: World) -> None:
    assert world.origin is not None
    world.origin.kill()
    world.origin.wait()
    code, body = world.get("/")
    assert code == 502 and "not answering" in body
    world.start_origin()
    assert world.get("/")[0] == 200


def test_killed_agent_goes_offline_and_comes_back(world: World) -> None:
    assert world.agent is not None
    world.agent.kill()
    started = time.monotonic()
    wait_until(
        lambda: (world.agents.get("web") or {}).get("status", {}).get("state") == "offline",
        "the Agent to be offline",
        timeout=HEARTBEAT_TIMEOUT + 10,
    )
    assert time.monotonic() - started <= HEARTBEAT_TIMEOUT + 5
    assert world.get("/")[0] == 502
    world.agent.start()
    wait_until(
        lambda: (world.agents.get("web") or {}).get("status", {}).get("state") == "online",
        "the Agent to be online again",
    )
    wait_until(lambda: world.get("/")[0] == 200, "serving again", timeout=30)
    reported = wait_until(
        lambda: (world.agents.get("web") or {}).get("status", {}).get("client"),
        "the agent's report of itself",
    )
    assert reported["wireguardMode"] in ("userspace", "kernel") and reported["version"]


def test_operator_restart_never_interrupts_traffic(world: World) -> None:
    script = (
        "import ssl, sys, time, urllib.request\n"
        "tls = ssl.create_default_context(cafile=sys.argv[2])\n"
        "codes = []\n"
        "end = time.monotonic() + float(sys.argv[3])\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        "        codes.append(urllib.request.urlopen(sys.argv[1], context=tls, timeout=5).status)\n"
        "    except Exception as error:\n"
        "        codes.append(repr(error))\n"
        "    time.sleep(0.05)\n"
        "print(sorted(set(map(str, codes))), len(codes))\n"
    )
    load = subprocess.Popen(
        world.client_host.command(sys.executable, "-c", script, f"https://{world.domain}/",
                                  str(world.ca_file), "12"),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1)
    world.operator.restart()
    out, _ = load.communicate(timeout=60)
    assert out.startswith("['200']"), out


def test_edges_restarted_while_control_is_down_serve_their_saved_config(world: World) -> None:
    """Control is down and both edges restart (a power cut at the origin's site, a node
    reboot): each serves the config it saved in its state folder (the Pod's emptyDir), so the
    site is back without control; control's return changes nothing a user sees."""
    assert world.gateway is not None and world.agent is not None
    gateway_file = world.state_dir(f"gateway-{world.node}") / "gateway-config.json"
    agent_file = world.state_dir(f"agent-{world.namespace}-web-0") / "agent-config.json"
    assert gateway_file.is_file() and agent_file.is_file()
    world.operator.stop()
    try:
        restarted_at = {}
        for edge in (world.gateway, world.agent):
            edge.kill()
            restarted_at[edge.log] = edge.log.stat().st_size
            edge.start()
        wait_until(lambda: world.get("/")[0] == 200, "serving without control", timeout=30)
        for log, offset in restarted_at.items():
            since = log.read_bytes()[offset:].decode(errors="replace")
            assert "serving the saved config" in since, since
            assert "connected to control" not in since
    finally:
        world.operator.start()
    wait_until(
        lambda: (world.agents.get("web") or {}).get("status", {}).get("state") == "online",
        "the Agent to be online again",
    )
    assert world.get("/")[0] == 200


HOLD_WEBSOCKET = """
import asyncio, aiohttp, ssl, sys
async def main():
    tls = ssl.create_default_context(cafile=sys.argv[2])
    async with aiohttp.ClientSession() as s, s.ws_connect(sys.argv[1], ssl=tls) as ws:
        for word in ("before", "after"):
            if word == "after":
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await ws.send_str(word)
            print((await ws.receive(timeout=10)).data, flush=True)
asyncio.run(main())
"""


def test_second_gateway_serves_too_and_changes_never_drop_open_connections(
    world: World,
) -> None:
    """A second node joins the pool: the agent peers with both gateways and either one serves
    the tunnel. Meanwhile a WebSocket through the first gateway stays open across the new
    WireGuard peer and a tunnel added and removed beside it."""
    held = subprocess.Popen(
        world.client_host.command(sys.executable, "-c", HOLD_WEBSOCKET,
                                  f"wss://{world.domain}/ws", str(world.ca_file)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert held.stdout is not None and held.stdin is not None
    assert held.stdout.readline().strip() == "echo: before"
    second = netns.Host("gateway2")
    try:
        public, _ = netns.link(second, world.agent_host, "192.168.249.0")
        facing_client, _ = netns.link(second, world.client_host, "192.168.248.0")
        netns.link_root(second, "192.168.247.0")
        second.set_hosts({CONTROL_NAME: world.control_ip})
        node = world.add_node(str(public.ip))
        # (Nodes have a /var/run each; namespaces here share one, so the second gateway's
        # wireguard-go needs a socket name of its own.)
        edge = world.start_gateway(second, node, "--wireguard-interface", "kmgateway1")
        resolve = f"{world.domain}:443:{facing_client.ip}"
        wait_until(
            lambda: world.curl("-o", "/dev/null", "-w", "%{http_code}", "--resolve", resolve,
                               f"https://{world.domain}/").stdout == "200",
            "the second gateway to serve the tunnel", timeout=60,
        )  # fmt: skip
        extra = f"more.{world.domain}"
        world.create_tunnel("more", extra)
        world.tunnels.ready("more")
        wait_until(
            lambda: world.curl("-o", "/dev/null", "-w", "%{http_code}", "--resolve",
                               f"{extra}:443:{facing_client.ip}", f"https://{extra}/"
                               ).stdout == "200",
            "the added tunnel to serve",
        )  # fmt: skip
        world.tunnels.delete("more")
        assert world.get("/")[0] == 200  # the first gateway still serves
        held.stdin.write("go\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "echo: after"
        assert held.wait(timeout=10) == 0
        edge.kill()
    finally:
        held.kill()
        second.destroy()


def test_gateway_metrics_count_requests_by_tunnel_and_code(world: World) -> None:
    metrics = world.gateway_host.exec("curl", "-s", "http://127.0.0.1:9470/metrics")
    assert f'kakuremichi_gateway_requests_total{{code="200",tunnel="{world.domain}"}}' in metrics
    assert 'kakuremichi_gateway_info{version="' in metrics
    assert 'wireguard_mode="userspace"' in metrics or 'wireguard_mode="kernel"' in metrics


def _https_workers(world: World) -> list[int]:
    assert world.gateway is not None and world.gateway.process is not None
    parent, worker = str(world.gateway.process.pid), "kakuremichi.edge.https_worker"
    done = subprocess.run(["pgrep", "-P", parent, "-f", worker],
                          capture_output=True, text=True, check=False)  # fmt: skip
    return sorted(int(pid) for pid in done.stdout.split())


def _fresh_connections(world: World, url: str, count: int, *args: str) -> list[str]:
    """The status of ``count`` requests, each on a connection of its own."""
    script = f'for i in $(seq {count}); do curl -s -o /dev/null -w "%{{http_code}}\\n" $@; done'
    done = world.client_host.exec("sh", "-c", script, "curl-loop", "--max-time", "10",
                                  "--cacert", str(world.ca_file), *args, url)  # fmt: skip
    return done.split()


def test_https_workers_serve_every_change_and_a_dead_one_is_replaced(world: World) -> None:
    """The gateway serves HTTPS from one process per CPU (``--workers auto``): a tunnel added
    is served on every new connection once it is Ready, whichever process accepts it, and a
    worker that dies is replaced while the others keep serving."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: the gateway runs no extra HTTPS worker")
    workers = _https_workers(world)
    assert len(workers) == len(os.sched_getaffinity(0)) - 1, world.gateway and world.gateway.tail()
    extra = f"workers.{world.domain}"
    world.create_tunnel("workers", extra)
    try:
        world.tunnels.ready("workers")
        gateway_ip = world.client_host.exec("getent", "hosts", world.domain).split()[0]
        resolve = f"{extra}:443:{gateway_ip}"
        wait_until(lambda: _fresh_connections(world, f"https://{extra}/", 1, "--resolve",
                                              resolve) == ["200"],
                   "the added tunnel to serve")  # fmt: skip
        # Reuse-port spreads new connections over the processes: all of them serve it now.
        assert (
            _fresh_connections(world, f"https://{extra}/", 24, "--resolve", resolve) == ["200"] * 24
        )
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: len(_https_workers(world)) == len(workers)
                   and workers[0] not in _https_workers(world),
                   "another worker in place of the killed one", timeout=20)  # fmt: skip
        assert _fresh_connections(world, f"https://{world.domain}/", 24) == ["200"] * 24
        assert world.gateway is not None
        assert "HTTPS worker 1 exited" in world.gateway.log.read_text(errors="replace")
    finally:
        world.tunnels.delete("workers")


GRPC_CLIENT = """
import grpc, sys
target, name, ca = sys.argv[1:4]
credentials = grpc.ssl_channel_credentials(open(ca, "rb").read())
options = (("grpc.ssl_target_name_override", name), ("grpc.default_authority", name))
with grpc.secure_channel(target, credentials, options=options) as channel:
    print(channel.unary_unary("/kakuremichi.test.Echo/Say")(b"hello", timeout=10).decode())
    call = channel.unary_stream("/kakuremichi.test.Echo/Count")(b"3", timeout=10)
    print(",".join(message.decode() for message in call))
    print(dict(call.trailing_metadata())["x-counted"])
"""


def test_grpc_reaches_an_h2c_service_with_its_trailers(world: World) -> None:
    """A Tunnel with appProtocol H2C publishes a gRPC service (HTTP/2 without TLS behind the
    agent): a gRPC client over TLS gets its unary answer, its stream and the trailers that end
    it; a client without HTTP/2 is told to use it."""
    grpc_server = world.agent_host.spawn(
        [sys.executable, GRPC_ORIGIN, "127.0.0.1", "50051"], log=world.workdir / "grpc.log"
    )
    domain = f"grpc.{world.domain}"
    world.create_tunnel("grpc", domain, target="localhost:50051", appProtocol="H2C")
    try:
        world.tunnels.ready("grpc")
        gateway_ip = world.client_host.exec("getent", "hosts", world.domain).split()[0]

        def call() -> str:
            done = subprocess.run(
                world.client_host.command(sys.executable, "-c", GRPC_CLIENT, f"{gateway_ip}:443",
                                          domain, str(world.ca_file)),
                capture_output=True, text=True, check=False, timeout=60,
            )  # fmt: skip
            return done.stdout

        assert wait_until(call, "a gRPC call through the tunnel", timeout=30).splitlines() == [
            "echo: hello", "0,1,2", "3",
        ]  # fmt: skip
        http1 = world.curl("--http1.1", "-w", "\n%{http_code}", "--resolve",
                           f"{domain}:443:{gateway_ip}", f"https://{domain}/")  # fmt: skip
        assert http1.stdout.endswith("\n505") and "HTTP/2" in http1.stdout
    finally:
        world.tunnels.delete("grpc")
        grpc_server.kill()
        grpc_server.wait(timeout=10)


def test_deleted_tunnel_name_is_refused_at_the_handshake(world: World) -> None:
    world.tunnels.delete("app")
    wait_until(lambda: world.curl(f"https://{world.domain}/").returncode == 35,
               "the handshake to be refused", timeout=15)  # fmt: skip
