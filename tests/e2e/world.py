"""An end-to-end world: the operator (control channel on TLS), a gateway and an agent each in a
network namespace started from the DaemonSet and sidecar the operator rendered, an origin beside
the agent, and a client namespace. Shared by the end-to-end test modules."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kakuremichi.api.resources import AGENT, CERTIFICATE, GATEWAY, TUNNEL
from kakuremichi.control.manifests import (
    AGENT_LABEL,
    CREDENTIALS_MOUNT,
    POD_TOKEN_MOUNT,
    SIDECAR_NAME,
    STATE_MOUNT,
    gateway_daemonset_name,
)
from tests.infra import cluster, kubelet, netns, ports, wireguard
from tests.infra.cluster import Cluster
from tests.infra.fixtures import OperatorProcess
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import wait_until
from tests.infra.tlsgen import TestCA

KAKUREMICHI = str(Path(sys.executable).parent / "kakuremichi")
ORIGIN = str(Path(__file__).with_name("origin.py"))
CONTROL_NAME = "control.kakuremichi.test"
HEARTBEAT_TIMEOUT = 5.0


@dataclass
class Edge:
    """An edge process in its namespace, restartable with the same command."""

    host: netns.Host
    command: list[str]
    log: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = self.host.spawn(self.command, log=self.log, env=self.env)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


ENDPOINT_RANGE = "192.168.254.0/24"
"""Where servers outside the cluster are, for the Ingress tests (``--endpoint-range``)."""


@dataclass
class World:
    kube: Cluster
    namespace: str
    operator: OperatorProcess
    gateway_host: netns.Host
    agent_host: netns.Host
    client_host: netns.Host
    ca_file: Path
    domain: str
    gateway_name: str
    workdir: Path
    gateway: Edge | None = None
    agent: Edge | None = None
    origin: subprocess.Popen[bytes] | None = None
    ca: TestCA = field(default_factory=TestCA)
    client_ca_file: Path | None = None
    """What curl in the client trusts, when not the test CA (e.g. Pebble's root)."""
    node: str = ""
    """The first gateway's Node."""
    control_ip: str = ""
    gateway_public_ip: str = ""
    gateway_client_ip: str = ""
    """The gateway's address on the client's link (where the client's names resolve)."""
    client_host_address: str = ""
    """The client's own address on that link (what the gateway sees it connect from)."""
    extra_hosts: list[netns.Host] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    """The DaemonSet container's arguments, credentials already remapped."""
    cleanups: list[Any] = field(default_factory=list)

    def add_node(self, external_ip: str) -> str:
        """A Node (no kubelet) the gateway pool selects, with its public address."""
        core = client.CoreV1Api(self.kube.api_client())
        node = cluster.unique_name("node")
        labels = {"e2e": self.namespace}
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node, labels=labels)))
        self.cleanups.append(lambda: core.delete_node(node))
        addresses = [{"type": "ExternalIP", "address": external_ip}]
        core.patch_node_status(node, {"status": {"addresses": addresses}})
        return node

    def start_gateway(
        self, host: netns.Host, node: str, *extra: str, token_of: str | None = None
    ) -> Edge:
        """The DaemonSet's pod on ``node``: bound to it and given its pod-bound token (as the
        scheduler and the kubelet would), then its command with the node name filled in.
        ``token_of``: hand it the token of the pod on that node instead (an impostor)."""
        api = self.kube.api_client()
        daemonset = gateway_daemonset_name(self.gateway_name)
        placed = kubelet.place(api, self.namespace, daemonset, node)
        if token_of is not None:
            placed = kubelet.place(api, self.namespace, daemonset, token_of)
        token_folder = self.workdir / f"gateway-{node}-pod-token"
        kubelet.write_pod_token(api, self.namespace, placed, token_folder)
        mounts = {STATE_MOUNT: self.state_dir(f"gateway-{node}"), POD_TOKEN_MOUNT: token_folder}
        args = mounted(self.gateway_args, mounts, {"NODE_NAME": node}) + list(extra)
        log = self.workdir / f"gateway-{node}.log"
        edge = Edge(host, [KAKUREMICHI, *args], log, {"SSL_CERT_FILE": str(self.ca_file)})
        edge.start()
        return edge

    def start_agent(
        self, namespace: str, agent: str, host: netns.Host, pod: str = "", *extra: str
    ) -> Edge:
        """Agent ``namespace/agent``'s sidecar, as the webhook injects it into a labelled Pod
        (named ``pod``, default ``<agent>-0``), running in ``host`` (``extra``: more
        arguments, e.g. a WireGuard interface name of its own beside another agent's)."""
        Objects(self.kube, namespace, AGENT).ready(agent)
        core = client.CoreV1Api(self.kube.api_client())
        made: Any = wait_until(
            lambda: core.create_namespaced_pod(namespace, _labelled_pod(agent, pod)),
            "the webhook to inject the sidecar",
        )
        (sidecar,) = [c for c in made.spec.containers if c.name == SIDECAR_NAME]
        (volume,) = [v for v in made.spec.volumes if v.secret]
        credentials = Secrets(self.kube, namespace).read(volume.secret.secret_name) or {}
        label = f"agent-{namespace}-{made.metadata.name}"
        folder = credentials_folder(credentials, self.workdir / f"{label}-credentials")
        mounts = {CREDENTIALS_MOUNT: folder, STATE_MOUNT: self.state_dir(label)}
        edge = Edge(
            host, [KAKUREMICHI, *mounted(sidecar.args, mounts, {}), *extra],
            self.workdir / f"{label}.log", {"SSL_CERT_FILE": str(self.ca_file)},
        )  # fmt: skip
        edge.start()
        return edge

    def state_dir(self, edge: str) -> Path:
        """The edge's own emptyDir (``--state-dir``)."""
        return self.workdir / f"{edge}-state"

    @property
    def agents(self) -> Objects:
        return Objects(self.kube, self.namespace, AGENT)

    @property
    def tunnels(self) -> Objects:
        return Objects(self.kube, self.namespace, TUNNEL)

    def create_tunnel(self, name: str, domain: str, **spec: str) -> None:
        """A Tunnel to the origin beside agent ``web`` (or to ``spec``'s target), its
        certificate in Secret ``<name>-tls`` signed by the test CA."""
        issued = self.ca.issue(domain)
        Secrets(self.kube, self.namespace).put_tls(
            f"{name}-tls", issued.certificate_pem, issued.private_key_pem
        )
        tls = {"issuer": "Secret", "secretName": f"{name}-tls"}
        self.tunnels.create(
            name,
            {"domain": domain, "agent": "web", "target": "localhost:8080", "tls": tls, **spec},
        )

    def curl(self, *args: str, host: str | None = None) -> subprocess.CompletedProcess[str]:
        """curl from the client namespace, trusting the test CA."""
        command = self.client_host.command(
            "curl",
            "-sS",
            "--max-time",
            "15",
            "--cacert",
            str(self.client_ca_file or self.ca_file),
            *args,
        )
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)

    def get(self, path: str, *args: str) -> tuple[int, str]:
        """(status, body) of an HTTPS GET; status 0 when no HTTP answer came."""
        done = self.curl("-o", "-", "-w", "\n%{http_code}", *args, f"https://{self.domain}{path}")
        body, _, code = done.stdout.rpartition("\n")
        return int(code or 0), body

    def start_origin(self) -> None:
        log = self.workdir / "origin.log"
        self.origin = self.agent_host.spawn([sys.executable, ORIGIN, "127.0.0.1", "8080"], log=log)
        wait_until(
            lambda: "200" in self.agent_host.exec(
                "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:8080/",
                check=False,
            ),
            "the origin",
        )  # fmt: skip


