"""Gateway API objects of class ``kakuremichi`` against an in-memory cluster: what a user sees
(statuses with the spec's reasons, Certificates, the rules the gateways get) and what a tenant
who tries to cross a namespace gets (a refusal that names nothing of the other's)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from kakuremichi.api import protocol
from kakuremichi.api.protocol import CertificateBundle
from kakuremichi.api.resources import AGENT, TUNNEL
from kakuremichi.control import agents, gateway_api, tunnels
from kakuremichi.control.context import Context
from kakuremichi.control.gateway_api import GATEWAY_CONTROLLER
from kakuremichi.control.ingress_routes import ServiceFacts, ServicePort
from kakuremichi.control.ingresses import IngressController
from kakuremichi.control.kube_api import (
    ENDPOINT_SLICE,
    GATEWAY_CLASS,
    GRPC_ROUTE,
    HTTP_ROUTE,
    INGRESS,
    NAMESPACE,
    POD,
    REFERENCE_GRANT,
    ROUTED_GATEWAY,
    SERVICE,
    TCP_ROUTE,
    TLS_ROUTE,
    UDP_ROUTE,
    BuiltinKind,
)
from kakuremichi.control.topology import GatewayNode, agent_config, gateway_config
from kakuremichi.control.tunnel_readiness import CertificateVerdict
from tests.infra.fake_kube import FakeKube
from tests.infra.tlsgen import TestCA
from tests.unit.test_control_plane import reconcile
from tests.unit.test_ingress_controller import (
    AGENT_NAME,
    SYSTEM,
    backends,
    controller_of,
    endpoint_slice,
    feed,
    host,
    ingress,
    make_context,
    pod,
    service,
    settle,
)

INFRA = "infra"


@pytest.fixture
def context(tmp_path: Path) -> Context:
    return make_context(tmp_path)


def gateway_class(name: str = "kakuremichi", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"controllerName": GATEWAY_CONTROLLER, **spec}}


def https(name: str = "https", hostname: str | None = None, secret: str = "site-cert",
          **more: Any) -> dict[str, Any]:  # fmt: skip
    listener: dict[str, Any] = {
        "name": name, "protocol": "HTTPS", "port": 443,
        "tls": {"mode": "Terminate", "certificateRefs": [{"kind": "Secret", "name": secret}]},
        **more,
    }  # fmt: skip
    if hostname:
        listener["hostname"] = hostname
    return listener


def gateway(name: str, namespace: str, *listeners: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"gatewayClassName": "kakuremichi", "listeners": list(listeners), **spec},
    }


def route(name: str, namespace: str, hostnames: list[str], rules: list[dict[str, Any]],
          parent: tuple[str, str] = ("edge", INFRA), **ref: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "parentRefs": [{"name": parent[0], "namespace": parent[1], **ref}],
            "hostnames": hostnames,
            "rules": rules,
        },
    }


def to(service_name: str, port: int = 80, weight: int | None = None, **ref: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": service_name, "port": port, **ref}
    if weight is not None:
        out["weight"] = weight
    return out


def everywhere() -> dict[str, Any]:
    return {"namespaces": {"from": "All"}}


def tell(controller: IngressController, kube: FakeKube, *objects: tuple[BuiltinKind, Any]) -> None:
    for kind, body in objects:
        stored = kube.put_builtin(kind, body)
        if kind is NAMESPACE:
            controller.heard(controller.sources.saw_namespace(stored))
        elif kind in (GATEWAY_CLASS, ROUTED_GATEWAY, HTTP_ROUTE, TLS_ROUTE, GRPC_ROUTE,
                      TCP_ROUTE, UDP_ROUTE, REFERENCE_GRANT):  # fmt: skip
            controller.saw_gateway_api(kind, stored)
        else:
            feed(controller, kube, (kind, stored))


def status(kube: FakeKube, kind: BuiltinKind, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = kube.builtin[(kind.plural, namespace, name)].get("status") or {}
    return found


def conditions(entries: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in entries}


def parent_conditions(kube: FakeKube, namespace: str, name: str) -> dict[str, tuple[str, str]]:
    (parent,) = [
        p for p in status(kube, HTTP_ROUTE, namespace, name).get("parents", ())
        if p["controllerName"] == GATEWAY_CONTROLLER
    ]  # fmt: skip
    return conditions(parent["conditions"])


def shop_backend(namespace: str = "shop", ip: str = "10.244.1.5") -> list[tuple[BuiltinKind, Any]]:
    return [
        (SERVICE, service("web", namespace, 80, f"10.96.0.{ip.rsplit('.', 1)[1]}")),
        (ENDPOINT_SLICE, endpoint_slice(f"web-{namespace}", namespace, "web", 8080, ip)),
        (POD, pod(f"web-{namespace}", namespace, ip)),
    ]


def test_an_httproute_is_served_through_a_gateway_with_the_statuses_the_spec_asks(
    context: Context,
) -> None:
    async def scenario() -> None:
        controller, kube, agent_id = await controller_of(context)
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, https(allowedRoutes=everywhere()),
                                      {"name": "http", "protocol": "HTTP", "port": 80,
                                       "allowedRoutes": everywhere()})),
             *shop_backend(),
             (SERVICE, service("canary", "shop", 80, "10.96.0.11")),
             (HTTP_ROUTE, route("site", "shop", ["shop.example.com"], [
                 {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                  "backendRefs": [to("web", weight=90), to("canary", weight=10)],
                  "filters": [{"type": "RequestHeaderModifier",
                               "requestHeaderModifier": {"set": [{"name": "X-Env",
                                                                  "value": "prod"}]}}]},
                 {"backendRefs": [to("web")]},
             ])))  # fmt: skip
        await settle(controller)
        assert conditions(status(kube, GATEWAY_CLASS, "", "kakuremichi")["conditions"]) == {
            "Accepted": ("True", "Accepted")
        }
        assert parent_conditions(kube, "shop", "site") == {
            "Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs"),
        }  # fmt: skip
        gateway_status = status(kube, ROUTED_GATEWAY, INFRA, "edge")
        assert conditions(gateway_status["conditions"]) == {
            "Accepted": ("True", "Accepted"), "Programmed": ("False", "AddressNotAssigned"),
        }  # fmt: skip
        listeners = {entry["name"]: entry for entry in gateway_status["listeners"]}
        # The route attaches to both listeners (no sectionName), and is one route on each.
        assert [listeners[n]["attachedRoutes"] for n in ("https", "http")] == [1, 1]
        assert listeners["https"]["supportedKinds"] == [
            {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"},
            {"group": "gateway.networking.k8s.io", "kind": "GRPCRoute"},
        ]
        # The host: its rules in order, weights kept, served through the cluster agent.
        (served,) = context.state.snapshot().routes
        assert (served.domain, served.agent_id) == ("shop.example.com", agent_id)
        assert served.rules is not None
        first, second = served.rules
        assert first.matches is not None and first.matches[0].path is not None
        assert first.matches[0].path.value == "/api"
        assert [(b.stream, b.weight) for b in first.backends] == [
            ("shop/web:80", 90), ("shop/canary:80", 10),
        ]  # fmt: skip
        assert first.request_headers is not None and first.request_headers.set is not None
        assert [b.stream for b in second.backends] == ["shop/web:80"]
        assert backends(context, agent_id)["shop/web:80"] == ("10.244.1.5:8080",)
        # The certificate: the listener's Secret, in the Gateway's namespace, owned by it.
        (certificate,) = [b for (plural, ns, _), b in kube.objects.items()
                          if plural == "certificates"]  # fmt: skip
        assert certificate["metadata"]["namespace"] == INFRA
        assert certificate["spec"] == {"domain": "shop.example.com", "secretName": "site-cert",
                                       "issuer": "Secret", "autoRenew": True}  # fmt: skip
        (owner,) = certificate["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["apiVersion"]) == ("Gateway", "gateway.networking.k8s.io/v1")
        # A gateway with an address: Programmed, and its address in status.
        context.state.set_gateway(GatewayNode(UUID(int=7), "gw", 1, "203.0.113.9", "k" * 43 + "="))
        await settle(controller)
        gateway_status = status(kube, ROUTED_GATEWAY, INFRA, "edge")
        assert conditions(gateway_status["conditions"])["Programmed"] == ("True", "Programmed")
        assert gateway_status["addresses"] == [{"type": "IPAddress", "value": "203.0.113.9"}]
        writes = len(kube.writes)
        await settle(controller)
        assert len(kube.writes) == writes  # a steady cluster costs no API call

    asyncio.run(scenario())


def test_a_backend_of_another_namespace_needs_a_reference_grant_there(context: Context) -> None:
    """The attacker's route names the bank's Service: refused with RefNotPermitted, and the
    cluster agent is given nothing of the bank's; the bank's grant to another namespace is no
    grant to the attacker."""

    async def scenario() -> None:
        controller, kube, agent_id = await controller_of(context)
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, https(allowedRoutes=everywhere()))),
             *shop_backend("bank", "10.244.2.7"),
             (REFERENCE_GRANT, {"metadata": {"name": "shop-only", "namespace": "bank"}, "spec": {
                 "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                           "namespace": "shop"}],
                 "to": [{"group": "", "kind": "Service"}]}}),
             (HTTP_ROUTE, route("grab", "evil", ["grab.example.com"],
                                [{"backendRefs": [to("web", namespace="bank")]}])))  # fmt: skip
        await settle(controller)
        assert parent_conditions(kube, "evil", "grab")["ResolvedRefs"] == (
            "False", "RefNotPermitted",
        )  # fmt: skip
        assert "bank/web:80" not in backends(context, agent_id)
        (served,) = context.state.snapshot().routes
        assert served.rules is not None  # (its share answered 500, never the bank's)
        assert [(b.stream, b.weight) for b in served.rules[0].backends] == [(None, 1)]
        # ... and so a gateway reads it off the wire: the whole config, nobody's route lost.
        context.state.set_gateway(GatewayNode(UUID(int=7), "gw", 1, "203.0.113.9", "k" * 43 + "="))
        sent = gateway_config(context.state.snapshot().topology, UUID(int=7), 1)
        read = protocol.gateway_inbound.validate_json(
            protocol.encode(protocol.GatewayConfigMessage(data=sent))
        )
        assert isinstance(read, protocol.GatewayConfigMessage)
        (tunnel,) = read.data.tunnels
        assert tunnel.rules is not None and tunnel.rules[0].backends[0].stream is None
        # The namespace the bank granted: resolved, and the bank's pods are its backends.
        granted = [{"backendRefs": [to("web", namespace="bank")]}]
        tell(controller, kube, (HTTP_ROUTE, route("pay", "shop", ["pay.example.com"], granted)))
        await settle(controller)
        assert parent_conditions(kube, "shop", "pay")["ResolvedRefs"] == ("True", "ResolvedRefs")
        assert backends(context, agent_id)["bank/web:80"] == ("10.244.2.7:8080",)

    asyncio.run(scenario())


def test_allowed_routes_decide_which_namespaces_attach(context: Context) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        selected = {
            "namespaces": {
                "from": "Selector",
                "selector": {"matchLabels": {"shared-gateway": "yes"}},
            }
        }
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (NAMESPACE, {"metadata": {"name": "team-a", "labels": {"shared-gateway": "yes"}}}),
             (NAMESPACE, {"metadata": {"name": "team-b"}}),
             (ROUTED_GATEWAY, gateway("own", INFRA, https())),  # (allowedRoutes: Same)
             (ROUTED_GATEWAY, gateway("shared", INFRA, https(allowedRoutes=selected))),
             *shop_backend("team-a"), *shop_backend("team-b", "10.244.3.3"),
             (HTTP_ROUTE, route("a", "team-a", ["a.example.com"], [{"backendRefs": [to("web")]}],
                                parent=("shared", INFRA))),
             (HTTP_ROUTE, route("b", "team-b", ["b.example.com"], [{"backendRefs": [to("web")]}],
                                parent=("shared", INFRA))),
             (HTTP_ROUTE, route("c", "team-a", ["c.example.com"], [{"backendRefs": [to("web")]}],
                                parent=("own", INFRA))))  # fmt: skip
        await settle(controller)
        assert parent_conditions(kube, "team-a", "a")["Accepted"] == ("True", "Accepted")
        refused = ("False", "NotAllowedByListeners")
        assert parent_conditions(kube, "team-b", "b")["Accepted"] == refused
        assert parent_conditions(kube, "team-a", "c")["Accepted"] == refused
        assert {r.domain for r in context.state.snapshot().routes} == {"a.example.com"}

    asyncio.run(scenario())


def test_routes_of_a_namespace_merge_on_a_host_in_the_specs_order_and_no_other_namespace_joins(
    context: Context,
) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, https(allowedRoutes=everywhere()))),
             *shop_backend(), *shop_backend("evil", "10.244.9.9"),
             (SERVICE, service("api", "shop", 80, "10.96.0.12")),
             (HTTP_ROUTE, route("root", "shop", ["shop.example.com"],
                                [{"backendRefs": [to("web")]}])),
             (HTTP_ROUTE, route("api", "shop", ["shop.example.com"], [
                 {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}},
                              {"path": {"type": "Exact", "value": "/login"}},
                              {"path": {"type": "PathPrefix", "value": "/api"},
                               "headers": [{"name": "X-Beta", "value": "1"}]}],
                  "backendRefs": [to("api")]}])))  # fmt: skip
        await settle(controller)
        tell(controller, kube, (HTTP_ROUTE, route("steal", "evil", ["shop.example.com"], [
            {"matches": [{"path": {"type": "Exact", "value": "/login"}}],
             "backendRefs": [to("web")]}])))  # fmt: skip
        await settle(controller)
        (served,) = context.state.snapshot().routes
        assert served.rules is not None
        order = [
            (m.path.type, m.path.value, len(m.headers or ()))
            for rule in served.rules for m in rule.matches or () if m.path is not None
        ]  # fmt: skip
        assert order == [("Exact", "/login", 0), ("PathPrefix", "/api", 1),
                         ("PathPrefix", "/api", 0), ("PathPrefix", "/", 0)]  # fmt: skip
        assert {b.stream for rule in served.rules for b in rule.backends} == {
            "shop/web:80", "shop/api:80",
        }  # fmt: skip
        # The other namespace's route is attached, but its host is not its: told in an Event
        # that names nobody.
        assert parent_conditions(kube, "evil", "steal")["Accepted"] == ("True", "Accepted")
        told = [
            (kube.events[i][4], kube.messages[i]) for i in range(len(kube.events))
            if kube.events[i][1:3] == ("evil", "steal")
        ]  # fmt: skip
        assert [reason for reason, _ in told] == ["DomainConflict"]
        assert "shop" not in told[0][1].replace("shop.example.com", "")

    asyncio.run(scenario())


def test_what_cannot_be_served_is_said_with_the_specs_reasons(context: Context) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (GATEWAY_CLASS, gateway_class("odd", parametersRef={
                 "group": "example.com", "kind": "Config", "name": "x"})),
             (ROUTED_GATEWAY, gateway("edge", INFRA,
                                      https("a", "x.example.com"), https("b", "x.example.com"),
                                      {"name": "tcp", "protocol": "TCP", "port": 443},
                                      {"name": "quic", "protocol": "example.com/QUIC",
                                       "port": 443},
                                      {"name": "dns", "protocol": "UDP", "port": 5353},
                                      {"name": "dns2", "protocol": "UDP", "port": 5353,
                                       "hostname": "ns.example.com"},
                                      {"name": "dns3", "protocol": "TCP", "port": 5353},
                                      {"name": "alt", "protocol": "HTTP", "port": 8080},
                                      https("wild", "*.example.com",
                                            allowedRoutes=everywhere()))),
             (ROUTED_GATEWAY, gateway("fixed", INFRA, https(),
                                      addresses=[{"type": "IPAddress", "value": "1.2.3.4"}])),
             *shop_backend(),
             (HTTP_ROUTE, route("site", "shop", ["a.example.com", "b.other.org"], [
                 {"backendRefs": [to("web")]},
                 {"matches": [{"path": {"type": "RegularExpression", "value": "/v[0-9]"}}],
                  "backendRefs": [to("web")]},
                 {"matches": [{"path": {"value": "/old"}}],
                  "filters": [{"type": "RequestRedirect",
                               "requestRedirect": {"hostname": "new.example.com"}}],
                  "backendRefs": [to("web")]},
                 {"matches": [{"path": {"value": "/gone"}}], "backendRefs": [to("nope")]},
             ])),
             (HTTP_ROUTE, route("any", "shop", [], [{"backendRefs": [to("web")]}])),
        )  # fmt: skip
        gateway_body = kube.builtin[("gateways", INFRA, "edge")]
        gateway_body["spec"]["gatewayClassName"] = "kakuremichi"
        await settle(controller)
        assert conditions(status(kube, GATEWAY_CLASS, "", "odd")["conditions"])["Accepted"] == (
            "False", "InvalidParameters",
        )  # fmt: skip
        fixed = conditions(status(kube, ROUTED_GATEWAY, INFRA, "fixed")["conditions"])
        assert fixed["Accepted"] == ("False", "UnsupportedAddress")
        listeners = {
            entry["name"]: conditions(entry["conditions"])
            for entry in status(kube, ROUTED_GATEWAY, INFRA, "edge")["listeners"]
        }
        assert listeners["a"]["Conflicted"] == ("True", "HostnameConflict")
        assert listeners["b"]["Conflicted"] == ("True", "HostnameConflict")
        assert listeners["tcp"]["Accepted"] == ("False", "PortUnavailable")
        assert listeners["quic"]["Accepted"] == ("False", "UnsupportedProtocol")
        # (a UDP listener takes its whole port, whatever hostname it says; TCP is another)
        assert listeners["dns"]["Conflicted"] == ("True", "ProtocolConflict")
        assert listeners["dns2"]["Conflicted"] == ("True", "ProtocolConflict")
        assert listeners["dns3"]["Conflicted"] == ("False", "NoConflicts")
        assert listeners["alt"]["Accepted"] == ("False", "PortUnavailable")
        assert listeners["wild"]["Programmed"][0] == "False"  # (no gateway address yet)
        site = parent_conditions(kube, "shop", "site")
        assert site["Accepted"] == ("True", "Accepted")
        assert site["ResolvedRefs"] == ("False", "BackendNotFound")
        assert site["PartiallyInvalid"] == ("True", "UnsupportedValue")
        # Through the wildcard listener: the named host that fits it; the redirect's requests
        # are answered 500, never passed on as if no filter were there.
        (served,) = context.state.snapshot().routes
        assert served.domain == "a.example.com" and served.rules is not None
        by_path = {
            rule.matches[0].path.value: rule.backends
            for rule in served.rules if rule.matches and rule.matches[0].path
        }  # fmt: skip
        assert by_path["/old"] == [] and [b.stream for b in by_path["/gone"]] == [None]
        assert "/v[0-9]" not in by_path
        # No hostname on either side: nothing named to publish.
        assert parent_conditions(kube, "shop", "any")["Accepted"] == ("False", "UnsupportedValue")

    asyncio.run(scenario())


def test_an_httproute_cannot_take_a_domain_a_tunnel_holds(context: Context) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        home = kube.add(AGENT, "home", {}, "bank")
        await reconcile(context, AGENT, home, agents.reconcile)
        tunnel = kube.add(TUNNEL, "app", {"domain": "pay.example.com", "agent": "home",
                                          "target": "localhost:80"}, "bank")  # fmt: skip
        await reconcile(context, TUNNEL, tunnel, tunnels.reconcile)
        tell(
            controller,
            kube,
            (GATEWAY_CLASS, gateway_class()),
            (ROUTED_GATEWAY, gateway("edge", "evil", https())),
            *shop_backend("evil", "10.244.9.9"),
            (
                HTTP_ROUTE,
                route(
                    "grab",
                    "evil",
                    ["pay.example.com"],
                    [{"backendRefs": [to("web")]}],
                    parent=("edge", "evil"),
                ),
            ),
        )
        await settle(controller)
        (served,) = context.state.snapshot().routes
        assert served.rules is None  # (the Tunnel's)
        reasons = [e[4] for e in kube.events if e[1:3] == ("evil", "grab")]
        assert reasons == ["DomainConflict"]
        # The Gateway's Certificate for that host is made, but never served or issued: the
        # holder's is.
        (made,) = [n for (p, ns, n) in kube.objects if p == "certificates" and ns == "evil"]
        assert not context.state.snapshot().may_issue(("evil", made), "pay.example.com")

    asyncio.run(scenario())


def test_parents_written_by_other_controllers_are_kept(context: Context) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        theirs = {"parentRef": {"name": "nginx-gw"}, "controllerName": "example.com/nginx",
                  "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                                  "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z",
                                  "observedGeneration": 1}]}  # fmt: skip
        body = route("site", "shop", ["shop.example.com"], [{"backendRefs": [to("web")]}])
        body["spec"]["parentRefs"].append({"name": "nginx-gw"})
        body["status"] = {"parents": [theirs]}
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, https(allowedRoutes=everywhere()))),
             *shop_backend(), (HTTP_ROUTE, body))  # fmt: skip
        await settle(controller)
        parents = status(kube, HTTP_ROUTE, "shop", "site")["parents"]
        assert [p["controllerName"] for p in parents] == ["example.com/nginx", GATEWAY_CONTROLLER]
        assert parents[0] == theirs

    asyncio.run(scenario())


def test_a_bad_certificate_ref_costs_nobody_else_their_routes(context: Context) -> None:
    """A tenant's Gateway names a Secret no Certificate could: its listener is refused
    (InvalidCertificateRef), and every other route is still decided and served."""

    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("bad", "evil", https(secret="Bad_Name"))),
             (ROUTED_GATEWAY, gateway("edge", INFRA, https(allowedRoutes=everywhere()))),
             *shop_backend(), *shop_backend("evil", "10.244.9.9"),
             (HTTP_ROUTE, route("x", "evil", ["x.example.com"], [{"backendRefs": [to("web")]}],
                                parent=("bad", "evil"))),
             (HTTP_ROUTE, route("site", "shop", ["shop.example.com"],
                                [{"backendRefs": [to("web")]}])))  # fmt: skip
        await settle(controller)
        (listener,) = status(kube, ROUTED_GATEWAY, "evil", "bad")["listeners"]
        assert conditions(listener["conditions"])["ResolvedRefs"] == (
            "False", "InvalidCertificateRef",
        )  # fmt: skip
        assert {r.domain for r in context.state.snapshot().routes} == {"shop.example.com"}

    asyncio.run(scenario())


def test_another_namespace_on_an_open_listener_never_rewrites_the_holders_certificate(
    context: Context,
) -> None:
    """The shop's Gateway serves its host with its own Secret, and has an HTTP listener open to
    every namespace: the attacker attaches a route for the shop's host there. The shop's
    Certificate keeps its Secret, and no ACME order is allowed for the attacker's."""

    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        tell(
            controller,
            kube,
            (GATEWAY_CLASS, gateway_class()),
            (
                ROUTED_GATEWAY,
                gateway(
                    "edge",
                    "shop",
                    https(secret="shop-cert"),
                    {"name": "http", "protocol": "HTTP", "port": 80, "allowedRoutes": everywhere()},
                ),
            ),
            *shop_backend(),
            *shop_backend("zzz", "10.244.9.9"),
            (
                HTTP_ROUTE,
                route(
                    "site",
                    "shop",
                    ["shop.example.com"],
                    [{"backendRefs": [to("web")]}],
                    parent=("edge", "shop"),
                ),
            ),
        )
        await settle(controller)
        tell(controller, kube, (HTTP_ROUTE, route(
            "grab", "zzz", ["shop.example.com"], [{"backendRefs": [to("web")]}],
            parent=("edge", "shop"), sectionName="http")))  # fmt: skip
        await settle(controller)
        made = {
            name: body["spec"] for (plural, ns, name), body in kube.objects.items()
            if plural == "certificates" and ns == "shop"
        }  # fmt: skip
        specs = sorted((s["issuer"], s["secretName"]) for s in made.values())
        assert specs[0] == ("ACME", specs[0][1]) and specs[1] == ("Secret", "shop-cert")
        (held,) = context.state.snapshot().routes
        holder = context.state.snapshot().ownership.holders["shop.example.com"]
        assert held.domain == "shop.example.com" and holder.namespace == "shop"
        assert made[holder.certificate]["secretName"] == "shop-cert"
        acme = next(name for name, spec in made.items() if spec["issuer"] == "ACME")
        assert not context.state.snapshot().may_issue(("shop", acme), "shop.example.com")

    asyncio.run(scenario())


