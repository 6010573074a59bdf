"""Status writers of one object take turns; a holder may take its lock again; idle locks go."""

from __future__ import annotations

import asyncio
import gc

from kakuremichi.api.resources import AGENT, GATEWAY
from kakuremichi.control.status_locks import StatusLocks


def test_writers_of_one_object_take_turns_in_order_and_others_do_not_wait() -> None:
    async def scenario() -> list[str]:
        locks = StatusLocks()
        written: list[str] = []

        async def write(name: str, label: str, hold: float) -> None:
            async with locks.of(AGENT, "default", name):
                await asyncio.sleep(hold)
                written.append(label)

        first = asyncio.create_task(write("home", "stale verdict", 0.05))
        await asyncio.sleep(0)  # it holds the lock now
        newer = asyncio.create_task(write("home", "newer state", 0.0))
        other = asyncio.create_task(write("office", "other object", 0.0))
        await asyncio.gather(first, newer, other)
        return written

    assert asyncio.run(scenario()) == ["other object", "stale verdict", "newer state"]


def test_the_holder_may_take_the_lock_again() -> None:
    async def scenario() -> bool:
        locks = StatusLocks()
        lock = locks.of(GATEWAY, "", "edge")
        async with lock:
            async with locks.of(GATEWAY, "ignored for a cluster-scoped kind", "edge"):
                pass
            still_held = lock.locked()
        return still_held and not lock.locked()

    assert asyncio.run(asyncio.wait_for(scenario(), 1.0))


def test_another_task_waits_for_a_reentered_lock_to_be_fully_released() -> None:
    async def scenario() -> list[str]:
        locks = StatusLocks()
        order: list[str] = []

        async def holder() -> None:
            async with locks.of(AGENT, "default", "home"):
                async with locks.of(AGENT, "default", "home"):
                    await asyncio.sleep(0.02)
                order.append("inner released")
                await asyncio.sleep(0.02)
                order.append("outer releasing")

        async def waiter() -> None:
            await asyncio.sleep(0.01)
            async with locks.of(AGENT, "default", "home"):
                order.append("waiter")

        await asyncio.gather(holder(), waiter())
        return order

    assert asyncio.run(scenario()) == ["inner released", "outer releasing", "waiter"]


def test_locks_nobody_holds_are_not_kept() -> None:
    async def scenario() -> int:
        locks = StatusLocks()
        for number in range(1000):
            async with locks.of(AGENT, "default", f"agent-{number}"):
                pass
        gc.collect()
        return len(locks)

    assert asyncio.run(scenario()) == 0
