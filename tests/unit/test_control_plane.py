"""The control plane's reconcilers, state and projector against an in-memory cluster
(``tests/infra/fake_kube.py``) and a real SQLite mirror: fast, and each about what a user sees in
statuses. The integration tier runs the same code against the real API server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import kopf
import pytest

from kakuremichi.api.resources import AGENT, GATEWAY, TUNNEL, ResourceKind
from kakuremichi.control import agents, gateways, node_admission, tunnels
from kakuremichi.control.addressing import SubnetAllocator
from kakuremichi.control.context import Context
from kakuremichi.control.gateway_instances import instance_id
from kakuremichi.control.mirror import Mirror
from kakuremichi.control.ownership import TenantRule
from kakuremichi.control.pod_identity import NODE_NAME, POD_NAME, POD_UID, PodFacts, ReviewedToken
from kakuremichi.control.presence import Presence
from kakuremichi.control.projector import Projector
from kakuremichi.control.settings import ControlSettings
from kakuremichi.control.state import ControlState, EdgeIdentity
from kakuremichi.control.status_writer import StatusWriter
from kakuremichi.control.store import Sealer
from kakuremichi.control.tunnel_readiness import CertificateVerdict
from tests.infra.fake_kube import FakeKube

SYSTEM = "kakuremichi-system"
TUNNEL_SPEC = {
    "domain": "app.example.com", "agent": "home", "target": "localhost:8080",
    "tls": {"issuer": "Secret", "secretName": "app-tls"},
}  # fmt: skip


@pytest.fixture
def context(tmp_path: Path) -> Context:
    settings = ControlSettings(db_url=f"sqlite:///{tmp_path / 'km.db'}", system_namespace=SYSTEM)
    state = ControlState(Sealer(Sealer.generate_key()), SubnetAllocator(settings.subnet_pool()))
    kube = FakeKube()
    statuses, mirror = StatusWriter(kube), Mirror(settings.db_url)
    made = Context(
        settings=settings, state=state, kube=kube, mirror=mirror,
        presence=Presence(state, mirror, statuses), statuses=statuses,
    )  # fmt: skip
    return made


def fake(context: Context) -> FakeKube:
    return cast(FakeKube, context.kube)


async def reconcile(context: Context, kind: ResourceKind, body: dict[str, Any], run: Any) -> None:
    """What register_reconciler does around a reconcile: kopf's patch, its status written."""
    patch = kopf.Patch()
    try:
        await run(context, kopf.Body(cast(kopf.RawBody, body)), patch)
    finally:
        status = patch.pop("status", None)
        if status:
            meta = body["metadata"]
            await context.kube.patch_status(
                kind, meta.get("namespace") or "", meta["name"], dict(status)
            )


def current(context: Context, kind: ResourceKind, name: str, namespace: str = "") -> dict[str, Any]:
    key = (kind.plural, namespace if kind.namespaced else "", name)
    return fake(context).objects[key]


def ready(body: dict[str, Any]) -> tuple[str, str]:
    (condition,) = [c for c in body["status"]["conditions"] if c["type"] == "Ready"]
    return condition["status"], condition["reason"]


def test_an_agent_is_provisioned_once_and_a_resume_allocates_nothing_new(context: Context) -> None:
    async def scenario() -> None:
        body = fake(context).add(AGENT, "home", {}, "team-a")
        await reconcile(context, AGENT, body, agents.reconcile)
        status = current(context, AGENT, "home", "team-a")["status"]
        assert ready(current(context, AGENT, "home", "team-a")) == ("True", "Provisioned")
        assert status["subnet"] == "10.1.0.0/24" and status["virtualIP"] == "10.1.0.100"
        secret = fake(context).secrets[("team-a", status["credentialsSecret"])]
        assert secret.data["apiKey"].startswith("agt_") and secret.owned_by(body["metadata"]["uid"])
        identity = context.state.authenticate(secret.data["apiKey"])
        assert identity == EdgeIdentity("agent", UUID(body["metadata"]["uid"]))
        # A restart's resume: the same subnet and keys, nothing written but the status.
        context.state.remove_agent(identity.id)
        writes = len(fake(context).writes)
        await reconcile(context, AGENT, current(context, AGENT, "home", "team-a"), agents.reconcile)
        assert current(context, AGENT, "home", "team-a")["status"]["subnet"] == "10.1.0.0/24"
        assert [verb for verb, _ in fake(context).writes[writes:]] == ["status"]

    asyncio.run(scenario())


