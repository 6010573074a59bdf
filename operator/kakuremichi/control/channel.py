"""The control channel: one WebSocket per edge at ``/ws`` (see docs/protocol.md); what else
control serves over HTTP is ``http_endpoints``.

The first frame must be ``auth`` with a known API key. A bad key gets close code 4401 and
nothing else; a missing, late (10 s), malformed or oversized first frame gets 4400 (more than
4 KiB before ``auth`` is refused as its frame header arrives, unread: ``preauth_frames``);
failures from one address are answered ever more slowly. An authenticated edge gets its
``config`` at once and again whenever what it should run changes (bursts coalesce), each with a
newer version.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID

from aiohttp import WSMsgType, web
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kakuremichi.api import protocol
from kakuremichi.api.resources import GATEWAY
from kakuremichi.control import gateways, metrics, node_admission
from kakuremichi.control.addressing import AllocationError
from kakuremichi.control.context import Context
from kakuremichi.control.credentials_secret import PRIVATE_KEY
from kakuremichi.control.preauth_frames import GuardedWebSocketResponse
from kakuremichi.control.reconciler import reconcile_again
from kakuremichi.control.state import EdgeIdentity
from kakuremichi.control.topology import EdgeRole, edge_config, edge_inputs, serves

AUTH_TIMEOUT_SECONDS = 10.0
MAX_MESSAGE_BYTES = 1 << 20
"""An authenticated edge's messages (status reports); before ``auth``, 4 KiB in all."""
CLOSE_HANDSHAKE_SECONDS = 2.0
"""How long a closing connection waits for the edge's close frame."""
KEY_READ_SECONDS = 3.0
"""An edge's private key is read from its Secret; a session never waits longer than this."""
KEY_RETRY_SECONDS = 5.0
POD_PROOF_SECONDS = 5.0
"""A gateway pod's token review and pod read; past this the pod is told to try again."""
POD_PROOFS_AT_ONCE = 4
"""Pods proving themselves at once (pods start one per node, and retry)."""
STARTUP_POLL_SECONDS = 0.25
FAILURE_WINDOW_SECONDS = 60.0
FAILURES_BEFORE_SLOWDOWN = 5
MAX_FAILURE_DELAY_SECONDS = 5.0
log = logging.getLogger(__name__)


class VersionClock:
    """Config versions: a counter of this control process, no wall clock. They order the configs
    within one session; an edge applies the first config of every session, so a restarted
    control (whose clock may be behind) is never ignored."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last += 1
        return self._last


@dataclass
class Session:
    identity: EdgeIdentity
    socket: web.WebSocketResponse
    remote: str
    connected_at: datetime
    last_seen: float = field(default_factory=time.monotonic)
    sent: str | None = None
    """The last config sent, as JSON without its version."""
    sent_version: int = 0
    inputs: tuple[object, ...] | None = None
    """What that config was rendered from (``topology.*_inputs``): unchanged inputs skip the
    rendering, so a change that concerns some edges costs the others next to nothing."""
    acked_version: int = 0
    client: protocol.ClientInfo | None = None
    replaced: asyncio.Event = field(default_factory=asyncio.Event)
    private_key: str | None = None
    """The edge's WireGuard private key, read from its Secret once per session (keys are never
    rotated under a live identity): a change that fans out to every edge must not cost one API
    call per connected edge."""


class FailureThrottle:
    """Slows down addresses that keep presenting bad credentials. Failures older than the
    window are forgotten, and so are addresses with none left: many addresses failing once
    cost no memory for long."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._now = now
        self._pruned = now()

    def record(self, remote: str) -> None:
        now = self._now()
        self._failures.setdefault(remote, deque()).append(now)
        if now - self._pruned > FAILURE_WINDOW_SECONDS:
            self._prune(now)

    def delay(self, remote: str) -> float:
        recent = self._failures.get(remote)
        if recent is None:
            return 0.0
        cutoff = self._now() - FAILURE_WINDOW_SECONDS
        while recent and recent[0] < cutoff:
            recent.popleft()
        if not recent:
            del self._failures[remote]
            return 0.0
        excess = len(recent) - FAILURES_BEFORE_SLOWDOWN
        return 0.0 if excess < 0 else min(MAX_FAILURE_DELAY_SECONDS, 0.25 * 2**excess)

    def tracked(self) -> int:
        return len(self._failures)

    def _prune(self, now: float) -> None:
        self._pruned = now
        cutoff = now - FAILURE_WINDOW_SECONDS
        for remote in [r for r, times in self._failures.items() if times[-1] < cutoff]:
            del self._failures[remote]


