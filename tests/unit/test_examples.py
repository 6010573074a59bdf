"""examples/: every kakuremichi resource passes ``kakuremichi validate`` (the operator's own
models), the pieces refer to each other correctly, and the READMEs' commands fit the files."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from kakuremichi.api.resources import API_VERSION, GROUP, KINDS
from kakuremichi.cli import main
from kakuremichi.control.agents import credentials_secret_name
from kakuremichi.control.manifests import AGENT_LABEL
from kakuremichi.control.tls_material import inspect

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
FILES = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".yaml", ".yml"))
KIND_NAMES = {kind.kind for kind in KINDS}
NAMESPACED = {kind.kind for kind in KINDS if kind.namespaced}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def all_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in FILES:
        for document in documents(path):
            yield path, document


def of_kind(kind: str, folder: Path | None = None) -> list[dict[str, Any]]:
    return [
        d
        for path, d in all_documents()
        if d.get("kind") == kind and (folder is None or path.parent == folder)
    ]


def key(document: dict[str, Any]) -> tuple[str, str]:
    metadata = document["metadata"]
    return metadata.get("namespace", "default"), metadata["name"]


def test_there_are_examples() -> None:
    folders = {p.parent.name for p in FILES}
    assert {"quickstart", "secret-certificate", "external-agent"} <= folders
    for folder in {p.parent for p in FILES} | {EXAMPLES}:
        if folder != EXAMPLES / "quickstart":
            assert (folder / "README.md").is_file(), f"{folder} has no README.md"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_resource_is_valid(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no manifest"
    ours = 0
    for document in docs:
        assert {"apiVersion", "kind", "metadata"} <= document.keys(), document
        assert document["metadata"].get("name"), document
        if str(document["apiVersion"]).startswith(f"{GROUP}/"):
            # validate skips what it does not know: a typo here would pass unseen.
            assert document["apiVersion"] == API_VERSION, document["apiVersion"]
            assert document["kind"] in KIND_NAMES, document["kind"]
            ours += 1
            if document["kind"] in NAMESPACED:
                assert document["metadata"].get("namespace"), "say the namespace explicitly"
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count(": valid") == ours


def test_validate_is_not_vacuous(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "tunnel.yaml"
    text = (EXAMPLES / "quickstart" / "40-tunnel.yaml").read_text()
    broken.write_text(text.replace("target: localhost:8080", "target: localhost"))
    assert main(["validate", str(broken)]) == 1
    assert "target" in capsys.readouterr().err


def test_workloads_run_an_agent_of_their_folder() -> None:
    workloads = [(p, d) for p, d in all_documents() if d["kind"] in WORKLOADS]
    assert workloads
    for path, workload in workloads:
        namespace = workload["metadata"]["namespace"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        agent = labels.get(AGENT_LABEL)
        assert agent, f"{path}: the Pod template has no {AGENT_LABEL} label"
        agents = {key(a) for a in of_kind("Agent", path.parent)}
        assert (namespace, agent) in agents, f"{path}: no Agent {namespace}/{agent} beside it"
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), f"{path}: the selector misses the template"
        if workload["kind"] == "Deployment":
            # One Agent is one WireGuard identity: one Pod at a time, also during updates.
            assert workload["spec"].get("replicas") == 1, path
            assert workload["spec"].get("strategy", {}).get("type") == "Recreate", path


def test_tunnels_name_an_agent_and_unique_domains() -> None:
    agents = {key(a) for a in of_kind("Agent")}
    tunnels = of_kind("Tunnel")
    assert tunnels
    for tunnel in tunnels:
        namespace = tunnel["metadata"]["namespace"]
        assert (namespace, tunnel["spec"]["agent"]) in agents, tunnel["metadata"]
    domains = [t["spec"]["domain"] for t in tunnels]
    assert len(domains) == len(set(domains)), "a domain belongs to one Tunnel"


def test_namespaces_exist() -> None:
    created = {d["metadata"]["name"] for d in of_kind("Namespace")} | {"default"}
    for path, document in all_documents():
        namespace = document["metadata"].get("namespace")
        assert namespace is None or namespace in created, f"{path}: namespace {namespace}"


def test_the_quickstart_applies_in_order() -> None:
    order = {"Namespace": 0, "Gateway": 1, "Agent": 2, "Deployment": 3, "Tunnel": 4}
    kinds = [
        d["kind"] for p in sorted((EXAMPLES / "quickstart").glob("*.yaml")) for d in documents(p)
    ]
    assert kinds == sorted(kinds, key=order.__getitem__), kinds
    tunnel = of_kind("Tunnel", EXAMPLES / "quickstart")[0]
    assert "tls" not in tunnel["spec"], "the quickstart shows the default: ACME"
    (gateway,) = of_kind("Gateway", EXAMPLES / "quickstart")
    assert gateway["spec"]["mode"] == "InCluster" and gateway["spec"]["nodeSelector"]


def _readme_lines(folder: str, start: str) -> list[str]:
    text = (EXAMPLES / folder / "README.md").read_text()
    return [line.strip() for line in text.splitlines() if line.strip().startswith(start)]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_the_readmes_self_signed_certificate_serves_its_tunnel(tmp_path: Path) -> None:
    folder = EXAMPLES / "secret-certificate"
    (tunnel,) = of_kind("Tunnel", folder)
    assert tunnel["spec"]["tls"]["issuer"] == "Secret"
    (openssl,) = _readme_lines("secret-certificate", "openssl req")
    subprocess.run(shlex.split(openssl), cwd=tmp_path, capture_output=True, check=True)
    info = inspect(
        (tmp_path / "tls.crt").read_bytes(),
        (tmp_path / "tls.key").read_bytes(),
        tunnel["spec"]["domain"],
        datetime.now(UTC),
    )
    assert info.dns_names == (tunnel["spec"]["domain"],)
    for line in _readme_lines("secret-certificate", "kubectl -n"):
        if "create secret tls" in line:
            words = shlex.split(line)
            assert words[2] == tunnel["metadata"]["namespace"], line
            assert words[6] == tunnel["spec"]["tls"]["secretName"], line
    (curl,) = _readme_lines("secret-certificate", "curl ")
    assert f"{tunnel['spec']['domain']}:443:127.0.0.1" in curl


def test_the_external_agent_readme_names_its_agent() -> None:
    (agent,) = of_kind("Agent", EXAMPLES / "external-agent")
    namespace, name = key(agent)
    (command,) = _readme_lines("external-agent", "kakuremichi agent-command")
    assert shlex.split(command)[2:5] == [name, "-n", namespace], command
    (kubectl,) = _readme_lines("external-agent", "kubectl -n")
    assert f"get secret {credentials_secret_name(name)} " in kubectl
    assert re.search(r"\{\.data\.apiKey\}", kubectl)
    (tunnel,) = of_kind("Tunnel", EXAMPLES / "external-agent")
    assert tunnel["spec"]["agent"] == name
