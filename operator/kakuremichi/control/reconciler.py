"""How every kind is wired into kopf: one idempotent reconcile for create, update and resume
(level-triggered, so a restart or a repeated event does no harm), and a cleanup on deletion.

The cleanup runs behind kopf's finalizer, or, for kinds whose cleanup only concerns what the
operator rebuilds on every start anyway (``finalizer=False``: in-memory state, mirror rows the
start-up prune drops), on the watch's ``DELETED`` event: no finalizer to add and take off, so
two writes and two watch events fewer per object. A deletion while the operator is away is then
covered by the start-up rebuild instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import kopf

from kakuremichi.api.resources import GROUP, VERSION, ResourceKind
from kakuremichi.control.context import Context
from kakuremichi.control.metrics import counted

Reconcile = Callable[[Context, kopf.Body, kopf.Patch], Awaitable[None]]
Cleanup = Callable[[Context, kopf.Body], Awaitable[None]]


async def reconcile_again(
    context: Context, kind: ResourceKind, reconcile: Reconcile, namespace: str, name: str
) -> None:
    """Run ``reconcile`` on the object as it is now, outside its own events (something it
    depends on changed), and write its status the way :func:`register_reconciler` does."""
    async with context.statuses.lock(kind, namespace, name):
        found = await context.kube.get_object(kind, namespace, name)
        if found is None or found.get("metadata", {}).get("deletionTimestamp"):
            return
        patch = kopf.Patch()
        try:
            await reconcile(context, kopf.Body(cast(kopf.RawBody, found)), patch)
        finally:  # (also when it failed: the status then says why)
            status = patch.pop("status", None)
            if status:
                await context.statuses.write(kind, namespace, name, dict(status))


def register_reconciler(
    registry: kopf.OperatorRegistry,
    context: Context,
    kind: ResourceKind,
    reconcile: Reconcile,
    cleanup: Cleanup,
    *,
    finalizer: bool = True,
) -> None:
    resource = (GROUP, VERSION, kind.plural)

    @kopf.on.resume(*resource, registry=registry, id="reconcile")
    @kopf.on.create(*resource, registry=registry, id="reconcile")
    @kopf.on.update(*resource, registry=registry, id="reconcile")
    @counted(kind.kind)
    async def on_change(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        # The status is written here, under the object's status lock, instead of being left in
        # kopf's patch: kopf applies that after the handler returns, possibly over a newer
        # status another writer (presence, the ACME task) wrote meanwhile, which would then
        # stay stale until the next change.
        namespace, name = body.metadata.namespace or "", body.metadata.name or ""
        async with context.statuses.lock(kind, namespace, name):
            try:
                await reconcile(context, body, patch)
                # Its keys are known now (a failed reconcile may not have got that far: the
                # startup window then waits for its retry, or for its deadline).
                context.state.startup.reconciled(body.metadata.uid or "")
            finally:  # (also when it failed: the status then says why)
                status = patch.pop("status", None)
                if status:
                    await context.statuses.write(kind, namespace, name, dict(status))

    async def locked_cleanup(body: kopf.Body) -> None:
        # Under the object's lock: a reconcile outside kopf's events (re-admission, a Secret's
        # recheck) that read the object just before its deletion must not finish after the
        # cleanup and bring back what it removed (a subnet, a served certificate).
        namespace, name = body.metadata.namespace or "", body.metadata.name or ""
        async with context.statuses.lock(kind, namespace, name):
            await cleanup(context, body)

    if finalizer:

        @kopf.on.delete(*resource, registry=registry, id="cleanup")
        async def on_delete(body: kopf.Body, **_: Any) -> None:
            context.state.startup.reconciled(body.metadata.uid or "")
            await locked_cleanup(body)

        return

    def deleted(type: str, **_: Any) -> bool:
        return type == "DELETED"

    @kopf.on.event(*resource, registry=registry, id="cleanup", when=deleted)
    async def on_deleted(body: kopf.Body, **_: Any) -> None:
        context.state.startup.reconciled(body.metadata.uid or "")
        await locked_cleanup(body)
