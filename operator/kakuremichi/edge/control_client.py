"""An edge's side of the control channel: authenticate, apply pushed configs, acknowledge,
beat, report; reconnect with exponential backoff and jitter when the connection drops.

What is being served never depends on this connection: the last applied config keeps serving
while control is away (and, with ``--state-dir``, across a restart), and a config equal to the
applied one changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from typing import Any

import aiohttp
from pydantic import TypeAdapter, ValidationError

from kakuremichi.api import protocol
from kakuremichi.edge.settings import EdgeSettings

MIN_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
STABLE_SESSION_SECONDS = 30.0
TRY_AGAIN_SECONDS = 2.0
"""Control asked to come back (it has just started): the first retry comes within this, later
ones back off from it (a restarted operator must not face every edge every two seconds)."""
log = logging.getLogger(__name__)


class ApplyError(RuntimeError):
    """A config that cannot be applied; the message goes back to control."""


class ConfigTarget(ABC):
    """What the control client drives: an edge that applies configs and reports status."""

    role: str
    inbound: TypeAdapter[Any]

    @abstractmethod
    async def apply(self, config: Any) -> None:
        """Make the edge serve ``config``; raise :class:`ApplyError` and keep the last good one
        when it cannot."""

    @abstractmethod
    async def status_report(self) -> protocol.StatusReport: ...

    @abstractmethod
    def client_info(self) -> protocol.ClientInfo: ...

    def set_connected(self, connected: bool) -> None:  # noqa: B027 - optional hook
        """Called when the channel comes up or goes down."""

    def credentials_refused(self) -> None:  # noqa: B027 - optional hook
        """Called when control refuses the key the edge started with (its object is gone)."""


def backoff_delay(attempt: int, first: float = MIN_BACKOFF_SECONDS) -> float:
    """Exponential with jitter in its upper half: ``first``, twice that, ... up to 30 s."""
    ceiling = min(MAX_BACKOFF_SECONDS, first * 2**attempt)
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not secrecy


class ControlClient:
    def __init__(self, settings: EdgeSettings, edge: ConfigTarget) -> None:
        self.settings = settings
        self.edge = edge
        self.initial_key = self.api_key = settings.api_key.get_secret_value()
        self.node_name = settings.node_name
        self.applied_version = -1
        self.session_version = -1
        """The last config version applied in this session: versions order the configs of
        one session only (a restarted control counts afresh, whatever its clock says)."""
        self.heartbeat_seconds = protocol.DEFAULT_HEARTBEAT_SECONDS
        self.applied = asyncio.Event()
        """Set once any config has been applied."""
        self.report_wanted = False

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.settings.control_url.startswith("https://"):
            return False
        context = ssl.create_default_context()
        if self.settings.ca_file is not None:
            context.load_verify_locations(cafile=str(self.settings.ca_file))
        if self.settings.ca_pem:
            context.load_verify_locations(cadata=self.settings.ca_pem)
        return context

    async def run_forever(self) -> None:
        attempt = retries = 0
        # A connection attempt that hangs is given up after 10 s and retried.
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                started = time.monotonic()
                code = None
                try:
                    code = await self._session(http)
                except (aiohttp.ClientError, OSError, TimeoutError) as error:
                    log.warning("control channel: %s: %s", type(error).__name__, error)
                finally:
                    self.edge.set_connected(False)
                if time.monotonic() - started > STABLE_SESSION_SECONDS:
                    attempt = retries = 0
                if code == protocol.CLOSE_TRY_AGAIN:
                    delay = backoff_delay(retries, TRY_AGAIN_SECONDS)
                    retries = min(retries + 1, 16)
                else:
                    delay = backoff_delay(attempt)
                    attempt = min(attempt + 1, 16)
                    retries = 0
                log.info("reconnecting to control in %.1fs", delay)
                await asyncio.sleep(delay)

    async def _session(self, http: aiohttp.ClientSession) -> int | None:
        """One connection, until it closes; returns control's close code."""
        async with http.ws_connect(
            self.settings.websocket_url,
            ssl=self._ssl(),
            timeout=aiohttp.ClientWSTimeout(ws_close=5),
            autoping=True,
            max_msg_size=16 << 20,
        ) as socket:
            auth = protocol.AuthMessage(
                api_key=self.api_key,
                node_name=self.node_name,
                pod_token=self._pod_token() if self.node_name else None,
                client=self.edge.client_info(),
            )
            await socket.send_str(protocol.encode(auth))
            self.session_version = -1  # the first config of a session is applied, whatever
            log.info("connected to control at %s", self.settings.control_url)
            self.edge.set_connected(True)
            beats = asyncio.create_task(self._beat(socket))
            try:
                async for frame in socket:
                    if frame.type == aiohttp.WSMsgType.TEXT:
                        await self._handle(socket, frame.data)
                    elif frame.type == aiohttp.WSMsgType.ERROR:
                        break
            finally:
                beats.cancel()
                await asyncio.gather(beats, return_exceptions=True)
            code = socket.close_code
            if code == protocol.CLOSE_UNAUTHORIZED and self.api_key != self.initial_key:
                # The node's own key is gone (its Gateway was re-created): be admitted again.
                log.warning("control refused this node's key; presenting the pool's key again")
                self.api_key, self.node_name = self.initial_key, self.settings.node_name
            elif code == protocol.CLOSE_UNAUTHORIZED and self.node_name:
                # Kept: a pod's saved config stays while it proves itself again.
                log.error("control refused the pool's key with this pod's token (close code %s): "
                          "the pod must be the Gateway's DaemonSet pod on node %s, with its "
                          "projected token in --pod-token-file", code, self.node_name)  # fmt: skip
            elif code == protocol.CLOSE_UNAUTHORIZED:
                log.error("control refused this edge's API key (close code %s)", code)
                self.edge.credentials_refused()
            elif code == protocol.CLOSE_TRY_AGAIN:
                log.info("control is starting and does not know this key yet; trying again")
            elif code is not None:
                log.warning("control closed the channel (code %s)", code)
            return code

    def _pod_token(self) -> str | None:
        """The pod's projected token, as the kubelet last wrote it."""
        path = self.settings.pod_token_file
        if path is None:
            return None
        try:
            token = path.read_text().strip()
        except OSError as error:
            log.error("cannot read the pod token %s: %s", path, error.strerror)
            return None
        if not 0 < len(token) <= protocol.MAX_POD_TOKEN_BYTES:
            size = "empty" if not token else f"over {protocol.MAX_POD_TOKEN_BYTES} bytes"
            log.error("the pod token %s is %s: not sent", path, size)
            return None
        return token

    async def _handle(self, socket: aiohttp.ClientWebSocketResponse, text: str) -> None:
        try:
            message = self.edge.inbound.validate_json(text)
        except ValidationError as error:
            log.warning("ignored a frame from control: %s", error.errors()[:3])
            return
        if isinstance(message, protocol.IdentityMessage):
            # This node's own key: reconnections present it instead of the pool's.
            log.info("control admitted this node as %s", message.data.name)
            self.api_key, self.node_name = message.data.api_key, None
        elif isinstance(message, protocol.ErrorMessage):
            log.error("control: %s: %s", message.code, message.message)
        elif isinstance(message, protocol.AgentConfigMessage | protocol.GatewayConfigMessage):
            await self._apply(socket, message.data)

    async def _apply(self, socket: aiohttp.ClientWebSocketResponse, config: Any) -> None:
        version = int(config.version)
        if version <= self.session_version:  # overtaken within this session
            ack = protocol.AckMessage(version=self.session_version)
        else:
            try:
                await self.edge.apply(config)
            except ApplyError as error:
                log.error("config %d not applied: %s", version, error)
                ack = protocol.AckMessage(version=version, ok=False, error=str(error)[:4096])
            else:
                self.applied_version = self.session_version = version
                self.heartbeat_seconds = float(config.heartbeat_seconds)
                self.applied.set()
                ack = protocol.AckMessage(version=version)
        await socket.send_str(protocol.encode(ack))
        await self._report(socket)

    async def _report(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        report = await self.edge.status_report()
        await socket.send_str(protocol.encode(protocol.StatusMessage(data=report)))

    def report_soon(self) -> None:
        """Send a status report within a second (something control shows has changed)."""
        self.report_wanted = True

    async def _beat(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        last_report = last_beat = time.monotonic()
        while not socket.closed:
            # Short naps: the interval control asks for may be shorter than the default.
            await asyncio.sleep(min(1.0, self.heartbeat_seconds))
            if self.report_wanted:
                self.report_wanted = False
                last_report = time.monotonic()
                with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                    await self._report(socket)
            if time.monotonic() - last_beat < self.heartbeat_seconds:
                continue
            last_beat = time.monotonic()
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                beat = protocol.HeartbeatMessage(sent_at=datetime.now(UTC))
                await socket.send_str(protocol.encode(beat))
                if time.monotonic() - last_report >= self.settings.status_interval:
                    last_report = time.monotonic()
                    await self._report(socket)
