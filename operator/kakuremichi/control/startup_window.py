"""The first moments after control starts. Its credentials come from reconciling every Agent and
Gateway again, so an API key it does not know yet may well be valid. Until every such object
that existed at the start has been reconciled once (or a deadline passes), control answers an
unknown key "come back shortly" (close code 4503) instead of refusing it: a refused edge would
drop its saved config, and a gateway pod its node's identity, for nothing. The answer is the
same for every unknown key, so it says nothing about which keys are valid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

STARTUP_WINDOW_SECONDS = 300.0


class StartupWindow:
    def __init__(
        self,
        seconds: float = STARTUP_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._ends_at = clock() + seconds
        self._pending: set[str] | None = None
        """Uids of the objects still to be reconciled; None until they are listed."""
        self._early: set[str] = set()
        """Reconciled before the listing came."""
        self._closed = False

    def expect(self, uids: Iterable[str]) -> None:
        """The Agents and Gateways that exist at the start."""
        if self._closed:
            return
        self._pending = set(uids) - self._early
        self._early.clear()
        self._close_when_done()

    def reconciled(self, uid: str) -> None:
        """An object was reconciled (or deleted): its keys are known now (or void)."""
        if self._closed:
            return
        if self._pending is None:
            self._early.add(uid)
            return
        self._pending.discard(uid)
        self._close_when_done()

    @property
    def open(self) -> bool:
        if not self._closed and self._clock() >= self._ends_at:
            self._close()
        return not self._closed

    def _close_when_done(self) -> None:
        if self._pending is not None and not self._pending:
            self._close()

    def _close(self) -> None:
        self._closed, self._pending = True, None
        self._early.clear()
