"""Control's HTTP server: the control channel's WebSocket (``channel``) and what else is served
beside it: ``/healthz``, ``/metrics``, the one-line installer and its edge kit (the wheel of this
release, a wheelhouse at ``/install/wheels/`` for ``pip --find-links``, wireguard-go builds)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kakuremichi.control import metrics
from kakuremichi.control.channel import ControlChannel
from kakuremichi.control.installer import EdgeKit, install_script
from kakuremichi.control.settings import ControlSettings

DOWNLOADS_AT_ONCE = 16
"""Files of the edge kit sent at the same time: the listener is the control channel's too, so
many downloads (or slow readers) must not take the sockets and the bandwidth its edges need."""
DOWNLOAD_WAIT_SECONDS = 30.0


class HttpEndpoints:
    def __init__(
        self, settings: ControlSettings, channel: ControlChannel, kit: EdgeKit | None = None
    ) -> None:
        self.settings = settings
        self.channel = channel
        self.kit = kit or EdgeKit.load(
            settings.edge_wheel, settings.edge_wheelhouse, settings.edge_wireguard_go
        )
        self.downloads = asyncio.Semaphore(DOWNLOADS_AT_ONCE)

    async def send_file(self, request: web.Request, path: Path) -> web.StreamResponse:
        """The file, sent while holding one of the download slots (503 after waiting 30 s)."""
        try:
            async with asyncio.timeout(DOWNLOAD_WAIT_SECONDS):
                await self.downloads.acquire()
        except TimeoutError:
            raise web.HTTPServiceUnavailable(
                text="too many downloads at once; try again\n", headers={"Retry-After": "10"}
            ) from None
        try:
            response = web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)  # (sent before the slot is given back)
            return response
        finally:
            self.downloads.release()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.channel.websocket)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/install/{role:agent|gateway}.sh", self.installer)
        app.router.add_get(r"/install/{wheel:kakuremichi-[^/]+\.whl}", self.wheel)
        app.router.add_get("/install/wheels/", self.wheelhouse_index)
        app.router.add_get("/install/wheels/{file}", self.wheelhouse_file)
        app.router.add_get("/install/wireguard-go/linux-{arch}", self.wireguard_go)
        return app

    async def installer(self, request: web.Request) -> web.Response:
        """The one-line installer: ``curl -sSL <control>/install/agent.sh | sh -s -- ...``."""
        return web.Response(
            text=install_script(request.match_info["role"], self.settings.control_url, self.kit),
            content_type="text/x-shellscript",
        )

    async def wheel(self, request: web.Request) -> web.StreamResponse:
        """The operator's own release, which the installer installs by default."""
        served = self.kit.wheel
        if served is None or request.match_info["wheel"] != served.name:
            raise web.HTTPNotFound(text="no such wheel here\n")
        return await self.send_file(request, served)

    async def wheelhouse_index(self, request: web.Request) -> web.Response:
        """Links to every wheel of the wheelhouse: what ``pip --find-links`` reads."""
        files = self.kit.wheelhouse_files()
        if not files:
            raise web.HTTPNotFound(text="no wheelhouse here\n")
        links = "".join(f'<a href="{name}">{name}</a><br>\n' for name in files)
        return web.Response(text=f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n",
                            content_type="text/html")  # fmt: skip

    async def wheelhouse_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        if self.kit.wheelhouse is None or name not in self.kit.wheelhouse_files():
            raise web.HTTPNotFound(text="no such wheel here\n")
        return await self.send_file(request, self.kit.wheelhouse / name)

    async def wireguard_go(self, request: web.Request) -> web.StreamResponse:
        """A wireguard-go build, for hosts without kernel WireGuard (the script checks it)."""
        build = self.kit.wireguard_go.get(request.match_info["arch"])
        if build is None:
            raise web.HTTPNotFound(text="no wireguard-go for that architecture here\n")
        return await self.send_file(request, build[0])

    async def metrics(self, request: web.Request) -> web.Response:
        connected = self.channel.connected()
        for role in ("agent", "gateway"):
            metrics.connected_edges.labels(role).set(connected[role])
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "connected": len(self.channel.sessions)})
