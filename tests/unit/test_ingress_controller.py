"""The Ingress controller against an in-memory cluster: what a user of an Ingress of class
``kakuremichi`` sees (Certificates, ``status.loadBalancer``, Events, the cluster agent's
backends), and what a tenant who tries to reach past its namespace gets (nothing)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import pytest
from kubernetes.client.exceptions import ApiException

from kakuremichi.api.resources import AGENT, CERTIFICATE, TUNNEL
from kakuremichi.control import agents, tunnels
from kakuremichi.control.addressing import SubnetAllocator
from kakuremichi.control.context import Context
from kakuremichi.control.ingress_routes import certificate_name
from kakuremichi.control.ingresses import CLAIMS_CONFIG_MAP, IngressController
from kakuremichi.control.kube_api import (
    ENDPOINT_SLICE,
    INGRESS,
    INGRESS_CLASS,
    NODE,
    POD,
    SERVICE,
)
from kakuremichi.control.mirror import Mirror
from kakuremichi.control.presence import Presence
from kakuremichi.control.settings import ControlSettings
from kakuremichi.control.state import ControlState
from kakuremichi.control.status_writer import StatusWriter
from kakuremichi.control.store import Sealer
from kakuremichi.control.topology import GatewayNode
from kakuremichi.control.tunnel_readiness import CertificateVerdict
from tests.infra.fake_kube import FakeKube
from tests.unit.test_control_plane import reconcile

SYSTEM = "kakuremichi-system"
AGENT_NAME = "kakuremichi-cluster-agent"


def shop() -> dict[str, Any]:
    return ingress("site", "shop", [host("shop.example.com", ("/", "web", 80))])


def make_context(
    tmp_path: Path, kube: FakeKube | None = None, ranges: tuple[str, ...] = ()
) -> Context:
    settings = ControlSettings(
        db_url=f"sqlite:///{tmp_path / 'km.db'}", system_namespace=SYSTEM,
        cluster_agent=f"{SYSTEM}/{AGENT_NAME}", endpoint_ranges=ranges,
    )  # fmt: skip
    state = ControlState(Sealer(Sealer.generate_key()), SubnetAllocator(settings.subnet_pool()))
    kube = kube or FakeKube()
    statuses, mirror = StatusWriter(kube), Mirror(settings.db_url)
    return Context(
        settings=settings, state=state, kube=kube, mirror=mirror,
        presence=Presence(state, mirror, statuses), statuses=statuses,
    )  # fmt: skip


@pytest.fixture
def context(tmp_path: Path) -> Context:
    return make_context(tmp_path)


def fake(context: Context) -> FakeKube:
    return cast(FakeKube, context.kube)


def ingress(name: str, namespace: str, rules: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"ingressClassName": "kakuremichi", "rules": rules, **spec},
    }


def host(name: str, *paths: tuple[str, str, int]) -> dict[str, Any]:
    return {"host": name, "http": {"paths": [
        {"path": path, "pathType": "Prefix",
         "backend": {"service": {"name": service, "port": {"number": port}}}}
        for path, service, port in paths
    ]}}  # fmt: skip


def service(name: str, namespace: str, port: int, cluster_ip: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": cluster_ip, "ports": [{"port": port, "protocol": "TCP"}]},
    }


def endpoint_slice(name: str, namespace: str, service: str, port: int,
                   *addresses: str, ready: bool = True) -> dict[str, Any]:  # fmt: skip
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": ready}} for a in addresses],
    }


def pod(name: str, namespace: str, ip: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": {},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}  # fmt: skip


async def cluster_agent(context: Context) -> UUID:
    body = fake(context).add(AGENT, AGENT_NAME, {}, SYSTEM)
    await reconcile(context, AGENT, body, agents.reconcile)
    return UUID(body["metadata"]["uid"])


async def controller_of(context: Context) -> tuple[IngressController, FakeKube, UUID]:
    """The cluster agent provisioned, and the controller that serves through it."""
    agent_id = await cluster_agent(context)
    return IngressController(context, (SYSTEM, AGENT_NAME)), fake(context), agent_id


def feed(
    controller: IngressController, kube: FakeKube, *bodies: tuple[Any, dict[str, Any]]
) -> None:
    """Objects created in the cluster, as the watches tell the controller of them."""
    for kind, body in bodies:
        stored = kube.put_builtin(kind, body)
        if kind is INGRESS:
            controller.saw_ingress(stored)
        elif kind is SERVICE:
            controller.heard(controller.sources.saw_service(stored))
        elif kind is ENDPOINT_SLICE:
            controller.heard(controller.sources.saw_slice(stored))
        elif kind is POD:
            controller.heard(controller.sources.saw_pod(stored))
        elif kind is NODE:
            controller.heard(controller.sources.saw_node(stored))
        elif kind is INGRESS_CLASS:
            controller.heard(controller.sources.saw_class(stored))


async def settle(controller: IngressController) -> None:
    controller.decide()
    await controller.project(controller.context.state.snapshot())


def backends(context: Context, agent_id: UUID) -> dict[str, tuple[str, ...]]:
    return dict(context.state.snapshot().topology.backends_of(agent_id))


def test_an_ingress_is_served_through_the_cluster_agent_with_its_certificate(
    context: Context,
) -> None:
    async def scenario() -> None:
        controller, kube, agent_id = await controller_of(context)
        feed(controller, kube,
             (SERVICE, service("web", "shop", 80, "10.96.0.10")),
             (ENDPOINT_SLICE, endpoint_slice("web-1", "shop", "web", 8080, "10.244.1.5")),
             (POD, pod("web-0", "shop", "10.244.1.5")),
             (INGRESS, shop()))  # fmt: skip
        await settle(controller)
        # The host is a claim through the cluster agent, its backend has the pod's endpoint.
        assert backends(context, agent_id) == {"shop/web:80": ("10.244.1.5:8080",)}
        (route,) = context.state.snapshot().routes
        assert (route.domain, route.agent_id) == ("shop.example.com", agent_id)
        # A Certificate per host, owned by the Ingress (ACME: no tls section).
        (certificate,) = [b for (plural, ns, _), b in kube.objects.items()
                          if plural == "certificates" and ns == "shop"]  # fmt: skip
        assert certificate["spec"]["domain"] == "shop.example.com"
        assert certificate["spec"]["issuer"] == "ACME"
        (owner,) = certificate["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"]) == ("Ingress", "site")
        # Its claim's date is kept where no tenant writes.
        assert len(kube.config_maps[(SYSTEM, CLAIMS_CONFIG_MAP)]) == 1
        # Held: the gateways' addresses in status.loadBalancer.
        context.state.set_gateway(GatewayNode(UUID(int=7), "gw", 1, "203.0.113.9", "k" * 43 + "="))
        await settle(controller)
        status = kube.builtin[("ingresses", "shop", "site")]["status"]
        assert status["loadBalancer"]["ingress"] == [{"ip": "203.0.113.9"}]
        writes = len(kube.writes)
        await settle(controller)
        assert len(kube.writes) == writes  # a steady cluster costs no API call

    asyncio.run(scenario())


def test_a_tls_secret_is_read_as_it_is_and_an_ingress_of_another_class_is_left_alone(
    context: Context,
) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        mine = ingress("site", "shop", [host("shop.example.com", ("/", "web", 80))],
                       tls=[{"hosts": ["shop.example.com"],
                             "secretName": "shop-cert"}])  # fmt: skip
        other = ingress("nginx", "shop", [host("other.example.com", ("/", "web", 80))])
        other["spec"]["ingressClassName"] = "nginx"
        feed(controller, kube, (SERVICE, service("web", "shop", 80, "10.96.0.10")),
             (INGRESS, mine), (INGRESS, other))  # fmt: skip
        await settle(controller)
        specs = [
            b["spec"] for (plural, _, _), b in kube.objects.items() if plural == "certificates"
        ]
        assert specs == [{"domain": "shop.example.com", "secretName": "shop-cert",
                          "issuer": "Secret", "autoRenew": True}]  # fmt: skip
        assert {r.domain for r in context.state.snapshot().routes} == {"shop.example.com"}

    asyncio.run(scenario())


def test_a_tenants_endpoint_slice_reaches_only_its_own_namespaces_pods(context: Context) -> None:
    """The attacker writes a Service without selector and an EndpointSlice by hand, naming the
    addresses of another tenant's pod, a Service's cluster IP, a node, the API server, the
    operator's own pod, cloud metadata and loopback: the cluster agent is given none of them."""

    async def scenario() -> None:
        controller, kube, agent_id = await controller_of(context)
        hostile = ("10.244.2.7", "10.96.0.20", "192.168.1.10", "172.18.0.2", "10.244.0.3",
                   "169.254.169.254", "127.0.0.1", "10.244.1.9")  # fmt: skip
        feed(controller, kube,
             (POD, pod("db-0", "bank", "10.244.2.7")),
             (SERVICE, service("db", "bank", 5432, "10.96.0.20")),
             (NODE, {"metadata": {"name": "n1"}, "status": {"addresses": [
                 {"type": "InternalIP", "address": "192.168.1.10"}]}}),
             (ENDPOINT_SLICE, endpoint_slice("kubernetes", "default", "kubernetes", 6443,
                                             "172.18.0.2")),
             (POD, pod("operator-0", SYSTEM, "10.244.0.3")),
             (POD, pod("mine-0", "evil", "10.244.1.9")),
             (SERVICE, service("steal", "evil", 80, "10.96.0.30")),
             (ENDPOINT_SLICE, endpoint_slice("steal-1", "evil", "steal", 5432, *hostile)),
             (INGRESS, ingress("grab", "evil", [host("grab.example.com", ("/", "steal", 80))])),
        )  # fmt: skip
        await settle(controller)
        assert backends(context, agent_id) == {"evil/steal:80": ("10.244.1.9:5432",)}
        # Its own pod gone too: nothing left to reach.
        controller.heard(controller.sources.pod_gone("evil", "mine-0"))
        feed(controller, kube, (POD, pod("other-0", "bank", "10.244.1.9")))
        await settle(controller)
        assert backends(context, agent_id) == {"evil/steal:80": ()}

    asyncio.run(scenario())


