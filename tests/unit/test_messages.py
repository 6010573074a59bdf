"""A refused field says in a sentence what it must be, the same sentence whoever refuses it: the
model (``kakuremichi validate``, the operator) and the API server (the CRD carries it as the
message of a CEL rule instead of a ``pattern``, whose answer would be the regular expression).
One case per field type of ours."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kakuremichi.api import crd
from kakuremichi.api.fields import SENTENCES, describe_errors
from kakuremichi.api.resources import CERTIFICATE, GATEWAY, TENANT_POLICY, TUNNEL, ResourceKind

TUNNEL_SPEC = {"domain": "app.example.com", "agent": "home", "target": "localhost:8080"}

CASES: list[tuple[ResourceKind, dict[str, Any], str, str, str]] = [
    # kind, spec, the field as users write it, the field type, the schema path inside spec
    (TUNNEL, {**TUNNEL_SPEC, "domain": "App.example.com"}, "spec.domain", "DomainName",
     "domain"),
    (TUNNEL, {**TUNNEL_SPEC, "agent": "Home_Server"}, "spec.agent", "ResourceName", "agent"),
    (TUNNEL, {**TUNNEL_SPEC, "target": "localhost"}, "spec.target", "TargetAddress", "target"),
    (TUNNEL, {**TUNNEL_SPEC, "tls": {"issuer": "Secret", "secretName": "App_TLS"}},
     "spec.tls.secretName", "SecretName", "tls.secretName"),
    (CERTIFICATE, {"domain": "app.example.com", "secretName": "-tls"}, "spec.secretName",
     "SecretName", "secretName"),
    (GATEWAY, {"publicIP": "127.0.0.1"}, "spec.publicIP", "PublicIPv4", "publicIP"),
    (GATEWAY, {"region": "Tokyo"}, "spec.region", "RegionName", "region"),
    (GATEWAY, {"resources": {"limits": {"cpu": "two"}}}, "spec.resources.limits.cpu", "Quantity",
     "resources.limits.cpu"),
    (GATEWAY, {"trustedProxies": ["10.0.0.0/33"]}, "spec.trustedProxies.0", "CidrRange",
     "trustedProxies[]"),
    (TENANT_POLICY, {"namespaces": {"matchNames": ["Team_A"]}}, "spec.namespaces.matchNames.0",
     "NamespaceName", "namespaces.matchNames[]"),
    (TENANT_POLICY, {"namespaces": {"matchNames": ["a"]}, "domains": ["*.Example.com"]},
     "spec.domains.0", "DomainPattern", "domains[]"),
]  # fmt: skip


def schema_at(kind: ResourceKind, path: str) -> dict[str, Any]:
    document = yaml.safe_load(crd.render(kind))
    node = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for part in path.split("."):
        many = part.endswith("[]")
        node = node["properties"][part.removesuffix("[]")]
        if many:
            node = node["items"]
    return dict(node)


@pytest.mark.parametrize(("kind", "spec", "field", "type_name", "schema_path"), CASES)
def test_a_refusal_is_the_fields_sentence_for_model_and_api_server_alike(
    kind: ResourceKind, spec: dict[str, Any], field: str, type_name: str, schema_path: str
) -> None:
    sentence = SENTENCES[type_name]
    with pytest.raises(ValidationError) as refused:
        kind.model.model_validate(
            {"apiVersion": "kakuremichi.io/v1alpha1", "kind": kind.kind,
             "metadata": {"name": "x"}, "spec": spec}
        )  # fmt: skip
    lines = describe_errors(refused.value)
    assert any(line.startswith(f"{field}: {sentence}") for line in lines), lines
    schema = schema_at(kind, schema_path)
    assert "pattern" not in schema  # (the API server would answer with the expression)
    messages = [rule["message"] for rule in schema.get("x-kubernetes-validations", [])]
    assert sentence in messages


def test_every_sentence_is_one_that_a_user_can_act_on() -> None:
    for name, sentence in SENTENCES.items():
        assert sentence.startswith("must be "), name
        assert "^" not in sentence and "$" not in sentence and "[a-z" not in sentence, name
