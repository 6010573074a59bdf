"""hack/kind-up.sh and hack/kind-down.sh, run against stand-ins for docker, kind, helm and kubectl
that record how they are called (the test machines have no Docker). shellcheck covers both
scripts through tests/unit/test_scripts.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KIND_UP = REPO / "hack" / "kind-up.sh"
KIND_DOWN = REPO / "hack" / "kind-down.sh"
TOOLS = ("docker", "kind", "helm", "kubectl")
# What the scripts use besides the four tools (linked into a folder of their own, so that a
# kubectl or docker of this machine never shows through).
UTILITIES = ("bash", "sed", "head", "grep", "git", "dirname", "basename", "cat", "env")
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

# Each stand-in appends its argv (and, for `--config=-`, its standard input) as one JSON line.
STUB = """#!/usr/bin/env bash
set -eu
name=$(basename "$0")
stdin=""
case " $* " in *" --config=- "*) stdin=$(cat) ;; esac
python3 - "$name" "$stdin" "$@" >>"$STUB_LOG" <<'PY'
import json, sys
print(json.dumps({"tool": sys.argv[1], "stdin": sys.argv[2], "args": sys.argv[3:]}))
PY
case "$name $*" in
  "kind get clusters") printf '%s\\n' ${STUB_CLUSTERS:-} ;;
  "docker info") exit "${STUB_DOCKER_INFO:-0}" ;;
  "kubectl "*"rollout status"*) exit "${STUB_ROLLOUT:-0}" ;;