def test_an_agent_over_its_namespaces_quota_gets_nothing_and_says_why(context: Context) -> None:
    context.state.set_tenant_rule(
        TenantRule("team-a", match_names=frozenset({"team-a"}), max_agents=1)
    )

    async def scenario() -> None:
        first = fake(context).add(AGENT, "first", {}, "team-a")
        await reconcile(context, AGENT, first, agents.reconcile)
        second = fake(context).add(AGENT, "second", {}, "team-a")
        await reconcile(context, AGENT, second, agents.reconcile)
        refused = current(context, AGENT, "second", "team-a")
        assert ready(refused)[1] == "QuotaExceeded"
        assert "subnet" not in refused["status"]
        assert ("team-a", "kakuremichi-agent-second") not in fake(context).secrets
        assert ("Agent", "team-a", "second", True, "QuotaExceeded") in fake(context).events

    asyncio.run(scenario())


def test_the_projector_writes_a_tunnels_status_once_and_a_steady_cluster_costs_nothing(
    context: Context,
) -> None:
    async def scenario() -> None:
        agent = fake(context).add(AGENT, "home", {}, "team-a")
        await reconcile(context, AGENT, agent, agents.reconcile)
        tunnel = fake(context).add(TUNNEL, "app", TUNNEL_SPEC, "team-a")
        await reconcile(context, TUNNEL, tunnel, tunnels.reconcile)
        assert ("certificates", "team-a", "app") in fake(context).objects  # its Certificate
        context.state.set_certificate(
            ("team-a", "app"), CertificateVerdict(True, "Valid", "valid until later"), None
        )
        projector = Projector(context)
        await projector.project()
        assert ready(current(context, TUNNEL, "app", "team-a")) == ("True", "Serving")
        assert current(context, TUNNEL, "app", "team-a")["status"]["url"] == (
            "https://app.example.com"
        )
        writes = fake(context).status_writes()
        await projector.project()
        await projector.project()
        assert fake(context).status_writes() == writes  # nothing changed: no API call

    asyncio.run(scenario())


def test_a_younger_claim_on_a_held_domain_is_refused_without_naming_the_holder(
    context: Context,
) -> None:
    async def scenario() -> None:
        for namespace in ("team-a", "team-b"):
            agent = fake(context).add(AGENT, "home", {}, namespace)
            await reconcile(context, AGENT, agent, agents.reconcile)
            tunnel = fake(context).add(TUNNEL, "app", TUNNEL_SPEC, namespace)
            await reconcile(context, TUNNEL, tunnel, tunnels.reconcile)
            context.state.set_certificate(
                (namespace, "app"), CertificateVerdict(True, "Valid", "valid"), None
            )
        await Projector(context).project()
        assert ready(current(context, TUNNEL, "app", "team-a")) == ("True", "Serving")
        younger = current(context, TUNNEL, "app", "team-b")
        assert ready(younger) == ("False", "DomainConflict")
        message = next(c["message"] for c in younger["status"]["conditions"])
        assert "team-a" not in message

    asyncio.run(scenario())


def test_an_external_gateway_without_an_address_takes_its_first_connections(
    context: Context,
) -> None:
    async def scenario() -> None:
        body = fake(context).add(GATEWAY, "edge", {"mode": "External"})
        await reconcile(context, GATEWAY, body, gateways.reconcile)
        assert ready(current(context, GATEWAY, "edge")) == ("False", "WaitingForAddress")
        gid = instance_id(body["metadata"]["uid"], "edge")
        assert gid not in context.state.gateways and gid in context.state.pending_gateways
        with pytest.raises(node_admission.NodeRefused, match="loopback"):
            await node_admission.adopt_address(context, gid, "127.0.0.1")  # not public
        name = await node_admission.adopt_address(context, gid, "203.0.113.7")
        await reconcile(context, GATEWAY, current(context, GATEWAY, name), gateways.reconcile)
        assert current(context, GATEWAY, "edge")["status"]["publicIP"] == "203.0.113.7"
        assert ready(current(context, GATEWAY, "edge")) == ("True", "Provisioned")
        assert context.state.gateways[gid].public_ip == "203.0.113.7"
        assert gid not in context.state.pending_gateways

    asyncio.run(scenario())