def test_a_route_learns_nothing_of_a_gateway_that_takes_no_routes_from_its_namespace(
    context: Context,
) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("private", "bank", https("admin-portal"))),
             *shop_backend("evil", "10.244.9.9"),
             (HTTP_ROUTE, route("probe", "evil", ["p.example.com"],
                                [{"backendRefs": [to("web")]}], parent=("private", "bank"),
                                sectionName="guess")))  # fmt: skip
        await settle(controller)
        (parent,) = status(kube, HTTP_ROUTE, "evil", "probe")["parents"]
        (accepted,) = [c for c in parent["conditions"] if c["type"] == "Accepted"]
        assert accepted["reason"] == "NotAllowedByListeners"
        assert "admin-portal" not in accepted["message"] and "guess" not in accepted["message"]

    asyncio.run(scenario())


def test_a_routes_parents_of_ours_go_when_its_gateway_goes(context: Context) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, https(allowedRoutes=everywhere()))),
             *shop_backend(),
             (HTTP_ROUTE, route("site", "shop", ["shop.example.com"],
                                [{"backendRefs": [to("web")]}])))  # fmt: skip
        await settle(controller)
        assert parent_conditions(kube, "shop", "site")["Accepted"] == ("True", "Accepted")
        del kube.builtin[("gateways", INFRA, "edge")]
        controller.gateway_api_gone(ROUTED_GATEWAY, INFRA, "edge")
        await settle(controller)
        assert status(kube, HTTP_ROUTE, "shop", "site")["parents"] == []
        assert not context.state.snapshot().routes
        assert not [k for k in kube.objects if k[0] == "certificates"]

    asyncio.run(scenario())


