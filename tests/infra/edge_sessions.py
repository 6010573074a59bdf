"""Edges connected to control the way a real edge connects (the edge's own control client, over
the real channel, applying and acknowledging every config), but without WireGuard or a data
path: for tests whose Tunnels must serve, since a Tunnel is Ready only while its Agent is
connected, and for tests of the channel itself with many edges at once."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from kakuremichi.api import protocol
from kakuremichi.api.resources import AGENT
from kakuremichi.edge.control_client import ConfigTarget, ControlClient
from kakuremichi.edge.settings import EdgeSettings
from tests.infra.cluster import Cluster
from tests.infra.objects import Objects, Secrets


class Recorder(ConfigTarget):
    """An edge that records what it is given."""

    role = "agent"
    inbound = protocol.agent_inbound

    def __init__(self) -> None:
        self.applied: list[float] = []

    async def apply(self, config: Any) -> None:
        self.applied.append(time.monotonic())

    async def status_report(self) -> protocol.StatusReport:
        return protocol.StatusReport()

    def client_info(self) -> protocol.ClientInfo:
        return protocol.ClientInfo(version="test")


class EdgeSessions:
    """Agents' control clients on an event loop of their own (a thread), so that synchronous
    tests can connect and disconnect them."""

    def __init__(self, control_url: str, ca_file: Path | None = None) -> None:
        self.control_url, self.ca_file = control_url, ca_file
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: dict[str, asyncio.Task[None]] = {}

    def connect(self, api_key: str, timeout: float = 30) -> None:
        """Connect an edge with ``api_key`` and wait until it applied its first config."""
        future = asyncio.run_coroutine_threadsafe(self._connect(api_key, timeout), self.loop)
        future.result(timeout + 5)

    async def _connect(self, api_key: str, seconds: float) -> None:
        if api_key in self.running:
            return
        settings = EdgeSettings(control_url=self.control_url, api_key=api_key,
                                ca_file=self.ca_file)  # fmt: skip
        client = ControlClient(settings, Recorder())
        self.running[api_key] = asyncio.create_task(client.run_forever())
        await asyncio.wait_for(client.applied.wait(), seconds)

    def disconnect(self, api_key: str) -> None:
        task = self.running.pop(api_key, None)
        if task is not None:
            self.loop.call_soon_threadsafe(task.cancel)

    def connect_agent(self, kube: Cluster, namespace: str, name: str) -> str:
        """Connect Agent ``namespace/name`` (Ready, its key from its Secret); its API key."""
        status = Objects(kube, namespace, AGENT).ready(name)
        key = (Secrets(kube, namespace).read(status["credentialsSecret"]) or {})["apiKey"]
        self.connect(key)
        return str(key)

    def close(self) -> None:
        async def stop_all() -> None:
            tasks = list(self.running.values())
            self.running.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop_all(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
