"""What the scheduler and the kubelet would do for a gateway DaemonSet's pod, in a local cluster
that runs neither: bind the pod the DaemonSet controller made for a Node (``pods/binding``), and
mint the pod-bound projected token its volume asks for (TokenRequest), written where the
gateway process reads it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.infra.polling import wait_until


@dataclass(frozen=True)
class PlacedPod:
    name: str
    uid: str
    service_account: str
    audience: str
    seconds: int


def _targets(pod: Any, node: str) -> bool:
    """The DaemonSet controller pins each pod to its node by node affinity."""
    if pod.spec.node_name:
        return bool(pod.spec.node_name == node)
    affinity = pod.spec.affinity
    terms = (
        affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
        if affinity and affinity.node_affinity
        and affinity.node_affinity.required_during_scheduling_ignored_during_execution
        else []
    )  # fmt: skip
    return any(
        field.key == "metadata.name" and node in (field.values or [])
        for term in terms
        for field in term.match_fields or []
    )


def daemon_pod(api: client.ApiClient, namespace: str, daemonset: str, node: str) -> Any:
    """The live pod of ``daemonset`` for ``node``, once the DaemonSet controller made it."""
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)

    def made() -> Any:
        found: Any = apps.read_namespaced_daemon_set(daemonset, namespace)
        selector = found.spec.selector.match_labels
        labels = ",".join(f"{k}={v}" for k, v in selector.items())
        pod: Any
        for pod in core.list_namespaced_pod(namespace, label_selector=labels).items:
            if pod.metadata.deletion_timestamp is None and _targets(pod, node):
                return pod
        return None

    return wait_until(made, f"the DaemonSet {daemonset}'s pod for node {node}", timeout=60)


def bind(api: client.ApiClient, namespace: str, pod: str, node: str) -> None:
    """Schedule ``pod`` onto ``node`` as the scheduler does (the binding subresource)."""
    binding = client.V1Binding(
        metadata=client.V1ObjectMeta(name=pod),
        target=client.V1ObjectReference(api_version="v1", kind="Node", name=node),
    )
    # (The client cannot read the answer back into a V1Binding; the call itself is enough.)
    with contextlib.suppress(ApiException):  # already bound to it: fine
        client.CoreV1Api(api).create_namespaced_pod_binding(
            pod, namespace, binding, _preload_content=False
        )


def place(api: client.ApiClient, namespace: str, daemonset: str, node: str) -> PlacedPod:
    """The DaemonSet's pod for ``node``, bound to it; what its projected token volume asks."""
    pod = daemon_pod(api, namespace, daemonset, node)
    if not pod.spec.node_name:
        bind(api, namespace, pod.metadata.name, node)
    (token,) = [
        source.service_account_token
        for volume in pod.spec.volumes or []
        if volume.projected
        for source in volume.projected.sources
        if source.service_account_token
    ]
    return PlacedPod(
        pod.metadata.name, pod.metadata.uid, pod.spec.service_account_name,
        token.audience, token.expiration_seconds or 3600,
    )  # fmt: skip


def mint_token(
    api: client.ApiClient,
    namespace: str,
    service_account: str,
    audience: str,
    pod: tuple[str, str] | None,
    seconds: int = 3600,
) -> str:
    """A projected token for ``service_account``, bound to ``pod`` (name, uid) as the kubelet
    binds its pods' tokens, or to nothing."""
    bound = (
        client.V1BoundObjectReference(api_version="v1", kind="Pod", name=pod[0], uid=pod[1])
        if pod
        else None
    )
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=[audience], expiration_seconds=seconds, bound_object_ref=bound
        )
    )
    made: Any = client.CoreV1Api(api).create_namespaced_service_account_token(
        service_account, namespace, request
    )
    return str(made.status.token)


def write_pod_token(api: client.ApiClient, namespace: str, placed: PlacedPod, folder: Path) -> Path:
    """The kubelet's projected volume: ``folder/token``, the pod-bound token."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    token = mint_token(
        api, namespace, placed.service_account, placed.audience,
        (placed.name, placed.uid), placed.seconds,
    )  # fmt: skip
    (folder / "token").write_text(token)
    return folder


def delete_pods(api: client.ApiClient, namespace: str) -> None:
    """Remove every pod at once: a bound pod waits for its kubelet otherwise, forever here."""
    with contextlib.suppress(ApiException):
        client.CoreV1Api(api).delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
