"""``kakuremichi gateway``: TLS by SNI, ACME HTTP-01 answers, forwarding over WireGuard.

Applying a config prepares everything that can fail first (certificates), then changes WireGuard
incrementally, then swaps routes, certificates and challenges in one step, then (re)binds the
ports if they changed, then waits until every HTTPS worker process serves the new routes. A
config that fails leaves the previous one serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from aiohttp import web

from kakuremichi.api import protocol
from kakuremichi.edge.control_client import ApplyError
from kakuremichi.edge.front_end import HttpsFrontEnd
from kakuremichi.edge.gateway_routes import FrontEndConfig
from kakuremichi.edge.http_port import PlainHttp
from kakuremichi.edge.https_proxy import serve
from kakuremichi.edge.https_workers import HttpsWorkers, WorkerFailed
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
        self.https_server: asyncio.Server | None = None
        self.https_port: int | None = None
        self.http_runner: web.AppRunner | None = None
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
                if self.http_runner is not None:
                    await self.http_runner.cleanup()
                runner = web.AppRunner(self.plain.app(), access_log=None)
                await runner.setup()
                await web.TCPSite(runner, host, http_port, reuse_address=True).start()
                self.http_runner, self.http_port = runner, http_port
                log.info("HTTP on %s:%d", host or "*", http_port)
        except OSError as error:
            raise ApplyError(f"cannot listen: {error}") from None

    def background_tasks(self) -> list[asyncio.Task[Any]]:
        return [asyncio.create_task(self.proxy.sweep_forever(), name="sweep")]

    async def stop(self) -> None:
        if self.https_server is not None:
            self.https_server.close()
        self.proxy.close_all()
        await self.workers.stop()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        await super().stop()
