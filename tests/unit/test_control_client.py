"""The edge's side of the control channel against a control written here: config versions order
one session only, so a restarted control whose counter (or clock) is behind is obeyed at once."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp import web

from kakuremichi import protocol
from kakuremichi.edge.control_client import ConfigTarget, ControlClient
from kakuremichi.edge.settings import EdgeSettings
from tests.infra.ports import free_port

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
        app = web.Application()
        app.router.add_get("/ws", ws)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        edge = Edge()
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
            await runner.cleanup()
        # The stale one within session 1 is not applied (and the newest is acknowledged);
        # session 2's first config is, though its version is far lower.
        assert edge.applied == [1_700_000_000_000, 1_700_000_000_005, 1, 2]
        assert acks == [[1_700_000_000_000, 1_700_000_000_005, 1_700_000_000_005], [1, 2]]

    asyncio.run(scenario())
