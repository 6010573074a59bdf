"""An Ingress of class ``kakuremichi``, and an HTTPRoute attached to a Gateway API Gateway of a
GatewayClass of ours, end to end: the operator watches every namespace and serves them through
the cluster agent, over WireGuard, to nginx servers in a network namespace of their own (the
"pod network"), named by Services without selector and EndpointSlices written by hand, as a user
with a server outside the cluster writes them.

Shown as a user sees it: the certificate from a Secret created after the Ingress (as
cert-manager fills one), path routing, connections spread across endpoints, an endpoint that goes
away no longer answered, ``status.loadBalancer`` naming the gateway, and a slice pointing at a
node's address (the gateway's) never used. For the HTTPRoute: weights, a header match and a
request header set, the Gateway's statuses, and a backend of another namespace refused without a
ReferenceGrant. TLSRoute, GRPCRoute, TCPRoute and UDPRoute reach nginx's own TLS, a gRPC
service, redis and dnsmasq."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kakuremichi.api.resources import GATEWAY
from kakuremichi.control.gateway_api import GATEWAY_CONTROLLER
from tests.e2e.test_first_path import GRPC_CLIENT, GRPC_ORIGIN
from tests.e2e.world import ENDPOINT_RANGE, World, running_world, skip_unless_possible
from tests.infra import netns
from tests.infra.cluster import Cluster, unique_name
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import wait_until

BACKEND_SUBNET = ENDPOINT_RANGE.removesuffix("/24")
BACKEND_IP = "192.168.254.2"
SITE_A, SITE_B, API = 8080, 8082, 8081
VAULT = 8443  # nginx's own TLS, for the TLSRoute (passed through: the gateway never holds it)
GRPC = 50051  # the gRPC service (h2c) of the GRPCRoute
REDIS, DNS = 6390, 5390  # redis and dnsmasq, for the TCPRoute and the UDPRoute
PUBLIC_REDIS, PUBLIC_DNS = 16390, 15390  # the Gateway's TCP and UDP listeners


def _nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not found:
        pytest.skip("nginx is not installed (hack/install-deps.sh installs it)")
    return found


@pytest.fixture(scope="module")
def world(
    kube: Cluster, namespaces_supported: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    skip_unless_possible()
    nginx = _nginx()
    workdir = tmp_path_factory.mktemp("ingress")
    with running_world(kube, workdir, cluster_agent=True) as made:
        backend = netns.Host("backend")
        made.extra_hosts.append(backend)
        netns.link(made.agent_host, backend, BACKEND_SUBNET)
        issued = made.ca.issue(vault_host(made))
        (workdir / "vault.crt").write_text(issued.certificate_pem)
        (workdir / "vault.key").write_text(issued.private_key_pem)
        start_nginx(backend, nginx, workdir)
        Objects(kube, "", GATEWAY).ready(made.gateway_name)
        yield made


def vault_host(world: World) -> str:
    return f"vault.{world.domain}"


def start_nginx(host: netns.Host, nginx: str, workdir: Path) -> None:
    folder = workdir / "nginx"
    folder.mkdir()
    servers = "\n".join(
        f"server {{ listen {BACKEND_IP}:{port}; location / {{ "
        f'return 200 "{name} $uri $http_x_route\\n"; }} }}'
        for name, port in (("site-a", SITE_A), ("site-b", SITE_B), ("api", API))
    )
    servers += (
        f"\nserver {{ listen {BACKEND_IP}:{VAULT} ssl; ssl_certificate {workdir}/vault.crt; "
        f"ssl_certificate_key {workdir}/vault.key; "
        'location / { return 200 "vault $uri $ssl_server_name\\n"; } }'
    )
    temp = " ".join(
        f"{kind}_temp_path {folder};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (workdir / "nginx.conf").write_text(
        textwrap.dedent(f"""\
        worker_processes 1;
        pid {folder}/nginx.pid;
        error_log {folder}/error.log;
        events {{}}
        http {{
          access_log off;
          {temp}
          {servers}
        }}
        """)
    )
    host.spawn([nginx, "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"],
               log=workdir / "nginx.log")  # fmt: skip
    wait_until(
        lambda: "site-a" in host.exec("curl", "-s", f"http://{BACKEND_IP}:{SITE_A}/", check=False),
        "nginx",
    )


def service(name: str, port: int = 80, port_name: str = "http") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"ports": [{"name": port_name, "port": port, "protocol": "TCP"}]},
    }  # fmt: skip


def endpoint_slice(
    name: str, service: str, address: str, port: int, port_name: str = "http"
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
    }  # fmt: skip


GATEWAY_API = "gateway.networking.k8s.io/v1"


@contextlib.contextmanager
def gateway_class_of_ours(world: World) -> Iterator[str]:
    """A GatewayClass of kakuremichi's controller (a name of its own: it is cluster-scoped)."""
    name = unique_name("kmgc")
    made = {"apiVersion": GATEWAY_API, "kind": "GatewayClass", "metadata": {"name": name},
            "spec": {"controllerName": GATEWAY_CONTROLLER}}  # fmt: skip
    world.kube.kubectl("apply", "-f", "-", input_text=json.dumps(made))
    try:
        yield name
    finally:
        world.kube.kubectl("delete", "gatewayclass.gateway.networking.k8s.io", name,
                           "--wait=false")  # fmt: skip