class ControlChannel:
    def __init__(self, context: Context) -> None:
        self.context = context
        self.sessions: dict[UUID, Session] = {}
        self.throttle = FailureThrottle()
        self.versions = VersionClock()
        self.unauthenticated: defaultdict[str, int] = defaultdict(int)
        """Connections not yet authenticated, by address."""
        self.pod_proofs = asyncio.Semaphore(POD_PROOFS_AT_ONCE)
        """Token reviews in flight: each holds a Kubernetes worker thread."""

    def connected(self) -> Counter[str]:
        """Connected edges by role."""
        return Counter(session.identity.role for session in self.sessions.values())

    # --- connection -----------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        remote = request.remote or "unknown"
        settings = self.context.settings
        if (
            sum(self.unauthenticated.values()) >= settings.max_unauthenticated
            or self.unauthenticated[remote] >= settings.max_unauthenticated_per_address
        ):
            metrics.auth_failures.labels("too_many_unauthenticated").inc()
            return web.Response(status=503, text="too many connections waiting to authenticate\n",
                                headers={"Retry-After": "2"})  # fmt: skip
        socket = GuardedWebSocketResponse(
            pre_auth_limit=protocol.MAX_AUTH_FRAME_BYTES,
            max_msg_size=MAX_MESSAGE_BYTES,
            timeout=CLOSE_HANDSHAKE_SECONDS,
        )
        # Until it is authenticated (a pool's pod: proven), a connection holds a place of the
        # caps and may send 4 KiB.
        self.unauthenticated[remote] += 1
        try:
            await socket.prepare(request)
            auth = await self._authenticate(socket, remote)
            if auth is not None and auth[0].role == "pool":
                auth = auth if await self._prove_pod(socket, *auth, remote) else None
            if auth is not None and not socket.authenticated():
                auth = None  # refused by the guard meanwhile: its close is under way
        except ConnectionError:  # gone while we were talking (say, answering its ping)
            auth = None
        finally:
            self.unauthenticated[remote] -= 1
            if not self.unauthenticated[remote]:
                del self.unauthenticated[remote]
        if auth is None:
            return socket
        identity, message = auth
        if identity.role == "pool":
            admitted = await self._admit_node(socket, identity, message)
            if admitted is None:
                return socket
            identity = admitted
        elif identity.id in self.context.state.pending_gateways:
            try:
                gateway = await node_admission.adopt_address(self.context, identity.id, remote)
            except node_admission.NodeRefused as error:
                await self._refuse(socket, "no_address", str(error))
                return socket
            # Its reconcile serves it now (and is the one that says Ready).
            await reconcile_again(self.context, GATEWAY, gateways.reconcile, "", gateway)
        if identity.role == "gateway" and message.client and message.client.boot_id:
            self.context.state.gateway_booted(identity.id, message.client.boot_id)
        session = Session(identity, socket, remote, datetime.now(UTC), client=message.client)
        previous = self.sessions.get(identity.id)
        self.sessions[identity.id] = session
        if previous is not None:
            previous.replaced.set()  # its own handler closes it (one reader per socket)
        log.info("%s %s connected from %s", identity.role, identity.id, remote)
        secure = request.secure or (self.context.settings.trust_loopback and _is_loopback(remote))
        pusher = asyncio.create_task(self._push_loop(session, secure))
        try:
            self.context.presence.connected(identity, message.client)
            await self._receive_loop(session)
        finally:
            pusher.cancel()
            await asyncio.gather(pusher, return_exceptions=True)
            if self.sessions.get(identity.id) is session:
                del self.sessions[identity.id]
                self.context.presence.disconnected(identity)
            log.info("%s %s disconnected", identity.role, identity.id)
        return socket

    async def _close(self, socket: GuardedWebSocketResponse, code: int, why: bytes) -> None:
        """Close, waiting at most a few seconds for the client: one that does not read (its
        pongs piling up unsent) must not hold its place, or the connection, any longer."""
        try:
            async with asyncio.timeout(CLOSE_HANDSHAKE_SECONDS):
                await socket.close(code=code, message=why)
        except TimeoutError:
            socket.abort()

    async def _authenticate(
        self, socket: GuardedWebSocketResponse, remote: str
    ) -> tuple[EdgeIdentity, protocol.AuthMessage] | None:
        delay = self.throttle.delay(remote)
        try:
            frame = await asyncio.wait_for(socket.receive(), AUTH_TIMEOUT_SECONDS)
        except TimeoutError:
            metrics.auth_failures.labels("timeout").inc()
            await self._close(socket, protocol.CLOSE_BAD_REQUEST, b"auth timeout")
            return None
        if delay:
            await asyncio.sleep(delay)
        if frame.type != WSMsgType.TEXT or len(frame.data.encode()) > protocol.MAX_AUTH_FRAME_BYTES:
            self.throttle.record(remote)
            oversized = socket.pre_auth is not None and socket.pre_auth.refused
            metrics.auth_failures.labels("too_large" if oversized else "malformed").inc()
            await self._close(socket, protocol.CLOSE_BAD_REQUEST, b"bad first frame")
            return None
        try:
            message = protocol.client_message.validate_json(frame.data)
        except ValidationError:
            message = None
        if not isinstance(message, protocol.AuthMessage):
            self.throttle.record(remote)
            metrics.auth_failures.labels("malformed").inc()
            await self._close(socket, protocol.CLOSE_BAD_REQUEST, b"expected auth")
            return None
        identity = self.context.state.authenticate(message.api_key)
        if identity is None and self.context.state.startup.open:
            metrics.auth_deferred.inc()
            await self._close(socket, protocol.CLOSE_TRY_AGAIN, b"starting")
            return None
        if identity is None:
            self.throttle.record(remote)
            metrics.auth_failures.labels("unknown_key").inc()
            log.warning("refused an unknown API key from %s", remote)
            await self._close(socket, protocol.CLOSE_UNAUTHORIZED, b"unauthorized")
            return None
        return identity, message

    async def _prove_pod(
        self,
        socket: GuardedWebSocketResponse,
        pool: EdgeIdentity,
        message: protocol.AuthMessage,
        remote: str,
    ) -> bool:
        """A connection presented a pool's key: True when its token proves it is the pool's pod
        on the node it names; otherwise it is closed (4401, or 4503 when that cannot be told
        now)."""
        if self.pod_proofs.locked():  # the API server is slow, or someone is hammering
            self.throttle.record(remote)
            metrics.auth_deferred.inc()
            await self._close(socket, protocol.CLOSE_TRY_AGAIN, b"try again")
            return False
        try:
            async with self.pod_proofs:
                unproven = await asyncio.wait_for(
                    node_admission.pod_refusal(
                        self.context, pool.id, message.node_name or "", message.pod_token
                    ),
                    POD_PROOF_SECONDS,
                )
        except Exception as error:  # the API server is away, or refuses us: neither yes nor no
            log.log(
                logging.ERROR if _our_fault(error) else logging.WARNING,
                "cannot check the pod token from %s now: %s", remote, _describe(error),
            )  # fmt: skip
            metrics.auth_deferred.inc()
            await self._close(socket, protocol.CLOSE_TRY_AGAIN, b"try again")
            return False
        if unproven is not None:
            self.throttle.record(remote)
            metrics.auth_failures.labels("pod_unproven").inc()
            log.warning("refused a pool's key from %s: %s", remote, unproven)
            await self._close(socket, protocol.CLOSE_UNAUTHORIZED, b"unauthorized")
            return False
        return True

    async def _admit_node(
        self, socket: GuardedWebSocketResponse, pool: EdgeIdentity, message: protocol.AuthMessage
    ) -> EdgeIdentity | None:
        """A proven pod: make (or find) its node's own identity and hand its key over."""
        node = message.node_name or ""  # (proven: the pod runs there)
        try:
            gateway_id, api_key = await node_admission.admit_node(self.context, pool.id, node)
        except (node_admission.NodeRefused, AllocationError) as error:
            await self._refuse(socket, "node_refused", str(error))
            return None
        except Exception:
            log.exception("admitting node %s failed", node)
            await self._refuse(
                socket, "node_refused", "control could not admit this node now; retry later"
            )
            return None
        name = self.context.state.gateways[gateway_id].name
        await socket.send_str(
            protocol.encode(
                protocol.IdentityMessage(data=protocol.Identity(name=name, api_key=api_key))
            )
        )
        return EdgeIdentity("gateway", gateway_id)

    async def _refuse(self, socket: GuardedWebSocketResponse, code: str, why: str) -> None:
        """Tell an authenticated edge why it cannot be served, and close."""
        with contextlib.suppress(ConnectionError):
            await socket.send_str(protocol.encode(protocol.ErrorMessage(code=code, message=why)))
        await self._close(socket, protocol.CLOSE_BAD_REQUEST, code.encode())

    async def _receive_loop(self, session: Session) -> None:
        timeout = self.context.settings.heartbeat_timeout
        while True:
            receive = asyncio.ensure_future(session.socket.receive(timeout=timeout))
            replaced = asyncio.ensure_future(session.replaced.wait())
            await asyncio.wait({receive, replaced}, return_when=asyncio.FIRST_COMPLETED)
            replaced.cancel()
            if session.replaced.is_set():
                receive.cancel()
                await asyncio.gather(receive, return_exceptions=True)
                await session.socket.close(code=protocol.CLOSE_REPLACED, message=b"replaced")
                return
            try:
                frame = receive.result()
            except TimeoutError:
                log.info(
                    "%s %s silent for %.0fs", session.identity.role, session.identity.id, timeout
                )
                await session.socket.close(code=protocol.CLOSE_TIMEOUT, message=b"silent")
                return
            if frame.type in (
                WSMsgType.CLOSE,
                WSMsgType.CLOSING,
                WSMsgType.CLOSED,
                WSMsgType.ERROR,
            ):
                return
            if frame.type != WSMsgType.TEXT:
                continue
            session.last_seen = time.monotonic()
            try:
                message = protocol.client_message.validate_json(frame.data)
            except ValidationError as error:
                log.warning("malformed frame from %s: %s", session.identity.id, error)
                continue
            if isinstance(message, protocol.AckMessage):
                session.acked_version = max(session.acked_version, message.version)
                if not message.ok:
                    log.warning(
                        "%s %s refused config %d: %s",
                        session.identity.role, session.identity.id, message.version, message.error,
                    )  # fmt: skip
                self.context.presence.acknowledged(session.identity, message)
            elif isinstance(message, protocol.StatusMessage):
                session.client = message.data.client
                self.context.presence.reported(session.identity, message.data)
            self.context.presence.seen(session.identity)

    # --- pushing ----------------------------------------------------------------------------

    async def _push_loop(self, session: Session, secure: bool) -> None:
        state = self.context.state
        seen = -1
        # A control that has just started is still rebuilding its state (gateway pools re-admit
        # their nodes as they reconcile): a config from it now could lack a gateway, and the
        # agent would drop that gateway's connections. Edges keep serving what they have (their
        # saved config) until the state is whole.
        for _ in itertools.count():
            if not state.startup.open:
                break
            await asyncio.sleep(STARTUP_POLL_SECONDS)
        while True:
            seen = state.generation
            try:
                complete = await self._push(session, secure)
            except Exception:  # a failure must not silence the edge for good
                log.exception("pushing config to %s failed; retrying", session.identity.id)
                await asyncio.sleep(1)
                continue
            if complete:
                await state.changed(seen)
            else:  # sent without the private key (the API server is away): again soon
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.changed(seen), KEY_RETRY_SECONDS)
            await asyncio.sleep(0.05)  # let a burst of changes settle into one push

    async def _push(self, session: Session, secure: bool) -> bool:
        """Send the edge its config if it changed; False when it went without the private key
        the edge may need (its Secret could not be read: try again later)."""
        identity = session.identity
        role: EdgeRole = "agent" if identity.role == "agent" else "gateway"
        topology = self.context.state.snapshot().topology
        if not serves(topology, role, identity.id):
            return True
        complete = True
        if secure and session.private_key is None:
            # Never wait on the API server here: an edge that holds its key (saved config,
            # key file) is served from the cached state while the API server is away.
            try:
                session.private_key = await asyncio.wait_for(
                    self._private_key(identity), KEY_READ_SECONDS
                )
            except Exception as error:
                log.warning("cannot read the key of %s %s now (%s): config sent without it",
                            identity.role, identity.id, type(error).__name__)  # fmt: skip
                complete = False
        private_key = session.private_key if secure else None
        # Edges beat three times per timeout, so one lost beat never marks them offline.
        heartbeat_seconds = self.context.settings.heartbeat_timeout / 3
        # Certificates carry private keys: over plain HTTP from elsewhere they stay home.
        inputs = edge_inputs(topology, role, identity.id, with_certificates=secure)
        inputs += (private_key, heartbeat_seconds)
        if inputs == session.inputs:
            return complete
        rendered = edge_config(topology, role, identity.id, private_key, secure, heartbeat_seconds)
        comparable = rendered.model_dump_json(exclude={"version"})
        if comparable == session.sent:
            session.inputs = inputs
            return complete
        version = self.versions.next()
        data = rendered.model_copy(update={"version": version})
        message = (
            protocol.AgentConfigMessage(data=data)
            if isinstance(data, protocol.AgentConfig)
            else protocol.GatewayConfigMessage(data=data)
        )
        await session.socket.send_str(protocol.encode(message))
        session.sent, session.sent_version, session.inputs = comparable, version, inputs
        metrics.config_pushes.labels(identity.role).inc()
        return complete

    async def _private_key(self, identity: EdgeIdentity) -> str | None:
        location = self.context.state.credential_secrets.get(identity.id)
        if location is None:
            return None
        data = await self.context.kube.read_secret(*location)
        return (data or {}).get(PRIVATE_KEY)


def _our_fault(error: Exception) -> bool:
    """An answer that will not change by itself: the API server refusing our own request (a
    missing RBAC rule, say), unlike a timeout or an unreachable server."""
    if isinstance(error, ApiException):
        return error.status is not None and 400 <= error.status < 500 and error.status != 429
    return False


def _describe(error: Exception) -> str:
    if isinstance(error, ApiException):
        return f"the API server answered {error.status} {error.reason}"
    return f"{type(error).__name__} {error}".strip()


def _is_loopback(remote: str) -> bool:
    try:
        return ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False
