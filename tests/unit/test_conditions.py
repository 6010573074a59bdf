from __future__ import annotations

from datetime import UTC, datetime

from kakuremichi.api.conditions import find_condition, is_ready, make_condition, set_condition

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 2, tzinfo=UTC)


def test_transition_time_moves_only_when_status_changes() -> None:
    conditions = set_condition([], make_condition("Ready", "False", "Pending", now=T0))
    again = set_condition(conditions, make_condition("Ready", "False", "StillPending", "x", now=T1))
    ready = find_condition(again, "Ready")
    assert ready is not None
    assert ready.last_transition_time == T0 and ready.reason == "StillPending"
    flipped = set_condition(again, make_condition("Ready", "True", "Serving", now=T1))
    assert find_condition(flipped, "Ready").last_transition_time == T1  # type: ignore[union-attr]
    assert is_ready(flipped) and not is_ready(again) and not is_ready([])


def test_other_condition_types_are_kept_in_place() -> None:
    conditions = [
        make_condition("Ready", "True", "Serving", now=T0),
        make_condition("Issued", "True", "Done", now=T0),
    ]
    merged = set_condition(conditions, make_condition("Ready", "False", "AgentMissing", now=T1))
    assert [c.type for c in merged] == ["Ready", "Issued"]
    assert merged[1] == conditions[1]


def test_serialises_in_kubernetes_shape() -> None:
    condition = make_condition("Ready", "True", "Serving", "ok", observed_generation=3, now=T0)
    assert condition.model_dump(mode="json", by_alias=True, exclude_none=True) == {
        "type": "Ready",
        "status": "True",
        "reason": "Serving",
        "message": "ok",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 3,
    }