def test_routes_deleted_before_the_watches_began_are_forgotten(context: Context) -> None:
    """Listed at the start, deleted before any watch saw it go (no event): the next check for
    vanished objects drops their claims, and an object created since is kept."""

    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        for kind, body in (
            (GATEWAY_CLASS, gateway_class()),
            (ROUTED_GATEWAY, gateway("edge", INFRA, https(allowedRoutes=everywhere()))),
            *shop_backend(),
            (HTTP_ROUTE, route("site", "shop", ["shop.example.com"],
                               [{"backendRefs": [to("web")]}])),
            (INGRESS, ingress("old", "shop", [host("old.example.com", ("/", "web", 80))])),
        ):  # fmt: skip
            kube.put_builtin(kind, body)
        await controller.restore()
        await controller.project(context.state.snapshot())
        served = {r.domain for r in context.state.snapshot().routes}
        assert served == {"shop.example.com", "old.example.com"}
        del kube.builtin[("httproutes", "shop", "site")]
        del kube.builtin[("ingresses", "shop", "old")]
        tell(
            controller,
            kube,
            (HTTP_ROUTE, route("new", "shop", ["new.example.com"], [{"backendRefs": [to("web")]}])),
        )
        await controller.forget_vanished()
        await settle(controller)
        assert {r.domain for r in context.state.snapshot().routes} == {"new.example.com"}

    asyncio.run(scenario())