esac
"""


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    calls: list[dict[str, Any]]

    def of(self, tool: str) -> list[list[str]]:
        return [c["args"] for c in self.calls if c["tool"] == tool]


@pytest.fixture
def bin_dirs(tmp_path: Path) -> tuple[Path, Path]:
    stubs, utilities = tmp_path / "stubs", tmp_path / "utilities"
    stubs.mkdir()
    utilities.mkdir()
    for tool in TOOLS:
        (stubs / tool).write_text(STUB)
        (stubs / tool).chmod(0o755)
    for name in UTILITIES:
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is not installed")
        (utilities / name).symlink_to(found)
    (utilities / "python3").symlink_to(sys.executable)
    return stubs, utilities


def run(
    script: Path,
    bin_dirs: tuple[Path, Path],
    tmp_path: Path,
    tools: tuple[str, ...] = TOOLS,
    **env: str,
) -> Run:
    stubs, utilities = bin_dirs
    for tool in TOOLS:
        if tool not in tools:
            (stubs / tool).unlink(missing_ok=True)
    chart = tmp_path / "chart"
    chart.mkdir(exist_ok=True)
    (chart / "Chart.yaml").write_text("name: kakuremichi\n")
    log = tmp_path / "calls.jsonl"
    log.write_text("")
    result = subprocess.run(
        [str(script)], capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path,
        env={"PATH": f"{stubs}:{utilities}", "HOME": str(tmp_path), "STUB_LOG": str(log),
             "CHART": str(chart), **env},
    )  # fmt: skip
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return Run(result.returncode, result.stdout, result.stderr, calls)


def test_kind_up_creates_builds_loads_installs_and_applies(
    bin_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    result = run(KIND_UP, bin_dirs, tmp_path, KIND_CLUSTER="km-test")
    assert result.returncode == 0, result.stderr
    order = [(c["tool"], c["args"][0]) for c in result.calls]
    assert order == [
        ("docker", "info"), ("kind", "get"), ("kind", "create"), ("docker", "build"),
        ("kind", "load"), ("helm", "upgrade"), ("kubectl", "--context"), ("kubectl", "--context"),
    ]  # fmt: skip
    image = f"kakuremichi/edge:{VERSION}"

    (create,) = [a for a in result.of("kind") if a[0] == "create"]
    assert create[:4] == ["create", "cluster", "--name", "km-test"]
    (build,) = [a for a in result.of("docker") if a[0] == "build"]
    assert build[1:5] == ["-f", str(REPO / "edge-image" / "Dockerfile"), "-t", image]
    assert build[-1] == str(REPO) and f"VERSION={VERSION}" in build
    (load,) = [a for a in result.of("kind") if a[0] == "load"]
    assert load == ["load", "docker-image", image, "--name", "km-test"]

    (helm,) = result.of("helm")
    assert helm[:4] == ["upgrade", "--install", "kakuremichi", str(tmp_path / "chart")]
    sets = dict(helm[i + 1].split("=", 1) for i, word in enumerate(helm) if word == "--set")
    assert sets["image.repository"] == sets["edgeImage.repository"] == "kakuremichi/edge"
    assert sets["image.tag"] == sets["edgeImage.tag"] == VERSION
    assert "--kube-context" in helm and helm[helm.index("--kube-context") + 1] == "kind-km-test"

    apply, rollout = result.of("kubectl")
    assert apply == ["--context", "kind-km-test", "apply", "-f", f"{REPO}/examples/quickstart/"]
    assert rollout[:2] == ["--context", "kind-km-test"] and "rollout" in rollout
    assert "make kind-down" in result.stdout


def test_the_cluster_fits_the_quickstart(bin_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    result = run(KIND_UP, bin_dirs, tmp_path, HTTPS_PORT="8443")
    assert result.returncode == 0, result.stderr
    (create,) = [c for c in result.calls if c["args"][:2] == ["create", "cluster"]]
    config = yaml.safe_load(create["stdin"])
    (node,) = config["nodes"]
    gateway = yaml.safe_load((REPO / "examples" / "quickstart" / "10-gateway.yaml").read_text())
    assert gateway["spec"]["nodeSelector"].items() <= node["labels"].items()
    mappings = {
        (m["containerPort"], m["protocol"]): m["hostPort"] for m in node["extraPortMappings"]
    }
    assert mappings == {(80, "TCP"): 80, (443, "TCP"): 8443, (51820, "UDP"): 51820}
    # Agent subnets must not overlap the cluster's own ranges.
    (helm,) = result.of("helm")
    excluded = next(w for w in helm if w.startswith("excludeCIDRs="))
    networking = config["networking"]
    assert excluded == f"excludeCIDRs={{{networking['podSubnet']},{networking['serviceSubnet']}}}"


def test_kind_up_reuses_an_existing_cluster(bin_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    result = run(KIND_UP, bin_dirs, tmp_path, STUB_CLUSTERS="other kakuremichi")
    assert result.returncode == 0, result.stderr
    assert not [a for a in result.of("kind") if a[0] == "create"]
    assert "reusing" in result.stderr


@pytest.mark.parametrize(
    ("tools", "env", "message"),
    [
        (("docker", "kubectl"), {}, "missing kind helm"),
        (TOOLS, {"STUB_DOCKER_INFO": "1"}, "cannot reach the Docker daemon"),
        (TOOLS, {"HTTP_PORT": "eighty"}, "ports must be numbers"),
        (TOOLS, {"CHART": "/nonexistent"}, "no Helm chart"),
        (TOOLS, {"STUB_ROLLOUT": "1"}, "not running yet"),
    ],
    ids=["missing-tools", "no-daemon", "bad-port", "no-chart", "rollout-fails"],
)
def test_kind_up_fails_clearly(
    bin_dirs: tuple[Path, Path],
    tmp_path: Path,
    tools: tuple[str, ...],
    env: dict[str, str],
    message: str,
) -> None:
    result = run(KIND_UP, bin_dirs, tmp_path, tools, **env)
    assert result.returncode == 1
    assert message in result.stderr


def test_kind_down(bin_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    result = run(KIND_DOWN, bin_dirs, tmp_path, STUB_CLUSTERS="kakuremichi")
    assert result.returncode == 0, result.stderr
    assert ["delete", "cluster", "--name", "kakuremichi"] in result.of("kind")
    result = run(KIND_DOWN, bin_dirs, tmp_path)
    assert result.returncode == 0 and "nothing to do" in result.stderr
    assert not [a for a in result.of("kind") if a[0] == "delete"]
    result = run(KIND_DOWN, bin_dirs, tmp_path, tools=())
    assert result.returncode == 1 and "kind is not installed" in result.stderr


@pytest.mark.parametrize("script", [KIND_UP, KIND_DOWN], ids=lambda p: p.name)
def test_syntax_and_help(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert "Usage:" in result.stdout and "KIND_CLUSTER" in result.stdout


def test_make_targets() -> None:
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "kind-up", "kind-down"], cwd=REPO,
        capture_output=True, text=True, check=True, env={**os.environ, "MAKEFLAGS": ""},
    )  # fmt: skip
    assert result.stdout.split() == ["hack/kind-up.sh", "hack/kind-down.sh"]
