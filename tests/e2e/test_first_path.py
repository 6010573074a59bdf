"""The first end-to-end path: a user's service behind an agent, reached over HTTPS through a
gateway and WireGuard.

The operator runs against the local API server with its control channel on TLS. The gateway and
the agent each run in a network namespace of their own, started with exactly the command,
arguments and credentials of the DaemonSet and the injected sidecar the operator produced (the
Secret volumes become folders; there is no kubelet). The origin runs beside the agent, and a
client namespace resolves the tunnel's domain to the gateway. Everything is driven by creating
resources in the API server, and checked the way a user would: curl from the client.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kakuremichi.manifests import AGENT_LABEL, CREDENTIALS_MOUNT, SIDECAR_NAME
from kakuremichi.resources import AGENT, CERTIFICATE, GATEWAY, TUNNEL
from tests.e2e.origin import pattern_bytes
from tests.infra import cluster, netns, ports, wireguard
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
    control_ip: str = ""
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

    def start_gateway(self, host: netns.Host, node: str, *extra: str) -> Edge:
        """The DaemonSet's pod on ``node``: its command with the node name filled in."""
        args = [a.replace("$(NODE_NAME)", node) for a in self.gateway_args] + list(extra)
        log = self.workdir / f"gateway-{node}.log"
        edge = Edge(host, [KAKUREMICHI, *args], log, {"SSL_CERT_FILE": str(self.ca_file)})
        edge.start()
        return edge

    @property
    def agents(self) -> Objects:
        return Objects(self.kube, self.namespace, AGENT)

    @property
    def tunnels(self) -> Objects:
        return Objects(self.kube, self.namespace, TUNNEL)

    def curl(self, *args: str, host: str | None = None) -> subprocess.CompletedProcess[str]:
        """curl from the client namespace, trusting the test CA."""
        command = self.client_host.command(
            "curl", "-sS", "--max-time", "15", "--cacert", str(self.ca_file), *args
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


def mounted(args: list[str], folder: Path, env: dict[str, str]) -> list[str]:
    """The container's arguments with the Secret mount point moved to ``folder`` and
    ``$(VAR)`` references expanded the way the kubelet does."""
    out = []
    for arg in args:
        for name, value in env.items():
            arg = arg.replace(f"$({name})", value)
        out.append(arg.replace(CREDENTIALS_MOUNT, str(folder)))
    return out


@pytest.fixture(scope="module")
def world(
    kube: Cluster, namespaces_supported: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    missing = wireguard.userspace_wireguard_missing()
    if missing:
        pytest.skip(missing)
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    workdir = tmp_path_factory.mktemp("e2e")
    hosts = [netns.Host(role) for role in ("gateway", "agent", "client")]
    gateway_host, agent_host, client_host = hosts
    core = client.CoreV1Api(kube.api_client())
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
        client_side, _ = netns.link(gateway_host, client_host, "192.168.251.0")
        control_ip, _ = netns.link_root(gateway_host, "192.168.252.0")
        netns.link_root(agent_host, "192.168.253.0")
        made.control_ip = str(control_ip.ip)
        for host in (gateway_host, agent_host):
            host.set_hosts({CONTROL_NAME: made.control_ip})
        client_host.set_hosts({made.domain: str(client_side.ip)})

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
            args=["--db", f"sqlite:///{db_path}", "--namespace", namespace,
                  "--subnet-pool", "1-3", "--control-listen", f"{control_ip.ip}:{port}",
                  "--control-url", control_url,
                  "--control-tls-cert", str(workdir / "control.crt"),
                  "--control-tls-key", str(workdir / "control.key"),
                  "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--system-namespace", namespace,
                  "--webhook-listen", f"127.0.0.1:{ports.free_port()}",
                  "--webhook-cert-dir", str(workdir / "webhook")],
        )  # fmt: skip
        made.operator.start()
        edge_env = {"SSL_CERT_FILE": str(made.ca_file)}

        # A node (no kubelet) whose public address faces the agent; an InCluster pool on it.
        node = made.add_node(str(public_ip.ip))
        gateways = Objects(kube, namespace, GATEWAY)
        gateways.create(
            made.gateway_name, {"mode": "InCluster", "nodeSelector": {"e2e": namespace}}
        )
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
        made.gateway_args = mounted(container.args, folder, {})
        made.gateway = made.start_gateway(gateway_host, node)

        # The Agent, and the sidecar the webhook injects into a labelled Pod.
        made.agents.create("web")
        made.agents.ready("web")
        wait_until(
            lambda: kube.kubectl(
                "get", "mutatingwebhookconfiguration", "kakuremichi.io", check=False
            ),
            "the webhook configuration",
        )
        pod: Any = wait_until(
            lambda: core.create_namespaced_pod(namespace, _labelled_pod("web")),
            "the webhook to inject the sidecar",
        )
        (sidecar,) = [c for c in pod.spec.containers if c.name == SIDECAR_NAME]
        (volume,) = [v for v in pod.spec.volumes if v.secret]
        credentials = Secrets(kube, namespace).read(volume.secret.secret_name) or {}
        folder = credentials_folder(credentials, workdir / "agent-credentials")
        made.agent = Edge(
            agent_host, [KAKUREMICHI, *mounted(sidecar.args, folder, {})],
            workdir / "agent.log", edge_env,
        )  # fmt: skip
        made.agent.start()
        made.start_origin()

        issued = ca.issue(made.domain)
        Secrets(kube, namespace).put_tls("app-tls", issued.certificate_pem, issued.private_key_pem)
        made.tunnels.create(
            "app",
            {"domain": made.domain, "agent": "web", "target": "localhost:8080",
             "tls": {"issuer": "Secret", "secretName": "app-tls"}},
        )  # fmt: skip
        made.tunnels.ready("app")
        wait_until(lambda: made.get("/")[0] == 200, "the first HTTPS response", timeout=60)
        yield made
    except BaseException:
        for edge in (made.gateway, made.agent):
            if edge is not None:
                print(f"--- {edge.log.name}\n{edge.tail()}")
        if made.operator is not None:
            print(f"--- operator.log\n{made.operator.log()[-4000:]}")
        raise
    finally:
        if made.operator is not None:
            with contextlib.suppress(Exception):
                core.delete_collection_namespaced_pod(namespace)
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


def _read_daemonset(apps: client.AppsV1Api, name: str, namespace: str) -> Any:
    try:
        return apps.read_namespaced_daemon_set(name, namespace)
    except client.ApiException:
        return None


def _labelled_pod(agent: str) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=f"{agent}-0", labels={AGENT_LABEL: agent}),
        spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="origin")]),
    )


