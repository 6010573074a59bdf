"""How every kind is wired into kopf: one idempotent reconcile for create, update and resume
(level-triggered, so a restart or a repeated event does no harm), and a cleanup on deletion that
runs behind kopf's finalizer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import kopf

from kakuremichi.control.context import Context
from kakuremichi.control.metrics import counted
from kakuremichi.resources import GROUP, VERSION, ResourceKind

Reconcile = Callable[[Context, kopf.Body, kopf.Patch], Awaitable[None]]
Cleanup = Callable[[Context, kopf.Body], Awaitable[None]]


def register_reconciler(
    registry: kopf.OperatorRegistry,
    context: Context,
    kind: ResourceKind,
    reconcile: Reconcile,
    cleanup: Cleanup,
) -> None:
    resource = (GROUP, VERSION, kind.plural)

    @kopf.on.resume(*resource, registry=registry, id="reconcile")
    @kopf.on.create(*resource, registry=registry, id="reconcile")
    @kopf.on.update(*resource, registry=registry, id="reconcile")
    @counted(kind.kind)
    async def on_change(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await reconcile(context, body, patch)

    @kopf.on.delete(*resource, registry=registry, id="cleanup")
    async def on_delete(body: kopf.Body, **_: Any) -> None:
        await cleanup(context, body)
