"""Right after a start, an unknown key may be one control has not re-learned yet: the window
stays open until every Agent and Gateway that existed has been reconciled, or a deadline."""

from __future__ import annotations

from kakuremichi.control.startup_window import StartupWindow


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_open_until_every_listed_object_is_reconciled() -> None:
    window = StartupWindow(300, Clock())
    assert window.open  # not even listed yet
    window.reconciled("a")  # a reconcile may come before the listing
    window.expect({"a", "b", "c"})
    window.reconciled("b")
    assert window.open
    window.reconciled("tunnel-uid")  # other objects do not count
    window.reconciled("c")  # (or c was deleted)
    assert not window.open
    window.expect({"d"})  # closed for good: a later listing does not reopen it
    assert not window.open


def test_nothing_to_wait_for_closes_it_at_once() -> None:
    window = StartupWindow(300, Clock())
    window.expect(set())
    assert not window.open


def test_the_deadline_closes_it_whatever_is_left() -> None:
    clock = Clock()
    window = StartupWindow(300, clock)
    window.expect({"stuck"})
    clock.now += 299
    assert window.open
    clock.now += 1
    assert not window.open
