"""``kakuremichi gateway``: TLS by SNI (or passed through), ACME HTTP-01 answers, TCP and UDP
Tunnels' ports, forwarding over WireGuard.

Applying a config prepares everything that can fail first (certificates), then the TCP and UDP
Tunnels' ports (one that cannot be bound is reported and retried, not fatal; done first so that
a port a Tunnel gives up is free for the pool's own), then changes WireGuard incrementally, then
swaps routes, certificates and challenges in one step, then (re)binds its own ports if they
changed, then waits until every HTTPS worker process serves the new routes. A config that fails
leaves the previous one serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from aiohttp import web

from kakuremichi.api import protocol
from kakuremichi.edge.control_client import ApplyError
from kakuremichi.edge.front_end import HttpsFrontEnd
from kakuremichi.edge.gateway_routes import FrontEndConfig
from kakuremichi.edge.http_port import PlainHttp
from kakuremichi.edge.https_proxy import serve
from kakuremichi.edge.https_workers import HttpsWorkers, WorkerFailed
from kakuremichi.edge.public_ports import PublicPorts
from kakuremichi.edge.runtime import EdgeRuntime
from kakuremichi.edge.settings import EdgeSettings
from kakuremichi.edge.sni import CertificateError
from kakuremichi.edge.wireguard_plan import gateway_plan

log = logging.getLogger(__name__)


class GatewayEdge(EdgeRuntime):
    role = "gateway"
    inbound = protocol.gateway_inbound
    config_type = protocol.GatewayConfig

    def __init__(self, settings: EdgeSettings) -> None:
        super().__init__(settings)
        self.front_end = HttpsFrontEnd(self.stats)
        self.proxy = self.front_end.proxy
        self.workers = HttpsWorkers(settings.workers - 1, self.stats)
        self.plain = PlainHttp(self.front_end.serves, lambda: self.https_port or 443)
        self.ports = PublicPorts(
            self.stats, self.proxy.splices, self.proxy.proxy_headers, settings.listen_address,
            settings.wireguard_interface,
        )  # fmt: skip
        self.https_server: asyncio.Server | None = None
        self.https_port: int | None = None
        self.http_runner: web.AppRunner | None = None
        self.http_server: asyncio.Server | None = None
        self.http_port: int | None = None

    async def apply_config(self, config: Any) -> None:
        assert isinstance(config, protocol.GatewayConfig)
        settings = self.settings
        key = self.private_key(config.gateway.wireguard_private_key)
        front_end = FrontEndConfig.of(config)
        try:
            prepared = self.front_end.prepare(front_end)
        except CertificateError as error:
            raise ApplyError(str(error)) from None
        plan = gateway_plan(config, key)
        if settings.wireguard_port is not None:
            plan = dataclasses.replace(plan, listen_port=settings.wireguard_port)
        # Tunnels' ports before the pool's own and WireGuard's: one that goes may be the one a
        # pool's port moves to (control never gives both in one config); one that cannot be
        # bound yet (the pool's port it takes is still open) is retried.
        await self.ports.apply(front_end.routes, front_end.client_limits, front_end.trusted_proxies)
        await self.apply_wireguard(plan)
        self.front_end.install(prepared)
        self.plain.set_challenges(config.acme_challenges)
        self.stats.tunnels = sum(1 for t in config.tunnels if t.enabled)
        try:
            await self._listen(
                settings.http_port or config.gateway.http_port,
                settings.https_port or config.gateway.https_port,
            )
            await self.workers.apply(front_end)
        except WorkerFailed as error:
            raise ApplyError(str(error)) from None

    async def _listen(self, http_port: int, https_port: int) -> None:
        host = self.settings.listen_address
        try:
            if self.https_server is None or self.https_port != https_port:
                if self.https_server is not None:
                    self.https_server.close()
                self.https_server = await serve(
                    self.proxy, self.front_end.sni.front, host, https_port, self.workers.count > 0
                )
                self.https_port = https_port
                await self.workers.listen(self.https_server.sockets)
                log.info("HTTPS on %s:%d", host or "*", https_port)
            if self.http_runner is None or self.http_port != http_port:
                await self._stop_http()
                runner = web.AppRunner(self.plain.app(), access_log=None)
                await runner.setup()
                handler = runner.server
                assert handler is not None
                # (A server of our own rather than aiohttp's site: a load balancer's PROXY
                # header is read off first when the gateway takes them.)
                factory = self.proxy.proxy_headers.factory(lambda _: handler(), self.stats)
                self.http_server = await asyncio.get_running_loop().create_server(
                    factory, host, http_port, reuse_address=True
                )
                self.http_runner, self.http_port = runner, http_port
                log.info("HTTP on %s:%d", host or "*", http_port)
        except OSError as error:
            raise ApplyError(f"cannot listen: {error}") from None

    async def _stop_http(self) -> None:
        if self.http_server is not None:
            self.http_server.close()
            self.http_server = None
        if self.http_runner is not None:
            await self.http_runner.cleanup()
            self.http_runner = None

    def unavailable_ports(self) -> list[protocol.PortTrouble]:
        return [
            protocol.PortTrouble(protocol=key[0], port=key[1], error=error)
            for key, error in sorted(self.ports.unavailable.items())
        ][: protocol.MAX_PORT_TROUBLES]

    def background_tasks(self) -> list[asyncio.Task[Any]]:
        return [
            asyncio.create_task(self.proxy.sweep_forever(), name="sweep"),
            asyncio.create_task(self._sweep_flows(), name="udp-flows"),
            asyncio.create_task(
                self.ports.retry_forever(self.control.report_soon), name="port-retry"
            ),
        ]

    async def _sweep_flows(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.ports.sweep(time.monotonic())

    async def stop(self) -> None:
        if self.https_server is not None:
            self.https_server.close()
        self.ports.close_all()
        self.proxy.close_all()
        await self.workers.stop()
        await self._stop_http()
        await super().stop()
