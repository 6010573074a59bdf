"""Control's HTTP server: the control channel's WebSocket (``channel``) and what else is served
beside it: ``/healthz``, ``/metrics``, the one-line installer and the wheel of this release."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kakuremichi.control import metrics
from kakuremichi.control.channel import ControlChannel
from kakuremichi.control.installer import install_script
from kakuremichi.control.settings import ControlSettings


class HttpEndpoints:
    def __init__(self, settings: ControlSettings, channel: ControlChannel) -> None:
        self.settings = settings
        self.channel = channel

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.channel.websocket)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/install/{role:agent|gateway}.sh", self.installer)
        app.router.add_get(r"/install/{wheel:kakuremichi-[^/]+\.whl}", self.wheel)
        return app

    async def installer(self, request: web.Request) -> web.Response:
        """The one-line installer: ``curl -sSL <control>/install/agent.sh | sh -s -- ...``."""
        settings = self.settings
        wheel = settings.edge_wheel.name if settings.edge_wheel else None
        return web.Response(
            text=install_script(request.match_info["role"], settings.control_url, wheel),
            content_type="text/x-shellscript",
        )

    async def wheel(self, request: web.Request) -> web.StreamResponse:
        """The operator's own release, which the installer installs by default."""
        served = self.settings.edge_wheel
        if served is None or request.match_info["wheel"] != served.name:
            raise web.HTTPNotFound(text="no such wheel here\n")
        return web.FileResponse(served, headers={"Content-Type": "application/octet-stream"})

    async def metrics(self, request: web.Request) -> web.Response:
        connected = self.channel.connected()
        for role in ("agent", "gateway"):
            metrics.connected_edges.labels(role).set(connected[role])
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "connected": len(self.channel.sessions)})
