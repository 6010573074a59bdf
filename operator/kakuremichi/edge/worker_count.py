"""How many processes serve a gateway's HTTPS port by default (``--workers auto``): as many as
it may use CPUs and memory, read from its cgroup like nginx's ``worker_processes auto``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

MEMORY_PER_PROCESS = 128 * 1024 * 1024
"""What ``auto`` budgets per HTTPS process under a memory limit: ~45 MiB at rest, the rest for
connections (~18 KiB each when idle)."""
CGROUP = Path("/sys/fs/cgroup")


def default_worker_count(cgroup: Path = CGROUP) -> int:
    """``auto``: one process per CPU this process may run on, no more than its cgroup's CPU
    quota allows (a pod's CPU limit, rounded up), and one per :data:`MEMORY_PER_PROCESS` of its
    memory limit (the gateway pod's 256 MiB: two)."""
    count = max(1, len(os.sched_getaffinity(0)))
    with contextlib.suppress(OSError):
        quota = quota_cpus((cgroup / "cpu.max").read_text())
        if quota is not None:
            count = min(count, quota)
    with contextlib.suppress(OSError, ValueError):
        limit = (cgroup / "memory.max").read_text().strip()
        if limit.isdigit():
            count = min(count, max(1, int(limit) // MEMORY_PER_PROCESS))
    return count


def quota_cpus(cpu_max: str) -> int | None:
    """CPUs a cgroup v2 ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) allows,
    rounded up; None without a quota."""
    fields = cpu_max.split()
    if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit():
        return None
    quota, period = int(fields[0]), int(fields[1])
    return max(1, -(-quota // period)) if period else None