def credentials_folder(secret: dict[str, str], folder: Path) -> Path:
    """A Secret volume as the kubelet would mount it: one file per key."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    for key, value in secret.items():
        (folder / key).write_text(value)
    return folder


def mounted(args: list[str], mounts: dict[str, Path], env: dict[str, str]) -> list[str]:
    """The container's arguments with its mount points moved to folders (``mounts``: mount
    point → folder) and ``$(VAR)`` references expanded the way the kubelet does."""
    out = []
    for arg in args:
        for name, value in env.items():
            arg = arg.replace(f"$({name})", value)
        for mount, folder in mounts.items():
            arg = arg.replace(mount, str(folder))
        out.append(arg)
    return out


def skip_unless_possible() -> None:
    missing = wireguard.userspace_wireguard_missing()
    if missing:
        pytest.skip(missing)
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")


@contextlib.contextmanager
def running_world(
    kube: Cluster,
    workdir: Path,
    *,
    public_on_root_link: bool = False,
    operator_args: Sequence[str] = (),
    cluster_agent: bool = False,
) -> Iterator[World]:
    """Everything up and connected, with no Tunnel yet.

    ``public_on_root_link``: the gateway's public address (the Node's ExternalIP, the agent's
    WireGuard endpoint) is its address on the link to the root namespace, so that processes
    there (Pebble, the operator's self-check) reach its HTTP port as the internet would; the
    agent gets a host route to it over its direct link.

    ``cluster_agent``: the operator watches every namespace and serves Ingresses through the
    Agent ``web`` (``--cluster-agent``), to pods or to servers in :data:`ENDPOINT_RANGE`."""
    hosts = [netns.Host(role) for role in ("gateway", "agent", "client")]
    gateway_host, agent_host, client_host = hosts
    namespace = cluster.unique_name("e2e")
    made = World(
        kube=kube,
        namespace=namespace,
        operator=None,  # type: ignore[arg-type]
        gateway_host=gateway_host,
        agent_host=agent_host,
        client_host=client_host,
        ca_file=workdir / "ca.pem",
        domain=f"{cluster.unique_name('app')}.e2e.test",
        gateway_name=cluster.unique_name("edge"),
        workdir=workdir,
    )
    try:
        # The gateway's public side faces the agent (WireGuard) and the client (HTTPS); both
        # edges reach control in the root namespace over links of their own.
        public_ip, _ = netns.link(gateway_host, agent_host, "192.168.250.0")
        client_side, client_address = netns.link(gateway_host, client_host, "192.168.251.0")
        control_ip, gateway_root_side = netns.link_root(gateway_host, "192.168.252.0")
        netns.link_root(agent_host, "192.168.253.0")
        made.gateway_public_ip = str(public_ip.ip)
        if public_on_root_link:
            made.gateway_public_ip = str(gateway_root_side.ip)
            agent_host.exec("ip", "route", "add", f"{made.gateway_public_ip}/32",
                            "via", str(public_ip.ip))  # fmt: skip
        made.control_ip = str(control_ip.ip)
        for host in (gateway_host, agent_host):
            host.set_hosts({CONTROL_NAME: made.control_ip})
        made.gateway_client_ip = str(client_side.ip)
        made.client_host_address = str(client_address.ip)
        client_host.set_hosts({made.domain: made.gateway_client_ip})

        ca = made.ca
        made.ca_file.write_text(ca.pem)
        control_cert = ca.issue(CONTROL_NAME, str(control_ip.ip))
        (workdir / "control.crt").write_text(control_cert.certificate_pem)
        (workdir / "control.key").write_text(control_cert.private_key_pem)

        kube.kubectl("create", "namespace", namespace)
        port = ports.free_port()
        db_path = workdir / "kakuremichi.db"
        control_url = f"https://{CONTROL_NAME}:{port}"
        made.operator = OperatorProcess(
            kube=kube, namespace=namespace, db_path=db_path, log_path=workdir / "operator.log",
            control_url=control_url, ca_file=made.ca_file,
            health_url=f"https://{control_ip.ip}:{port}/healthz",
            args=["--db", f"sqlite:///{db_path}",
                  *(["--cluster-agent", f"{namespace}/web",
                     "--endpoint-range", ENDPOINT_RANGE] if cluster_agent
                    else ["--namespace", namespace]),
                  "--subnet-pool", "1-3", "--control-listen", f"{control_ip.ip}:{port}",
                  "--control-url", control_url,
                  "--control-tls-cert", str(workdir / "control.crt"),
                  "--control-tls-key", str(workdir / "control.key"),
                  "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--system-namespace", namespace,
                  "--webhook-listen", f"127.0.0.1:{ports.free_port()}",
                  "--webhook-cert-dir", str(workdir / "webhook"), *operator_args],
        )  # fmt: skip
        made.operator.start()

        # A node (no kubelet) whose public address faces the agent; an InCluster pool on it.
        node = made.node = made.add_node(made.gateway_public_ip)
        gateways = Objects(kube, namespace, GATEWAY)
        gateways.create(
            made.gateway_name,
            {"mode": "InCluster", "nodeSelector": {"e2e": namespace},
             "tunnelPorts": [{"first": 1024, "last": 65535}]},  # (TCP and UDP Tunnels' tests)
        )  # fmt: skip
        made.cleanups.append(gateways.delete_all)  # waits: the operator must see it go
        apps = client.AppsV1Api(kube.api_client())
        daemonset: Any = wait_until(
            lambda: _read_daemonset(apps, f"kakuremichi-gateway-{made.gateway_name}", namespace),
            "the gateway DaemonSet",
        )
        pod_spec = daemonset.spec.template.spec
        (container,) = pod_spec.containers
        (secret_volume,) = [v for v in pod_spec.volumes if v.secret]
        pool = Secrets(kube, namespace).read(secret_volume.secret.secret_name) or {}
        folder = credentials_folder({"apiKey": pool["apiKey"]}, workdir / "gateway-credentials")
        made.gateway_args = mounted(container.args, {CREDENTIALS_MOUNT: folder}, {})
        made.gateway = made.start_gateway(gateway_host, node)

        # The Agent, and the sidecar the webhook injects into a labelled Pod.
        made.agents.create("web")
        wait_until(
            lambda: kube.kubectl(
                "get", "mutatingwebhookconfiguration", "kakuremichi.io", check=False
            ),
            "the webhook configuration",
        )
        made.agent = made.start_agent(namespace, "web", agent_host)
        made.start_origin()
        yield made
    except BaseException:
        for edge in (made.gateway, made.agent):
            if edge is not None:
                print(f"--- {edge.log.name}\n{edge.tail()}")
        if made.operator is not None:
            print(f"--- operator.log\n{made.operator.log()[-4000:]}")
        raise
    finally:
        for extra in made.extra_hosts:
            extra.destroy()
        if made.operator is not None:
            kubelet.delete_pods(kube.api_client(), namespace)
            with contextlib.suppress(Exception):
                # While the operator runs: its finalizers must see everything go.
                made.tunnels.delete_all()
                Objects(kube, namespace, CERTIFICATE).delete_all()
                made.agents.delete_all()
            for cleanup in reversed(made.cleanups):
                with contextlib.suppress(Exception):
                    cleanup()
            made.operator.stop()
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        for host in hosts:
            host.destroy()


@contextlib.contextmanager
def serving_world(kube: Cluster, workdir: Path) -> Iterator[World]:
    """A running world serving one Tunnel, ``app`` at its domain, with a certificate from a
    Secret the test CA signed: the first HTTPS answer has come."""
    skip_unless_possible()
    with running_world(kube, workdir) as made:
        made.create_tunnel("app", made.domain)
        made.tunnels.ready("app")
        wait_until(lambda: made.get("/")[0] == 200, "the first HTTPS response", timeout=60)
        yield made


def _read_daemonset(apps: client.AppsV1Api, name: str, namespace: str) -> Any:
    try:
        return apps.read_namespaced_daemon_set(name, namespace)
    except client.ApiException:
        return None


def _labelled_pod(agent: str, name: str = "") -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name or f"{agent}-0", labels={AGENT_LABEL: agent}),
        spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="origin")]),
    )
