"""Polling with deadlines: the machine is small and shared, so tests wait for a condition,
never for a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T | None], what: str, timeout: float = 30.0, interval: float = 0.05
) -> T:
    """Call ``probe`` until it returns something truthy; return that, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = probe()
        except Exception as error:  # the condition may raise until it holds
            last_error = error
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def holds_for(
    probe: Callable[[], object], what: str, seconds: float, interval: float = 0.1
) -> None:
    """Fail naming ``what`` unless ``probe`` stays truthy for ``seconds`` (a state that must
    not be overwritten)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not probe():
            raise AssertionError(f"{what}: it stopped holding")
        time.sleep(interval)
