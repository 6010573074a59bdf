"""An Ingress of class ``kakuremichi`` end to end: the operator watches every namespace and
serves the Ingress through the cluster agent, over WireGuard, to nginx servers in a network
namespace of their own (the "pod network"), named by a Service without selector and
EndpointSlices written by hand, as a user with a server outside the cluster writes them.

Shown as a user sees it: the certificate from a Secret created after the Ingress (as
cert-manager fills one), path routing, connections spread across endpoints, an endpoint that goes
away no longer answered, ``status.loadBalancer`` naming the gateway, and a slice pointing at a
node's address (the gateway's) never used."""

from __future__ import annotations

import json
import shutil
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kakuremichi.api.resources import GATEWAY
from tests.e2e.world import ENDPOINT_RANGE, World, running_world, skip_unless_possible
from tests.infra import netns
from tests.infra.cluster import Cluster
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import wait_until

BACKEND_SUBNET = ENDPOINT_RANGE.removesuffix("/24")
BACKEND_IP = "192.168.254.2"
SITE_A, SITE_B, API = 8080, 8082, 8081


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
        start_nginx(backend, nginx, workdir)
        Objects(kube, "", GATEWAY).ready(made.gateway_name)
        yield made


def start_nginx(host: netns.Host, nginx: str, workdir: Path) -> None:
    folder = workdir / "nginx"
    folder.mkdir()
    servers = "\n".join(
        f'server {{ listen {BACKEND_IP}:{port}; location / {{ return 200 "{name} $uri\\n"; }} }}'
        for name, port in (("site-a", SITE_A), ("site-b", SITE_B), ("api", API))
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


def service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }  # fmt: skip


def endpoint_slice(name: str, service: str, address: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
    }  # fmt: skip


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
    assert world.get("/api/items") == (200, "api /api/items\n")
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