def test_the_running_controller_decides_off_the_loop_from_a_copy(context: Context) -> None:
    """The decision runs in a thread on a copy of the sources: what the watches tell meanwhile
    changes nothing it reads, and makes the next decision."""

    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        copied = controller.sources.copy()
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, https(allowedRoutes=everywhere()))),
             *shop_backend(),
             (HTTP_ROUTE, route("site", "shop", ["shop.example.com"],
                                [{"backendRefs": [to("web")]}])))  # fmt: skip
        assert not copied.routes.get("HTTPRoute") and not copied.services
        running = asyncio.create_task(controller.run())
        try:
            for _ in range(100):
                if context.state.snapshot().routes:
                    break
                await asyncio.sleep(0.05)
            assert {r.domain for r in context.state.snapshot().routes} == {"shop.example.com"}
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    asyncio.run(scenario())


def test_a_tlsroute_is_passed_through_to_its_backends_endpoints(context: Context) -> None:
    """A TLS listener (Passthrough) and a TLSRoute: the gateways pass the host's connections
    through by SNI, and the cluster agent sends them to the backend's ready endpoints; an
    HTTPRoute cannot attach there, nor a TLSRoute to another namespace's Service without a
    grant, and a TLS listener that would terminate is refused."""

    async def scenario() -> None:
        controller, kube, agent_id = await controller_of(context)
        passthrough = {
            "name": "tls",
            "protocol": "TLS",
            "port": 443,
            "tls": {"mode": "Passthrough"},
            "allowedRoutes": everywhere(),
        }
        terminate = {
            "name": "odd",
            "protocol": "TLS",
            "port": 443,
            "hostname": "x.example.com",
            "tls": {"mode": "Terminate", "certificateRefs": [{"name": "c"}]},
        }
        tls_route = route("vault", "shop", ["vault.example.com"],
                          [{"backendRefs": [to("web", 443)]}])  # fmt: skip
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, passthrough, terminate)),
             (SERVICE, service("web", "shop", 443, "10.96.0.10")),
             (ENDPOINT_SLICE, endpoint_slice("web-1", "shop", "web", 8443, "10.244.1.5")),
             (POD, pod("web-0", "shop", "10.244.1.5")),
             *shop_backend("bank", "10.244.2.7"),
             (TLS_ROUTE, tls_route),
             (TLS_ROUTE, route("grab", "evil", ["grab.example.com"],
                               [{"backendRefs": [to("web", namespace="bank")]}])),
             (HTTP_ROUTE, route("site", "shop", ["site.example.com"],
                                [{"backendRefs": [to("web", 443)]}])))  # fmt: skip
        await settle(controller)
        vault = conditions(next(
            p for p in status(kube, TLS_ROUTE, "shop", "vault")["parents"]
        )["conditions"])  # fmt: skip
        assert vault == {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}
        grab = status(kube, TLS_ROUTE, "evil", "grab")["parents"][0]["conditions"]
        assert conditions(grab)["ResolvedRefs"] == ("False", "RefNotPermitted")
        assert parent_conditions(kube, "shop", "site")["Accepted"] == (
            "False", "NotAllowedByListeners",
        )  # fmt: skip
        listeners = {
            entry["name"]: entry
            for entry in status(kube, ROUTED_GATEWAY, INFRA, "edge")["listeners"]
        }
        assert conditions(listeners["odd"]["conditions"])["Accepted"] == (
            "False", "UnsupportedProtocol",
        )  # fmt: skip
        assert listeners["tls"]["supportedKinds"] == [
            {"group": "gateway.networking.k8s.io", "kind": "TLSRoute"}
        ]
        assert listeners["tls"]["attachedRoutes"] == 2
        # Passed through: no certificate, and the agent's tunnel names the backend.
        served = {r.domain: r for r in context.state.snapshot().routes}
        assert served["vault.example.com"].protocol == "TLS"
        assert not [k for k in kube.objects if k[0] == "certificates"]
        topology = context.state.snapshot().topology
        config = agent_config(topology, agent_id, 1)
        (tunnel,) = [t for t in config.tunnels if t.domain == "vault.example.com"]
        assert tunnel.protocol == "TLS" and tunnel.backend == "shop/web:443"
        # (no name to resolve, nothing listening: an agent that does not read backend is refused)
        assert tunnel.target == "127.0.0.1:1"
        assert dict(topology.backends_of(agent_id))["shop/web:443"] == ("10.244.1.5:8443",)

    asyncio.run(scenario())