def test_an_ingress_cannot_take_a_domain_a_tunnel_holds_and_is_told_without_names(
    context: Context,
) -> None:
    async def scenario() -> None:
        await cluster_agent(context)
        kube = fake(context)
        home = kube.add(AGENT, "home", {}, "bank")
        await reconcile(context, AGENT, home, agents.reconcile)
        tunnel = kube.add(TUNNEL, "app", {"domain": "pay.example.com", "agent": "home",
                                          "target": "localhost:80"}, "bank")  # fmt: skip
        await reconcile(context, TUNNEL, tunnel, tunnels.reconcile)
        controller = IngressController(context, (SYSTEM, AGENT_NAME))
        feed(controller, kube, (SERVICE, service("web", "evil", 80, "10.96.0.10")),
             (INGRESS, ingress("grab", "evil",
                               [host("pay.example.com", ("/", "web", 80))])))  # fmt: skip
        context.state.set_gateway(GatewayNode(UUID(int=7), "gw", 1, "203.0.113.9", "k" * 43 + "="))
        await settle(controller)
        (route,) = context.state.snapshot().routes
        assert route.tunnel_id == UUID(tunnel["metadata"]["uid"])  # the Tunnel keeps it
        status = kube.builtin[("ingresses", "evil", "grab")].get("status", {})
        assert status.get("loadBalancer", {}).get("ingress", []) == []  # no DNS for a held name
        told = [(e, m) for e, m in zip(kube.events, kube.messages, strict=True)
                if e[:3] == ("Ingress", "evil", "grab")]  # fmt: skip
        assert [(e[3], e[4]) for e, _ in told] == [(True, "DomainConflict")]
        assert "bank" not in told[0][1] and "pay.example.com" in told[0][1]

    asyncio.run(scenario())


