"""The CRDs are generated from the models, structural, up to date, and reject what the models do."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kakuremichi.api import crd, validation
from kakuremichi.api.resources import CERTIFICATE, GATEWAY, GROUP, KINDS, TUNNEL
from tests.unit.test_validation import (
    INVALID_DOMAINS,
    INVALID_NAMES,
    INVALID_PUBLIC_IPS,
    INVALID_TARGETS,
    VALID_DOMAINS,
    VALID_NAMES,
    VALID_PUBLIC_IPS,
    VALID_TARGETS,
)

REPO = Path(__file__).resolve().parents[2]

# Short names used by Gateway API, cert-manager and core Kubernetes that ours must not shadow.
TAKEN_SHORT_NAMES = {
    "gtw", "gc", "httproute", "cert", "certs", "cr", "crs", "iss", "ciss", "ing", "svc", "po",
    "deploy", "ds", "ns", "no", "sa", "ep", "cm", "secret", "tun", "agent", "gw",
}  # fmt: skip


def openapi(kind_crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = kind_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_checked_in_crds_are_current() -> None:
    assert crd.stale_files(REPO / "crds") == [], "run `kakuremichi crds --output-dir crds`"


def test_stale_files_notices_an_edit(tmp_path: Path) -> None:
    crd.write_all(tmp_path)
    assert crd.stale_files(tmp_path) == []
    edited = tmp_path / crd.file_name(TUNNEL)
    edited.write_text(edited.read_text() + "# edited\n")
    (tmp_path / crd.file_name(GATEWAY)).unlink()
    assert sorted(crd.stale_files(tmp_path)) == sorted(
        [crd.file_name(TUNNEL), crd.file_name(GATEWAY)]
    )


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_names_scope_and_subresources(kind: Any) -> None:
    generated = yaml.safe_load(crd.render(kind))
    spec = generated["spec"]
    assert generated["metadata"]["name"] == f"{kind.plural}.{GROUP}"
    assert spec["group"] == "kakuremichi.io"
    assert spec["names"]["categories"] == ["kakuremichi"]
    assert spec["names"]["plural"] == kind.plural
    assert not set(spec["names"]["shortNames"]) & TAKEN_SHORT_NAMES
    assert spec["scope"] == ("Namespaced" if kind.namespaced else "Cluster")
    assert kind.namespaced == (kind.kind not in ("Gateway", "TenantPolicy"))
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Ready", "Age"} <= columns


def test_printer_columns_users_want() -> None:
    def columns(kind: Any) -> dict[str, str]:
        version = yaml.safe_load(crd.render(kind))["spec"]["versions"][0]
        return {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}

    agent = columns(KINDS[0])
    assert agent["Subnet"] == ".status.subnet"
    assert agent["Virtual IP"] == ".status.virtualIP"
    assert agent["State"] == ".status.state"
    assert agent["Last Seen"] == ".status.lastSeenAt"
    tunnel = columns(TUNNEL)
    assert {"Domain", "Agent", "Target", "Ready"} <= set(tunnel)
    assert columns(CERTIFICATE)["Expires"] == ".status.notAfter"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind: Any) -> None:
    root = openapi(crd.custom_resource_definition(kind))
    for path, node in walk(root):
        if node.get("x-kubernetes-int-or-string"):  # the one union allowed, and without a type
            assert "type" not in node
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}]
            continue
        assert "type" in node, f"{kind.kind}{path} has no type"
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "nullable", "title", "const"):
            assert forbidden not in node, f"{kind.kind}{path} uses {forbidden}"
        if "properties" in node:
            assert node["type"] == "object"
            assert "additionalProperties" not in node
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["message"], f"{kind.kind}{path}: CEL rule without a message"
    status = root["properties"]["status"]["properties"]
    assert "conditions" in status
    assert "observedGeneration" in status
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def test_specs_and_statuses_match_the_brief() -> None:
    def props(kind: Any, part: str) -> set[str]:
        return set(openapi(crd.custom_resource_definition(kind))["properties"][part]["properties"])

    agent, gateway, tunnel, certificate, tenant_policy = KINDS
    assert props(agent, "spec") == {"displayName"}
    assert {"state", "lastSeenAt", "credentialsSecret", "subnet", "virtualIP"} <= props(
        agent, "status"
    )
    assert {"publicIP", "region", "nodeSelector", "tolerations", "ports"} <= props(gateway, "spec")
    assert {"state", "lastSeenAt", "credentialsSecret", "publicIP", "instances"} <= props(
        gateway, "status"
    )
    assert {"domain", "agent", "target", "enabled", "description", "tls"} <= props(tunnel, "spec")
    assert "url" in props(tunnel, "status")
    assert props(tenant_policy, "spec") == {
        "namespaces", "domains", "ports", "maxAgents", "maxTunnels",
    }  # fmt: skip
    assert tenant_policy.short_names == ("kmtenant",) and not tenant_policy.namespaced
    assert {"domain", "secretName", "autoRenew", "issuer"} <= props(certificate, "spec")
    assert {"notBefore", "notAfter", "renewalTime", "lastRenewedAt"} <= props(certificate, "status")
    tunnel_spec = openapi(crd.custom_resource_definition(tunnel))["properties"]["spec"]
    assert tunnel_spec["required"] == ["domain", "agent", "target"]
    assert tunnel_spec["properties"]["enabled"]["default"] is True


# --- The API server's view of a value, evaluated here with the same regular expressions ------

_CEL_TERM = re.compile(r"^(!?)self\.matches\('((?:[^'\\]|\\.)*)'\)$")


def cel_accepts(rule: str, value: str) -> bool:
    """Evaluate a rule made of ``[!]self.matches('...')`` terms joined by ``||``."""
    for term in rule.split(" || "):
        match = _CEL_TERM.match(term.strip())
        assert match, f"unsupported CEL term in test evaluator: {term}"
        negate, literal = match.groups()
        pattern = re.sub(r"\\(.)", r"\1", literal)
        if bool(re.search(pattern, value)) != bool(negate):
            return True
    return False


def schema_accepts(schema: dict[str, Any], value: str) -> bool:
    if len(value) > schema.get("maxLength", 10**9) or len(value) < schema.get("minLength", 0):
        return False
    if "pattern" in schema and not re.search(schema["pattern"], value):
        return False
    return all(cel_accepts(r["rule"], value) for r in schema.get("x-kubernetes-validations", []))


def field_schema(kind: Any, *path: str) -> dict[str, Any]:
    node = openapi(crd.custom_resource_definition(kind))
    for name in path:
        node = node["properties"][name]
    return node


@pytest.mark.parametrize(
    ("path", "valid", "invalid"),
    [
        (("spec", "domain"), VALID_DOMAINS, INVALID_DOMAINS),
        (("spec", "target"), VALID_TARGETS, INVALID_TARGETS),
        (("metadata", "name"), VALID_NAMES, INVALID_NAMES),
    ],
    ids=["domain", "target", "name"],
)
def test_tunnel_schema_agrees_with_models(
    path: tuple[str, ...], valid: list[str], invalid: list[tuple[str, str]]
) -> None:
    schema = field_schema(TUNNEL, *path)
    for value in valid:
        assert schema_accepts(schema, value), f"API server would refuse valid {value!r}"
    # The schema checks IPv6 hosts only by shape; the operator's model refuses the rest.
    shape_only = {"[zz::1]:80"}
    for value, _ in invalid:
        if value not in shape_only:
            assert not schema_accepts(schema, value), f"API server would accept {value!r}"


def test_public_ip_schema_agrees_with_models() -> None:
    schema = field_schema(GATEWAY, "spec", "publicIP")
    for value in VALID_PUBLIC_IPS:
        assert schema_accepts(schema, value), value
    for value, _ in INVALID_PUBLIC_IPS:
        assert not schema_accepts(schema, value), value


@pytest.mark.parametrize("first_octet", range(256))
def test_public_ip_schema_agrees_for_every_first_octet(first_octet: int) -> None:
    value = f"{first_octet}.1.2.3"
    try:
        validation.public_ipv4(value)
        model_accepts = True
    except ValueError:
        model_accepts = False
    assert schema_accepts(field_schema(GATEWAY, "spec", "publicIP"), value) == model_accepts