def apply(world: World, *bodies: dict[str, Any]) -> None:
    document = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(bodies)})
    world.kube.kubectl("apply", "-n", world.namespace, "-f", "-", input_text=document)


def answers(world: World, path: str, count: int) -> Counter[str]:
    """Who answered ``count`` GETs of ``path`` (the first word of each body)."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        status, body = world.get(path)
        seen[body.split(" ")[0] if status == 200 else str(status)] += 1
    return seen


def test_an_ingress_is_served_over_wireguard_by_path_with_its_endpoints(world: World) -> None:
    domain = world.domain
    ingress = {
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "shop"},
        "spec": {
            "ingressClassName": "kakuremichi",
            "tls": [{"hosts": [domain], "secretName": "shop-tls"}],
            "rules": [{"host": domain, "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": "site", "port": {"name": "http"}}}},
                {"path": "/api", "pathType": "Prefix",
                 "backend": {"service": {"name": "api", "port": {"number": 80}}}},
                {"path": "/steal", "pathType": "Exact",
                 "backend": {"service": {"name": "steal", "port": {"number": 80}}}},
            ]}}],
        },
    }  # fmt: skip
    apply(
        world, service("site"), service("api"), service("steal"),
        endpoint_slice("site-a", "site", BACKEND_IP, SITE_A),
        endpoint_slice("site-b", "site", BACKEND_IP, SITE_B),
        endpoint_slice("api-1", "api", BACKEND_IP, API),
        # A node's address (the gateway's own): never an endpoint of a tenant's route.
        endpoint_slice("steal-1", "steal", world.gateway_public_ip, 8471),
        ingress,
    )  # fmt: skip
    # Its certificate comes later, into the Secret the Ingress names (as cert-manager fills it).
    wait_until(
        lambda: world.kube.kubectl("get", "certificates.kakuremichi.io", "-n", world.namespace,
                                   "-o", "name", check=False).strip(),
        "the host's Certificate",
    )  # fmt: skip
    issued = world.ca.issue(domain)
    Secrets(world.kube, world.namespace).put_tls(
        "shop-tls", issued.certificate_pem, issued.private_key_pem
    )
    wait_until(lambda: world.get("/")[0] == 200, "the Ingress to answer over HTTPS", timeout=90)

    # Path routing: /api and below to one Service, the rest to the other.
    assert world.get("/api/items") == (200, "api /api/items \n")  # (no X-Route header)
    assert world.get("/apix")[1].startswith("site-")
    # Connections spread across the ready endpoints.
    assert set(answers(world, "/", 12)) == {"site-a", "site-b"}
    # A node's address is never reached: no endpoint, 503.
    assert world.get("/steal")[0] == 503

    # An endpoint that goes away stops receiving requests (connections to it already open are
    # retired within seconds: a request in flight is never cut).
    world.kube.kubectl("delete", "endpointslice", "site-b", "-n", world.namespace)
    wait_until(lambda: answers(world, "/", 20) == Counter({"site-a": 20}), "site-b to be left out",
               timeout=60)  # fmt: skip
    assert answers(world, "/", 10) == Counter({"site-a": 10})

    # The Ingress says where it is served.
    status = world.kube.kubectl("get", "ingress", "shop", "-n", world.namespace, "-o",
                                "jsonpath={.status.loadBalancer.ingress[*].ip}")  # fmt: skip
    assert status.split() == [world.gateway_public_ip]


def test_an_httproute_is_served_with_weights_header_matches_and_the_specs_statuses(
    world: World,
) -> None:
    host = f"{unique_name('route')}.e2e.test"
    issued = world.ca.issue(host)
    Secrets(world.kube, world.namespace).put_tls(
        "edge-tls", issued.certificate_pem, issued.private_key_pem
    )
    other = unique_name("e2eother")
    world.kube.kubectl("create", "namespace", other)
    with gateway_class_of_ours(world) as klass:
        try:
            apply(
                world, service("blue"), service("green"), service("api"),
                endpoint_slice("blue-1", "blue", BACKEND_IP, SITE_A),
                endpoint_slice("green-1", "green", BACKEND_IP, SITE_B),
                endpoint_slice("green-2", "green", BACKEND_IP, API),
                endpoint_slice("api-2", "api", BACKEND_IP, API),
                {"apiVersion": GATEWAY_API, "kind": "Gateway", "metadata": {"name": "edge"},
                 "spec": {"gatewayClassName": klass, "listeners": [
                     {"name": "https", "protocol": "HTTPS", "port": 443,
                      "tls": {"certificateRefs": [{"name": "edge-tls"}]}}]}},
                {"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": {"name": "shop"},
                 "spec": {"parentRefs": [{"name": "edge"}], "hostnames": [host], "rules": [
                     {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                      "backendRefs": [{"name": "api", "port": 80}],
                      "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                          "set": [{"name": "X-Route", "value": "api-rule"}]}}]},
                     {"matches": [{"headers": [{"name": "X-Canary", "value": "always"}]}],
                      "backendRefs": [{"name": "green", "port": 80}]},
                     {"backendRefs": [{"name": "blue", "port": 80, "weight": 1},
                                      {"name": "green", "port": 80, "weight": 1}]},
                 ]}},
                # A backend of another namespace, which grants nothing: refused.
                {"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": {"name": "reach"},
                 "spec": {"parentRefs": [{"name": "edge"}], "hostnames": [f"x.{host}"], "rules": [
                     {"backendRefs": [{"name": "db", "namespace": other, "port": 80}]}]}},
            )  # fmt: skip
            resolve = ("--resolve", f"{host}:443:{world.gateway_client_ip}")

            def get(path: str, *args: str) -> tuple[int, str]:
                done = world.curl("-o", "-", "-w", "\n%{http_code}", *resolve, *args,
                                  f"https://{host}{path}")  # fmt: skip
                body, _, code = done.stdout.rpartition("\n")
                return int(code or 0), body

            wait_until(lambda: get("/")[0] == 200, "the HTTPRoute to answer over HTTPS", timeout=90)
            # Path, with the rule's header set on the way; a header match; weights over both.
            assert get("/api/x") == (200, "api /api/x api-rule\n")

            def canary(count: int) -> set[str]:
                return {get("/", "-H", "X-Canary: always")[1].split()[0] for _ in range(count)}

            assert canary(12) == {"site-b", "api"}  # (green's two endpoints)
            seen = Counter(get("/")[1].split()[0] for _ in range(30))
            assert {"site-a"} < set(seen) <= {"site-a", "site-b", "api"}, seen
            # An endpoint that goes away stops receiving requests.
            world.kube.kubectl("delete", "endpointslice", "green-2", "-n", world.namespace)
            wait_until(lambda: canary(10) == {"site-b"}, "green-2 to be left out", timeout=60)

            def conditions(kind: str, name: str, path: str) -> dict[str, str]:
                found = json.loads(world.kube.kubectl("get", kind, name, "-n", world.namespace,
                                                      "-o", "json"))  # fmt: skip
                for step in path.split("."):
                    found = found[int(step)] if step.isdigit() else found[step]
                return {c["type"]: c["reason"] for c in found}

            routes, gateways = (
                "httproutes.gateway.networking.k8s.io",
                "gateways.gateway.networking.k8s.io",
            )
            wait_until(
                lambda: (
                    conditions(routes, "reach", "status.parents.0.conditions").get("ResolvedRefs")
                    == "RefNotPermitted"
                ),
                "the cross-namespace backend to be refused",
            )
            assert conditions(routes, "shop", "status.parents.0.conditions") == {
                "Accepted": "Accepted",
                "ResolvedRefs": "ResolvedRefs",
            }
            assert conditions(gateways, "edge", "status.conditions") == {
                "Accepted": "Accepted",
                "Programmed": "Programmed",
            }
            status = json.loads(world.kube.kubectl("get", gateways, "edge", "-n", world.namespace,
                                                   "-o", "json"))["status"]  # fmt: skip
            assert status["addresses"] == [{"type": "IPAddress", "value": world.gateway_public_ip}]
            assert status["listeners"][0]["attachedRoutes"] == 2
        finally:
            world.kube.kubectl("delete", "namespace", other, "--wait=false")


def test_a_tlsroute_is_passed_through_to_the_origins_own_tls(world: World) -> None:
    """A TLS listener (Passthrough) and a TLSRoute: the client's TLS reaches nginx's own
    certificate through the gateway and WireGuard, which hold none for that host."""
    host = vault_host(world)
    with gateway_class_of_ours(world) as klass:
        apply(
            world,
            service("vault", 443, "tls"),
            endpoint_slice("vault-1", "vault", BACKEND_IP, VAULT, "tls"),
            {"apiVersion": GATEWAY_API, "kind": "Gateway", "metadata": {"name": "passthrough"},
             "spec": {"gatewayClassName": klass, "listeners": [
                 {"name": "tls", "protocol": "TLS", "port": 443,
                  "tls": {"mode": "Passthrough"}}]}},
            {"apiVersion": GATEWAY_API, "kind": "TLSRoute", "metadata": {"name": "vault"},
             "spec": {"parentRefs": [{"name": "passthrough"}], "hostnames": [host],
                      "rules": [{"backendRefs": [{"name": "vault", "port": 443}]}]}},
        )  # fmt: skip
        resolve = ("--resolve", f"{host}:443:{world.gateway_client_ip}")

        def get() -> tuple[int, str]:
            done = world.curl("-o", "-", "-w", "\n%{http_code}", *resolve, f"https://{host}/x")
            body, _, code = done.stdout.rpartition("\n")
            return int(code or 0), body

        wait_until(lambda: get()[0] == 200, "the TLSRoute to answer", timeout=90)
        assert get() == (200, f"vault /x {host}\n")  # (nginx saw the SNI: the TLS was its own)
        found = json.loads(
            world.kube.kubectl(
                "get",
                "tlsroutes.gateway.networking.k8s.io",
                "vault",
                "-n",
                world.namespace,
                "-o",
                "json",
            )
        )
        reasons = {c["type"]: c["reason"] for c in found["status"]["parents"][0]["conditions"]}
        assert reasons == {"Accepted": "Accepted", "ResolvedRefs": "ResolvedRefs"}


@contextlib.contextmanager
def grpc_gateway(world: World, name: str, host: str, port: int) -> Iterator[str]:
    """A gRPC service (h2c) on ``port`` beside the cluster agent, a certificate Secret for
    ``host`` and a Gateway ``name`` of a class of ours with an HTTPS listener that uses it;
    yields the Gateway's class."""
    backend = next(h for h in world.extra_hosts if h.role == "backend")
    server = backend.spawn([sys.executable, GRPC_ORIGIN, BACKEND_IP, str(port)],
                           log=world.workdir / f"{name}.log")  # fmt: skip
    issued = world.ca.issue(host)
    Secrets(world.kube, world.namespace).put_tls(
        f"{name}-tls", issued.certificate_pem, issued.private_key_pem
    )
    try:
        with gateway_class_of_ours(world) as klass:
            apply(world, {
                "apiVersion": GATEWAY_API, "kind": "Gateway", "metadata": {"name": name},
                "spec": {"gatewayClassName": klass, "listeners": [
                    {"name": "https", "protocol": "HTTPS", "port": 443,
                     "tls": {"certificateRefs": [{"name": f"{name}-tls"}]}}]},
            })  # fmt: skip
            yield klass
    finally:
        server.kill()
        server.wait(timeout=10)