def test_a_wildcard_listener_open_to_all_cannot_take_a_host_its_gateway_names_elsewhere(
    context: Context,
) -> None:
    """The shop's Gateway passes vault.example.com through (a TLS listener for the shop only)
    and serves *.example.com over HTTPS to every namespace: the attacker's HTTPRoute for
    vault.example.com finds no listener (the most specific one takes the host)."""

    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        tell(
            controller,
            kube,
            (GATEWAY_CLASS, gateway_class()),
            (
                ROUTED_GATEWAY,
                gateway(
                    "edge",
                    "shop",
                    https("wild", "*.example.com", allowedRoutes=everywhere()),
                    {
                        "name": "vault",
                        "protocol": "TLS",
                        "port": 443,
                        "hostname": "vault.example.com",
                        "tls": {"mode": "Passthrough"},
                    },
                ),
            ),
            *shop_backend("evil", "10.244.9.9"),
            (
                HTTP_ROUTE,
                route(
                    "steal",
                    "evil",
                    ["vault.example.com", "mine.example.com"],
                    [{"backendRefs": [to("web")]}],
                    parent=("edge", "shop"),
                ),
            ),
        )
        await settle(controller)
        assert parent_conditions(kube, "evil", "steal")["Accepted"] == ("True", "Accepted")
        assert {r.domain for r in context.state.snapshot().routes} == {"mine.example.com"}

    asyncio.run(scenario())


def test_an_object_made_again_while_vanished_ones_are_looked_for_is_kept(
    context: Context,
) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        edge = gateway("edge", INFRA, https(allowedRoutes=everywhere()))
        for kind, body in ((GATEWAY_CLASS, gateway_class()), (ROUTED_GATEWAY, edge),
                           *shop_backend(),
                           (HTTP_ROUTE, route("site", "shop", ["shop.example.com"],
                                              [{"backendRefs": [to("web")]}]))):  # fmt: skip
            kube.put_builtin(kind, body)
        await controller.restore()
        stale = await kube.list_builtin(HTTP_ROUTE)
        # Deleted and made again; the watch tells both while the check's listing is on its
        # way (it predates the new one).
        controller.gateway_api_gone(HTTP_ROUTE, "shop", "site")
        tell(
            controller,
            kube,
            (
                HTTP_ROUTE,
                route("site", "shop", ["shop.example.com"], [{"backendRefs": [to("web")]}]),
            ),
        )
        listing = kube.list_builtin

        async def before_it(kind: BuiltinKind, namespaces: tuple[str, ...] = ()) -> Any:
            return [] if kind is HTTP_ROUTE else await listing(kind, namespaces)

        kube.list_builtin = before_it  # type: ignore[method-assign]
        assert stale  # (it was listed at the start)
        await controller.forget_vanished()
        await settle(controller)
        assert {r.domain for r in context.state.snapshot().routes} == {"shop.example.com"}

    asyncio.run(scenario())


