"""The local API server is a real one: CRDs install, the schema rejects what the models reject,
status is a subresource, watches deliver, RBAC refuses what a Role does not grant."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kakuremichi.api.fields import SENTENCES, describe_errors
from kakuremichi.api.resources import GROUP, KINDS, VERSION, GatewaySpec
from tests.infra.cluster import Cluster, unique_name
from tests.infra.polling import wait_until
from tests.unit.test_validation import (
    INVALID_DOMAINS,
    INVALID_TARGETS,
    VALID_DOMAINS,
    VALID_TARGETS,
)


def tunnel(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Tunnel",
        "metadata": {"name": name},
        "spec": {
            "domain": f"{name}.example.com",
            "agent": "home",
            "target": "localhost:8080",
            **spec,
        },
    }


def as_object(value: object) -> dict[str, Any]:
    assert isinstance(value, dict)
    return value


def create_tunnel(
    kube: Cluster, namespace: str, body: dict[str, Any], dry_run: bool = False
) -> Any:
    api = client.CustomObjectsApi(kube.api_client())
    return api.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "tunnels", body, dry_run="All" if dry_run else None
    )


def rejection(kube: Cluster, namespace: str, body: dict[str, Any]) -> str:
    with pytest.raises(ApiException) as error:
        create_tunnel(kube, namespace, body, dry_run=True)
    assert error.value.status == 422, error.value.body
    return str(error.value.body)


def test_crds_are_installed_and_listed_by_category(kube: Cluster) -> None:
    names = kube.kubectl("get", "crd", "-o", "name")
    for kind in KINDS:
        assert f"customresourcedefinition.apiextensions.k8s.io/{kind.crd_name}" in names
    assert "No resources found" in kube.kubectl("get", "kakuremichi", "-A", check=False)


def test_the_gateway_apis_gateway_and_ours_are_told_apart(kube: Cluster) -> None:
    """The local cluster carries the Gateway API's standard CRDs, as a cluster routing with it
    does; its Gateway shares our plural, so everything of ours says gateways.kakuremichi.io."""
    if "gateways.gateway.networking.k8s.io" not in kube.kubectl("get", "crd", "-o", "name"):
        pytest.skip("no Go toolchain fetched the Gateway API CRDs")
    for kind in ("gatewayclasses", "gateways", "httproutes", "grpcroutes", "referencegrants"):
        kube.kubectl("get", f"{kind}.gateway.networking.k8s.io", "-A")
    ours = kube.kubectl("get", "gateways.kakuremichi.io", "-o", "name")
    assert all(line.startswith("gateway.kakuremichi.io/") for line in ours.split())
    assert "gateway.networking.k8s.io" not in kube.kubectl("get", "kakuremichi", "-A", "-o", "name")


def test_a_pod_can_be_created_in_a_fresh_namespace(kube: Cluster, namespace: str) -> None:
    core = client.CoreV1Api(kube.api_client())
    wait_until(lambda: core.read_namespaced_service_account("default", namespace), "default SA")
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="probe"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]),
    )
    created = core.create_namespaced_pod(namespace, pod)
    assert created.spec is not None
    assert created.spec.service_account_name == "default"


def test_schema_agrees_with_the_models_on_every_domain_and_target(
    kube: Cluster, namespace: str
) -> None:
    for index, domain in enumerate(VALID_DOMAINS):
        create_tunnel(kube, namespace, tunnel(f"d{index}", domain=domain), dry_run=True)
    for index, target in enumerate(VALID_TARGETS):
        create_tunnel(kube, namespace, tunnel(f"t{index}", target=target), dry_run=True)
    for index, (domain, _) in enumerate(INVALID_DOMAINS):
        assert "spec.domain" in rejection(kube, namespace, tunnel(f"d{index}", domain=domain))
    shape_only = {"[zz::1]:80"}  # the schema checks IPv6 by shape; the operator refuses it
    for index, (target, _) in enumerate(INVALID_TARGETS):
        if target not in shape_only:
            assert "spec.target" in rejection(kube, namespace, tunnel(f"t{index}", target=target))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"metadata": {"name": "Bad_Name"}}, "metadata.name"),
        ({"spec": {"domain": "app.example.123"}}, "the last label must not be all-numeric"),
        ({"spec": {"target": "999.1.1.1:80"}}, "a numeric host must be a valid IPv4 address"),
        ({"spec": {"tls": {"issuer": "Secret"}}}, "secretName is required when issuer is Secret"),
        ({"spec": {"agent": None}}, "spec.agent: Required value"),
        # The sentence, not the regular expression (the models say the same).
        ({"spec": {"domain": "App.example.com"}}, SENTENCES["DomainName"]),
        ({"spec": {"target": "localhost"}}, SENTENCES["TargetAddress"]),
        ({"spec": {"agent": "Home_Server"}}, SENTENCES["ResourceName"]),
    ],
)
def test_rejections_name_the_field_and_why(
    kube: Cluster, namespace: str, change: dict[str, Any], expected: str
) -> None:
    body = tunnel("app")
    for part, values in change.items():
        body[part].update(values)
    body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
    refusal = rejection(kube, namespace, body)
    assert expected in refusal
    if "metadata" not in change:  # (metadata.name is the API server's own, pattern and all)
        assert "should match" not in refusal


def test_defaults_are_applied_by_the_api_server(kube: Cluster, namespace: str) -> None:
    created = create_tunnel(kube, namespace, tunnel(unique_name("app")))
    assert created["spec"]["enabled"] is True
    assert created["spec"]["tls"] == {"issuer": "ACME"}


def test_status_is_a_subresource(kube: Cluster, namespace: str) -> None:
    api = client.CustomObjectsApi(kube.api_client())
    name = unique_name("app")
    created: dict[str, Any] = create_tunnel(kube, namespace, tunnel(name))
    # A status write cannot change the spec...
    created["spec"]["target"] = "localhost:9999"
    created["status"] = {"url": f"https://{name}.example.com"}
    updated = as_object(
        api.replace_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "tunnels", name, created
        )
    )
    assert updated["spec"]["target"] == "localhost:8080"
    assert updated["status"]["url"] == f"https://{name}.example.com"
    # ...and a spec write cannot change the status.
    updated["spec"]["target"] = "localhost:9999"
    updated["status"] = {"url": "https://elsewhere.example.com"}
    replaced = as_object(
        api.replace_namespaced_custom_object(GROUP, VERSION, namespace, "tunnels", name, updated)
    )
    assert replaced["spec"]["target"] == "localhost:9999"
    assert replaced["status"]["url"] == f"https://{name}.example.com"
    assert replaced["metadata"]["generation"] == 2


def test_watches_deliver_events(kube: Cluster, namespace: str) -> None:
    api = client.CustomObjectsApi(kube.api_client())
    name = unique_name("watched")
    seen: list[tuple[str, str]] = []
    watcher = watch.Watch()

    def follow() -> None:
        for event in watcher.stream(
            api.list_namespaced_custom_object, GROUP, VERSION, namespace, "tunnels",
            timeout_seconds=30,
        ):  # fmt: skip
            seen.append((event["type"], event["object"]["metadata"]["name"]))
            if event["type"] == "DELETED":
                watcher.stop()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    wait_until(lambda: thread.is_alive(), "the watch to start")
    create_tunnel(kube, namespace, tunnel(name))
    wait_until(lambda: ("ADDED", name) in seen, "the ADDED event")
    api.delete_namespaced_custom_object(GROUP, VERSION, namespace, "tunnels", name)
    wait_until(lambda: ("DELETED", name) in seen, "the DELETED event")
    thread.join(timeout=10)


def test_a_service_account_is_refused_outside_its_role(kube: Cluster, namespace: str) -> None:
    rbac = client.RbacAuthorizationV1Api(kube.api_client())
    core = client.CoreV1Api(kube.api_client())
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader"))
    )
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="tunnel-reader"),
            rules=[client.V1PolicyRule(api_groups=[GROUP], resources=["tunnels"],
                                       verbs=["get", "list", "watch"])],
        ),
    )  # fmt: skip
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="tunnel-reader"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role",
                                      name="tunnel-reader"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader",
                                           namespace=namespace)],
        ),
    )  # fmt: skip
    issued = core.create_namespaced_service_account_token(
        "reader",
        namespace,
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[])),
    )
    assert issued.status is not None
    token = issued.status.token
    as_reader = kube.api_client(token)
    custom = client.CustomObjectsApi(as_reader)
    wait_until(
        lambda: (
            custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "tunnels") is not None
        ),
        "the Role to take effect",
    )
    for forbidden in (
        lambda: custom.list_namespaced_custom_object(GROUP, VERSION, "default", "tunnels"),
        lambda: custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "tunnels", tunnel("x")
        ),
        lambda: client.CoreV1Api(as_reader).list_namespaced_secret(namespace),
    ):
        with pytest.raises(ApiException) as error:
            forbidden()
        assert error.value.status == 403


def gateway(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Gateway", "metadata": {"name": name},
            "spec": spec}  # fmt: skip


# (resources, what the refusal says): the API server and the model must agree on each.
GATEWAY_RESOURCES_REFUSED = [
    ({"limits": {"cpu": "2 cores"}}, "spec.resources.limits.cpu"),
    ({"limits": {"memory": "-1Gi"}}, "spec.resources.limits.memory"),
    ({"requests": {"cpu": "3"}, "limits": {"cpu": 2}}, "requests.cpu must not exceed limits.cpu"),
    ({"requests": {"memory": "1Gi"}}, "requests.memory must not exceed limits.memory"),
    ({"limits": {"memory": "100Mi"}}, "limits.memory must be at least 128Mi"),
]


def test_gateway_resources_schema_agrees_with_the_model(kube: Cluster) -> None:
    api = client.CustomObjectsApi(kube.api_client())

    def create(body: dict[str, Any]) -> dict[str, Any]:
        return as_object(api.create_cluster_custom_object(GROUP, VERSION, "gateways", body,
                                                          dry_run="All"))  # fmt: skip

    created = create(gateway("pool", resources={"limits": {"cpu": 4, "memory": "1Gi"}}))
    resources = created["spec"]["resources"]
    assert resources == {"requests": {"cpu": "50m", "memory": "64Mi"},
                         "limits": {"cpu": 4, "memory": "1Gi"}}  # fmt: skip
    assert GatewaySpec.model_validate(created["spec"]).resources is not None
    assert "resources" not in create(gateway("plain"))["spec"]  # unset stays unset
    for index, (resources, expected) in enumerate(GATEWAY_RESOURCES_REFUSED):
        with pytest.raises(ApiException) as error:
            create(gateway(f"bad{index}", resources=resources))
        assert error.value.status == 422, error.value.body
        assert expected in str(error.value.body), (resources, error.value.body)
        with pytest.raises(ValidationError) as refused:
            GatewaySpec.model_validate({"resources": resources})
        lines = "\n".join(describe_errors(refused.value))
        assert expected.removeprefix("spec.") in lines, (resources, lines)
    with pytest.raises(ApiException) as error:
        create(gateway("outside", mode="External", resources={}))
    assert "resources apply only to mode InCluster" in str(error.value.body)


@pytest.mark.parametrize(
    ("spec", "field", "why"),
    [
        ({"trustedProxies": ["10.0.0.0"]}, "trustedProxies[0]", "CIDR range"),
        ({"trustedProxies": ["10.0.0.0/33"]}, "trustedProxies[0]", "CIDR range"),
        ({"trustedProxies": ["lb.example.com/8"]}, "trustedProxies[0]", "CIDR range"),
        ({"clientLimits": {"maxHeadBytes": 10}}, "maxHeadBytes", "greater than or equal to 1024"),
        (
            {"clientLimits": {"headTimeoutSeconds": 0}},
            "headTimeoutSeconds",
            "greater than or equal",
        ),
    ],
)
def test_gateway_front_end_settings_are_refused_alike_by_schema_and_model(
    kube: Cluster, spec: dict[str, Any], field: str, why: str
) -> None:
    api = client.CustomObjectsApi(kube.api_client())
    body = gateway(unique_name("lb"), **spec)
    with pytest.raises(ApiException) as error:
        api.create_cluster_custom_object(GROUP, VERSION, "gateways", body, dry_run="All")
    assert error.value.status == 422
    assert field in str(error.value.body) and why in str(error.value.body), error.value.body
    with pytest.raises(ValidationError) as refused:
        GatewaySpec.model_validate(spec)
    lines = "\n".join(describe_errors(refused.value))
    assert why in lines, lines
    accepted = as_object(api.create_cluster_custom_object(
        GROUP, VERSION, "gateways",
        gateway(unique_name("lb"), trustedProxies=["10.0.0.0/8", "2001:db8::/32"]), dry_run="All",
    ))  # fmt: skip
    assert accepted["spec"]["clientLimits"]["maxHeadBytes"] == 65536  # defaults applied