def grpc_client(world: World, script: str, host: str) -> str:
    """What a gRPC client ``script`` run from the client's namespace prints."""
    done = subprocess.run(
        world.client_host.command(sys.executable, "-c", script, f"{world.gateway_client_ip}:443",
                                  host, str(world.ca_file)),
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    return done.stdout


def test_a_grpcroute_reaches_an_h2c_service_with_its_trailers(world: World) -> None:
    """A GRPCRoute of one backend: a gRPC client over TLS reaches a gRPC service (h2c) beside
    the cluster agent, its stream and the trailers that end it included."""
    host = f"grpc.{world.domain}"
    with grpc_gateway(world, "grpc", host, GRPC):
        apply(
            world,
            service("echo", 50051, "grpc"),
            endpoint_slice("echo-1", "echo", BACKEND_IP, GRPC, "grpc"),
            {"apiVersion": GATEWAY_API, "kind": "GRPCRoute", "metadata": {"name": "echo"},
             "spec": {"parentRefs": [{"name": "grpc"}], "hostnames": [host],
                      "rules": [{"backendRefs": [{"name": "echo", "port": 50051}]}]}},
        )  # fmt: skip
        answered = wait_until(lambda: grpc_client(world, GRPC_CLIENT, host),
                              "a gRPC call through the GRPCRoute", timeout=90)  # fmt: skip
        assert answered.splitlines() == ["echo: hello", "0,1,2", "3"]


def test_tcp_and_udp_routes_reach_redis_and_dnsmasq_through_their_listeners_ports(
    world: World,
) -> None:
    """A Gateway with a TCP listener and a UDP one, a TCPRoute to redis and a UDPRoute to
    dnsmasq beside the cluster agent (a Service's UDP port, its slice's endpoint): redis-cli and
    dig from the client reach them on the gateway's ports, through WireGuard."""
    tools = {name: shutil.which(name) or f"/usr/sbin/{name}" for name in
             ("redis-server", "redis-cli", "dnsmasq", "dig")}  # fmt: skip
    if missing := [name for name, path in tools.items() if not Path(path).exists()]:
        pytest.skip(f"not installed: {', '.join(missing)} (hack/install-deps.sh installs them)")
    backend = next(h for h in world.extra_hosts if h.role == "backend")
    servers = [
        backend.spawn([tools["redis-server"], "--bind", BACKEND_IP, "--port", str(REDIS),
                       "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                      log=world.workdir / "route-redis.log"),
        backend.spawn([tools["dnsmasq"], "--no-daemon", "--user=root", f"--port={DNS}",
                       f"--listen-address={BACKEND_IP}", "--bind-interfaces", "--no-resolv",
                       "--no-hosts", "--address=/probe.example/10.9.8.7",
                       f"--pid-file={world.workdir / 'route-dnsmasq.pid'}"],
                      log=world.workdir / "route-dnsmasq.log"),
    ]  # fmt: skip
    dns_slice = endpoint_slice("dns-1", "dns", BACKEND_IP, DNS, "dns")
    dns_slice["ports"][0]["protocol"] = "UDP"
    try:
        with gateway_class_of_ours(world) as klass:
            apply(
                world,
                service("redis", 6379, "redis"),
                endpoint_slice("redis-1", "redis", BACKEND_IP, REDIS, "redis"),
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns"},
                 "spec": {"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}},
                dns_slice,
                {"apiVersion": GATEWAY_API, "kind": "Gateway", "metadata": {"name": "ports"},
                 "spec": {"gatewayClassName": klass, "listeners": [
                     {"name": "redis", "protocol": "TCP", "port": PUBLIC_REDIS},
                     {"name": "dns", "protocol": "UDP", "port": PUBLIC_DNS}]}},
                {"apiVersion": GATEWAY_API, "kind": "TCPRoute", "metadata": {"name": "redis"},
                 "spec": {"parentRefs": [{"name": "ports", "sectionName": "redis"}],
                          "rules": [{"backendRefs": [{"name": "redis", "port": 6379}]}]}},
                {"apiVersion": GATEWAY_API, "kind": "UDPRoute", "metadata": {"name": "dns"},
                 "spec": {"parentRefs": [{"name": "ports", "sectionName": "dns"}],
                          "rules": [{"backendRefs": [{"name": "dns", "port": 53}]}]}},
            )  # fmt: skip

            def client(*args: str) -> str:
                done = subprocess.run(world.client_host.command(*args), capture_output=True,
                                      text=True, check=False, timeout=60)  # fmt: skip
                return done.stdout.strip() if done.returncode == 0 else ""

            ping = (tools["redis-cli"], "-h", world.gateway_client_ip, "-p", str(PUBLIC_REDIS),
                    "PING")  # fmt: skip
            wait_until(lambda: client(*ping) == "PONG", "redis through the TCPRoute", timeout=90)
            dig = (tools["dig"], f"@{world.gateway_client_ip}", "-p", str(PUBLIC_DNS),
                   "probe.example", "+short", "+time=2", "+tries=1")  # fmt: skip
            answer = wait_until(lambda: client(*dig), "dig through the UDPRoute", timeout=90)
            assert answer == "10.9.8.7"
            for kind, name in (("tcproutes", "redis"), ("udproutes", "dns")):
                found = json.loads(world.kube.kubectl(
                    "get", f"{kind}.gateway.networking.k8s.io", name, "-n", world.namespace,
                    "-o", "json",
                ))  # fmt: skip
                parent = found["status"]["parents"][0]
                reasons = {c["type"]: c["reason"] for c in parent["conditions"]}
                assert reasons == {"Accepted": "Accepted", "ResolvedRefs": "ResolvedRefs"}
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=10)


ROUTED_GRPC_CLIENT = """
import grpc, sys
target, name, ca = sys.argv[1:4]
credentials = grpc.ssl_channel_credentials(open(ca, "rb").read())
options = (("grpc.ssl_target_name_override", name), ("grpc.default_authority", name))
with grpc.secure_channel(target, credentials, options=options) as channel:
    for path in ("/kakuremichi.test.Echo/Say", "/kakuremichi.test.Echo/Count", "/other.Svc/Say"):
        try:
            print(channel.unary_unary(path)(b"3", timeout=10).decode())
        except grpc.RpcError as error:
            print(error.code().name)
"""


def test_a_grpcroutes_calls_are_routed_one_by_one_by_method(world: World) -> None:
    """A GRPCRoute with method matches: the gateway routes each call of one HTTP/2 connection,
    Say to the gRPC service beside the agent, Count to a Service with no endpoint (UNAVAILABLE),
    and a service no rule names is UNIMPLEMENTED."""
    host = f"calls.{world.domain}"
    with grpc_gateway(world, "calls", host, GRPC + 1):
        apply(
            world,
            service("say", 50051, "grpc"),
            endpoint_slice("say-1", "say", BACKEND_IP, GRPC + 1, "grpc"),
            service("nowhere", 50051, "grpc"),
            {"apiVersion": GATEWAY_API, "kind": "GRPCRoute", "metadata": {"name": "calls"},
             "spec": {"parentRefs": [{"name": "calls"}], "hostnames": [host], "rules": [
                 {"matches": [{"method": {"service": "kakuremichi.test.Echo",
                                          "method": "Say"}}],
                  "backendRefs": [{"name": "say", "port": 50051}]},
                 {"matches": [{"method": {"service": "kakuremichi.test.Echo",
                                          "method": "Count"}}],
                  "backendRefs": [{"name": "nowhere", "port": 50051}]}]}},
        )  # fmt: skip
        answered = wait_until(
            lambda: (said := grpc_client(world, ROUTED_GRPC_CLIENT, host).splitlines())
            and said[0] == "echo: 3" and said,
            "calls routed by the GRPCRoute", timeout=90,
        )  # fmt: skip
        assert answered == ["echo: 3", "UNAVAILABLE", "UNIMPLEMENTED"]
