"""The operator provisions Agents against the real API server: subnet and virtual IP by the
document's rule, credentials in an owned Secret, a mirrored row, clean deletion, a clear
condition when the pool is exhausted, and the same answers after a restart."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from kakuremichi.api.resources import AGENT
from kakuremichi.control.credentials import api_key_role, wireguard_public_key
from tests.infra.cluster import Cluster
from tests.infra.fixtures import OperatorProcess
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import wait_until


@pytest.fixture
def agents(kube: Cluster, operator: OperatorProcess) -> Iterator[Objects]:
    objects = Objects(kube, operator.namespace, AGENT)
    yield objects
    objects.delete_all()


@pytest.fixture
def secrets(kube: Cluster, operator: OperatorProcess) -> Secrets:
    return Secrets(kube, operator.namespace)


def rows(operator: OperatorProcess) -> dict[str, tuple[Any, ...]]:
    with sqlite3.connect(operator.db_path) as db:
        return {
            row[0]: row
            for row in db.execute(
                "SELECT name, subnet, virtual_ip, api_key, wireguard_public_key FROM agents"
            )
        }


def test_agent_is_provisioned_by_the_documents_rule(
    agents: Objects, secrets: Secrets, operator: OperatorProcess, kube: Cluster
) -> None:
    agents.create("home-server")
    status = agents.ready("home-server")
    assert status["subnet"] == "10.1.0.0/24"
    assert status["virtualIP"] == "10.1.0.100"
    assert status["state"] == "offline"
    assert status["observedGeneration"] == 1
    secret = secrets.read(status["credentialsSecret"])
    assert secret is not None
    assert api_key_role(secret["apiKey"]) == "agent"
    assert wireguard_public_key(secret["wireguardPrivateKey"]) == status["wireguardPublicKey"]
    # The mirror holds the row, with a digest in place of the API key.
    row = wait_until(lambda: rows(operator).get("home-server"), "the mirrored row")
    assert row[1:3] == ("10.1.0.0/24", "10.1.0.100")
    assert row[3].startswith("h1:") and secret["apiKey"] not in row[3]
    assert row[4] == status["wireguardPublicKey"]
    listing = kube.kubectl("get", "agents", "-n", operator.namespace)
    assert "10.1.0.0/24" in listing and "10.1.0.100" in listing


def test_deletion_releases_subnet_secret_and_row(
    agents: Objects, secrets: Secrets, operator: OperatorProcess
) -> None:
    agents.create("first")
    agents.create("second")
    first, second = agents.ready("first"), agents.ready("second")
    assert {first["subnet"], second["subnet"]} == {"10.1.0.0/24", "10.2.0.0/24"}
    agents.delete("first")
    wait_until(lambda: agents.get("first") is None, "Agent first to be gone (finalizer ran)")
    wait_until(lambda: secrets.read(first["credentialsSecret"]) is None, "its Secret to be gone")
    wait_until(lambda: "first" not in rows(operator), "its row to be gone")
    agents.create("third")
    assert agents.ready("third")["subnet"] == first["subnet"]  # the released subnet is reused


def test_exhausted_pool_is_a_condition_and_recovers(agents: Objects) -> None:
    for name in ("a1", "a2", "a3"):
        agents.create(name)
        agents.ready(name)
    agents.create("a4")
    status = agents.ready("a4", status="False")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "PoolExhausted"
    assert "no free agent subnet" in ready["message"]
    assert "subnet" not in status
    assert {agents.ready(n)["subnet"] for n in ("a1", "a2", "a3")} == {
        "10.1.0.0/24", "10.2.0.0/24", "10.3.0.0/24"
    }  # fmt: skip
    freed = agents.ready("a2")["subnet"]
    agents.delete("a2")
    assert agents.ready("a4")["subnet"] == freed


def test_restart_keeps_allocations_and_keys_and_rebuilds_the_mirror(
    agents: Objects, secrets: Secrets, operator: OperatorProcess
) -> None:
    agents.create("steady")
    before = agents.ready("steady")
    secret_before = secrets.read(before["credentialsSecret"])
    operator.stop()
    operator.db_path.unlink()
    operator.start()
    agents.create("newcomer")
    newcomer = agents.ready("newcomer")
    assert newcomer["subnet"] != before["subnet"]
    after = agents.ready("steady")
    assert (after["subnet"], after["wireguardPublicKey"]) == (
        before["subnet"],
        before["wireguardPublicKey"],
    )
    assert secrets.read(before["credentialsSecret"]) == secret_before
    wait_until(lambda: {"steady", "newcomer"} <= set(rows(operator)), "the rebuilt mirror")
