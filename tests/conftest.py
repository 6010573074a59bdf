"""Shared test configuration: tiers are marked by folder (unit, integration, e2e).

The fixtures of the integration and end-to-end tiers (a cluster, hosts, the operator…) live in
``tests.infra.fixtures``; both folders share them, and they start only when a test asks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.infra import binaries
from tests.infra.fixtures import *  # noqa: F403

TESTS = Path(__file__).resolve().parent

# The binaries hack/build-binaries.sh builds win over the system's (wireguard-go above all).
binaries.put_first_on_path()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.path)).relative_to(TESTS).parts[0]
        if tier in ("integration", "e2e"):
            item.add_marker(getattr(pytest.mark, tier))