def test_claim_dates_survive_a_restart_so_a_younger_tunnel_never_takes_the_host(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        first = make_context(tmp_path)
        kube = fake(first)
        await cluster_agent(first)
        controller = IngressController(first, (SYSTEM, AGENT_NAME))
        feed(controller, kube, (SERVICE, service("web", "shop", 80, "10.96.0.10")),
             (INGRESS, shop()))  # fmt: skip
        await settle(controller)
        # As if that was an hour ago; half an hour ago, another tenant's Tunnel named the same
        # domain (it waits)…
        dates = kube.config_maps[(SYSTEM, CLAIMS_CONFIG_MAP)]
        for claim, when in dates.items():
            dates[claim] = (datetime.fromisoformat(when) - timedelta(hours=1)).isoformat()
        home = kube.add(AGENT, "home", {}, "evil")
        tunnel = kube.add(TUNNEL, "app", {"domain": "shop.example.com", "agent": "home",
                                          "target": "localhost:80"}, "evil")  # fmt: skip
        tunnel["metadata"]["creationTimestamp"] = (
            (datetime.now(UTC) - timedelta(minutes=30)).isoformat().replace("+00:00", "Z")
        )
        # …and the operator restarts: a new process, the same cluster.
        second = make_context(tmp_path / "again", kube)
        await reconcile(second, AGENT, current_agent(kube), agents.reconcile)
        await reconcile(second, AGENT, home, agents.reconcile)
        await tunnels.restore_claims(second)
        restarted = IngressController(second, (SYSTEM, AGENT_NAME))
        await restarted.restore()
        (route,) = second.state.snapshot().routes
        assert route.tunnel_id != UUID(tunnel["metadata"]["uid"])  # the Ingress still holds it

    asyncio.run(scenario())


def test_outside_its_pods_a_slice_reaches_only_the_ranges_the_administrator_opens(
    tmp_path: Path,
) -> None:
    """A node's bridge, a NodePort, the cloud's host services, any host of the VPC: none of
    them is a pod of the tenant's namespace, so none is reached unless the administrator opened
    its range (``--endpoint-range``) for servers outside the cluster."""

    async def scenario(ranges: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        context = make_context(tmp_path / str(len(ranges)), ranges=ranges)
        agent_id = await cluster_agent(context)
        controller = IngressController(context, (SYSTEM, AGENT_NAME))
        outside = ("10.244.1.1", "168.63.129.16", "100.64.0.9", "192.168.77.5")
        feed(controller, fake(context),
             (SERVICE, service("ext", "home", 80, "10.96.0.40")),
             (ENDPOINT_SLICE, endpoint_slice("ext-1", "home", "ext", 10250, *outside)),
             (INGRESS, ingress("site", "home",
                               [host("home.example.com", ("/", "ext", 80))])))  # fmt: skip
        await settle(controller)
        return backends(context, agent_id)

    assert asyncio.run(scenario(())) == {"home/ext:80": ()}
    opened = asyncio.run(scenario(("192.168.77.0/24",)))
    assert opened == {"home/ext:80": ("192.168.77.5:10250",)}


def test_another_tenants_external_ips_cannot_take_a_namespaces_own_pods(context: Context) -> None:
    async def scenario() -> None:
        controller, kube, agent_id = await controller_of(context)
        shadow = service("shadow", "evil", 80, "10.96.0.50")
        shadow["spec"]["externalIPs"] = ["10.244.2.7"]
        feed(controller, kube,
             (POD, pod("web-0", "bank", "10.244.2.7")),
             (SERVICE, service("web", "bank", 80, "10.96.0.20")),
             (ENDPOINT_SLICE, endpoint_slice("web-1", "bank", "web", 8080, "10.244.2.7")),
             (INGRESS, ingress("site", "bank", [host("bank.example.com", ("/", "web", 80))])),
             (SERVICE, shadow))  # fmt: skip
        await settle(controller)
        assert backends(context, agent_id) == {"bank/web:80": ("10.244.2.7:8080",)}

    asyncio.run(scenario())


def test_an_ingress_that_cannot_be_read_costs_nobody_else_their_routes(context: Context) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        odd = ingress("odd", "evil", [host("odd.example.com", ("/", "web", 80))])
        odd["spec"]["ingressClassName"] = ["kakuremichi"]
        broken_slice = endpoint_slice("web-2", "shop", "web", 8080)
        broken_slice["endpoints"] = 5
        feed(controller, kube, (SERVICE, service("web", "shop", 80, "10.96.0.10")),
             (SERVICE, service("web", "evil", 80, "10.96.0.11")),
             (ENDPOINT_SLICE, broken_slice), (INGRESS, odd), (INGRESS, shop()))  # fmt: skip
        await settle(controller)
        assert {r.domain for r in context.state.snapshot().routes} == {"shop.example.com"}

    asyncio.run(scenario())


def test_a_certificate_of_that_name_that_is_not_the_ingresss_is_never_touched(
    context: Context,
) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        feed(controller, kube, (SERVICE, service("web", "shop", 80, "10.96.0.10")))
        name = certificate_name("site", "shop.example.com")
        theirs = kube.add(CERTIFICATE, name, {"domain": "pay.example.com",
                                              "secretName": "pay-tls"}, "shop")  # fmt: skip
        feed(controller, kube, (INGRESS, shop()))
        await settle(controller)
        assert kube.objects[("certificates", "shop", name)] == theirs
        assert ("Ingress", "shop", "site", True, "CertificateNameTaken") in kube.events
        controller.ingress_gone("shop", "site")
        await settle(controller)
        assert ("certificates", "shop", name) in kube.objects

    asyncio.run(scenario())


def test_an_ingress_whose_writes_fail_holds_back_no_other(context: Context) -> None:
    """A namespace being deleted refuses every write into it: the Ingresses of other
    namespaces still get their Certificates and status."""

    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        create = kube.create_object

        async def refusing(kind: Any, namespace: str, body: dict[str, Any]) -> None:
            if namespace == "going":
                raise ApiException(status=403, reason="Forbidden")
            await create(kind, namespace, body)

        kube.create_object = refusing  # type: ignore[method-assign]
        feed(controller, kube,
             (SERVICE, service("web", "going", 80, "10.96.0.11")),
             (INGRESS, ingress("aaa", "going", [host("going.example.com", ("/", "web", 80))])),
             (SERVICE, service("web", "shop", 80, "10.96.0.10")), (INGRESS, shop()))  # fmt: skip
        context.state.set_gateway(GatewayNode(UUID(int=7), "gw", 1, "203.0.113.9", "k" * 43 + "="))
        controller.decide()
        assert not await controller.project(context.state.snapshot())  # (tried again later)
        assert [k for k in kube.objects if k[0] == "certificates"] == [
            ("certificates", "shop", certificate_name("site", "shop.example.com"))
        ]
        status = kube.builtin[("ingresses", "shop", "site")]["status"]
        assert status["loadBalancer"]["ingress"] == [{"ip": "203.0.113.9"}]

    asyncio.run(scenario())


def current_agent(kube: FakeKube) -> dict[str, Any]:
    return kube.objects[("agents", SYSTEM, AGENT_NAME)]


def test_what_goes_away_stops_being_served(context: Context) -> None:
    async def scenario() -> None:
        controller, kube, agent_id = await controller_of(context)
        feed(controller, kube,
             (SERVICE, service("web", "shop", 80, "10.96.0.10")),
             (POD, pod("web-0", "shop", "10.0.5.1")), (POD, pod("web-1", "shop", "10.0.5.2")),
             (ENDPOINT_SLICE, endpoint_slice("web-1", "shop", "web", 8080, "10.0.5.1", "10.0.5.2")),
             (INGRESS, ingress("site", "shop", [
                 host("a.example.com", ("/", "web", 80)),
                 host("b.example.com", ("/", "web", 80))])))  # fmt: skip
        await settle(controller)
        assert backends(context, agent_id)["shop/web:80"] == ("10.0.5.1:8080", "10.0.5.2:8080")
        assert len([k for k in kube.objects if k[0] == "certificates"]) == 2
        # An endpoint that is no longer ready, and a host taken out of the Ingress.
        edited = ingress("site", "shop", [host("a.example.com", ("/", "web", 80))])
        edited["metadata"]["uid"] = kube.builtin[("ingresses", "shop", "site")]["metadata"]["uid"]
        feed(controller, kube,
             (ENDPOINT_SLICE, endpoint_slice("web-1", "shop", "web", 8080, "10.0.5.1")),
             (INGRESS, edited))  # fmt: skip
        await settle(controller)
        assert backends(context, agent_id)["shop/web:80"] == ("10.0.5.1:8080",)
        assert {r.domain for r in context.state.snapshot().routes} == {"a.example.com"}
        assert len([k for k in kube.objects if k[0] == "certificates"]) == 1
        # The Ingress deleted: nothing is served, its date is forgotten.
        controller.ingress_gone("shop", "site")
        await settle(controller)
        assert context.state.snapshot().routes == ()
        assert backends(context, agent_id) == {}
        assert kube.config_maps[(SYSTEM, CLAIMS_CONFIG_MAP)] == {}

    asyncio.run(scenario())


def test_a_default_ingress_class_takes_ingresses_without_a_class(context: Context) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        unclassed = ingress("site", "shop", [host("shop.example.com", ("/", "web", 80))])
        del unclassed["spec"]["ingressClassName"]
        feed(controller, kube, (SERVICE, service("web", "shop", 80, "10.96.0.10")),
             (INGRESS, unclassed))  # fmt: skip
        await settle(controller)
        assert context.state.snapshot().routes == ()
        feed(controller, kube, (INGRESS_CLASS, {
            "metadata": {"name": "kakuremichi", "annotations": {
                "ingressclass.kubernetes.io/is-default-class": "true"}},
            "spec": {"controller": "kakuremichi.io/ingress-controller"}}))  # fmt: skip
        await settle(controller)
        assert {r.domain for r in context.state.snapshot().routes} == {"shop.example.com"}

    asyncio.run(scenario())


def test_a_refused_field_is_told_once_as_an_event(context: Context) -> None:
    async def scenario() -> None:
        controller, kube, _ = await controller_of(context)
        feed(controller, kube, (INGRESS, ingress("site", "shop", [
            host("shop.example.com", ("/", "missing", 80))])))  # fmt: skip
        await settle(controller)
        await settle(controller)
        told = [
            m for e, m in zip(kube.events, kube.messages, strict=True) if e[4] == "RouteRefused"
        ]
        assert told == ["spec.rules[0].http.paths[0].backend.service.name: there is no Service "
                        "missing in this namespace."]  # fmt: skip
        context.state.set_certificate(("x", "y"), CertificateVerdict(True, "Valid", ""), None)

    asyncio.run(scenario())
