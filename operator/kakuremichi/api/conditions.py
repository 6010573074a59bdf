"""Status conditions in the Kubernetes convention (``metav1.Condition``).

Controllers compute the condition they want; :func:`set_condition` merges it into the list so that
``lastTransitionTime`` moves only when the status really changes, which keeps status writes
idempotent across reconciles and restarts.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import Field

from kakuremichi.api.fields import CamelModel

ConditionStatus = Literal["True", "False", "Unknown"]

READY = "Ready"

# CamelCase reason, as metav1.Condition requires.
Reason = Annotated[
    str, Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
]


class Condition(CamelModel):
    """One aspect of a resource's current state."""

    type: Annotated[str, Field(min_length=1, max_length=316)]
    """Kind of condition, e.g. ``Ready``."""
    status: ConditionStatus
    """``True``, ``False`` or ``Unknown``."""
    reason: Reason
    """Machine-readable CamelCase reason for the last transition."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """Human-readable details."""
    last_transition_time: datetime
    """When the status last changed."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The ``metadata.generation`` the condition was computed from."""


def utc_now() -> datetime:
    """Current time in UTC, truncated to seconds as Kubernetes timestamps are."""
    return datetime.now(UTC).replace(microsecond=0)


def make_condition(
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    *,
    observed_generation: int | None = None,
    now: datetime | None = None,
) -> Condition:
    return Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=now or utc_now(),
        observed_generation=observed_generation,
    )


def set_condition(conditions: list[Condition], new: Condition) -> list[Condition]:
    """Return ``conditions`` with ``new`` in place of the condition of its type.

    When the status is unchanged the previous ``lastTransitionTime`` is kept.
    """
    merged: list[Condition] = []
    placed = False
    for existing in conditions:
        if existing.type != new.type:
            merged.append(existing)
            continue
        if existing.status == new.status:
            new = new.model_copy(update={"last_transition_time": existing.last_transition_time})
        merged.append(new)
        placed = True
    if not placed:
        merged.append(new)
    return merged


def set_ready(
    conditions: list[Condition],
    status: ConditionStatus,
    reason: str,
    message: str,
    observed_generation: int | None,
) -> list[Condition]:
    """``conditions`` with their ``Ready`` condition set (see :func:`set_condition`)."""
    ready = make_condition(READY, status, reason, message, observed_generation=observed_generation)
    return set_condition(conditions, ready)


def find_condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_ready(conditions: list[Condition]) -> bool:
    ready = find_condition(conditions, READY)
    return ready is not None and ready.status == "True"