# --- what a user sees ---------------------------------------------------------------------------


def test_https_reaches_the_origin_with_forwarded_headers(world: World) -> None:
    code, body = world.get("/headers?q=1", "-H", "X-Forwarded-For: 6.6.6.6")
    assert code == 200, body
    seen = json.loads(body)
    assert seen["path"] == "/headers?q=1"
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-forwarded-for"] == world.client_host.address  # not the client's claim
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-host"] == world.domain
    assert headers["host"] == world.domain


def test_plain_http_redirects_to_https(world: World) -> None:
    done = world.curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                      f"http://{world.domain}/a/b?c=d")  # fmt: skip
    assert done.stdout == f"308 https://{world.domain}/a/b?c=d"


def test_websocket_echo_and_server_sent_events(world: World) -> None:
    script = (
        "import asyncio, aiohttp, ssl, sys\n"
        "async def main():\n"
        "    tls = ssl.create_default_context(cafile=sys.argv[2])\n"
        "    async with aiohttp.ClientSession() as s, s.ws_connect(sys.argv[1], ssl=tls) as ws:\n"
        "        for word in ('one', 'two'):\n"
        "            await ws.send_str(word)\n"
        "            print((await ws.receive(timeout=10)).data)\n"
        "asyncio.run(main())\n"
    )
    out = world.client_host.exec(
        sys.executable, "-c", script, f"wss://{world.domain}/ws", str(world.ca_file)
    )
    assert out.split("\n")[:2] == ["echo: one", "echo: two"]
    started = time.monotonic()
    done = world.curl("-N", f"https://{world.domain}/events")
    assert [line for line in done.stdout.splitlines() if line] == [
        f"data: event {n}" for n in range(5)
    ]
    assert time.monotonic() - started >= 0.8  # streamed as sent, not all at once at the end


