"""Tunnel reconciler: record what the Tunnel asks for and give it a Certificate.

Readiness is not decided here: it depends on the Agent, the other claims on the domain and the
certificate, so :mod:`kakuremichi.control.projector` computes it from the whole state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kakuremichi.api.conditions import READY, find_condition
from kakuremichi.api.resources import (
    API_VERSION,
    CERTIFICATE,
    TUNNEL,
    CertificateSpec,
    TunnelSpec,
    TunnelStatus,
)
from kakuremichi.control.context import Context
from kakuremichi.control.ownership import TunnelFacts
from kakuremichi.control.projector import restored_claim
from kakuremichi.control.reconciler import register_reconciler

log = logging.getLogger(__name__)


def certificate_spec(name: str, spec: TunnelSpec) -> CertificateSpec:
    """The Certificate a Tunnel needs: same name, its domain, its TLS choice."""
    return CertificateSpec(
        domain=spec.domain,
        secret_name=spec.tls.secret_name or f"{name}-tls",
        issuer=spec.tls.issuer,
    )


async def reconcile(context: Context, body: kopf.Body, patch: kopf.Patch) -> None:
    meta = body.metadata
    namespace, name = meta.namespace or "", meta.name or ""
    spec = TunnelSpec.model_validate(dict(body.spec))
    wanted = certificate_spec(name, spec).model_dump(mode="json", by_alias=True)
    certificate = {
        "apiVersion": API_VERSION,
        "kind": CERTIFICATE.kind,
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "kakuremichi"},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": TUNNEL.kind,
                    "name": name,
                    "uid": meta.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": wanted,
    }
    # The claim first: the Certificate's reconcile may run at once and asks whether its
    # Tunnel holds the domain before it orders a certificate.
    context.state.seed_tunnel_conditions(
        UUID(meta.uid), TunnelStatus.model_validate(dict(body.status)).conditions
    )
    context.state.set_tunnel(facts_of(meta, spec))
    if spec.protocol != "HTTP":
        return  # passed through or forwarded: the gateways need no certificate of theirs
    # A Tunnel seen for the first time has no Certificate yet: create it without asking first
    # (one call instead of two for each new Tunnel); otherwise look, and fix what differs.
    created_now = False
    if not body.status.get("certificate"):
        try:
            await context.kube.create_object(CERTIFICATE, namespace, certificate)
            created_now = True
        except ApiException as error:
            if error.status != 409:
                raise
    if not created_now:
        existing = await context.kube.get_object(CERTIFICATE, namespace, name)
        if existing is None:
            await context.kube.create_object(CERTIFICATE, namespace, certificate)
        elif {k: existing["spec"].get(k) for k in wanted} != wanted:
            await context.kube.patch_object(CERTIFICATE, namespace, name, {"spec": wanted})

    # No status here: the projector writes url and certificate with the Ready condition, in one
    # patch instead of two (and one watch event fewer per new Tunnel).
    del patch


def facts_of(meta: Mapping[str, Any], spec: TunnelSpec) -> TunnelFacts:
    return TunnelFacts(
        id=UUID(meta["uid"]),
        namespace=meta.get("namespace") or "",
        name=meta["name"],
        domain=spec.domain,
        agent=spec.agent,
        target=spec.target,
        enabled=spec.enabled,
        created=datetime.fromisoformat(str(meta["creationTimestamp"]).replace("Z", "+00:00")),
        generation=int(meta.get("generation") or 0),
        certificate=meta["name"],
        description=spec.description,
        app_protocol=spec.app_protocol,
        hsts=spec.hsts,
        protocol=spec.protocol,
        port=spec.port,
        proxy_protocol=spec.proxy_protocol,
    )


async def restore_claims(context: Context) -> set[UUID]:
    """Record every Tunnel's claim before any reconcile runs. Reconciles come in any order:
    without this, a younger claim reconciled first would hold its domain, and be routed to,
    until the older one's turn came. Returns the Tunnels restored."""
    state, restored = context.state, set()
    async for page in context.kube.pages(TUNNEL, context.settings.namespaces):
        for found in page:
            try:
                spec = TunnelSpec.model_validate(found.get("spec") or {})
                status = TunnelStatus.model_validate(found.get("status") or {})
            except ValidationError:  # its reconcile says why
                continue
            facts = facts_of(found["metadata"], spec)
            state.seed_tunnel_conditions(facts.id, status.conditions)
            # When its claim began: as sealed into status, or (none there) from its creation,
            # unless it was refused (quota, policy) then: its claim begins when allowed.
            ready = find_condition(status.conditions, READY)
            refused = ready is not None and ready.reason in ("QuotaExceeded", "DomainNotAllowed")
            state.restore_claim(facts.id, restored_claim(state.sealer, facts, status), refused)
            state.set_tunnel(facts)
            restored.add(facts.id)
    return restored


async def forget_vanished(context: Context, restored: set[UUID]) -> None:
    """Tunnels have no finalizer: one deleted between the start-up listing and the first watch
    sends no event, and would keep holding its domain. Drop those restored at the start that
    are no longer listed (only those: one created since may be missing from this listing)."""
    listed: set[UUID] = set()
    async for page in context.kube.pages(TUNNEL, context.settings.namespaces):
        listed |= {UUID(found["metadata"]["uid"]) for found in page}
    for vanished in (restored & set(context.state.tunnels)) - listed:
        log.info("Tunnel %s was deleted meanwhile: forgotten", vanished)
        context.state.remove_tunnel(vanished)


async def cleanup(context: Context, body: kopf.Body) -> None:
    # The Certificate it owns is garbage-collected with it; the tunnels table follows the state
    # (the projector's next pass drops the row).
    context.state.remove_tunnel(UUID(body.metadata.uid))


def register(registry: kopf.OperatorRegistry, context: Context) -> None:
    # No finalizer: all the cleanup concerns is the in-memory state (rebuilt from the cluster on
    # every start) and the tunnels table (written from that state).
    register_reconciler(registry, context, TUNNEL, reconcile, cleanup, finalizer=False)