def test_a_pool_admits_only_its_own_pod_on_its_own_node(context: Context) -> None:
    async def scenario() -> None:
        body = fake(context).add(GATEWAY, "pool", {"mode": "InCluster"})
        await reconcile(context, GATEWAY, body, gateways.reconcile)
        assert ready(current(context, GATEWAY, "pool")) == ("True", "RolledOut")
        (daemonset,) = fake(context).daemonsets.values()
        assert (SYSTEM, "kakuremichi-gateway-pool") in fake(context).service_accounts
        fake(context).nodes["node-a"] = ({"ExternalIP": "203.0.113.9"}, {})
        fake(context).pods[(SYSTEM, "pool-x1")] = PodFacts(
            "pool-x1", "pod-uid", "node-a", "kakuremichi-gateway-pool", "DaemonSet",
            daemonset["metadata"]["uid"], False,
        )  # fmt: skip
        fake(context).tokens["good"] = ReviewedToken(
            True, f"system:serviceaccount:{SYSTEM}:kakuremichi-gateway-pool", ("kakuremichi",),
            {POD_NAME: ("pool-x1",), POD_UID: ("pod-uid",), NODE_NAME: ("node-a",)},
        )  # fmt: skip
        pool = UUID(body["metadata"]["uid"])
        assert await node_admission.pod_refusal(context, pool, "node-a", "good") is None
        for node, token in (("node-a", None), ("node-a", "forged"), ("node-b", "good")):
            assert await node_admission.pod_refusal(context, pool, node, token) is not None
        gid, _ = await node_admission.admit_node(context, pool, "node-a")
        assert context.state.gateways[gid].public_ip == "203.0.113.9"
        (instance,) = current(context, GATEWAY, "pool")["status"]["instances"]
        assert (instance["name"], instance["index"]) == ("node-a", 1)

    asyncio.run(scenario())


def test_presence_reaches_the_status_without_the_session_waiting(context: Context) -> None:
    async def scenario() -> None:
        body = fake(context).add(AGENT, "home", {}, "team-a")
        await reconcile(context, AGENT, body, agents.reconcile)
        identity = EdgeIdentity("agent", UUID(body["metadata"]["uid"]))
        writer = asyncio.create_task(context.presence.run())
        try:
            context.presence.connected(identity, None)  # returns at once: a fact, no API call
            for _ in range(100):
                if current(context, AGENT, "home", "team-a")["status"].get("state") == "online":
                    break
                await asyncio.sleep(0.02)
            assert current(context, AGENT, "home", "team-a")["status"]["state"] == "online"
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    asyncio.run(scenario())


def test_tcp_tunnels_get_no_certificate_and_a_younger_one_on_a_held_port_waits(
    context: Context,
) -> None:
    async def scenario() -> None:
        agent = fake(context).add(AGENT, "home", {}, "team-a")
        await reconcile(context, AGENT, agent, agents.reconcile)
        for name in ("first", "second"):
            spec = {"domain": f"{name}.example.com", "agent": "home", "target": "localhost:22",
                    "protocol": "TCP", "port": 2222}  # fmt: skip
            tunnel = fake(context).add(TUNNEL, name, spec, "team-a")
            await reconcile(context, TUNNEL, tunnel, tunnels.reconcile)
        await Projector(context).project()
        first, second = (current(context, TUNNEL, n, "team-a") for n in ("first", "second"))
        assert ready(first)[1] in ("Serving", "AgentOffline")
        assert ready(second) == ("False", "PortConflict")
        assert first["status"]["url"] == "tcp://first.example.com:2222"
        assert "certificate" not in first["status"]
        assert not [k for k in fake(context).objects if k[0] == "certificates"]

    asyncio.run(scenario())
