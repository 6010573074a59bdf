"""The operator provisions Agents against the real API server: subnet and virtual IP by the
document's rule, credentials in an owned Secret, a mirrored row, clean deletion, a clear
condition when the pool is exhausted, and the same answers after a restart."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kakuremichi.credentials import api_key_role, wireguard_public_key
from kakuremichi.resources import GROUP, VERSION
from tests.infra.cluster import Cluster
from tests.infra.polling import wait_until
from tests.integration.conftest import OperatorProcess


@pytest.fixture
def agents(kube: Cluster, operator: OperatorProcess) -> Iterator[AgentApi]:
    api = AgentApi(kube, operator.namespace)
    yield api
    for name in list(api.created):
        api.delete(name)
    wait_until(lambda: not api.list_names(), "the test's Agents to be deleted", timeout=60)


class AgentApi:
    def __init__(self, kube: Cluster, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(kube.api_client())
        self.core = client.CoreV1Api(kube.api_client())
        self.namespace = namespace
        self.created: set[str] = set()

    def create(self, name: str) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Agent", "metadata": {"name": name}}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "agents", body)
        self.created.add(name)

    def delete(self, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "agents", name
            )
        except ApiException as error:
            if error.status != 404:
                raise
        self.created.discard(name)

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            found = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "agents", name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        assert isinstance(found, dict)
        return found

    def list_names(self) -> list[str]:
        listing = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "agents"
        )
        assert isinstance(listing, dict)
        return [item["metadata"]["name"] for item in listing["items"]]

    def ready(self, name: str, status: str = "True") -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            agent = self.get(name)
            conditions = ((agent or {}).get("status") or {}).get("conditions", [])
            ready = next((c for c in conditions if c["type"] == "Ready"), None)
            return agent["status"] if agent and ready and ready["status"] == status else None

        return wait_until(probe, f"Agent {name} Ready={status}", timeout=60)

    def secret(self, name: str) -> dict[str, str] | None:
        try:
            secret = self.core.read_namespaced_secret(name, self.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def rows(operator: OperatorProcess) -> dict[str, tuple[Any, ...]]:
    with sqlite3.connect(operator.db_path) as db:
        return {
            row[0]: row
            for row in db.execute(
                "SELECT name, subnet, virtual_ip, api_key, wireguard_public_key FROM agents"
            )
        }


def test_agent_is_provisioned_by_the_documents_rule(
    agents: AgentApi, operator: OperatorProcess, kube: Cluster
) -> None:
    agents.create("home-server")
    status = agents.ready("home-server")
    assert status["subnet"] == "10.1.0.0/24"
    assert status["virtualIP"] == "10.1.0.100"
    assert status["state"] == "offline"
    assert status["observedGeneration"] == 1
    secret = agents.secret(status["credentialsSecret"])
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
    agents: AgentApi, operator: OperatorProcess
) -> None:
    agents.create("first")
    agents.create("second")
    first, second = agents.ready("first"), agents.ready("second")
    assert {first["subnet"], second["subnet"]} == {"10.1.0.0/24", "10.2.0.0/24"}
    agents.delete("first")
    wait_until(lambda: agents.get("first") is None, "Agent first to be gone (finalizer ran)")
    wait_until(lambda: agents.secret(first["credentialsSecret"]) is None, "its Secret to be gone")
    wait_until(lambda: "first" not in rows(operator), "its row to be gone")
    agents.create("third")
    assert agents.ready("third")["subnet"] == first["subnet"]  # the released subnet is reused


def test_exhausted_pool_is_a_condition_and_recovers(agents: AgentApi) -> None:
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
    agents: AgentApi, operator: OperatorProcess
) -> None:
    agents.create("steady")
    before = agents.ready("steady")
    secret_before = agents.secret(before["credentialsSecret"])
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
    assert agents.secret(before["credentialsSecret"]) == secret_before
    wait_until(lambda: {"steady", "newcomer"} <= set(rows(operator)), "the rebuilt mirror")