def test_a_certificate_secret_of_another_namespace_is_used_where_a_grant_allows_it(
    context: Context,
) -> None:
    """The Gateway names a Secret of the namespace certs: refused until certs grants it; then
    the Certificate is made beside the Secret (it reads Secrets of its own namespace), says
    its owner in an annotation, serves the host, and goes with the Gateway."""

    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        listener = https(allowedRoutes=everywhere())
        listener["tls"]["certificateRefs"] = [{"name": "wild", "namespace": "certs"}]
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, listener)), *shop_backend(),
             (HTTP_ROUTE, route("site", "shop", ["shop.example.com"],
                                [{"backendRefs": [to("web")]}])))  # fmt: skip
        await settle(controller)
        (entry,) = status(kube, ROUTED_GATEWAY, INFRA, "edge")["listeners"]
        assert conditions(entry["conditions"])["ResolvedRefs"] == ("False", "RefNotPermitted")
        assert not context.state.snapshot().routes
        tell(controller, kube, (REFERENCE_GRANT, {
            "metadata": {"name": "edge-may-read", "namespace": "certs"},
            "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                               "namespace": INFRA}],
                     "to": [{"group": "", "kind": "Secret", "name": "wild"}]}}))  # fmt: skip
        await settle(controller)
        (made,) = [(ns, n) for (p, ns, n) in kube.objects if p == "certificates"]
        assert made[0] == "certs"
        body = kube.objects[("certificates", *made)]
        assert body["spec"]["secretName"] == "wild" and "ownerReferences" not in body["metadata"]
        assert body["metadata"]["annotations"]["kakuremichi.io/owner"].startswith(
            f"gateway.networking.k8s.io/v1 Gateway {INFRA}/edge "
        )
        holder = context.state.snapshot().ownership.holders["shop.example.com"]
        assert holder.certificate_key == made
        # After a restart the Certificate is known again by its annotation, and goes with the
        # Gateway (no owner reference would take it along).
        restarted = IngressController(context, (SYSTEM, AGENT_NAME))
        await restarted.restore()
        del kube.builtin[("gateways", INFRA, "edge")]
        restarted.gateway_api_gone(ROUTED_GATEWAY, INFRA, "edge")
        await settle(restarted)
        assert not [k for k in kube.objects if k[0] == "certificates"]

    asyncio.run(scenario())


def test_a_grpcroute_is_passed_whole_to_one_backend_or_routed_call_by_call(
    context: Context,
) -> None:
    """A GRPCRoute of one backend: TLS terminated with the listener's certificate, the HTTP/2
    connection passed whole to the backend's endpoints (h2c). One with method and header
    matches, weights or several Services: rules the gateway applies to each call, in the
    spec's precedence (the longest service, then method, then the most headers), merged with
    the namespace's other GRPCRoutes on that host; a method without its service, or a regular
    expression, is not served (PartiallyInvalid)."""

    async def scenario() -> None:
        controller, kube, agent_id = await controller_of(context)
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, https(allowedRoutes=everywhere()))),
             *shop_backend(), (SERVICE, service("admin", "shop", 80, "10.96.0.11")),
             (GRPC_ROUTE, route("echo", "shop", ["grpc.example.com"],
                                [{"backendRefs": [to("web")]}])),
             (GRPC_ROUTE, route("picky", "shop", ["picky.example.com"], [
                 {"matches": [{"method": {"service": "Echo"}}], "backendRefs": [to("web")]},
                 {"matches": [{"method": {"service": "Echo", "method": "Say"},
                               "headers": [{"name": "x-beta", "value": "1"}]}],
                  "backendRefs": [to("admin", weight=3), to("web", weight=1)]},
                 {"matches": [{"method": {"method": "Say"}},
                              {"method": {"type": "RegularExpression", "service": "E.*"}}],
                  "backendRefs": [to("web")]}])),
             (GRPC_ROUTE, route("later", "shop", ["picky.example.com"], [
                 {"matches": [{"method": {"service": "Echo", "method": "Say"}}],
                  "backendRefs": [to("admin")]}])))  # fmt: skip
        await settle(controller)
        echo = conditions(status(kube, GRPC_ROUTE, "shop", "echo")["parents"][0]["conditions"])
        assert echo == {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}
        picky = conditions(status(kube, GRPC_ROUTE, "shop", "picky")["parents"][0]["conditions"])
        assert picky["Accepted"] == ("True", "Accepted")
        assert picky["PartiallyInvalid"] == ("True", "UnsupportedValue")
        served = {r.domain: r for r in context.state.snapshot().routes}
        whole = served["grpc.example.com"]
        assert (whole.h2c, whole.rules) == (True, None)
        routed = served["picky.example.com"]
        assert routed.h2c and routed.rules is not None
        order = [
            (m.path.type, m.path.value, len(m.headers or ()),
             [(b.stream, b.weight) for b in r.backends])
            for r in routed.rules for m in r.matches or () if m.path is not None
        ]  # fmt: skip
        assert order == [
            ("Exact", "/Echo/Say", 1, [("shop/admin:80", 3), ("shop/web:80", 1)]),
            ("Exact", "/Echo/Say", 0, [("shop/admin:80", 1)]),  # (the younger route's)
            ("PathPrefix", "/Echo", 0, [("shop/web:80", 1)]),
        ]
        # The gateways open streams to both backends; the agent serves them (no tunnel for the
        # routed host: its calls go by backend), and the passed-whole host keeps its tunnel.
        config = agent_config(context.state.snapshot().topology, agent_id, 1)
        (tunnel,) = config.tunnels
        assert (tunnel.domain, tunnel.backend, tunnel.target) == (
            "grpc.example.com", "shop/web:80", "127.0.0.1:1",
        )  # fmt: skip
        assert {b.name for b in config.backends or ()} == {"shop/web:80", "shop/admin:80"}
        context.state.set_gateway(GatewayNode(UUID(int=7), "gw", 1, "203.0.113.9", "k" * 43 + "="))
        sent = gateway_config(context.state.snapshot().topology, UUID(int=7), 1)
        read = protocol.gateway_inbound.validate_json(
            protocol.encode(protocol.GatewayConfigMessage(data=sent))
        )
        assert isinstance(read, protocol.GatewayConfigMessage)
        by_domain = {t.domain: t for t in read.data.tunnels}
        assert by_domain["picky.example.com"].app_protocol == "H2C"
        assert by_domain["picky.example.com"].rules is not None

    asyncio.run(scenario())


def test_whoever_writes_a_routes_certificate_cannot_order_a_key_for_its_host(
    context: Context,
) -> None:
    """The namespace of the Secret a Gateway uses (by its grant) edits the Certificate made
    there to ACME: no order is allowed for the host it does not hold."""

    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        listener = https(allowedRoutes=everywhere())
        listener["tls"]["certificateRefs"] = [{"name": "wild", "namespace": "certs"}]
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, listener)), *shop_backend(),
             (REFERENCE_GRANT, {"metadata": {"name": "g", "namespace": "certs"}, "spec": {
                 "from": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                           "namespace": INFRA}], "to": [{"group": "", "kind": "Secret"}]}}),
             (HTTP_ROUTE, route("site", "shop", ["shop.example.com"],
                                [{"backendRefs": [to("web")]}])))  # fmt: skip
        await settle(controller)
        (made,) = [(ns, n) for (p, ns, n) in kube.objects if p == "certificates"]
        kube.objects[("certificates", *made)]["spec"]["issuer"] = "ACME"  # (certs' edit)
        assert not context.state.snapshot().may_issue(made, "shop.example.com")

    asyncio.run(scenario())


def test_a_deleted_certificate_is_made_again_and_one_of_an_earlier_gateway_is_replaced(
    context: Context,
) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, https(allowedRoutes=everywhere()))),
             *shop_backend(),
             (HTTP_ROUTE, route("site", "shop", ["shop.example.com"],
                                [{"backendRefs": [to("web")]}])))  # fmt: skip
        await settle(controller)
        (made,) = [k for k in kube.objects if k[0] == "certificates"]
        del kube.objects[made]
        controller.certificate_gone(made[1], made[2])
        await settle(controller)
        assert made in kube.objects
        # The Gateway made again (a new uid): its Certificate is made anew for it.
        tell(
            controller,
            kube,
            (ROUTED_GATEWAY, gateway("edge", INFRA, https(allowedRoutes=everywhere()))),
        )
        controller.certificate_gone(made[1], made[2])  # (forget what was written)
        await settle(controller)
        (owner,) = kube.objects[made]["metadata"]["ownerReferences"]
        assert owner["uid"] == kube.builtin[("gateways", INFRA, "edge")]["metadata"]["uid"]

    asyncio.run(scenario())


