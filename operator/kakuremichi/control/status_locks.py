"""One status writer at a time per object.

Several tasks write the status of one object: its reconciler, presence (connection state), the
ACME task (a Certificate's verdict), admissions into a gateway pool (the instance list). Each
computes its part from what it knows and writes it; without a lock, a write computed earlier can
land after a newer one and stay (nobody writes again until the next change). Under the object's
lock each writer computes from the newest facts and writes before the next one starts.
"""

from __future__ import annotations

import asyncio
import weakref
from types import TracebackType

from kakuremichi.api.resources import ResourceKind


class StatusLock:
    """An :class:`asyncio.Lock` that the task holding it may take again: a reconciler that
    holds its object's lock calls helpers that take it themselves."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[object] | None = None
        self._depth = 0

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is not None and task is self._owner:
            self._depth += 1
            return
        await self._lock.acquire()
        self._owner, self._depth = task, 1

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


class StatusLocks:
    """A :class:`StatusLock` per object, kept only while someone holds or awaits it: thousands
    of objects cost nothing at rest."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[tuple[str, str, str], StatusLock] = (
            weakref.WeakValueDictionary()
        )

    def of(self, kind: ResourceKind, namespace: str, name: str) -> StatusLock:
        key = (kind.plural, namespace if kind.namespaced else "", name)
        lock = self._locks.get(key)
        if lock is None:
            lock = StatusLock()
            self._locks[key] = lock
        return lock

    def __len__(self) -> int:
        return len(self._locks)