def test_large_download_and_upload_arrive_intact(world: World) -> None:
    size = 50 * 1024 * 1024
    target = world.workdir / "download.bin"
    done = world.curl("-o", str(target), "-w", "%{http_code}",
                      f"https://{world.domain}/bytes/{size}")  # fmt: skip
    assert done.stdout == "200", done.stderr
    assert target.stat().st_size == size
    expected = hashlib.sha256(pattern_bytes(size)).hexdigest()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == expected
    upload = world.workdir / "upload.bin"
    upload.write_bytes(pattern_bytes(10 * 1024 * 1024))
    echoed = world.workdir / "echoed.bin"
    done = world.curl("-o", str(echoed), "--data-binary", f"@{upload}",
                      "-H", "Content-Type: application/octet-stream",
                      f"https://{world.domain}/echo")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert echoed.read_bytes() == upload.read_bytes()


def test_an_unknown_name_gets_no_certificate(world: World) -> None:
    other = f"other.{world.domain}"
    done = world.curl("--resolve", f"{other}:443:{world.gateway_host.addresses[1].ip}",
                      f"https://{other}/")  # fmt: skip
    assert done.returncode == 35, (done.returncode, done.stderr)  # TLS handshake failed


def test_disabled_tunnel_answers_404_within_two_seconds(world: World) -> None:
    world.tunnels.patch_spec("app", {"enabled": False})
    started = time.monotonic()
    wait_until(lambda: world.get("/")[0] == 404, "404 for the disabled tunnel", timeout=10)
    assert time.monotonic() - started < 2.0
    world.tunnels.patch_spec("app", {"enabled": True})
    wait_until(lambda: world.get("/")[0] == 200, "the tunnel back", timeout=10)


def test_stopped_origin_gives_502(world: World) -> None:
    assert world.origin is not None
    world.origin.kill()
    world.origin.wait()
    code, body = world.get("/")
    assert code == 502 and "not answering" in body
    world.start_origin()
    assert world.get("/")[0] == 200


def test_killed_agent_goes_offline_and_comes_back(world: World) -> None:
    assert world.agent is not None
    world.agent.kill()
    started = time.monotonic()
    wait_until(
        lambda: (world.agents.get("web") or {}).get("status", {}).get("state") == "offline",
        "the Agent to be offline",
        timeout=HEARTBEAT_TIMEOUT + 10,
    )
    assert time.monotonic() - started <= HEARTBEAT_TIMEOUT + 5
    assert world.get("/")[0] == 502
    world.agent.start()
    wait_until(
        lambda: (world.agents.get("web") or {}).get("status", {}).get("state") == "online",
        "the Agent to be online again",
    )
    wait_until(lambda: world.get("/")[0] == 200, "serving again", timeout=30)
    reported = wait_until(
        lambda: (world.agents.get("web") or {}).get("status", {}).get("client"),
        "the agent's report of itself",
    )
    assert reported["wireguardMode"] in ("userspace", "kernel") and reported["version"]


def test_operator_restart_never_interrupts_traffic(world: World) -> None:
    script = (
        "import ssl, sys, time, urllib.request\n"
        "tls = ssl.create_default_context(cafile=sys.argv[2])\n"
        "codes = []\n"
        "end = time.monotonic() + float(sys.argv[3])\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        "        codes.append(urllib.request.urlopen(sys.argv[1], context=tls, timeout=5).status)\n"
        "    except Exception as error:\n"
        "        codes.append(repr(error))\n"
        "    time.sleep(0.05)\n"
        "print(sorted(set(map(str, codes))), len(codes))\n"
    )
    load = subprocess.Popen(
        world.client_host.command(sys.executable, "-c", script, f"https://{world.domain}/",
                                  str(world.ca_file), "12"),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1)
    world.operator.restart()
    out, _ = load.communicate(timeout=60)
    assert out.startswith("['200']"), out


