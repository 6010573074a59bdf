"""CustomResourceDefinitions generated from the resource models.

pydantic's JSON schema is turned into a Kubernetes *structural* schema: references are inlined,
optional values lose their ``null`` branch (absent means unset), ``const`` becomes ``enum`` and
``additionalProperties: false`` is dropped (the API server prunes unknown fields instead). The one
union a structural schema allows, Kubernetes' int-or-string (resource quantities), is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kakuremichi.api import validation
from kakuremichi.api.fields import CamelModel
from kakuremichi.api.resources import GROUP, KINDS, VERSION, ResourceKind

_KEPT_KEYWORDS = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "default",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


def structural_schema(model: type[CamelModel]) -> dict[str, Any]:
    """The OpenAPI v3 structural schema of ``model`` (by alias, as users write it)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    definitions: dict[str, Any] = schema.pop("$defs", {})
    return _convert(schema, definitions)


def _convert(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        merged = {**definitions[name], **{k: v for k, v in node.items() if k != "$ref"}}
        return _convert(merged, definitions)
    if node.get("x-kubernetes-int-or-string"):
        union = ("anyOf", "x-kubernetes-int-or-string")
        rest = _convert({k: v for k, v in node.items() if k not in union}, definitions)
        return rest | {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
        }
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {node}")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        return _convert({**branches[0], **rest}, definitions)
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
    converted: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEPT_KEYWORDS:
            continue
        if key == "properties":
            converted[key] = {name: _convert(sub, definitions) for name, sub in value.items()}
        elif key == "items":
            converted[key] = _convert(value, definitions)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                converted[key] = _convert(value, definitions)
        elif key == "default":
            # {} on an object with properties makes the API server fill in its fields' defaults
            # when the object is left out; empty lists, maps and nulls are just noise.
            if value not in (None, [], {}) or (value == {} and "properties" in node):
                converted[key] = value
        elif key == "description":
            converted[key] = " ".join(value.replace("``", "").split())
        else:
            converted[key] = value
    if "properties" in converted:
        converted.setdefault("type", "object")
    return converted


def custom_resource_definition(kind: ResourceKind) -> dict[str, Any]:
    spec_schema = structural_schema(kind.spec)
    status_schema = structural_schema(kind.status)
    root: dict[str, Any] = {
        "type": "object",
        "description": spec_schema.get("description", kind.kind),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": validation.NAME_MAX_LENGTH,
                        "pattern": validation.NAME_PATTERN,
                    }
                },
            },
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    if kind.spec_required:
        root["required"] = ["spec"]
    else:
        spec_schema["default"] = {}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.crd_name,
            "labels": {"app.kubernetes.io/part-of": "kakuremichi"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced" if kind.namespaced else "Cluster",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": list(kind.categories),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [c.to_crd() for c in kind.columns],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


_HEADER = "# Generated by `kakuremichi crds --output-dir crds`; do not edit.\n"


def render(kind: ResourceKind) -> str:
    body = yaml.safe_dump(custom_resource_definition(kind), sort_keys=False, width=100)
    return _HEADER + body


def file_name(kind: ResourceKind) -> str:
    return f"{GROUP}_{kind.plural}.yaml"


def render_all() -> dict[str, str]:
    """File name → YAML text for every kind."""
    return {file_name(kind): render(kind) for kind in KINDS}


def write_all(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_files(directory: Path) -> list[str]:
    """Names of generated files in ``directory`` that are missing or differ from the models."""
    stale = []
    for name, text in render_all().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale
