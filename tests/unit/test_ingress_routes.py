"""Ingress of class kakuremichi → per-host rules and backends, and a backend's ready endpoints
from EndpointSlices: the pure core the operator's route controllers project from. Adversarial
cases beside each: what a tenant could write to reach beyond its namespace."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from kakuremichi.api.request_paths import normalize_path
from kakuremichi.control.ingress_routes import (
    BackendRef,
    ServiceFacts,
    ServicePort,
    ingress_routes,
    is_ours,
)
from kakuremichi.control.route_endpoints import ready_endpoints, usable
from kakuremichi.edge.request_routing import Request, RequestRouter

SERVICES = {
    "web": ServiceFacts.of({"metadata": {"name": "web"},
                            "spec": {"ports": [{"name": "http", "port": 80}]}}),
    "api": ServiceFacts.of({"metadata": {"name": "api"},
                            "spec": {"ports": [{"name": "grpc", "port": 9000},
                                               {"name": "http", "port": 8080},
                                               {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
    "outside": ServiceFacts.of({"metadata": {"name": "outside"},
                                "spec": {"type": "ExternalName", "externalName": "evil.example"}}),
}  # fmt: skip


def ingress(spec: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "shop", "namespace": "shop", "annotations": annotations or {}},
            "spec": spec}  # fmt: skip


def backend(service: str, port: int | str) -> dict[str, Any]:
    key = "number" if isinstance(port, int) else "name"
    return {"service": {"name": service, "port": {key: port}}}


def path(value: str, service: str, port: int | str, kind: str = "Prefix") -> dict[str, Any]:
    return {"path": value, "pathType": kind, "backend": backend(service, port)}


def chosen(rules: Any, request_path: str) -> str | None:
    choice = RequestRouter(rules).choose(
        Request(b"GET", normalize_path(request_path.encode()), b"", [], [])
    )
    return choice.stream if choice is not None else None


def test_the_class_is_read_from_the_field_then_the_annotation_then_the_default() -> None:
    assert is_ours(ingress({"ingressClassName": "kakuremichi"}), default_class=False)
    assert not is_ours(ingress({"ingressClassName": "nginx"}), default_class=True)
    old = ingress({}, {"kubernetes.io/ingress.class": "kakuremichi"})
    assert is_ours(old, default_class=False)
    assert is_ours(ingress({}), default_class=True) and not is_ours(ingress({}), False)


def test_paths_longest_first_exact_before_prefix_and_the_default_backend_last() -> None:
    routes = ingress_routes(ingress({
        "defaultBackend": backend("web", "http"),
        "rules": [
            {"host": "shop.example.com", "http": {"paths": [
                path("/", "web", 80),
                path("/api", "api", "http"),
                path("/api/v2", "api", 9000, "ImplementationSpecific"),
                path("/api", "web", 80, "Exact"),
            ]}},
            {"host": "shop.example.com", "http": {"paths": [path("/static/", "web", "http")]}},
        ],
    }), SERVICES)  # fmt: skip
    assert routes.problems == []
    host = routes.hosts["shop.example.com"]
    expected = {
        "/api": "shop/web:80", "/api/x": "shop/api:8080", "/api/v2/x": "shop/api:9000",
        "/static": "shop/web:80", "/staticx": "shop/web:80", "/": "shop/web:80",
    }  # fmt: skip
    assert {p: chosen(host.rules, p) for p in expected} == expected
    assert host.backends == {BackendRef("shop", "web", 80), BackendRef("shop", "api", 8080),
                             BackendRef("shop", "api", 9000)}  # fmt: skip
    assert host.rules[-1].matches is None  # the default backend: whatever no path matched


def test_without_a_default_backend_an_unmatched_path_has_no_rule() -> None:
    routes = ingress_routes(ingress({"rules": [
        {"host": "a.example.com", "http": {"paths": [path("/only", "web", 80, "Exact")]}}
    ]}), SERVICES)  # fmt: skip
    assert chosen(routes.hosts["a.example.com"].rules, "/other") is None


def test_tls_names_the_secret_of_the_hosts_it_lists_and_others_use_acme() -> None:
    routes = ingress_routes(ingress({
        "tls": [{"hosts": ["a.example.com"], "secretName": "a-tls"}, {"hosts": ["b.example.com"]}],
        "rules": [{"host": h, "http": {"paths": [path("/", "web", 80)]}}
                  for h in ("a.example.com", "b.example.com")],
    }), SERVICES)  # fmt: skip
    assert routes.hosts["a.example.com"].tls_secret == "a-tls"
    assert routes.hosts["b.example.com"].tls_secret is None


@pytest.mark.parametrize(
    ("rule", "said"),
    [
        ({"http": {"paths": [path("/", "web", 80)]}}, "spec.rules[0].host: kakuremichi publishes"),
        ({"host": "*.example.com"}, "spec.rules[0].host: wildcard hosts are not served"),
        ({"host": "a.example.com", "http": {"paths": [path("/", "db", 5432)]}},
         "spec.rules[0].http.paths[0].backend.service.name: there is no Service db in this"),
        ({"host": "a.example.com", "http": {"paths": [path("/", "web", 81)]}},
         "spec.rules[0].http.paths[0].backend.service.port: Service web has no TCP port 81"),
        ({"host": "a.example.com", "http": {"paths": [path("/", "api", "dns")]}},
         "spec.rules[0].http.paths[0].backend.service.port: Service api has no TCP port dns"),
        ({"host": "a.example.com", "http": {"paths": [path("/", "outside", 80)]}},
         "backend.service.name: Service outside is of type ExternalName"),
        ({"host": "a.example.com", "http": {"paths": [path("api?x=1", "web", 80)]}},
         "spec.rules[0].http.paths[0].path: must be an absolute path"),
        ({"host": "a.example.com", "http": {"paths": [
            {"path": "/", "pathType": "Prefix",
             "backend": {"resource": {"kind": "Bucket", "name": "b"}}}]}},
         "spec.rules[0].http.paths[0].backend.resource: only Service backends"),
    ],
)  # fmt: skip
def test_what_cannot_be_served_is_said_with_its_field_and_the_rest_is_served(
    rule: dict[str, Any], said: str
) -> None:
    fine = {"host": "ok.example.com", "http": {"paths": [path("/", "web", 80)]}}
    routes = ingress_routes(ingress({"rules": [rule, fine]}), SERVICES)
    assert len(routes.problems) == 1 and said in routes.problems[0], routes.problems
    assert "ok.example.com" in routes.hosts


def test_a_backend_can_only_be_a_service_of_the_ingress_namespace() -> None:
    # An Ingress has no field for another namespace; a name with one is not a Service name.
    sneaky = {"host": "a.example.com", "http": {"paths": [path("/", "kube-system/dns", 53)]}}
    routes = ingress_routes(ingress({"rules": [sneaky]}), SERVICES)
    assert routes.hosts["a.example.com"].rules == [] and "must name a Service" in routes.problems[0]
    for host in ingress_routes(ingress({"rules": [
        {"host": "b.example.com", "http": {"paths": [path("/", "web", 80)]}}
    ]}), SERVICES).hosts.values():  # fmt: skip
        assert all(ref.namespace == "shop" for ref in host.backends)


# --- endpoints ----------------------------------------------------------------------------------

WEB = BackendRef("shop", "web", 80, "http")


def endpoint_slice(
    addresses: list[str], ready: list[bool | None] | None = None, *, namespace: str = "shop",
    service: str = "web", port_name: str = "http", number: int = 8080, family: str = "IPv4",
) -> dict[str, Any]:  # fmt: skip
    ready = ready or [True] * len(addresses)
    return {
        "metadata": {"namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
        "addressType": family,
        "ports": [{"name": port_name, "port": number, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [a], "conditions": {} if r is None else {"ready": r}}
            for a, r in zip(addresses, ready, strict=True)
        ],
    }


def test_ready_endpoints_of_the_service_port_across_slices() -> None:
    slices = [
        endpoint_slice(["10.244.1.9", "10.244.1.7"], [True, None]),
        endpoint_slice(["10.244.2.3", "10.244.2.4"], [False, True]),
        endpoint_slice(["fd00::5"], family="IPv6"),
        endpoint_slice(["10.244.9.9"], port_name="metrics", number=9090),  # another port
        endpoint_slice(["10.244.9.8"], service="api"),  # another Service
    ]
    assert ready_endpoints(WEB, slices) == [
        "10.244.1.7:8080", "10.244.1.9:8080", "10.244.2.4:8080", "[fd00::5]:8080",
    ]  # fmt: skip


def test_a_hand_written_slice_cannot_point_into_other_tenants_or_the_node() -> None:
    foreign = {"10.244.3.3", "192.168.1.10"}  # another namespace's pod; a node
    slices = [endpoint_slice([
        "127.0.0.1", "169.254.169.254", "0.0.0.0", "224.0.0.1", "10.244.3.3", "192.168.1.10",
        "203.0.113.7",
    ]), endpoint_slice(["::1", "fe80::1", "::ffff:127.0.0.1", "::ffff:10.244.3.3"], family="IPv6"),
        endpoint_slice(["10.244.5.5"], namespace="other")]  # fmt: skip
    assert ready_endpoints(WEB, slices, foreign) == ["203.0.113.7:8080"]
    assert (
        ready_endpoints(WEB, [{**endpoint_slice(["a.example.com"]), "addressType": "FQDN"}]) == []
    )
    assert not usable("not-an-address")


@pytest.mark.parametrize(
    "spec",
    [
        {"rules": "x"}, {"rules": [None, 5, "x"]}, {"rules": [{"host": 5}]},
        {"rules": [{"host": "a.example.com", "http": "x"}]},
        {"rules": [{"host": "a.example.com", "http": {"paths": [{"path": 5, "backend": "web"}]}}]},
        {"rules": [{"host": "a.example.com", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": "web"}},
            {"path": "/", "pathType": "Prefix",
             "backend": {"service": {"name": "web", "port": 80}}},
            {"path": "/", "pathType": "Prefix",
             "backend": {"service": {"name": "web", "port": {"number": "80"}}}},
            *({"path": p, "pathType": "ImplementationSpecific", "backend": backend("web", 80)}
              for p in ("/a\n", "/x%5C", "/x/..;/y")),
        ]}}]},
        {"defaultBackend": "x", "tls": [{"hosts": 5, "secretName": 7}], "rules": []},
        {"rules": [{"host": "a.example.com\n", "http": {"paths": [path("/", "web", 80)]}}]},
    ],
)  # fmt: skip
def test_no_ingress_a_tenant_can_write_raises(spec: dict[str, Any]) -> None:
    routes = ingress_routes(ingress(spec), SERVICES)
    for host in routes.hosts.values():
        assert all(isinstance(p, str) for p in routes.problems) and host.host.endswith(".com")
    hostile_service = ServiceFacts.of({"metadata": None, "spec": {"ports": [None, {"port": "x"},
                                                                  {"port": True}, 5]}})  # fmt: skip
    assert hostile_service.ports == ()


def test_precedence_is_that_of_the_path_the_gateways_will_read() -> None:
    routes = ingress_routes(ingress({"rules": [{"host": "a.example.com", "http": {"paths": [
        path("/./././././././", "web", 80, "ImplementationSpecific"),
        path("/admin", "api", 8080),
    ]}}]}), SERVICES)  # fmt: skip
    assert chosen(routes.hosts["a.example.com"].rules, "/admin/x") == "shop/api:8080"


def test_the_longest_names_still_make_a_stream_name() -> None:
    long = "s" * 63
    services = {long: ServiceFacts(long, (ServicePort(65535, "http"),))}
    spec = {"rules": [{"host": "a.example.com", "http": {"paths": [path("/", long, 65535)]}}]}
    routes = ingress_routes({**ingress(spec), "metadata": {"namespace": "n" * 63}}, services)
    assert routes.problems == [] and len(next(iter(routes.hosts["a.example.com"].backends))
                                         .stream) == 133  # fmt: skip


@pytest.mark.parametrize(
    "address",
    ["0.1.2.3", "100.100.100.200", "fd00:ec2::254", "64:ff9b::a9fe:a9fe", "::127.0.0.1",
     "::ffff:0:7f00:1", "2002:7f00:1::", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "10.96.0.1"],
)  # fmt: skip
def test_addresses_that_carry_or_reach_elsewhere_are_refused(address: str) -> None:
    assert not usable(address, foreign={"10.96.0.1"})  # (a Service's cluster IP)


def test_only_the_allowed_space_when_one_is_given() -> None:
    pods = [ipaddress.ip_network("10.244.0.0/16")]
    assert usable("10.244.1.2", allowed=pods) and not usable("203.0.113.7", allowed=pods)
