"""The control-plane benchmark's smoke run: a few edges connect over real WebSockets and every
one of them receives a change (``bench/control_plane.py --smoke --only fanout``; about 25 s).
Keeps the benchmark's load clients speaking the protocol the operator speaks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.infra import binaries

SCRIPT = binaries.REPO / "bench" / "control_plane.py"


def test_fanout_smoke_run() -> None:
    reason = binaries.missing("kube-apiserver", "etcd", "kube-controller-manager", "kubectl")
    if reason:
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--only", "fanout"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "new Gateway -> every agent" in done.stdout
    assert "new Agent -> every gateway" in done.stdout