def test_a_grpcroute_with_a_broad_certificate_or_an_httproutes_host_is_not_served(
    context: Context,
) -> None:
    """A GRPCRoute's HTTP/2 goes whole to its backend: with a certificate that names other
    hosts (a client would reuse the connection for them) it is not served, and a host
    HTTPRoutes of its namespace serve stays theirs, whatever the dates."""

    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, https(allowedRoutes=everywhere()))),
             *shop_backend(),
             (GRPC_ROUTE, route("rpc", "shop", ["both.example.com"],
                                [{"backendRefs": [to("web")]}])),
             (HTTP_ROUTE, route("site", "shop", ["both.example.com"],
                                [{"backendRefs": [to("web")]}])),
             (GRPC_ROUTE, route("echo", "shop", ["grpc.example.com"],
                                [{"backendRefs": [to("web")]}])))  # fmt: skip
        await settle(controller)
        served = {r.domain: r for r in context.state.snapshot().routes}
        assert served["both.example.com"].rules is not None  # (the HTTPRoute's)
        # A certificate for *.example.com behind the gRPC host: not served, and said so.
        holder = context.state.snapshot().ownership.holders["grpc.example.com"]
        wild = TestCA().issue("*.example.com", "grpc.example.com")
        context.state.set_certificate(holder.certificate_key, CertificateVerdict(
            True, "Issued", "ok"), CertificateBundle(domain="grpc.example.com",
            certificate=wild.certificate_pem, private_key=wild.private_key_pem))  # fmt: skip
        snapshot = context.state.snapshot()
        assert "grpc.example.com" not in snapshot.served_certificates
        assert snapshot.route_verdicts[holder.id].reason == "CertificateTooBroad"
        own = TestCA().issue("grpc.example.com")
        context.state.set_certificate(holder.certificate_key, CertificateVerdict(
            True, "Issued", "ok"), CertificateBundle(domain="grpc.example.com",
            certificate=own.certificate_pem, private_key=own.private_key_pem))  # fmt: skip
        assert "grpc.example.com" in context.state.snapshot().served_certificates

    asyncio.run(scenario())


def port_route(name: str, namespace: str, backend: dict[str, Any], section: str,
               parent: tuple[str, str] = ("edge", INFRA)) -> dict[str, Any]:  # fmt: skip
    """A TCPRoute or UDPRoute (no hostnames; one rule)."""
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "parentRefs": [{"name": parent[0], "namespace": parent[1], "sectionName": section}],
            "rules": [{"backendRefs": [backend]}],
        },
    }


def kind_conditions(
    kube: FakeKube, kind: BuiltinKind, namespace: str, name: str
) -> dict[str, tuple[str, str]]:
    (parent,) = status(kube, kind, namespace, name)["parents"]
    return conditions(parent["conditions"])


def test_tcp_and_udp_routes_claim_their_listeners_port_and_reach_the_backends_endpoints(
    context: Context,
) -> None:
    """A TCP listener on 5432 and a UDP one on 5353: the shop's TCPRoute and UDPRoute hold
    those public ports through the cluster agent, which sends connections and datagrams to
    their backends' ready endpoints (a UDP Service port's). Another namespace's route on the
    same port is attached but served nothing, and is told so without a word of whose the port
    is; a route cannot reach another namespace's Service, nor a UDPRoute a TCP port."""

    async def scenario() -> None:
        controller, kube, agent_id = await controller_of(context)
        listeners = [
            {"name": "pg", "protocol": "TCP", "port": 5432, "allowedRoutes": everywhere()},
            {"name": "dns", "protocol": "UDP", "port": 5353, "allowedRoutes": everywhere()},
        ]
        dns_service = {
            "metadata": {"name": "dns", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.53", "ports": [
                {"name": "dns-udp", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ]},
        }  # fmt: skip
        dns_slice = endpoint_slice("dns-1", "shop", "dns", 5353, "10.244.1.6")
        dns_slice["ports"] = [{"name": "dns-udp", "port": 5353, "protocol": "UDP"},
                              {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}]  # fmt: skip
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, *listeners)),
             (SERVICE, service("db", "shop", 5432, "10.96.0.10")),
             (ENDPOINT_SLICE, endpoint_slice("db-1", "shop", "db", 15432, "10.244.1.5")),
             (POD, pod("db-0", "shop", "10.244.1.5")),
             (SERVICE, dns_service), (ENDPOINT_SLICE, dns_slice),
             (POD, pod("dns-0", "shop", "10.244.1.6")),
             *shop_backend("evil", "10.244.9.9"),
             (TCP_ROUTE, port_route("db", "shop", to("db", 5432), "pg")),
             (UDP_ROUTE, port_route("dns", "shop", to("dns", 53), "dns")))  # fmt: skip
        await settle(controller)
        tell(controller, kube,
             (TCP_ROUTE, port_route("grab", "evil", to("web", 80), "pg")),
             (TCP_ROUTE, port_route("cross", "evil", to("db", 5432, namespace="shop"), "pg")),
             (UDP_ROUTE, port_route("wrong", "evil", to("web", 80), "pg")),
             (UDP_ROUTE, port_route("tcp-only", "shop", to("db", 5432), "dns")))  # fmt: skip
        await settle(controller)
        accepted = {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}
        assert kind_conditions(kube, TCP_ROUTE, "shop", "db") == accepted
        assert kind_conditions(kube, UDP_ROUTE, "shop", "dns") == accepted
        assert kind_conditions(kube, TCP_ROUTE, "evil", "cross")["ResolvedRefs"] == (
            "False", "RefNotPermitted",
        )  # fmt: skip
        assert kind_conditions(kube, UDP_ROUTE, "evil", "wrong")["Accepted"] == (
            "False", "NotAllowedByListeners",
        )  # fmt: skip
        assert kind_conditions(kube, UDP_ROUTE, "shop", "tcp-only")["ResolvedRefs"] == (
            "False", "BackendNotFound",
        )  # fmt: skip
        edge = status(kube, ROUTED_GATEWAY, INFRA, "edge")
        gateway_listeners = {entry["name"]: entry for entry in edge["listeners"]}
        assert gateway_listeners["pg"]["supportedKinds"] == [
            {"group": "gateway.networking.k8s.io", "kind": "TCPRoute"}
        ]
        # The ports are the shop's (oldest claims), through the cluster agent.
        served = {(r.protocol, r.port): r for r in context.state.snapshot().routes}
        assert set(served) == {("TCP", 5432), ("UDP", 5353)}
        topology = context.state.snapshot().topology
        config = agent_config(topology, agent_id, 1)
        by_port = {(t.protocol, t.port): t for t in config.tunnels}
        assert by_port[("TCP", 5432)].backend == "shop/db:5432"
        assert by_port[("UDP", 5353)].backend == "shop/dns:53/udp"
        assert all(t.target == "127.0.0.1:1" for t in by_port.values())
        endpoints = dict(topology.backends_of(agent_id))
        assert endpoints == {"shop/db:5432": ("10.244.1.5:15432",),
                             "shop/dns:53/udp": ("10.244.1.6:5353",)}  # fmt: skip
        # The younger namespace's route: attached (the listener takes it), its port refused in
        # an Event that names nobody.
        assert kind_conditions(kube, TCP_ROUTE, "evil", "grab")["Accepted"] == ("True", "Accepted")
        told = [
            (kube.events[i][4], kube.messages[i]) for i in range(len(kube.events))
            if kube.events[i][1:3] == ("evil", "grab")
        ]  # fmt: skip
        assert [reason for reason, _ in told] == ["PortConflict"]
        assert "shop" not in told[0][1] and told[0][1].startswith("port 5432/TCP:")
        # ... and a gateway reads both ports off the wire.
        context.state.set_gateway(GatewayNode(UUID(int=7), "gw", 1, "203.0.113.9", "k" * 43 + "=",
                                              tunnel_ports=((1024, 65535),)))  # fmt: skip
        await settle(controller)
        sent = gateway_config(context.state.snapshot().topology, UUID(int=7), 1)
        read = protocol.gateway_inbound.validate_json(
            protocol.encode(protocol.GatewayConfigMessage(data=sent))
        )
        assert isinstance(read, protocol.GatewayConfigMessage)
        assert {(t.protocol, t.port) for t in read.data.tunnels} == {("TCP", 5432), ("UDP", 5353)}
        # The shop's route goes: the port is the other namespace's next.
        del kube.builtin[("tcproutes", "shop", "db")]
        controller.gateway_api_gone(TCP_ROUTE, "shop", "db")
        await settle(controller)
        served = {(r.protocol, r.port): r for r in context.state.snapshot().routes}
        assert served[("TCP", 5432)].backends == ("evil/web:80",)

    asyncio.run(scenario())


