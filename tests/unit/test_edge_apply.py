"""Applying configs on a gateway: a config that cannot be applied is refused with its reason,
reported as state ``error``, and the last good one keeps serving. (WireGuard is replaced by a
recorder here; the real drivers are exercised by the integration and end-to-end tiers.)"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from kakuremichi.api import protocol
from kakuremichi.control.credentials import generate_wireguard_keypair
from kakuremichi.edge.control_client import ApplyError
from kakuremichi.edge.gateway import GatewayEdge
from kakuremichi.edge.settings import EdgeSettings
from kakuremichi.edge.wireguard import PeerState, WireGuardMode
from kakuremichi.edge.wireguard_plan import InterfacePlan
from tests.infra.ports import free_port
from tests.infra.tlsgen import TestCA


class RecordingWireGuard:
    name = "test0"
    mode: WireGuardMode = "userspace"

    def __init__(self) -> None:
        self.current: InterfacePlan | None = None
        self.applied: list[InterfacePlan] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def apply(self, plan: InterfacePlan) -> None:
        self.applied.append(plan)
        self.current = plan

    async def peers(self) -> list[PeerState]:
        return []

    def alive(self) -> bool:
        return True


def gateway_config(version: int, bundle: protocol.CertificateBundle) -> protocol.GatewayConfig:
    agent = generate_wireguard_keypair()
    return protocol.GatewayConfig(
        version=version,
        gateway=protocol.GatewaySelf(
            id=uuid.uuid4(), public_ip="192.0.2.10", index=1,
            wireguard_private_key=generate_wireguard_keypair().private_key,
        ),
        agents=[protocol.AgentPeer(id=uuid.uuid4(), virtual_ip="10.1.0.100", subnet="10.1.0.0/24",
                                   wireguard_public_key=agent.public_key, address="10.1.0.1")],
        tunnels=[protocol.GatewayTunnel(domain=bundle.domain, agent_virtual_ip="10.1.0.100",
                                        target="localhost:8080")],
        certificates=[bundle],
    )  # fmt: skip


def test_a_config_that_cannot_be_applied_leaves_the_last_good_one_serving() -> None:
    async def scenario() -> None:
        ca = TestCA()
        issued = ca.issue("app.example.com")
        good = protocol.CertificateBundle(
            domain="app.example.com",
            certificate=issued.certificate_pem,
            private_key=issued.private_key_pem,
        )
        settings = EdgeSettings(
            control_url="http://127.0.0.1:1", api_key="gtw_x", listen_address="127.0.0.1",
            http_port=free_port(), https_port=free_port(),
        )  # fmt: skip
        edge = GatewayEdge(settings)
        wireguard = RecordingWireGuard()
        edge.wireguard = wireguard
        try:
            await edge.apply(gateway_config(1, good))
            assert edge.front_end.sni.domains() == {"app.example.com"}
            assert len(wireguard.applied) == 1

            broken = good.model_copy(update={"private_key": ca.issue("x").private_key_pem})
            with pytest.raises(ApplyError, match=r"certificate for app\.example\.com"):
                await edge.apply(gateway_config(2, broken))
            assert len(wireguard.applied) == 1  # nothing half-applied
            assert edge.stats.config_version == 1
            assert edge.front_end.sni.domains() == {"app.example.com"}
            report = await edge.status_report()
            assert report.state == "error" and report.error is not None
            assert "app.example.com" in report.error

            await edge.apply(gateway_config(3, good))
            assert (await edge.status_report()).state == "online"
            assert edge.stats.config_version == 3
        finally:
            await edge.stop()

    asyncio.run(scenario())


def test_a_gateway_without_a_private_key_says_how_to_get_one() -> None:
    async def scenario() -> None:
        edge = GatewayEdge(EdgeSettings(control_url="http://127.0.0.1:1", api_key="gtw_x"))
        edge.wireguard = RecordingWireGuard()
        ca = TestCA()
        issued = ca.issue("app.example.com")
        config = gateway_config(1, protocol.CertificateBundle(
            domain="app.example.com", certificate=issued.certificate_pem,
            private_key=issued.private_key_pem,
        ))  # fmt: skip
        config.gateway.wireguard_private_key = None
        with pytest.raises(ApplyError, match="--private-key-file, or connect to control over TLS"):
            await edge.apply(config)

    asyncio.run(scenario())
