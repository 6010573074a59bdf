"""``kakuremichi operator``: the kopf operator and the control channel in one process and one
event loop."""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import threading
import warnings
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import kopf
from aiohttp import web
from sqlalchemy.engine import make_url

from kakuremichi.control import (
    agents,
    certificates,
    gateways,
    ingresses,
    node_admission,
    tenancy,
    tunnels,
    webhook,
)
from kakuremichi.control.acme_issuer import AcmeIssuer
from kakuremichi.control.addressing import SubnetAllocator
from kakuremichi.control.channel import ControlChannel
from kakuremichi.control.context import Context
from kakuremichi.control.http_endpoints import HttpEndpoints
from kakuremichi.control.kube import Kube, load_api_client
from kakuremichi.control.manifests import CERTIFICATE_LABEL
from kakuremichi.control.mirror import Mirror
from kakuremichi.control.presence import Presence, settle_after_start
from kakuremichi.control.projector import Projector
from kakuremichi.control.settings import ControlSettings
from kakuremichi.control.state import ControlState
from kakuremichi.control.status_writer import StatusWriter
from kakuremichi.control.store import Sealer

PREFIX = "kakuremichi.io"
log = logging.getLogger("kakuremichi.operator")


SEALING_KEY = "sealing.key"


class SealingKeyConflict(RuntimeError):
    """The Secret and a key file hold different keys: which one seals the data is unknown."""


def sealing_key_path(settings: ControlSettings) -> Path:
    if settings.sealing_key_file is not None:
        return settings.sealing_key_file
    database = make_url(settings.db_url).database or "kakuremichi.db"
    return Path(database).resolve().parent / SEALING_KEY


async def load_sealer(settings: ControlSettings, kube: Kube) -> Sealer:
    """The database's sealing key. With ``--sealing-key-secret``: from that Secret, made on first
    start from the key file beside the database when there is one (the file is then removed:
    a snapshot of the data volume no longer holds the key to its sealed values), else new.
    Without: the key file, created on first start (mode 0600)."""
    path = sealing_key_path(settings)
    name = settings.sealing_key_secret
    if name is None:
        return load_key_file(path)
    namespace = settings.system_namespace
    stored = (await kube.read_secret(namespace, name) or {}).get(SEALING_KEY)
    legacy = path.read_text().strip() if path.exists() else None
    if stored is None:
        text = legacy or base64.b64encode(Sealer.generate_key()).decode()
        Sealer.from_key_text(text, f"the sealing key at {path}")  # refuse a broken one first
        labels = {"app.kubernetes.io/managed-by": "kakuremichi"}
        if not await kube.create_secret(namespace, name, {SEALING_KEY: text}, None, labels):
            return await load_sealer(settings, kube)  # made meanwhile: use that one
        log.info("the sealing key is in Secret %s/%s%s", namespace, name,
                 f" (moved from {path})" if legacy else " (new)")  # fmt: skip
        stored = text
    elif legacy is not None and legacy != stored.strip():
        raise SealingKeyConflict(
            f"Secret {namespace}/{name} and {path} hold different sealing keys; keep the one "
            f"that sealed the database ({path} if it predates the Secret) and remove the other"
        )
    if legacy is not None:
        path.unlink()
    return Sealer.from_key_text(stored, f"Secret {namespace}/{name}")


def load_key_file(path: Path) -> Sealer:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(base64.b64encode(Sealer.generate_key()).decode() + "\n")
        log.info("generated a new sealing key at %s", path)
    return Sealer.from_key_file(path)


# kopf's own HTTP session opens a new connection for every request in flight, without a
# limit: a burst of thousands of new objects held hundreds of TLS connections (each with its
# buffers, over 100 KiB) and most of the operator's memory. Requests beyond these wait instead.
KOPF_REQUEST_CONNECTIONS = 32
WATCH_STREAMS_PER_NAMESPACE = 6  # agents, tunnels, certificates, secrets, and some to spare
LIST_CHUNK_SIZE = 500
"""Objects per page when kopf lists a resource (at the start of each watch)."""
KOPF_WORKERS_PER_KIND = 200
"""Objects of one kind that kopf handles at once (the rest wait in the watch stream)."""
KOPF_WORKER_IDLE_SECONDS = 1.0


def bounded_session(info: kopf.ConnectionInfo, namespaces: tuple[str, ...]) -> kopf.AiohttpSession:
    """kopf's session as kopf would build it from ``info``, with a bounded connection pool (the
    long-lived watch streams get connections of their own on top of the requests')."""
    streams = WATCH_STREAMS_PER_NAMESPACE * max(1, len(namespaces)) + 4  # + cluster-scoped kinds
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="kopf")
        auth = info.as_aiohttp_basic_auth()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=KOPF_REQUEST_CONNECTIONS + streams, ssl=info.as_ssl_context()
        ),
        headers=info.as_http_headers(),
        auth=auth,
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        server=info.server,
        priority=info.priority,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
        aiohttp_session=session,
    )


VANISHED_CHECKS_SECONDS = (30.0, 300.0)
"""After a start: when to look for objects without finalizer deleted before the watches began."""


async def forget_vanished(
    context: Context, tunnel_uids: set[UUID], policies: set[str],
    routes: ingresses.IngressController | None,
) -> None:  # fmt: skip
    started = asyncio.get_running_loop().time()
    for after in VANISHED_CHECKS_SECONDS:
        await asyncio.sleep(max(0.0, started + after - asyncio.get_running_loop().time()))
        try:
            await tunnels.forget_vanished(context, tunnel_uids)
            await tenancy.forget_vanished(context, policies)
            if routes is not None:
                await routes.forget_vanished()
        except Exception:  # the next check tries again
            log.exception("looking for objects deleted during the start failed")


