"""Fixtures that start real components: network namespaces, WireGuard, the local API server,
Pebble. Each is torn down after use, and a test that needs something this machine lacks skips
with the reason."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.infra import binaries, cluster, netns, pebble, ports, tlsgen, wireguard
from tests.infra.edge_sessions import EdgeSessions
from tests.infra.polling import wait_until


@pytest.fixture(scope="session")
def namespaces_supported() -> None:
    reason = netns.can_create_namespaces()
    if reason:
        pytest.skip(reason)
    netns.sweep_stale()


@pytest.fixture
def make_host(namespaces_supported: None) -> Iterator[netns.HostFactory]:
    created: list[netns.Host] = []

    def factory(role: str) -> netns.Host:
        host = netns.Host(role)
        created.append(host)
        return host

    yield factory
    for host in reversed(created):
        host.destroy()


@pytest.fixture(scope="session")
def wireguard_mode(namespaces_supported: None) -> wireguard.Mode:
    mode, why = wireguard.available_mode()
    if mode is None:
        pytest.skip(why)
    return mode


@pytest.fixture(scope="session")
def kernel_wireguard(namespaces_supported: None) -> None:
    reason = wireguard.kernel_wireguard_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def pebble_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pebble.Pebble]:
    """Pebble and pebble-challtestsrv; point names at a host with ``add_a``."""
    reason = binaries.missing("pebble", "pebble-challtestsrv")
    if reason:
        pytest.skip(reason)
    server = pebble.start(tmp_path_factory.mktemp("pebble"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Cluster]:
    """The API server: our own local control plane, or an existing cluster when opted in."""
    reason = cluster.unavailable()
    if reason:
        pytest.skip(reason)
    started = cluster.start(tmp_path_factory.mktemp("cluster"))
    yield started
    started.stop()


@pytest.fixture
def namespace(kube: cluster.Cluster) -> Iterator[str]:
    """A fresh namespace, deleted after the test."""
    name = cluster.unique_name("kmt")
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@dataclass
class OperatorProcess:
    """``kakuremichi operator`` running as users run it, against the test cluster."""

    kube: cluster.Cluster
    namespace: str
    db_path: Path
    log_path: Path
    control_url: str
    args: list[str]
    ca_file: Path | None = None
    health_url: str | None = None
    """Where this machine reaches /healthz, when not at ``control_url`` (a name only the
    edges' namespaces resolve)."""
    start_timeout: float = 60.0
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kube.kubeconfig)}
        command = [str(Path(sys.executable).parent / "kakuremichi"), "operator", *self.args]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.healthy, "the operator's control channel", timeout=self.start_timeout)

    def healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"the operator exited:\n{self.log()[-3000:]}")
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None
            url = self.health_url or f"{self.control_url}/healthz"
            with urllib.request.urlopen(url, timeout=2, context=context):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def operator_namespace(kube: cluster.Cluster) -> Iterator[str]:
    name = cluster.unique_name("kmop")
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


def local_operator(
    kube: cluster.Cluster,
    namespace: str,
    workdir: Path,
    *extra_args: str,
    tls: tlsgen.TestCA | None = None,
) -> OperatorProcess:
    """The operator watching ``namespace``, with a small subnet pool (10.1-3.0.0/24), its
    control channel on loopback (over TLS with a certificate of ``tls``, when given); not
    started yet."""
    db_path = workdir / "kakuremichi.db"
    port = ports.free_port()
    scheme, tls_args, ca_file = "http", [], None
    if tls is not None:
        serving = tls.issue("127.0.0.1")
        (workdir / "control.crt").write_text(serving.certificate_pem)
        (workdir / "control.key").write_text(serving.private_key_pem)
        ca_file = workdir / "control-ca.pem"
        ca_file.write_text(tls.pem)
        scheme = "https"
        tls_args = ["--control-tls-cert", str(workdir / "control.crt"),
                    "--control-tls-key", str(workdir / "control.key")]  # fmt: skip
    return OperatorProcess(
        kube=kube,
        namespace=namespace,
        db_path=db_path,
        log_path=workdir / "operator.log",
        control_url=f"{scheme}://127.0.0.1:{port}",
        ca_file=ca_file,
        args=["--db", f"sqlite:///{db_path}", "--namespace", namespace,
              "--subnet-pool", "1-3", "--control-listen", f"127.0.0.1:{port}",
              "--control-url", f"{scheme}://127.0.0.1:{port}", "--heartbeat-timeout", "5",
              "--trust-loopback",
              "--system-namespace", namespace,
              "--webhook-listen", f"127.0.0.1:{ports.free_port()}",
              "--webhook-cert-dir", str(workdir / "webhook"), *tls_args, *extra_args],
    )  # fmt: skip


@pytest.fixture
def edges(operator: OperatorProcess) -> Iterator[EdgeSessions]:
    """Agents connected to the module's operator (a Tunnel serves only while its Agent is)."""
    sessions = EdgeSessions(operator.control_url, operator.ca_file)
    yield sessions
    sessions.close()


@pytest.fixture(scope="module")
def operator(
    kube: cluster.Cluster, operator_namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator watching one namespace (:func:`local_operator`)."""
    running = local_operator(kube, operator_namespace, tmp_path_factory.mktemp("operator"))
    running.start()
    yield running
    running.stop()
