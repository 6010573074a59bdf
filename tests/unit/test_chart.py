"""The Helm chart's static parts, without helm: its CRDs are the generated ones, its version is
the package's, its values schema keeps up with values.yaml, and the operator flags its
Deployment passes exist. (tests/integration/test_helm_chart.py renders and installs it.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from kakuremichi import __version__
from kakuremichi.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kakuremichi"


def test_chart_crds_are_the_generated_ones() -> None:
    generated = {path.name: path.read_bytes() for path in (REPO / "crds").glob("*.yaml")}
    in_chart = {path.name: path.read_bytes() for path in (CHART / "crds").iterdir()}
    assert generated, "crds/ is empty"
    assert in_chart == generated, "run `make crds` (it copies crds/*.yaml into the chart)"


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "kakuremichi"
    assert chart["appVersion"] == __version__
    assert chart["kubeVersion"] == ">=1.29.0-0"


def _undescribed(schema: dict[str, Any], where: str) -> list[str]:
    missing = [] if "description" in schema or where == "" else [where]
    for name, child in schema.get("properties", {}).items():
        missing += _undescribed(child, f"{where}.{name}")
    return missing


def _keys(values: dict[str, Any], schema: dict[str, Any], where: str) -> list[str]:
    """Keys of values.yaml the schema does not name (recursing where the schema is closed)."""
    unknown = []
    properties = schema.get("properties", {})
    for key, value in values.items():
        if key not in properties:
            unknown.append(f"{where}.{key}")
        elif isinstance(value, dict) and properties[key].get("additionalProperties") is False:
            unknown += _keys(value, properties[key], f"{where}.{key}")
    return unknown


def test_values_schema_covers_values_and_describes_everything() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False  # a misspelt key is an error
    assert _keys(values, schema, "") == []
    assert _undescribed(schema, "") == []


def test_deployment_passes_only_flags_the_operator_has() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    operator = commands.choices["operator"]  # type: ignore[index]
    known = {flag for action in operator._actions for flag in action.option_strings}
    template = (CHART / "templates" / "deployment.yaml").read_text()
    passed = set(re.findall(r'^\s+- "?(--[a-z-]+)', template, flags=re.MULTILINE))
    passed |= set(re.findall(r'printf "(--[a-z-]+)=', template))
    assert {"--db", "--control-url", "--webhook-host", "--liveness"} <= passed
    assert passed <= known, f"unknown operator flags: {passed - known}"
