"""The API server calls the operator's webhook over TLS and a labelled Pod comes back with the
agent sidecar; unlabelled Pods never reach the webhook; bad requests are refused clearly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kakuremichi.api.resources import AGENT
from kakuremichi.control.manifests import AGENT_LABEL, SIDECAR_NAME
from tests.infra.cluster import Cluster
from tests.infra.fixtures import OperatorProcess
from tests.infra.objects import Objects
from tests.infra.polling import wait_until


@pytest.fixture
def core(kube: Cluster, operator: OperatorProcess) -> Iterator[client.CoreV1Api]:
    api = client.CoreV1Api(kube.api_client())
    yield api
    api.delete_collection_namespaced_pod(operator.namespace)


def pod(name: str, agent: str | None) -> client.V1Pod:
    labels = {AGENT_LABEL: agent} if agent else {}
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="nginx")]),
    )


def create(core: client.CoreV1Api, namespace: str, body: client.V1Pod) -> Any:
    return core.create_namespaced_pod(namespace, body)


def test_labelled_pod_gets_the_sidecar_and_others_are_untouched(
    kube: Cluster, operator: OperatorProcess, core: client.CoreV1Api
) -> None:
    agents = Objects(kube, operator.namespace, AGENT)
    agents.create("web")
    status = agents.ready("web")
    wait_until(
        lambda: kube.kubectl("get", "mutatingwebhookconfiguration", "kakuremichi.io", check=False),
        "the webhook configuration",
    )
    created = wait_until(
        lambda: create(core, operator.namespace, pod("web-0", "web")), "the webhook to answer"
    )
    containers = {c.name: c for c in created.spec.containers}
    assert set(containers) == {"web", SIDECAR_NAME}
    sidecar = containers[SIDECAR_NAME]
    assert sidecar.args[:3] == ["agent", "--control-url", operator.control_url]
    assert "NET_ADMIN" in sidecar.security_context.capabilities.add
    secrets = [v.secret.secret_name for v in created.spec.volumes if v.secret]
    assert status["credentialsSecret"] in secrets

    plain = create(core, operator.namespace, pod("plain", None))
    assert [c.name for c in plain.spec.containers] == ["web"]

    with pytest.raises(ApiException) as second:
        create(core, operator.namespace, pod("web-1", "web"))
    assert "Agent web already runs in Pod web-0" in str(second.value.body)
    agents.delete_all()


def test_unknown_agent_is_refused_with_its_name(
    operator: OperatorProcess, core: client.CoreV1Api, kube: Cluster
) -> None:
    wait_until(
        lambda: kube.kubectl("get", "mutatingwebhookconfiguration", "kakuremichi.io", check=False),
        "the webhook configuration",
    )
    with pytest.raises(ApiException) as refused:
        create(core, operator.namespace, pod("ghost-0", "ghost"))
    assert f"no provisioned Agent ghost in namespace {operator.namespace}" in str(
        refused.value.body
    )
