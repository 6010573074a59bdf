"""TCP, UDP and TLS-passthrough Tunnels end to end, with real servers and clients from Debian:
redis (TCP), dnsmasq answering dig (UDP), nginx holding its own certificate (TLS passed through,
PROXY headers read), HAProxy as a load balancer in front of the gateway (PROXY v2 to it). The
gateway and the agent run in network namespaces as in every e2e test, over WireGuard."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kakuremichi.api.resources import CERTIFICATE, GATEWAY
from tests.e2e.world import World, running_world, skip_unless_possible
from tests.infra.cluster import Cluster
from tests.infra.objects import Objects
from tests.infra.polling import wait_until
from tests.infra.tlsgen import TestCA

UDP_ORIGIN = str(Path(__file__).with_name("udp_origin.py"))
REDIS_PORT, DNS_PORT, NGINX_PLAIN, NGINX_TLS, UDP_ORIGIN_PORT = 6379, 5353, 8081, 9443, 5454
TOOLS = ("redis-server", "redis-cli", "dnsmasq", "dig", "nginx", "haproxy")


def _need_tools() -> None:
    missing = [tool for tool in TOOLS if not shutil.which(tool) and not _sbin(tool)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (hack/install-deps.sh installs them)")


def _sbin(tool: str) -> str | None:
    path = Path("/usr/sbin") / tool
    return str(path) if path.exists() else None


def tool(name: str) -> str:
    found = shutil.which(name) or _sbin(name)
    assert found is not None
    return found


@pytest.fixture(scope="module")
def world(
    kube: Cluster, namespaces_supported: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    skip_unless_possible()
    _need_tools()
    workdir = tmp_path_factory.mktemp("l4")
    with running_world(kube, workdir) as made:
        start_servers(made, workdir)
        Objects(kube, "", GATEWAY).ready(made.gateway_name)  # its instance is connected
        yield made


def start_servers(world: World, workdir: Path) -> None:
    """Beside the agent: redis, dnsmasq, nginx (plain with PROXY headers, and TLS with a
    certificate of its own CA, PROXY headers too), and a UDP origin that reports PROXY v2."""
    host = world.agent_host
    host.spawn(
        [tool("redis-server"), "--bind", "127.0.0.1", "--port", str(REDIS_PORT), "--save", "",
         "--appendonly", "no", "--protected-mode", "no"],
        log=workdir / "redis.log",
    )  # fmt: skip
    host.spawn(
        [tool("dnsmasq"), "--no-daemon", "--user=root", f"--port={DNS_PORT}",
         "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
         "--address=/probe.example/10.9.8.7", f"--pid-file={workdir / 'dnsmasq.pid'}"],
        log=workdir / "dnsmasq.log",
    )  # fmt: skip
    origin_ca = TestCA()
    (workdir / "origin-ca.pem").write_text(origin_ca.pem)
    names = [f"vault.{world.domain}", f"pvault.{world.domain}"]
    issued = origin_ca.issue(*names)
    (workdir / "origin.crt").write_text(issued.certificate_pem)
    (workdir / "origin.key").write_text(issued.private_key_pem)
    (workdir / "nginx").mkdir()
    (workdir / "nginx.conf").write_text(
        textwrap.dedent(f"""
        user root;
        worker_processes 1;
        pid {workdir}/nginx/nginx.pid;
        error_log {workdir}/nginx/error.log;
        events {{ worker_connections 64; }}
        http {{
          access_log off;
          client_body_temp_path {workdir}/nginx;
          proxy_temp_path {workdir}/nginx;
          fastcgi_temp_path {workdir}/nginx;
          uwsgi_temp_path {workdir}/nginx;
          scgi_temp_path {workdir}/nginx;
          server {{
            listen 127.0.0.1:{NGINX_PLAIN} proxy_protocol;
            location / {{ return 200 "client $proxy_protocol_addr:$proxy_protocol_port\\n"; }}
          }}
          server {{
            listen 127.0.0.1:{NGINX_TLS} ssl;
            server_name vault.{world.domain};
            ssl_certificate {workdir}/origin.crt;
            ssl_certificate_key {workdir}/origin.key;
            location / {{ return 200 "vault: the origin's own TLS\\n"; }}
          }}
          server {{
            listen 127.0.0.1:{NGINX_TLS + 1} ssl proxy_protocol;
            ssl_certificate {workdir}/origin.crt;
            ssl_certificate_key {workdir}/origin.key;
            location / {{ return 200 "pvault client $proxy_protocol_addr\\n"; }}
          }}
        }}
        """)
    )
    host.spawn([tool("nginx"), "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"],
               log=workdir / "nginx.log")  # fmt: skip
    host.spawn([sys.executable, UDP_ORIGIN, "127.0.0.1", str(UDP_ORIGIN_PORT)],
               log=workdir / "udp-origin.log")  # fmt: skip
    wait_until(
        lambda: "PONG" in host.exec(tool("redis-cli"), "-p", str(REDIS_PORT), "ping", check=False),
        "redis",
    )
    wait_until(
        lambda: "200" in host.exec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                   "--haproxy-protocol", f"http://127.0.0.1:{NGINX_PLAIN}/",
                                   check=False),
        "nginx",
    )  # fmt: skip


def names(world: World, *extra: str) -> None:
    """The client resolves these names (and the world's own) to the gateway."""
    world.client_host.set_hosts(
        {world.domain: world.gateway_client_ip}
        | {f"{name}.{world.domain}": world.gateway_client_ip for name in extra}
    )


def tunnel(world: World, name: str, **spec: object) -> None:
    world.tunnels.create(name, {"domain": f"{name}.{world.domain}", "agent": "web", **spec})


def in_client(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(world.client_host.command(*args), capture_output=True, text=True,
                          check=False, timeout=60)  # fmt: skip


# --- TCP ------------------------------------------------------------------------------------------


def test_redis_over_a_tcp_tunnel(world: World) -> None:
    names(world, "redis")
    tunnel(world, "redis", protocol="TCP", port=16379, target=f"localhost:{REDIS_PORT}")
    status = world.tunnels.ready("redis")
    assert status["url"] == f"tcp://redis.{world.domain}:16379"
    assert Objects(world.kube, world.namespace, CERTIFICATE).get("redis") is None
    host = f"redis.{world.domain}"
    cli = (tool("redis-cli"), "-h", host, "-p", "16379")
    # Ready says control routes it; the gateway's config follows within moments.
    wait_until(
        lambda: (
            in_client(world, *cli, "SET", "greeting", "through the tunnel").stdout.strip() == "OK"
        ),
        "redis through the tunnel",
    )
    assert in_client(world, *cli, "GET", "greeting").stdout.strip() == "through the tunnel"
    listed = world.kube.kubectl("get", "kmtun", "redis", "-n", world.namespace)
    assert "TCP" in listed and "16379" in listed
    # A claim on a port dates from its Tunnel: no Tunnel moves onto another port later.
    said = world.kube.kubectl("patch", "kmtun", "redis", "-n", world.namespace, "--type=merge",
                              "-p", '{"spec": {"port": 16380}}', check=False)  # fmt: skip
    assert "protocol and port cannot be changed" in said, said


def test_proxy_v1_tells_nginx_the_clients_address(world: World) -> None:
    names(world, "web1")
    tunnel(world, "web1", protocol="TCP", port=18081, target=f"localhost:{NGINX_PLAIN}",
           proxyProtocol="V1")  # fmt: skip
    world.tunnels.ready("web1")
    url = f"http://web1.{world.domain}:18081/"
    done = wait_until(lambda: _ok(in_client(world, "curl", "-sS", "--max-time", "5", url)), url)
    assert done.stdout.startswith(f"client {world.client_host_address}:"), done


def test_a_younger_tunnel_on_a_taken_port_waits_and_one_the_gateway_cannot_bind_says_so(
    world: World,
) -> None:
    tunnel(world, "first", protocol="TCP", port=17000, target="localhost:1")
    world.tunnels.ready("first")
    world.tunnels.wait_past_creation("first")  # (claims of one second are ordered by uid)
    tunnel(world, "second", protocol="TCP", port=17000, target="localhost:2")
    conflict = world.tunnels.ready("second", "False", "PortConflict")
    message = next(c for c in conflict["conditions"] if c["type"] == "Ready")["message"]
    assert "17000/TCP is already claimed by Tunnel first of this namespace" in message
    # Another program holds a port on the gateway's host: PortUnavailable, until it lets go.
    squatter = world.gateway_host.spawn(
        [sys.executable, "-c", "import socket,time; s=socket.socket(); s.setsockopt(1,2,1); "
         "s.bind(('0.0.0.0',17100)); s.listen(); time.sleep(600)"]
    )  # fmt: skip
    wait_until(lambda: "17100" in world.gateway_host.exec("ss", "-ltn"), "the squatter")
    tunnel(world, "squatted", protocol="TCP", port=17100, target=f"localhost:{REDIS_PORT}")
    refused = world.tunnels.ready("squatted", "False", "PortUnavailable")
    message = next(c for c in refused["conditions"] if c["type"] == "Ready")["message"]
    assert "cannot listen on 17100/TCP" in message
    squatter.kill()
    world.tunnels.ready("squatted", timeout=40)  # retried every 10 s
    world.tunnels.delete("first")
    world.tunnels.ready("second")  # the port passes on once its holder is gone


def test_a_port_below_1024_needs_the_pool_to_open_it(world: World) -> None:
    tunnel(world, "low", protocol="TCP", port=1022, target=f"localhost:{REDIS_PORT}")
    refused = world.tunnels.ready("low", "False", "PortNotAllowed")
    message = next(c for c in refused["conditions"] if c["type"] == "Ready")["message"]
    assert f"Gateway {world.gateway_name} opens to Tunnels" in message
    gateways = Objects(world.kube, "", GATEWAY)
    gateways.patch_spec(world.gateway_name, {"tunnelPorts": [
        {"first": 1022, "last": 1022}, {"first": 1024, "last": 65535}]})  # fmt: skip
    try:
        world.tunnels.ready("low")
        cli = (tool("redis-cli"), "-h", world.gateway_client_ip, "-p", "1022", "PING")
        wait_until(lambda: in_client(world, *cli).stdout.strip() == "PONG", "redis on 1022")
    finally:
        gateways.patch_spec(world.gateway_name, {"tunnelPorts": [{"first": 1024, "last": 65535}]})
    world.tunnels.ready("low", "False", "PortNotAllowed")


def test_the_gateways_own_ports_are_refused_with_the_field_named(world: World) -> None:
    manifest = textwrap.dedent(f"""
        apiVersion: kakuremichi.io/v1alpha1
        kind: Tunnel
        metadata: {{name: https-squat, namespace: {world.namespace}}}
        spec: {{domain: squat.{world.domain}, agent: web, target: "localhost:1", protocol: TCP,
                port: 443}}
        """)
    said = world.kube.kubectl("apply", "-f", "-", input_text=manifest, check=False)
    assert "spec.port" in said and "must not be one of the gateways' own" in said, said
    assert world.tunnels.get("https-squat") is None


# --- UDP ------------------------------------------------------------------------------------------


def test_dig_through_a_udp_tunnel_to_dnsmasq(world: World) -> None:
    tunnel(world, "dns", protocol="UDP", port=5353, target=f"localhost:{DNS_PORT}")
    assert world.tunnels.ready("dns")["url"] == f"udp://dns.{world.domain}:5353"
    dig = (tool("dig"), f"@{world.gateway_client_ip}", "-p", "5353", "probe.example", "+short",
           "+time=2", "+tries=1")  # fmt: skip
    answer = wait_until(lambda: _ok(in_client(world, *dig)), "dig through the tunnel")
    assert answer.stdout.strip() == "10.9.8.7", answer
    metrics = world.gateway_host.exec("curl", "-s", "http://127.0.0.1:9470/metrics")
    assert (
        f'kakuremichi_gateway_datagrams_total{{direction="in",tunnel="dns.{world.domain}"}}'
        in metrics
    )


def test_udp_proxy_v2_carries_the_client_in_each_datagram(world: World) -> None:
    tunnel(world, "udpp", protocol="UDP", port=5454, target=f"localhost:{UDP_ORIGIN_PORT}",
           proxyProtocol="V2")  # fmt: skip
    world.tunnels.ready("udpp")
    probe = (
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(5);"
        f"s.sendto(b'who am i',('{world.gateway_client_ip}',5454)); print(s.recv(512).decode())"
    )
    answer = wait_until(lambda: _ok(in_client(world, sys.executable, "-c", probe)), "udpp")
    assert answer.stdout.startswith(f"from {world.client_host_address}:"), answer
    assert answer.stdout.strip().endswith(f"to {world.gateway_public_ip}:5454 said b'who am i'")


# --- TLS passthrough ----------------------------------------------------------------------------


def test_tls_is_passed_through_to_an_origin_with_its_own_certificate(world: World) -> None:
    names(world, "vault", "pvault")
    tunnel(world, "vault", protocol="TLS", target=f"localhost:{NGINX_TLS}")
    tunnel(world, "pvault", protocol="TLS", target=f"localhost:{NGINX_TLS + 1}",
           proxyProtocol="V2")  # fmt: skip
    world.tunnels.ready("vault")
    world.tunnels.ready("pvault")
    origin_ca = str(world.workdir / "origin-ca.pem")
    vault = (
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--cacert",
        origin_ca,
        f"https://vault.{world.domain}/",
    )
    done = wait_until(lambda: _ok(in_client(world, *vault)), "vault through the gateway")
    assert done.stdout == "vault: the origin's own TLS\n", done  # verified against its CA only
    done = in_client(world, "curl", "-sS", "--max-time", "10", "--cacert", origin_ca,
                     f"https://pvault.{world.domain}/")  # fmt: skip
    assert done.stdout == f"pvault client {world.client_host_address}\n", done
    # The gateway never had a certificate for it: no Certificate was made.
    assert Objects(world.kube, world.namespace, CERTIFICATE).get("vault") is None


# --- a load balancer in front of the gateway ---------------------------------------------------


def test_a_trusted_load_balancers_proxy_header_is_believed_and_a_posers_refused(
    world: World,
) -> None:
    """HAProxy in the client's namespace sends PROXY v2 to the gateway; the gateway trusts its
    address. The client behind HAProxy (127.0.0.1 there) is what nginx hears of; a client from
    another address that begins with a PROXY header of its own is refused."""
    names(world, "lbweb")
    tunnel(world, "lbweb", protocol="TCP", port=18082, target=f"localhost:{NGINX_PLAIN}",
           proxyProtocol="V2")  # fmt: skip
    world.tunnels.ready("lbweb")
    client = world.client_host
    poser = "192.168.251.77"  # a second address on the client's link: not trusted
    client.exec("ip", "addr", "add", f"{poser}/24", "dev", _link_of(world))
    config = world.workdir / "haproxy.cfg"
    config.write_text(textwrap.dedent(f"""
        global
          maxconn 64
        defaults
          mode tcp
          timeout connect 5s
          timeout client 30s
          timeout server 30s
        frontend lb
          bind 127.0.0.1:20082
          default_backend gateway
        backend gateway
          server gw {world.gateway_client_ip}:18082 send-proxy-v2 source {world.client_host_address}
        """))  # fmt: skip
    lb = client.spawn([tool("haproxy"), "-f", str(config), "-db"], log=world.workdir / "lb.log")
    gateways = Objects(world.kube, "", GATEWAY)
    gateways.patch_spec(world.gateway_name, {"trustedProxies": [f"{world.client_host_address}/32"],
                                             "acceptProxyProtocol": True})  # fmt: skip
    try:
        url = "http://127.0.0.1:20082/"
        wait_until(
            lambda: in_client(world, "curl", "-s", "--max-time", "5", url).stdout.startswith(
                "client 127.0.0.1:"
            ),
            "the client behind HAProxy, as nginx hears it",
        )
        gateway = world.gateway_client_ip
        forged = (
            f"import socket; s=socket.create_connection(('{gateway}',18082),5,('{poser}',0));"
            f"s.sendall(b'PROXY TCP4 6.6.6.6 {gateway} 1 18082\\r\\nGET / HTTP/1.0\\r\\n\\r\\n');"
            "print(repr(s.recv(100)))"
        )
        assert in_client(world, sys.executable, "-c", forged).stdout.strip() == "b''"
        metrics = world.gateway_host.exec("curl", "-s", "http://127.0.0.1:9470/metrics")
        assert 'kakuremichi_gateway_limit_hits_total{limit="proxy_header"}' in metrics
    finally:
        gateways.patch_spec(
            world.gateway_name, {"trustedProxies": [], "acceptProxyProtocol": False}
        )
        lb.kill()


def _ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str] | None:
    return done if done.returncode == 0 and done.stdout else None


def _link_of(world: World) -> str:
    out = world.client_host.exec("ip", "-o", "-4", "addr", "show")
    for line in out.splitlines():
        if f" {world.client_host_address}/" in line:
            return line.split()[1]
    raise AssertionError(out)
