"""Prometheus metrics of the control plane, served at ``/metrics`` on the control channel's port."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

P = ParamSpec("P")
R = TypeVar("R")

registry = CollectorRegistry()
reconciles = Counter(
    "kakuremichi_reconciles", "Reconciles by kind and result", ["kind", "result"],
    registry=registry,
)  # fmt: skip
connected_edges = Gauge(
    "kakuremichi_connected_edges", "Edges connected to the control channel", ["role"],
    registry=registry,
)  # fmt: skip
config_pushes = Counter(
    "kakuremichi_config_pushes", "Config messages sent to edges", ["role"], registry=registry
)
auth_failures = Counter(
    "kakuremichi_auth_failures", "Refused first frames by reason", ["reason"], registry=registry
)
auth_deferred = Counter(
    "kakuremichi_auth_deferred",
    "Unknown keys asked to come back (4503) while control re-learns keys after a start",
    registry=registry,
)


def counted(kind: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Count each run of a reconcile handler as ``ok`` or ``error``."""

    def wrap(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(handler)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                result = await handler(*args, **kwargs)
            except Exception:
                reconciles.labels(kind, "error").inc()
                raise
            reconciles.labels(kind, "ok").inc()
            return result

        return run

    return wrap