def build_registry(context: Context) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    tasks: list[asyncio.Task[None]] = []
    acme = AcmeIssuer(context)
    ingress = ingresses.register(registry, context)

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
        info = kopf.login_via_client(**kwargs)
        return None if info is None else bounded_session(info, context.settings.namespaces)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Handler progress and the diff base live in annotations under our own prefix: the CRD
        # schemas prune unknown status fields, and other kopf operators keep their own keys.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=PREFIX, key="last-handled-configuration"
        )
        settings.persistence.finalizer = f"{PREFIX}/finalizer"
        settings.posting.level = logging.INFO
        # kopf lists everything again whenever a watch restarts; in pages, the decoded body of
        # one LIST of thousands of Tunnels (~80 MiB of Python objects at 5,000) is never whole.
        settings.watching.chunk_size = LIST_CHUNK_SIZE
        # At most this many objects of a kind in flight: a burst (5,000 Tunnels applied at once,
        # or a restart's resume) is worked through a window of objects instead of all at once,
        # each with its body, handler and queued API calls alive; peak RSS at 250 Agents / 5,000
        # Tunnels fell from ~430 to ~260 MiB, and the run got faster. An idle per-object worker
        # leaves after a second (kopf's default, 5 s, would hold a place that long).
        settings.queueing.worker_limit = KOPF_WORKERS_PER_KIND
        settings.queueing.idle_timeout = KOPF_WORKER_IDLE_SECONDS
        # Secrets: the API server sends only those labelled for Certificates, so the operator
        # neither streams nor keeps every Secret of the cluster; the others a Certificate
        # reads are read by name (certificates.recheck_sources).
        settings.watching.label_selectors["", "v1", "secrets"] = CERTIFICATE_LABEL
        if context.settings.webhook_listen:
            service = context.settings.webhook_service
            webhook.configure(
                settings,
                context.settings.webhook_listen,
                context.settings.webhook_host,
                context.settings.webhook_cert_dir,
                webhook.ServiceReference.parse(service) if service else None,
            )
        # The facts every decision needs, before any reconcile: policies first (quotas), then
        # the Agents (their claims and subnets), the gateways, and every Tunnel's claim, so no
        # younger claim is ever routed while an older one waits for its reconcile.
        policies = await tenancy.restore(context)
        edges = await agents.restore_allocations(context)
        edges |= await gateways.restore_indexes(context)
        context.state.startup.expect(edges)  # their keys are known once each is reconciled
        restored = await tunnels.restore_claims(context)
        if ingress is not None:  # (its claims weigh against those, from the first decision)
            await ingress.restore()
            tasks.append(asyncio.create_task(ingress.run(), name="ingresses"))
        tasks.append(asyncio.create_task(Projector(context).run(), name="projector"))
        tasks.append(asyncio.create_task(acme.run(), name="acme"))
        tasks.append(
            asyncio.create_task(
                settle_after_start(context.state, context.settings.heartbeat_timeout),
                name="settle presence",
            )
        )
        tasks.append(asyncio.create_task(certificates.follow_acme(context), name="follow acme"))
        tasks.append(asyncio.create_task(certificates.recheck(context), name="recheck"))
        tasks.append(
            asyncio.create_task(certificates.recheck_sources(context), name="recheck sources")
        )
        tasks.append(asyncio.create_task(agents.readmit(context), name="readmit"))
        tasks.append(
            asyncio.create_task(
                forget_vanished(context, restored, policies, ingress), name="forget vanished"
            )
        )

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await acme.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    agents.register(registry, context)
    gateways.register(registry, context)
    node_admission.register(registry, context)
    tunnels.register(registry, context)
    certificates.register(registry, context)
    tenancy.register(registry, context)
    if context.settings.webhook_listen:  # kopf refuses admission handlers without a server
        webhook.register(registry, context)
    return registry


async def run(
    settings: ControlSettings,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    liveness_endpoint: str | None = None,
) -> None:
    mirror = await asyncio.to_thread(Mirror, settings.db_url)
    kube = Kube(load_api_client())
    state = ControlState(await load_sealer(settings, kube), SubnetAllocator(settings.subnet_pool()))
    statuses = StatusWriter(kube)
    context = Context(
        settings=settings,
        state=state,
        kube=kube,
        mirror=mirror,
        presence=Presence(state, mirror, statuses),
        statuses=statuses,
    )
    channel = ControlChannel(context)
    runner = web.AppRunner(HttpEndpoints(settings, channel).app(), access_log=None)
    await runner.setup()
    host, _, port = settings.control_listen.rpartition(":")
    tls = None
    if settings.control_tls_cert and settings.control_tls_key:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(settings.control_tls_cert, settings.control_tls_key)
    await web.TCPSite(runner, host.strip("[]") or None, int(port), ssl_context=tls).start()
    log.info("control channel listening on %s (edges use %s)", settings.control_listen,
             settings.control_url)  # fmt: skip
    presence = asyncio.create_task(context.presence.run(), name="presence")
    try:
        await kopf.operator(
            registry=build_registry(context),
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            standalone=True,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            liveness_endpoint=liveness_endpoint,
        )
    finally:
        presence.cancel()
        await runner.cleanup()
