"""What the gateway and the agent share: WireGuard, the control client, status and /metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import platform
import secrets
import signal
import socket
import time
from abc import abstractmethod
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kakuremichi import __version__
from kakuremichi.api import protocol
from kakuremichi.edge.control_client import ApplyError, ConfigTarget, ControlClient
from kakuremichi.edge.file_limit import raise_file_limit
from kakuremichi.edge.firewall import PacketFilter
from kakuremichi.edge.saved_config import ConfigFile
from kakuremichi.edge.settings import EdgeSettings, read_private_key
from kakuremichi.edge.stats import EdgeStats, PeerSample
from kakuremichi.edge.wireguard import WireGuardError, WireGuardInterface, open_wireguard
from kakuremichi.edge.wireguard_plan import InterfacePlan

SUPERVISE_SECONDS = 2.0
log = logging.getLogger(__name__)


class EdgeRuntime(ConfigTarget):
    role = "edge"
    config_type: Any

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.boot_id = secrets.token_hex(8)
        """This process's start: a gateway's tells agents to start new WireGuard sessions."""
        self.saved_config: ConfigFile[Any] | None = None
        if settings.state_dir is not None:
            self.saved_config = ConfigFile(
                settings.state_dir, self.role, self.config_type, settings.control_url,
                settings.api_key.get_secret_value(), settings.node_name,
            )  # fmt: skip
        self.stats = EdgeStats(self.role)
        self.firewall = PacketFilter(
            "gateway" if self.role == "gateway" else "agent", settings.wireguard_interface,
            protocol.RELAY_PORT, settings.firewall,
        )  # fmt: skip
        self.wireguard: WireGuardInterface | None = None
        self.file_private_key = read_private_key(settings.private_key_file)
        self.pushed_private_key: str | None = None
        self.error: str | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.runners: list[web.AppRunner] = []
        self.control = ControlClient(settings, self)

    # --- ConfigTarget ----------------------------------------------------------------------

    def client_info(self) -> protocol.ClientInfo:
        mode = self.wireguard.mode if self.wireguard is not None else None
        return protocol.ClientInfo(
            version=__version__,
            os=f"{platform.system()} {platform.release()}"[:128],
            hostname=socket.gethostname()[:253],
            wireguard_mode=mode,
            boot_id=self.boot_id,
        )

    async def status_report(self) -> protocol.StatusReport:
        await self._sample_peers()
        return protocol.StatusReport(
            client=self.client_info(),
            config_version=self.stats.config_version or None,
            state="error" if self.error else "online",
            error=self.error[:4096] if self.error else None,
            peers=[
                protocol.PeerStatus(
                    public_key=p.public_key,
                    latest_handshake_at=datetime.fromtimestamp(p.latest_handshake, UTC)
                    if p.latest_handshake
                    else None,
                    rx_bytes=p.rx_bytes,
                    tx_bytes=p.tx_bytes,
                )
                for p in self.stats.peers
            ],
            tunnels=self.stats.tunnels,
            active_connections=max(0, self.stats.combined().active_connections),
            requests_total=self.stats.requests_total,
            unavailable_ports=self.unavailable_ports(),
        )

    def unavailable_ports(self) -> list[protocol.PortTrouble]:
        """A gateway's Tunnel ports it could not bind."""
        return []

    def set_connected(self, connected: bool) -> None:
        self.stats.control_connected = connected

    def credentials_refused(self) -> None:
        if self.saved_config is not None:
            self.saved_config.forget()

    async def apply(self, config: Any, *, save: bool = True) -> None:
        try:
            await self.apply_config(config)
        except ApplyError as error:
            self.error = str(error)
            self.stats.config_errors += 1
            raise
        self.error = None
        self.stats.config_version = int(config.version)
        self.stats.config_applied_at = time.time()
        if save and self.saved_config is not None:
            try:
                await asyncio.to_thread(self.saved_config.save, config)
            except OSError as error:  # serving goes on; only a restart would miss it
                log.warning("cannot save the config to %s: %s", self.saved_config.path, error)

    async def restore_saved_config(self) -> None:
        """Serve the config saved by the last run until control sends the current one."""
        if self.saved_config is None:
            return
        saved = await asyncio.to_thread(self.saved_config.load)
        if saved is None:
            return
        log.info(
            "serving the saved config (version %d, saved %s) from %s until control sends the "
            "current one",
            saved.config.version, saved.saved_at.isoformat(timespec="seconds"),
            self.saved_config.path,
        )  # fmt: skip
        try:
            await self.apply(saved.config, save=False)
        except ApplyError as error:
            log.error("the saved config cannot be applied: %s", error)
        except Exception:  # never keep an edge from dialling control over its saved config
            log.exception("applying the saved config failed; setting it aside")
            await asyncio.to_thread(self.saved_config.set_aside)

    @abstractmethod
    async def apply_config(self, config: Any) -> None: ...

    # --- shared pieces ---------------------------------------------------------------------

    def private_key(self, pushed: str | None) -> str:
        if pushed:
            self.pushed_private_key = pushed
        key = self.file_private_key or self.pushed_private_key
        if key is None:
            raise ApplyError(
                "no WireGuard private key: give --private-key-file, or connect to control over "
                "TLS (https://) so it can send the key"
            )
        return key

    async def apply_wireguard(self, plan: InterfacePlan) -> None:
        assert self.wireguard is not None
        try:
            await self.wireguard.apply(plan)
        except (WireGuardError, OSError) as error:
            raise ApplyError(f"WireGuard: {error}") from None
        except Exception as error:  # netlink errors come in many classes
            raise ApplyError(f"WireGuard: {type(error).__name__}: {error}") from None

    async def _sample_peers(self) -> None:
        if self.wireguard is None:
            return
        with contextlib.suppress(Exception):
            self.stats.peers = [
                PeerSample(
                    public_key=base64.b64encode(bytes.fromhex(p.public_key_hex)).decode(),
                    latest_handshake=p.last_handshake_seconds,
                    rx_bytes=p.rx_bytes,
                    tx_bytes=p.tx_bytes,
                )
                for p in await self.wireguard.peers()
            ]

    async def _serve_metrics(self) -> None:
        if not self.settings.metrics_listen:
            return
        registry = self.stats.registry()

        async def metrics(_: web.Request) -> web.Response:
            await self._sample_peers()
            return web.Response(
                body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        async def healthz(_: web.Request) -> web.Response:
            body = {
                "state": "error" if self.error else "online",
                "configVersion": self.stats.config_version,
                "controlConnected": self.stats.control_connected,
                "wireguardMode": self.stats.wireguard_mode,
            }
            ready = self.stats.config_version > 0
            return web.json_response(body, status=200 if ready else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = self.settings.metrics_listen.rpartition(":")
        await web.TCPSite(runner, host.strip("[]") or None, int(port)).start()
        self.runners.append(runner)
        log.info("metrics on http://%s/metrics", self.settings.metrics_listen)

    async def _supervise_wireguard(self) -> None:
        """wireguard-go can die under us; bring it back with the current plan."""
        while True:
            await asyncio.sleep(SUPERVISE_SECONDS)
            wireguard = self.wireguard
            if wireguard is None or await asyncio.to_thread(wireguard.alive):
                continue
            log.error(
                "WireGuard interface %s is gone; recreating it", self.settings.wireguard_interface
            )
            plan = wireguard.current
            try:
                await wireguard.stop()
                fresh = await self._open_wireguard()
                self.wireguard = fresh
                if plan is not None:
                    await fresh.apply(plan)
                await self.after_wireguard_restart()
            except Exception as error:
                self.error = f"WireGuard: {error}"
                log.exception("recreating WireGuard failed")

    async def _open_wireguard(self) -> WireGuardInterface:
        # pyroute2 runs an event loop of its own: its netlink calls go to threads.
        wireguard = await asyncio.to_thread(
            open_wireguard, self.settings.wireguard_interface, self.settings.wireguard_mode
        )
        await wireguard.start()
        return wireguard

    async def after_wireguard_restart(self) -> None:
        """Re-establish what depended on the interface (e.g. a listener on its address)."""

    async def start(self) -> None:
        """Bring up the packet filter, WireGuard and /metrics before control is dialled (the
        filter first: nothing may arrive over WireGuard unfiltered, not even for a moment).
        Raises :class:`FirewallError` when the filter cannot be installed."""
        raise_file_limit()
        await self.firewall.install()
        self.wireguard = await self._open_wireguard()
        self.stats.wireguard_mode = self.wireguard.mode
        await self._serve_metrics()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for runner in self.runners:
            await runner.cleanup()
        if self.wireguard is not None:
            await self.wireguard.stop()
        await self.firewall.remove()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await self.start()
            await self.restore_saved_config()
            self.tasks.append(asyncio.create_task(self.control.run_forever(), name="control"))
            self.tasks.append(asyncio.create_task(self._supervise_wireguard(), name="wireguard"))
            self.tasks.extend(self.background_tasks())
            await stopping.wait()
            log.info("stopping")
        finally:
            await self.stop()

    def background_tasks(self) -> list[asyncio.Task[Any]]:
        return []
