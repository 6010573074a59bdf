"""``kakuremichi agent``: WireGuard peer of every gateway, relaying each tunnel to its target.

It listens on its virtual IP only, bound to its WireGuard interface, takes connections only from
the gateways of its config (and, with its packet filter, nothing else from WireGuard at all), and
connects only to the targets of its own enabled tunnels.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from kakuremichi.api import protocol
from kakuremichi.edge.agent_datagrams import AgentDatagrams
from kakuremichi.edge.agent_relay import AgentRelay, AgentTarget
from kakuremichi.edge.control_client import ApplyError
from kakuremichi.edge.firewall import FirewallError
from kakuremichi.edge.runtime import EdgeRuntime
from kakuremichi.edge.settings import EdgeSettings
from kakuremichi.edge.wireguard_plan import agent_plan, keep_sessions

log = logging.getLogger(__name__)


class AgentEdge(EdgeRuntime):
    role = "agent"
    inbound = protocol.agent_inbound
    config_type = protocol.AgentConfig

    def __init__(self, settings: EdgeSettings) -> None:
        super().__init__(settings)
        self.relay = AgentRelay(self.stats)
        self.datagrams = AgentDatagrams(self.stats, self.relay.resolver)
        self.server: asyncio.Server | None = None
        self.listening_on: str | None = None

    async def apply_config(self, config: Any) -> None:
        assert isinstance(config, protocol.AgentConfig)
        key = self.private_key(config.agent.wireguard_private_key)
        current = self.wireguard.current if self.wireguard is not None else None
        await self.apply_wireguard(keep_sessions(agent_plan(config, key), current))
        gateways = [g.address for g in config.gateways]
        try:
            await self.firewall.set_gateways(gateways)
        except FirewallError as error:
            raise ApplyError(str(error)) from None
        self.relay.set_gateways(gateways)
        self.datagrams.set_gateways({g.address: g.public_ip for g in config.gateways})
        backends = {b.name: AgentTarget.backend(b) for b in config.backends or ()}
        targets = {t.domain: AgentTarget.of(t, backends) for t in config.tunnels if t.enabled}
        self.relay.set_targets({**targets, **backends})
        self.datagrams.set_tunnels(targets)
        self.stats.tunnels = len(self.relay.targets)
        await self._listen(config.agent.virtual_ip)

    async def _listen(self, address: str, force: bool = False) -> None:
        if self.server is not None and self.listening_on == address and not force:
            return
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        try:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.settings.firewall:  # only what arrives over WireGuard
                    device = self.settings.wireguard_interface.encode()
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device)
                listener.bind((address, protocol.RELAY_PORT))
                listener.listen(4096)
                listener.setblocking(False)
            except OSError:
                listener.close()
                raise
            self.server = await loop.create_server(self.relay.protocol, sock=listener)
            # UDP Tunnels' frames arrive on the same port, over UDP (always bound: the
            # gateways' UDP relay sockets expect it whether or not a UDP Tunnel exists yet).
            if force:
                self.datagrams.close_socket()
            await self.datagrams.listen(
                address, self.settings.wireguard_interface if self.settings.firewall else None
            )
        except OSError as error:
            self.server = None
            raise ApplyError(f"cannot listen on {address}:{protocol.RELAY_PORT}: {error}") from None
        self.listening_on = address
        log.info("relaying for gateways on %s:%d", address, protocol.RELAY_PORT)

    async def after_wireguard_restart(self) -> None:
        if self.listening_on is not None:
            await self._listen(self.listening_on, force=True)

    def background_tasks(self) -> list[asyncio.Task[Any]]:
        return [asyncio.create_task(self._sweep(), name="sweep")]

    async def _sweep(self) -> None:
        """Idle UDP flows; relays to endpoints that left their backend."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            self.datagrams.sweep(now)
            self.relay.sweep(now)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.relay.close_all()
        self.datagrams.close_all()
        await super().stop()
