"""The edge's side of the control channel against a control written here: config versions order
one session only, so a restarted control whose counter (or clock) is behind is obeyed at once."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp import web

from kakuremichi.api import protocol
from kakuremichi.edge.control_client import ConfigTarget, ControlClient
from kakuremichi.edge.settings import EdgeSettings
from tests.infra.web import serving

AGENT_ID = uuid.uuid4()


class Edge(ConfigTarget):
    role = "agent"
    inbound = protocol.agent_inbound

    def __init__(self) -> None:
        self.applied: list[int] = []

    async def apply(self, config: Any) -> None:
        self.applied.append(int(config.version))

    async def status_report(self) -> protocol.StatusReport:
        return protocol.StatusReport()

    def client_info(self) -> protocol.ClientInfo:
        return protocol.ClientInfo(version="test")


def config(version: int) -> str:
    return protocol.encode(protocol.AgentConfigMessage(data=protocol.AgentConfig(
        version=version,
        agent=protocol.AgentSelf(id=AGENT_ID, virtual_ip="10.1.0.100", subnet="10.1.0.0/24"),
    )))  # fmt: skip


def test_the_first_config_of_each_session_is_applied_whatever_its_version() -> None:
    # Session 1: a control whose versions run high (say, the old wall-clock ones); then the
    # operator restarts and counts from 1 again.
    sessions = [[1_700_000_000_000, 1_700_000_000_005, 1_700_000_000_003], [1, 2]]
    acks: list[list[int]] = []

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.receive()  # auth
        versions, got = sessions.pop(0), list[int]()
        acks.append(got)
        for version in versions:
            await socket.send_str(config(version))
            while True:
                message = protocol.client_message.validate_json((await socket.receive()).data)
                if isinstance(message, protocol.AckMessage):
                    got.append(message.version)
                    break
        await socket.close()
        return socket

    async def scenario() -> None:
        edge = Edge()
        async with serving("/ws", ws) as port:
            client = ControlClient(
                EdgeSettings(control_url=f"http://127.0.0.1:{port}", api_key="agt_x"), edge
            )
            running = asyncio.create_task(client.run_forever())
            try:
                for _ in range(400):
                    if len(edge.applied) >= 4 and len(acks) == 2 and len(acks[1]) == 2:
                        break
                    await asyncio.sleep(0.05)
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
        # The stale one within session 1 is not applied (and the newest is acknowledged);
        # session 2's first config is, though its version is far lower.
        assert edge.applied == [1_700_000_000_000, 1_700_000_000_005, 1, 2]
        assert acks == [[1_700_000_000_000, 1_700_000_000_005, 1_700_000_000_005], [1, 2]]

    asyncio.run(scenario())


def test_a_gateway_pod_presents_its_current_token_and_keeps_its_config_when_refused(
    tmp_path: Any,
) -> None:
    """The kubelet renews the projected token: each connection reads it afresh. A refusal of
    the pool's key (4401) is not a verdict on the node: the saved config stays."""
    token_file = tmp_path / "token"
    token_file.write_text("token-1\n")
    auths: list[protocol.AuthMessage] = []

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        message = protocol.client_message.validate_json((await socket.receive()).data)
        assert isinstance(message, protocol.AuthMessage)
        auths.append(message)
        token_file.write_text("token-2\n")  # renewed meanwhile
        await socket.close(code=protocol.CLOSE_UNAUTHORIZED)
        return socket

    class Gateway(Edge):
        forgotten = False

        def credentials_refused(self) -> None:
            self.forgotten = True

    async def scenario() -> Gateway:
        edge = Gateway()
        async with serving("/ws", ws) as port:
            settings = EdgeSettings(
                control_url=f"http://127.0.0.1:{port}", api_key="gtw_pool", node_name="node-a",
                pod_token_file=token_file,
            )  # fmt: skip
            running = asyncio.create_task(ControlClient(settings, edge).run_forever())
            try:
                for _ in range(100):
                    if len(auths) >= 2:
                        break
                    await asyncio.sleep(0.05)
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
        return edge

    edge = asyncio.run(scenario())
    assert [(a.api_key, a.node_name, a.pod_token) for a in auths[:2]] == [
        ("gtw_pool", "node-a", "token-1"), ("gtw_pool", "node-a", "token-2"),
    ]  # fmt: skip
    assert not edge.forgotten
