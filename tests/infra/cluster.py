"""The Kubernetes API server the integration tests run against.

By default the suite starts its own control plane with hack/cluster.sh (etcd, kube-apiserver,
kube-controller-manager on loopback) in a temporary folder and stops it afterwards. To run the
same tests on kind or a real cluster, point KUBECONFIG at it and opt in explicitly with
KAKUREMICHI_TEST_EXISTING_CLUSTER=1: nobody's cluster is touched by accident.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client, config

from tests.infra import binaries

CLUSTER_SCRIPT = binaries.REPO / "hack" / "cluster.sh"
EXISTING_CLUSTER_FLAG = "KAKUREMICHI_TEST_EXISTING_CLUSTER"


@dataclass
class Cluster:
    kubeconfig: Path
    kubectl_path: Path
    state_dir: Path | None  # None for an existing cluster we did not start

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args],
            input=input_text, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout + result.stderr if not check else result.stdout

    def api_client(self, token: str | None = None) -> client.ApiClient:
        """An API client as the admin, or as the bearer of ``token`` (e.g. a ServiceAccount's)."""
        api: client.ApiClient = config.new_client_from_config(config_file=str(self.kubeconfig))
        if token is not None:
            api.configuration.api_key = {"BearerToken": token}
            api.configuration.api_key_prefix = {"BearerToken": "Bearer"}
            api.configuration.refresh_api_key_hook = None
        return api

    def stop(self) -> None:
        if self.state_dir is not None:
            subprocess.run(
                [str(CLUSTER_SCRIPT), "down"],
                env={**os.environ, "KAKUREMICHI_CLUSTER_DIR": str(self.state_dir)},
                check=False,
            )


def unavailable() -> str | None:
    """None when a cluster can be had, otherwise why not."""
    if os.environ.get(EXISTING_CLUSTER_FLAG) == "1":
        return (
            None if os.environ.get("KUBECONFIG") else f"{EXISTING_CLUSTER_FLAG}=1 needs KUBECONFIG"
        )
    return binaries.missing("kube-apiserver", "etcd", "kube-controller-manager", "kubectl")


def start(state_dir: Path) -> Cluster:
    kubectl = binaries.find("kubectl")
    assert kubectl is not None
    if os.environ.get(EXISTING_CLUSTER_FLAG) == "1":
        existing = Cluster(Path(os.environ["KUBECONFIG"]), kubectl, None)
        crds = str(binaries.REPO / "crds")
        existing.kubectl("apply", "--server-side", "-f", crds)
        existing.kubectl("wait", "--for", "condition=Established", "-f", crds)
        return existing
    env = {**os.environ, "KAKUREMICHI_CLUSTER_DIR": str(state_dir)}
    result = subprocess.run(
        [str(CLUSTER_SCRIPT), "up"], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        logs = "\n".join(
            f"--- {log.name}\n{log.read_text()[-3000:]}" for log in (state_dir / "logs").glob("*")
        ) if (state_dir / "logs").is_dir() else ""  # fmt: skip
        subprocess.run([str(CLUSTER_SCRIPT), "down"], env=env, check=False)
        raise RuntimeError(f"hack/cluster.sh up failed:\n{result.stderr}\n{logs}")
    return Cluster(Path(result.stdout.strip().splitlines()[-1]), kubectl, state_dir)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"
