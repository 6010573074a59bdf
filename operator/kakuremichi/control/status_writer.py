"""The one way status reaches the API server: every writer goes through :class:`StatusWriter`,
one at a time per object (the object's lock, which its reconcile holds while it computes), as a
merge patch of the fields that writer owns. Each kind's conditions have a single writer; the
table of who writes which field is in docs/architecture.md ("Who writes status").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kakuremichi.api.resources import ResourceKind
from kakuremichi.control.kube_api import KubeApi
from kakuremichi.control.status_locks import StatusLock, StatusLocks


class StatusWriter:
    def __init__(self, kube: KubeApi, locks: StatusLocks | None = None) -> None:
        self.kube = kube
        self.locks = locks or StatusLocks()

    def lock(self, kind: ResourceKind, namespace: str, name: str) -> StatusLock:
        """The object's lock (reentrant for the task that holds it): hold it while computing
        what to write from what was read."""
        return self.locks.of(kind, namespace, name)

    async def write(
        self, kind: ResourceKind, namespace: str, name: str, fields: dict[str, Any]
    ) -> bool:
        """Merge ``fields`` into the object's status; False when the object is gone."""
        async with self.lock(kind, namespace, name):
            return await self.kube.patch_status(kind, namespace, name, fields)

    async def update(
        self,
        kind: ResourceKind,
        namespace: str,
        name: str,
        change: Callable[[dict[str, Any]], dict[str, Any] | None],
    ) -> bool:
        """Read the status, let ``change`` say what to merge into it (None: nothing), write;
        all under the object's lock. False when the object is gone."""
        async with self.lock(kind, namespace, name):
            found = await self.kube.get_object(kind, namespace, name)
            if found is None:
                return False
            fields = change(dict(found.get("status") or {}))
            if not fields:
                return True
            return await self.kube.patch_status(kind, namespace, name, fields)
