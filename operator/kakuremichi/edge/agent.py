"""``kakuremichi agent``: WireGuard peer of every gateway, relaying each tunnel to its target.

It listens on its virtual IP only (inside WireGuard, where only gateways can reach it) and
connects only to the targets of its own enabled tunnels.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kakuremichi import protocol
from kakuremichi.edge.agent_relay import AgentRelay
from kakuremichi.edge.control_client import ApplyError
from kakuremichi.edge.runtime import EdgeRuntime
from kakuremichi.edge.settings import EdgeSettings
from kakuremichi.wireguard_plan import agent_plan

log = logging.getLogger(__name__)


class AgentEdge(EdgeRuntime):
    role = "agent"
    inbound = protocol.agent_inbound
    config_type = protocol.AgentConfig

    def __init__(self, settings: EdgeSettings) -> None:
        super().__init__(settings)
        self.relay = AgentRelay(self.stats)
        self.server: asyncio.Server | None = None
        self.listening_on: str | None = None

    async def apply_config(self, config: Any) -> None:
        assert isinstance(config, protocol.AgentConfig)
        key = self.private_key(config.agent.wireguard_private_key)
        await self.apply_wireguard(agent_plan(config, key))
        self.relay.set_targets({t.domain: t.target for t in config.tunnels if t.enabled})
        self.stats.tunnels = len(self.relay.targets)
        await self._listen(config.agent.virtual_ip)

    async def _listen(self, address: str, force: bool = False) -> None:
        if self.server is not None and self.listening_on == address and not force:
            return
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(
                self.relay.protocol, address, protocol.RELAY_PORT, backlog=4096,
                reuse_address=True,
            )  # fmt: skip
        except OSError as error:
            self.server = None
            raise ApplyError(f"cannot listen on {address}:{protocol.RELAY_PORT}: {error}") from None
        self.listening_on = address
        log.info("relaying for gateways on %s:%d", address, protocol.RELAY_PORT)

    async def after_wireguard_restart(self) -> None:
        if self.listening_on is not None:
            await self._listen(self.listening_on, force=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.relay.close_all()
        await super().stop()
