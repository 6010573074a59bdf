"""The gateway DaemonSet and the agent sidecar carry what the edges need to run."""

from __future__ import annotations

from typing import Any

import pytest

from kakuremichi.api.protocol import POD_TOKEN_AUDIENCE
from kakuremichi.api.resources import GatewaySpec
from kakuremichi.control.manifests import (
    API_KEY_FILE,
    POD_TOKEN_MOUNT,
    SIDECAR_NAME,
    STATE_MOUNT,
    EdgeImage,
    agent_pod_patch,
    agent_sidecar,
    gateway_daemonset,
    gateway_service_account,
    gateway_service_account_name,
)

EDGE = EdgeImage(image="kakuremichi/edge:test", control_url="https://control.example.com")


def daemonset(**spec: Any) -> dict[str, Any]:
    return gateway_daemonset(
        "edge", "0b0d9a31-5c53-4b43-9d9c-0c1ef8a4b1a2", GatewaySpec.model_validate(spec), EDGE,
        "kakuremichi-system", "kakuremichi-gateway-edge",
    )  # fmt: skip


def test_daemonset_runs_the_gateway_on_the_host_network() -> None:
    manifest = daemonset(
        nodeSelector={"role": "edge"},
        tolerations=[{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
        ports={"http": 8080, "https": 8443, "wireguard": 51821},
    )
    assert manifest["metadata"]["namespace"] == "kakuremichi-system"
    owner = manifest["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("Gateway", "edge", True)
    pod = manifest["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["nodeSelector"] == {"role": "edge"}
    assert pod["tolerations"] == [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}]
    (container,) = pod["containers"]
    assert container["image"] == "kakuremichi/edge:test"
    args = container["args"]
    assert args[0] == "gateway"
    assert args[args.index("--control-url") + 1] == "https://control.example.com"
    assert args[args.index("--api-key-file") + 1] == API_KEY_FILE
    assert args[args.index("--node-name") + 1] == "$(NODE_NAME)"
    assert args[args.index("--https-port") + 1] == "8443"
    assert "NET_ADMIN" in container["securityContext"]["capabilities"]["add"]
    ports = {(p["name"], p["hostPort"], p["protocol"]) for p in container["ports"]}
    assert ports == {("http", 8080, "TCP"), ("https", 8443, "TCP"), ("wireguard", 51821, "UDP")}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["credentials"]["secret"]["secretName"] == "kakuremichi-gateway-edge"
    assert volumes["dev-net-tun"]["hostPath"]["path"] == "/dev/net/tun"
    selector = manifest["spec"]["selector"]["matchLabels"]
    assert selector.items() <= manifest["spec"]["template"]["metadata"]["labels"].items()


def test_daemonset_pods_get_the_pools_resources_or_the_defaults() -> None:
    def resources(manifest: dict[str, Any]) -> Any:
        return manifest["spec"]["template"]["spec"]["containers"][0]["resources"]

    assert resources(daemonset()) == {
        "requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"},
    }  # fmt: skip
    sized = daemonset(resources={"requests": {"memory": "256Mi"}, "limits": {"memory": "1Gi"}})
    assert resources(sized) == {
        "requests": {"cpu": "50m", "memory": "256Mi"}, "limits": {"memory": "1Gi"},
    }  # fmt: skip


def test_daemonset_without_placement_leaves_it_out() -> None:
    pod = daemonset()["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_sidecar_gets_credentials_and_tun() -> None:
    sidecar = agent_sidecar("kakuremichi-agent-home", EDGE)
    assert sidecar.container["name"] == SIDECAR_NAME
    assert sidecar.container["args"][:3] == [
        "agent",
        "--control-url",
        "https://control.example.com",
    ]
    assert {
        "name": "kakuremichi-credentials",
        "secret": {"secretName": "kakuremichi-agent-home"},
    } in (sidecar.volumes)


def test_pod_patch_adds_sidecar_and_volumes_once() -> None:
    pod: dict[str, Any] = {"spec": {"containers": [{"name": "app", "image": "nginx"}]}}
    operations = agent_pod_patch(pod, "kakuremichi-agent-home", EDGE)
    assert operations[0]["path"] == "/spec/containers/-"
    volumes = agent_sidecar("kakuremichi-agent-home", EDGE).volumes
    assert operations[1] == {"op": "add", "path": "/spec/volumes", "value": volumes}
    pod["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    appended = agent_pod_patch(pod, "kakuremichi-agent-home", EDGE)
    assert [op["path"] for op in appended] == ["/spec/containers/-"] + ["/spec/volumes/-"] * 3
    pod["spec"]["containers"].append(appended[0]["value"])
    assert agent_pod_patch(pod, "kakuremichi-agent-home", EDGE) == []


def test_a_private_control_ca_reaches_gateways_and_sidecars_as_an_environment_variable() -> None:
    from kakuremichi.api.resources import GatewaySpec
    from kakuremichi.control.manifests import CONTROL_CA_ENV, agent_sidecar, gateway_daemonset

    edge = EdgeImage(image="edge:test", control_url="https://control.svc:8480", control_ca="PEM")
    daemonset = gateway_daemonset("pool", "uid", GatewaySpec(), edge, "system", "pool-secret")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert {"name": CONTROL_CA_ENV, "value": "PEM"} in container["env"]
    sidecar = agent_sidecar("credentials", edge).container
    assert sidecar["env"] == [{"name": CONTROL_CA_ENV, "value": "PEM"}]
    assert "env" not in agent_sidecar("credentials", EDGE).container


def test_a_webhook_service_reference_names_the_service_and_its_certificate() -> None:
    from kakuremichi.control.webhook import ServiceReference

    service = ServiceReference.parse("kakuremichi/km-webhook:9443")
    assert (service.namespace, service.name, service.port) == ("kakuremichi", "km-webhook", 9443)
    assert service.host == "km-webhook.kakuremichi.svc"
    for bad in ("km-webhook:9443", "kakuremichi/km-webhook", "ns/name:port"):
        with pytest.raises(ValueError, match="NAMESPACE/NAME:PORT"):
            ServiceReference.parse(bad)


def test_gateways_and_sidecars_keep_their_saved_config_across_container_restarts() -> None:
    gateway_pod = daemonset()["spec"]["template"]["spec"]
    sidecar = agent_sidecar("kakuremichi-agent-home", EDGE)
    for container, volumes in (
        (gateway_pod["containers"][0], gateway_pod["volumes"]),
        (sidecar.container, sidecar.volumes),
    ):
        args = container["args"]
        assert args[args.index("--state-dir") + 1] == STATE_MOUNT
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == STATE_MOUNT]
        assert not mount.get("readOnly")
        (volume,) = [v for v in volumes if v["name"] == mount["name"]]
        assert volume["emptyDir"] == {}  # on disk: a node reboot keeps it, the Pod's end does not


def test_daemonset_pods_prove_themselves_with_a_pod_bound_token_only() -> None:
    manifest = daemonset()
    pod = manifest["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == gateway_service_account_name("edge")
    assert pod["automountServiceAccountToken"] is False  # no API token: the gateway needs none
    volumes = {v["name"]: v for v in pod["volumes"]}
    (source,) = volumes["pod-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == POD_TOKEN_AUDIENCE == "kakuremichi"
    assert 600 <= source["serviceAccountToken"]["expirationSeconds"] <= 86400
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["pod-token"] == {"name": "pod-token", "mountPath": POD_TOKEN_MOUNT,
                                   "readOnly": True}  # fmt: skip
    args = container["args"]
    assert args[args.index("--pod-token-file") + 1] == f"{POD_TOKEN_MOUNT}/token"


def test_the_pools_service_account_is_owned_by_the_gateway_and_mounts_nothing() -> None:
    account = gateway_service_account("edge", "uid-1", "kakuremichi-system")
    assert account["metadata"]["name"] == gateway_service_account_name("edge")
    assert account["metadata"]["namespace"] == "kakuremichi-system"
    assert account["automountServiceAccountToken"] is False
    (owner,) = account["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Gateway", "edge", "uid-1")