def test_a_pool_that_does_not_open_a_port_refuses_a_tcproute_there(context: Context) -> None:
    """The administrator opens ports to Tunnels per pool (``tunnelPorts``): a TCP listener
    outside them serves nothing, and the route's Event says which pool does not open it."""

    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        context.state.set_gateway(GatewayNode(UUID(int=7), "gw", 1, "203.0.113.9", "k" * 43 + "=",
                                              tunnel_ports=((20000, 29999),)))  # fmt: skip
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, {"name": "ssh", "protocol": "TCP",
                                                      "port": 22, "allowedRoutes": everywhere()})),
             *shop_backend(),
             (TCP_ROUTE, port_route("ssh", "shop", to("web", 80), "ssh")))  # fmt: skip
        await settle(controller)
        assert not context.state.snapshot().routes
        told = [kube.events[i][4] for i in range(len(kube.events))
                if kube.events[i][1:3] == ("shop", "ssh")]  # fmt: skip
        assert told == ["PortNotAllowed"]

    asyncio.run(scenario())


def test_a_passed_through_routes_backends_are_weighted_and_an_unresolved_one_keeps_its_share(
    context: Context,
) -> None:
    """A TCPRoute weighted 3:1 over two Services, with a third backendRef to another
    namespace's Service (no grant) and a fourth of weight 0: the cluster agent gets the three
    shares (the refused one without a stream), ``backend`` one that resolves (what an agent of
    an earlier release uses), and both Services' endpoints; the route says RefNotPermitted."""

    async def scenario() -> None:
        controller, kube, agent_id = await controller_of(context)
        tell(controller, kube, (GATEWAY_CLASS, gateway_class()),
             (ROUTED_GATEWAY, gateway("edge", INFRA, {"name": "pg", "protocol": "TCP",
                                                      "port": 5432,
                                                      "allowedRoutes": everywhere()})),
             *shop_backend(), *shop_backend("bank", "10.244.2.7"),
             (SERVICE, service("canary", "shop", 80, "10.96.0.11")),
             (ENDPOINT_SLICE, endpoint_slice("canary-1", "shop", "canary", 8080, "10.244.1.9")),
             (POD, pod("canary-0", "shop", "10.244.1.9")))  # fmt: skip
        weighted = port_route("db", "shop", to("web", weight=3), "pg")
        weighted["spec"]["rules"][0]["backendRefs"] += [
            to("canary", weight=1),
            to("web", namespace="bank", weight=1),
            to("canary", weight=0),
        ]
        tell(controller, kube, (TCP_ROUTE, weighted))
        await settle(controller)
        assert kind_conditions(kube, TCP_ROUTE, "shop", "db")["ResolvedRefs"] == (
            "False", "RefNotPermitted",
        )  # fmt: skip
        topology = context.state.snapshot().topology
        sent = agent_config(topology, agent_id, 1)
        read = protocol.agent_inbound.validate_json(
            protocol.encode(protocol.AgentConfigMessage(data=sent))
        )
        assert isinstance(read, protocol.AgentConfigMessage)
        (tunnel,) = read.data.tunnels
        assert tunnel.shares is not None
        assert [(s.stream, s.weight) for s in tunnel.shares] == [
            ("shop/web:80", 3), ("shop/canary:80", 1), (None, 1),
        ]  # fmt: skip
        assert tunnel.backend in ("shop/web:80", "shop/canary:80")
        assert dict(topology.backends_of(agent_id)) == {
            "shop/web:80": ("10.244.1.5:8080",), "shop/canary:80": ("10.244.1.9:8080",),
        }  # fmt: skip

    asyncio.run(scenario())


def test_a_tcproute_attaches_at_most_a_hundred_times_over_all_its_parent_refs() -> None:
    """Two Gateways of 64 TCP listeners each and one TCPRoute naming both: 100 attachments,
    and the route is told that the rest is not served (the decision stays bounded)."""
    listeners = [
        {"name": f"p{i}", "protocol": "TCP", "port": 20000 + i, "allowedRoutes": everywhere()}
        for i in range(64)
    ]
    gateways = {
        (INFRA, name): {**gateway(name, INFRA, *listeners), "metadata": {"name": name,
                        "namespace": INFRA, "uid": name}}
        for name in ("one", "two")
    }  # fmt: skip
    routed = port_route("wide", "shop", to("web"), "p0")
    routed["spec"]["parentRefs"] = [{"name": n, "namespace": INFRA} for n in ("one", "two")]
    objects = gateway_api.GatewayApiObjects(
        classes={"kakuremichi": gateway_class()}, gateways=gateways,
        routes={"TCPRoute": {("shop", "wide"): routed}},
    )  # fmt: skip
    services = {"shop": {"web": ServiceFacts("web", (ServicePort(80),))}}
    decided = gateway_api.decide(objects, services, (SYSTEM, AGENT_NAME), {}, datetime.now(UTC))
    (claims,) = decided.claims.values()
    assert len(claims) == 64  # (ports: the first Gateway's 64, then 36 of the same ports)
    attached = sum(listener.attached for g in decided.gateways.values() for listener in g.listeners)
    assert attached == 100
    (problem,) = decided.routes["TCPRoute"][("shop", "wide")].problems
    assert "at most 100 times" in problem
