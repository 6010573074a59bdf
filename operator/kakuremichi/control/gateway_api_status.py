"""The statuses of Gateway API objects of ours, as projections of the decision
(:mod:`kakuremichi.control.gateway_api`): pure. A condition keeps its ``lastTransitionTime``
while its status holds; an HTTPRoute's parents written by other controllers are kept as they
are (each controller writes its own entries of ``status.parents``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from kakuremichi.control.gateway_api import (
    GATEWAY_CONTROLLER,
    GROUP,
    ClassDecision,
    Condition,
    GatewayDecision,
    RouteDecision,
)


def conditions(
    wanted: Sequence[Condition], previous: object, generation: int, now: datetime
) -> list[dict[str, Any]]:
    """Conditions as the API wants them, keeping each one's transition time while its status
    holds."""
    before = {
        c.get("type"): c for c in previous if isinstance(c, Mapping)
    } if isinstance(previous, list) else {}  # fmt: skip
    out = []
    for condition in wanted:
        status = "True" if condition.status else "False"
        old = before.get(condition.type)
        since = (
            old.get("lastTransitionTime")
            if old is not None and old.get("status") == status and old.get("lastTransitionTime")
            else now.strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        out.append({
            "type": condition.type, "status": status, "reason": condition.reason,
            "message": condition.message[:32768], "observedGeneration": generation,
            "lastTransitionTime": since,
        })  # fmt: skip
    return out


def class_status(
    decided: ClassDecision, previous: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    return {
        "conditions": conditions(
            decided.conditions, previous.get("conditions"), decided.generation, now
        )
    }


def gateway_status(
    decided: GatewayDecision, addresses: Sequence[str], previous: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    """Accepted as decided; Programmed once its pool has an address (and each listener that is
    valid with it)."""
    programmed = decided.accepted and bool(addresses)
    if programmed:
        ready = Condition("Programmed", True, "Programmed", "Served by the kakuremichi gateways.")
    elif decided.accepted:
        pool = f"pool {decided.pool}" if decided.pool else "any pool"
        ready = Condition("Programmed", False, "AddressNotAssigned",
                          f"No gateway of {pool} has a public address yet.")  # fmt: skip
    else:
        ready = Condition("Programmed", False, "Invalid", "The Gateway is not accepted.")
    old_listeners = {
        item.get("name"): item
        for item in previous.get("listeners") or ()
        if isinstance(item, Mapping)
    }
    listeners = []
    for listener in decided.listeners:
        wanted = list(listener.conditions)
        if listener.accepted and programmed:
            wanted.append(Condition("Programmed", True, "Programmed", "Listener served."))
        else:
            wanted.append(Condition("Programmed", False, "Invalid" if not listener.accepted
                                    else "Pending", "Listener not served."))  # fmt: skip
        old = old_listeners.get(listener.name) or {}
        listeners.append({
            "name": listener.name,
            "supportedKinds": [{"group": GROUP, "kind": k} for k in listener.supported_kinds],
            "attachedRoutes": listener.attached,
            "conditions": conditions(wanted, old.get("conditions"), decided.generation, now),
        })  # fmt: skip
    return {
        "conditions": conditions(
            [*decided.conditions, ready], previous.get("conditions"), decided.generation, now
        ),
        "addresses": [{"type": "IPAddress", "value": a} for a in addresses] if programmed else [],
        "listeners": listeners,
    }


def route_status(
    decided: RouteDecision | None, previous: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    """Our entries of ``status.parents`` (one per parentRef to a Gateway of ours; None: none
    any more), after those of other controllers, which are kept as they are."""
    before = [p for p in previous.get("parents") or () if isinstance(p, Mapping)]
    others = [dict(p) for p in before if p.get("controllerName") != GATEWAY_CONTROLLER]
    ours_before = {
        _ref_key(p.get("parentRef")): p for p in before
        if p.get("controllerName") == GATEWAY_CONTROLLER
    }  # fmt: skip
    ours = []
    generation = decided.generation if decided is not None else 0
    for parent in decided.parents if decided is not None else ():
        old = ours_before.get(_ref_key(parent.ref)) or {}
        ours.append({
            "parentRef": dict(parent.ref),
            "controllerName": GATEWAY_CONTROLLER,
            "conditions": conditions(
                parent.conditions, old.get("conditions"), generation, now
            ),
        })  # fmt: skip
    return {"parents": (others + ours)[:32]}


def has_ours(status: Mapping[str, Any]) -> bool:
    """Whether a route's status has entries of ours."""
    return any(
        isinstance(p, Mapping) and p.get("controllerName") == GATEWAY_CONTROLLER
        for p in status.get("parents") or ()
    )


def _ref_key(ref: object) -> tuple[str, ...]:
    if not isinstance(ref, Mapping):
        return ()
    return tuple(
        str(ref.get(k) or "") for k in ("group", "kind", "namespace", "name", "sectionName", "port")
    )


def without_times(status: Mapping[str, Any]) -> Any:
    """A status with no ``lastTransitionTime``: equal when nothing but time would change."""
    if isinstance(status, Mapping):
        return {k: without_times(v) for k, v in status.items() if k != "lastTransitionTime"}
    if isinstance(status, list):
        return [without_times(v) for v in status]
    return status