HOLD_WEBSOCKET = """
import asyncio, aiohttp, ssl, sys
async def main():
    tls = ssl.create_default_context(cafile=sys.argv[2])
    async with aiohttp.ClientSession() as s, s.ws_connect(sys.argv[1], ssl=tls) as ws:
        for word in ("before", "after"):
            if word == "after":
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await ws.send_str(word)
            print((await ws.receive(timeout=10)).data, flush=True)
asyncio.run(main())
"""


def test_second_gateway_serves_too_and_changes_never_drop_open_connections(
    world: World,
) -> None:
    """A second node joins the pool: the agent peers with both gateways and either one serves
    the tunnel. Meanwhile a WebSocket through the first gateway stays open across the new
    WireGuard peer and a tunnel added and removed beside it."""
    held = subprocess.Popen(
        world.client_host.command(sys.executable, "-c", HOLD_WEBSOCKET,
                                  f"wss://{world.domain}/ws", str(world.ca_file)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert held.stdout is not None and held.stdin is not None
    assert held.stdout.readline().strip() == "echo: before"
    second = netns.Host("gateway2")
    try:
        public, _ = netns.link(second, world.agent_host, "192.168.249.0")
        facing_client, _ = netns.link(second, world.client_host, "192.168.248.0")
        netns.link_root(second, "192.168.247.0")
        second.set_hosts({CONTROL_NAME: world.control_ip})
        node = world.add_node(str(public.ip))
        # (Nodes have a /var/run each; namespaces here share one, so the second gateway's
        # wireguard-go needs a socket name of its own.)
        edge = world.start_gateway(second, node, "--wireguard-interface", "kmgateway1")
        resolve = f"{world.domain}:443:{facing_client.ip}"
        wait_until(
            lambda: world.curl("-o", "/dev/null", "-w", "%{http_code}", "--resolve", resolve,
                               f"https://{world.domain}/").stdout == "200",
            "the second gateway to serve the tunnel", timeout=60,
        )  # fmt: skip
        extra = f"more.{world.domain}"
        issued = world.ca.issue(extra)
        Secrets(world.kube, world.namespace).put_tls(
            "more-tls", issued.certificate_pem, issued.private_key_pem
        )
        tls = {"issuer": "Secret", "secretName": "more-tls"}
        world.tunnels.create(
            "more", {"domain": extra, "agent": "web", "target": "localhost:8080", "tls": tls}
        )
        world.tunnels.ready("more")
        wait_until(
            lambda: world.curl("-o", "/dev/null", "-w", "%{http_code}", "--resolve",
                               f"{extra}:443:{facing_client.ip}", f"https://{extra}/"
                               ).stdout == "200",
            "the added tunnel to serve",
        )  # fmt: skip
        world.tunnels.delete("more")
        assert world.get("/")[0] == 200  # the first gateway still serves
        held.stdin.write("go\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "echo: after"
        assert held.wait(timeout=10) == 0
        edge.kill()
    finally:
        held.kill()
        second.destroy()


def test_gateway_metrics_count_requests_by_tunnel_and_code(world: World) -> None:
    metrics = world.gateway_host.exec("curl", "-s", "http://127.0.0.1:9470/metrics")
    assert f'kakuremichi_gateway_requests_total{{code="200",tunnel="{world.domain}"}}' in metrics
    assert 'kakuremichi_gateway_info{version="' in metrics
    assert 'wireguard_mode="userspace"' in metrics or 'wireguard_mode="kernel"' in metrics


def test_deleted_tunnel_name_is_refused_at_the_handshake(world: World) -> None:
    world.tunnels.delete("app")
    wait_until(lambda: world.curl(f"https://{world.domain}/").returncode == 35,
               "the handshake to be refused", timeout=15)  # fmt: skip
