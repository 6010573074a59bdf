"""Custom resources as users write them: camelCase YAML in, errors that name the field out."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kakuremichi.api.fields import SENTENCES, describe_errors
from kakuremichi.api.resources import (
    GATEWAY_MEMORY_PER_PROCESS,
    Agent,
    AgentStatus,
    Certificate,
    Gateway,
    GatewaySpec,
    Tunnel,
)
from kakuremichi.api.validation import quantity_amount
from kakuremichi.edge.worker_count import MEMORY_PER_PROCESS


def load(text: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(text)
    return document


TUNNEL = """
apiVersion: kakuremichi.io/v1alpha1
kind: Tunnel
metadata: {name: app, namespace: default, uid: 4b0b6c1e-9d3a-4d0e-8a53-0d2f1f7f1a11}
spec:
  domain: app.example.com
  agent: home-server
  target: localhost:8080
"""


def test_tunnel_defaults() -> None:
    tunnel = Tunnel.model_validate(load(TUNNEL))
    assert tunnel.spec.enabled is True
    assert tunnel.spec.tls.issuer == "ACME"
    assert tunnel.spec.tls.secret_name is None
    assert tunnel.metadata.namespace == "default"
    assert tunnel.status is None


def test_agent_with_empty_spec_and_generated_status() -> None:
    agent = Agent.model_validate(
        {
            "kind": "Agent",
            "metadata": {"name": "home-server"},
            "spec": {},
            "status": {
                "subnet": "10.1.0.0/24",
                "virtualIP": "10.1.0.100",
                "state": "online",
                "credentialsSecret": "home-server-credentials",
            },
        }
    )
    assert agent.status is not None
    assert agent.status.virtual_ip == "10.1.0.100"
    dumped = agent.status.model_dump(by_alias=True, exclude_none=True)
    assert dumped["virtualIP"] == "10.1.0.100" and dumped["state"] == "online"


def test_generated_values_are_not_part_of_the_agent_spec() -> None:
    with pytest.raises(ValidationError, match=r"spec\.subnet"):
        Agent.model_validate({"kind": "Agent", "metadata": {"name": "a"}, "spec": {"subnet": "x"}})


def errors_of(model: Any, document: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as error:
        model.model_validate(document)
    return describe_errors(error.value)


def said(field: str, kind: str, detail: str) -> str:
    """A refusal as users read it: the field, its type's sentence, then what exactly is wrong."""
    return f"{field}: {SENTENCES[kind]} ({detail}"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("spec", "domain"), "*.example.com",
         said("spec.domain", "DomainName", "'*.example.com': wildcard")),
        (("spec", "domain"), "10.0.0.1",
         said("spec.domain", "DomainName", "'10.0.0.1' is an IP address")),
        (("spec", "target"), "localhost",
         said("spec.target", "TargetAddress", "'localhost' must be host:port")),
        (("spec", "target"), "localhost:70000",
         said("spec.target", "TargetAddress", "'localhost:70000': port must be")),
        (("spec", "agent"), "Home_Server",
         said("spec.agent", "ResourceName", "'Home_Server' is not a valid name")),
        (("metadata", "name"), "App",
         said("metadata.name", "ResourceName", "'App' is not a valid name")),
        (("spec", "tls"), {"issuer": "Secret"}, "spec.tls: secretName is required"),
        (("spec", "tls"), {"issuer": "Vault"}, "spec.tls.issuer: Input should be 'ACME' or"),
    ],
)  # fmt: skip
def test_tunnel_errors_name_the_field_and_why(
    path: tuple[str, str], value: Any, expected: str
) -> None:
    document = load(TUNNEL)
    document[path[0]][path[1]] = value
    lines = errors_of(Tunnel, document)
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"publicIP": "127.0.0.1"},
            said("spec.publicIP", "PublicIPv4", "'127.0.0.1' is a loopback address"),
        ),
        (
            {"publicIP": "300.1.1.1"},
            said("spec.publicIP", "PublicIPv4", "'300.1.1.1' is not a valid IPv4 address"),
        ),
        ({"region": "Tokyo"}, said("spec.region", "RegionName", "'Tokyo' is not a valid region")),
        ({"ports": {"http": 0}}, "spec.ports.http: Input should be greater than or equal to 1"),
        ({"ports": {"http": 443}}, "spec.ports: http and https must be different ports"),
        ({"mode": "External", "nodeSelector": {"a": "b"}}, "spec: nodeSelector, tolerations"),
        ({"mode": "External", "resources": {}}, "spec: nodeSelector, tolerations and resources"),
        (
            {"resources": {"limits": {"cpu": "two"}}},
            said("spec.resources.limits.cpu", "Quantity", "'two' is not a resource quantity"),
        ),
        ({"resources": {"limits": {"cpu": True}}}, "spec.resources.limits.cpu: Input should be"),
        (
            {"resources": {"requests": {"cpu": "1500m"}, "limits": {"cpu": 1}}},
            "spec.resources: requests.cpu must not exceed limits.cpu",
        ),
        (
            {"resources": {"limits": {"memory": "127Mi"}}},
            "spec.resources: limits.memory must be at least 128Mi",
        ),
    ],
)
def test_gateway_errors_name_the_field(spec: dict[str, Any], expected: str) -> None:
    lines = errors_of(Gateway, {"kind": "Gateway", "metadata": {"name": "edge"}, "spec": spec})
    assert any(line.startswith(expected) for line in lines), lines


def test_gateway_defaults_for_a_daemonset() -> None:
    gateway = Gateway.model_validate(
        {
            "kind": "Gateway",
            "metadata": {"name": "edge"},
            "spec": {"nodeSelector": {"role": "edge"}, "tolerations": [{"operator": "Exists"}]},
        }
    )
    assert gateway.spec.mode == "InCluster"
    assert (gateway.spec.ports.http, gateway.spec.ports.https, gateway.spec.ports.wireguard) == (
        80,
        443,
        51820,
    )
    assert gateway.spec.public_ip is None
    assert gateway.spec.resources is None


def test_gateway_resources_take_what_a_pod_takes_and_keep_the_other_defaults() -> None:
    spec = GatewaySpec.model_validate({"resources": {"limits": {"cpu": 2, "memory": "0.5Gi"}}})
    assert spec.resources is not None
    assert spec.resources.as_container_resources() == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"cpu": "2", "memory": "0.5Gi"},
    }


def test_the_memory_per_process_is_the_gateways_own() -> None:
    assert quantity_amount(GATEWAY_MEMORY_PER_PROCESS) == MEMORY_PER_PROCESS


def test_certificate_requires_domain_and_secret() -> None:
    lines = errors_of(Certificate, {"kind": "Certificate", "metadata": {"name": "c"}, "spec": {}})
    assert "spec.domain: Field required" in lines
    assert "spec.secretName: Field required" in lines
    certificate = Certificate.model_validate(
        {
            "kind": "Certificate",
            "metadata": {"name": "c"},
            "spec": {"domain": "app.example.com", "secretName": "app-tls"},
        }
    )
    assert certificate.spec.auto_renew is True and certificate.spec.issuer == "ACME"


def test_status_round_trip_keeps_camel_case_names() -> None:
    status = AgentStatus(subnet="10.2.0.0/24", virtual_ip="10.2.0.100")
    assert AgentStatus.model_validate(status.model_dump(by_alias=True)) == status
