"""``make bench-control``: the control plane at scale, measured against a real API server.

Two runs, each on a fresh local control plane (``hack/cluster.sh``: etcd, kube-apiserver,
kube-controller-manager on loopback, the CRDs installed) with the real operator process
(``kakuremichi operator``, a fresh SQLite file, its control channel on 127.0.0.1):

- **scale**: for each size, Agents and Tunnels (issuer ``Secret``, all reading one wildcard TLS
  Secret) are created through the API server with concurrent requests. Measured from the first
  request: until every Agent and Tunnel reports ``Ready=True`` (a watch on each kind) and until
  every Agent, Tunnel and Certificate row is in the SQLite mirror (read-only queries); the
  operator's RSS (peak, and at the end) and CPU time. Time per object across the sizes shows
  whether growth is linear.
- **fan-out**: Agents and External Gateways (with a public IP) are created, and one load client
  per edge connects over a real WebSocket speaking the real protocol (``auth`` with the edge's API
  key from the Secret the operator made, ``config``, ``ack``, ``status``, heartbeats). Once every
  client holds its first config, one change is written through the API server and the time until
  the last client has received and acknowledged the config carrying it is measured:
  a new Gateway (every agent gets a new peer), then a new Agent (every gateway gets a new peer).

The document's address plan holds 254 agent subnets (10.N.0.0/24) and 99 gateway indexes; the
fan-out starts the operator with ``--subnet-third-octets`` large enough for its agents
(10.N.M.0/24), so 1,000 edges (902 agents + 98 gateways by default) can be connected at once.

Progress goes to stderr, the table to stdout; ``bench/RESULTS-control-plane.md`` keeps the
latest figures (date, machine, versions) and ``bench/control_plane.json`` the raw numbers.
``--smoke`` runs tiny sizes (what the integration smoke test runs).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.infra import binaries, cluster, ports  # noqa: E402
from tests.infra.fixtures import OperatorProcess  # noqa: E402

from kakuremichi import __version__  # noqa: E402
from kakuremichi.api import protocol  # noqa: E402
from kakuremichi.api.resources import API_VERSION, GROUP, VERSION  # noqa: E402

RESULTS_MD = REPO / "bench" / "RESULTS-control-plane.md"
RESULTS_JSON = REPO / "bench" / "control_plane.json"
NAMESPACE = "kmbench"
SECRET = "bench-wildcard-tls"
ZONE = "bench.kakuremichi.test"
DEFAULT_SIZES = ((50, 1000), (125, 2500), (250, 5000))
SMOKE_SIZES = ((3, 12),)
# The address plan's bounds: subnets 10.N.M.0/24 (N in 1..254, M in 0..255: the operator is given
# as many third octets as the agents need), gateway indexes 1..99; one agent subnet and one gateway
# index are kept for the change that fans out. 902 + 98 = 1,000 connected edges by default.
SUBNETS_PER_OCTET, THIRD_OCTETS_MAX, MAX_GATEWAYS = 254, 256, 99
FANOUT_AGENTS, FANOUT_GATEWAYS = 902, MAX_GATEWAYS - 1
GOAL_SCALE_SECONDS, GOAL_RSS_MIB, GOAL_FANOUT_SECONDS = 120.0, 300.0, 1.0


def progress(message: str) -> None:
    print(f"[bench-control] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# --- the system under test -----------------------------------------------------------------------


class Operator(OperatorProcess):
    """``kakuremichi operator`` as users run it, watching the bench namespace (the test suite's
    operator process), with its memory and CPU time."""

    def memory_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in KiB."""
        assert self.process is not None
        values = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
        return values["VmRSS"], values["VmHWM"]

    def cpu_seconds(self) -> float:
        assert self.process is not None
        return cpu_seconds(self.process.pid)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster_cpu_seconds(kube: cluster.Cluster) -> float:
    """CPU time of the local kube-apiserver and etcd together."""
    assert kube.state_dir is not None
    return sum(
        cpu_seconds(int((kube.state_dir / f"{name}.pid").read_text()))
        for name in ("kube-apiserver", "etcd")
    )


STRICT_CLIENTS = False
"""``--strict-clients``: the load clients validate every config with the protocol's models."""

PROFILE: Path | None = None
"""Where ``--profile`` puts py-spy's collapsed stacks of the operator (one file per run)."""


@contextlib.contextmanager
def profiled(operator: Operator, name: str) -> Iterator[None]:
    """py-spy sampling the operator while the block runs (with ``--profile``)."""
    if PROFILE is None or operator.process is None:
        yield
        return
    PROFILE.mkdir(parents=True, exist_ok=True)
    output = PROFILE / f"{name}.txt"
    spy = subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(operator.process.pid),
         "--format", "raw", "--rate", "50", "--nonblocking", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        spy.send_signal(2)
        spy.wait(timeout=30)
        progress(f"  profile: {output}")


@contextlib.contextmanager
def system(
    workdir: Path, subnet_last: int = SUBNETS_PER_OCTET, third_octets: int = 1
) -> Iterator[tuple[cluster.Cluster, Operator]]:
    """A fresh local control plane with the bench namespace, and the operator on it."""
    reason = binaries.missing("kube-apiserver", "etcd", "kube-controller-manager", "kubectl")
    if reason:
        raise RuntimeError(reason)
    workdir.mkdir(parents=True)
    progress("starting a local API server (hack/cluster.sh up)")
    kube = cluster.start(workdir / "cluster")
    url = f"http://127.0.0.1:{ports.free_port()}"
    operator = Operator(
        kube=kube, namespace=NAMESPACE, db_path=workdir / "kakuremichi.db",
        log_path=workdir / "operator.log", control_url=url, start_timeout=90,
        args=["--db", f"sqlite:///{workdir / 'kakuremichi.db'}",
              "--namespace", NAMESPACE, "--system-namespace", NAMESPACE,
              "--control-listen", url.removeprefix("http://"), "--control-url", url,
              "--subnet-pool", f"1-{subnet_last}", "--subnet-third-octets", str(third_octets)],
    )  # fmt: skip
    try:
        kube.kubectl("create", "namespace", NAMESPACE)
        progress(f"starting the operator (control channel {operator.control_url})")
        operator.start()
        yield kube, operator
    finally:
        operator.stop()
        kube.stop()


class Api:
    """Just enough of the Kubernetes API over aiohttp: concurrent creates and watches."""

    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        server = config["clusters"][0]["cluster"]
        self.base = server["server"]
        self.ssl = ssl.create_default_context(cafile=server["certificate-authority"])
        self.headers = {"Authorization": f"Bearer {config['users'][0]['user']['token']}"}
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self.http = aiohttp.ClientSession(
            headers=self.headers,
            connector=aiohttp.TCPConnector(ssl=self.ssl, limit=64),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.http is not None
        await self.http.close()

    @staticmethod
    def path(plural: str, name: str = "", core: bool = False, namespaced: bool = True) -> str:
        prefix = "/api/v1" if core else f"/apis/{GROUP}/{VERSION}"
        scope = f"/namespaces/{NAMESPACE}" if namespaced else ""
        return f"{prefix}{scope}/{plural}" + (f"/{name}" if name else "")

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        assert self.http is not None
        for attempt in range(5):
            async with self.http.request(method, self.base + path, json=body) as response:
                if response.status == 429 or response.status >= 500:  # API server busy
                    await asyncio.sleep(0.2 * 2**attempt)
                    continue
                if response.status >= 400:
                    raise RuntimeError(
                        f"{method} {path}: {response.status} {await response.text()}"
                    )
                return await response.json()
        raise RuntimeError(f"{method} {path}: the API server stayed busy")

    async def create_all(self, items: Sequence[tuple[str, dict[str, Any]]], parallel: int) -> None:
        """POST every (path, body), ``parallel`` at a time."""
        queue = iter(items)

        async def worker() -> None:
            for path, body in queue:
                await self.request("POST", path, body)

        await asyncio.gather(*(worker() for _ in range(parallel)))

    async def watch_ready(
        self,
        plural: str,
        expected: int,
        done: Callable[[float], None],
        namespaced: bool = True,
        decided: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """Watch ``plural`` and call ``done(t)`` once ``expected`` objects are Ready=True (or
        ``decided`` says so; a watch the API server ends is resumed from a fresh list)."""
        is_done = decided or _is_ready
        assert self.http is not None
        path = self.path(plural, namespaced=namespaced)
        while True:
            listing = await self.request("GET", path)
            ready = {item["metadata"]["name"]: is_done(item) for item in listing["items"]}
            version = listing["metadata"]["resourceVersion"]
            if sum(ready.values()) >= expected:
                done(time.monotonic())
                return
            url = f"{self.base}{path}?watch=1&resourceVersion={version}&timeoutSeconds=3600"
            async with self.http.get(url) as response:
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        item = event["object"]
                        if event["type"] == "DELETED":
                            ready.pop(item["metadata"]["name"], None)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            ready[item["metadata"]["name"]] = is_done(item)
                    if sum(ready.values()) >= expected:
                        done(time.monotonic())
                        return


def _is_ready(item: dict[str, Any]) -> bool:
    conditions = (item.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _is_served(item: dict[str, Any]) -> bool:
    """A Tunnel that serves as far as control is concerned: Ready, or waiting only for its
    Agent's edge to connect (no edge connects in this part of the benchmark)."""
    conditions = (item.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("reason") in ("Serving", "AgentOffline")
               for c in conditions)  # fmt: skip


def mirror_counts(db_path: Path) -> dict[str, int]:
    """Rows per table, read-only (the operator is writing)."""
    try:
        connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return {}
    try:
        return {
            table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("agents", "gateways", "tunnels", "certificates")
        }
    except sqlite3.Error:
        return {}
    finally:
        connection.close()


def wildcard_certificate() -> tuple[str, str]:
    """A self-signed ``*.bench.kakuremichi.test`` certificate and key, PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{ZONE}")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"*.{ZONE}")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def agent_body(name: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "Agent", "metadata": {"name": name},
            "spec": {"displayName": f"bench {name}"}}  # fmt: skip


def tunnel_body(index: int, agent: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION, "kind": "Tunnel", "metadata": {"name": f"t{index}"},
        "spec": {"domain": f"t{index}.{ZONE}", "agent": agent, "target": "localhost:8080",
                 "tls": {"issuer": "Secret", "secretName": SECRET}},
    }  # fmt: skip


def gateway_body(name: str, public_ip: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "Gateway", "metadata": {"name": name},
            "spec": {"mode": "External", "publicIP": public_ip}}  # fmt: skip


def gateway_ip(index: int) -> str:
    """Documentation addresses (TEST-NET-3 and -2): public-looking, never routed."""
    return f"203.0.113.{index}" if index < 200 else f"198.51.100.{index - 199}"


class Sampler:
    """The operator's memory and CPU, sampled in the background."""

    def __init__(self, operator: Operator) -> None:
        self.operator = operator
        self.peak_rss_kib = 0
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            rss, _ = self.operator.memory_kib()
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            await asyncio.sleep(0.2)

    def __enter__(self) -> Sampler:
        self.task = asyncio.get_running_loop().create_task(self.run())
        return self

    def __exit__(self, *_: object) -> None:
        assert self.task is not None
        self.task.cancel()


# --- scale ---------------------------------------------------------------------------------------


@dataclass
class ScaleResult:
    agents: int
    tunnels: int
    applied_s: float
    agents_ready_s: float
    tunnels_ready_s: float
    mirrored_s: float
    done_s: float
    ms_per_object: float
    rss_start_mib: float
    rss_peak_mib: float
    rss_end_mib: float
    cpu_s: float
    apiserver_etcd_cpu_s: float


async def scale_run(agents: int, tunnels: int, workdir: Path, parallel: int) -> ScaleResult:
    with system(workdir) as (kube, operator):
        async with Api(kube.kubeconfig) as api:
            chain, key = wildcard_certificate()
            await api.request("POST", api.path("secrets", core=True), {
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET},
                "type": "kubernetes.io/tls", "stringData": {"tls.crt": chain, "tls.key": key},
            })  # fmt: skip
            await asyncio.sleep(2)  # let the operator settle after its start
            rss_start, _ = operator.memory_kib()
            cpu_start = operator.cpu_seconds()
            cluster_cpu_start = cluster_cpu_seconds(kube)
            names = [f"a{i}" for i in range(agents)]
            items = [(api.path("agents"), agent_body(name)) for name in names]
            items += [(api.path("tunnels"), tunnel_body(i, names[i % agents]))
                      for i in range(tunnels)]  # fmt: skip
            marks: dict[str, float] = {}

            def mark(what: str) -> Callable[[float], None]:
                def done(at: float) -> None:
                    marks.setdefault(what, at)

                return done

            progress(f"scale {agents} agents / {tunnels} tunnels: applying")
            with Sampler(operator) as sampler, profiled(operator, f"scale-{agents}-{tunnels}"):
                start = time.monotonic()
                watches = [
                    asyncio.create_task(api.watch_ready("agents", agents, mark("agents"))),
                    asyncio.create_task(
                        api.watch_ready("tunnels", tunnels, mark("tunnels"), decided=_is_served)
                    ),
                ]
                await api.create_all(items, parallel)
                marks["applied"] = time.monotonic()
                progress(f"  applied in {marks['applied'] - start:.1f}s; waiting for Ready+mirror")
                wanted = {"agents": agents, "tunnels": tunnels, "certificates": tunnels}
                last_report = 0.0
                while "mirrored" not in marks or not all(w.done() for w in watches):
                    for watch in watches:
                        if watch.done() and watch.exception():
                            raise watch.exception()  # type: ignore[misc]
                    counts = mirror_counts(operator.db_path)
                    if "mirrored" not in marks and all(
                        counts.get(t, 0) >= n for t, n in wanted.items()
                    ):
                        marks["mirrored"] = time.monotonic()
                    now = time.monotonic()
                    if now - last_report >= 5:
                        last_report = now
                        rss, _ = operator.memory_kib()
                        progress(
                            f"  {now - start:5.1f}s  mirror {counts}  ready: "
                            f"{', '.join(k for k in ('agents', 'tunnels') if k in marks) or '-'}"
                            f"  rss {rss / 1024:.0f} MiB"
                        )
                    if now - start > 1800:
                        raise RuntimeError("not done after 30 minutes")
                    await asyncio.sleep(0.1)
                await asyncio.sleep(2)  # what it keeps once done
                rss_end, hwm = operator.memory_kib()
                peak = max(sampler.peak_rss_kib, hwm)
                cpu = operator.cpu_seconds() - cpu_start
                cluster_cpu = cluster_cpu_seconds(kube) - cluster_cpu_start
    done = max(marks["agents"], marks["tunnels"], marks["mirrored"]) - start
    result = ScaleResult(
        agents=agents, tunnels=tunnels,
        applied_s=marks["applied"] - start,
        agents_ready_s=marks["agents"] - start,
        tunnels_ready_s=marks["tunnels"] - start,
        mirrored_s=marks["mirrored"] - start,
        done_s=done,
        ms_per_object=1000 * done / (agents + tunnels),
        rss_start_mib=rss_start / 1024, rss_peak_mib=peak / 1024, rss_end_mib=rss_end / 1024,
        cpu_s=cpu, apiserver_etcd_cpu_s=cluster_cpu,
    )  # fmt: skip
    progress(f"  done in {done:.1f}s, RSS peak {result.rss_peak_mib:.0f} MiB")
    return result


# --- fan-out -------------------------------------------------------------------------------------


class LoadClient:
    """One edge's side of the control channel, as a load generator: authenticate, acknowledge
    every config (then report status, as edges do), beat; no data plane behind it."""

    def __init__(self, role: str, name: str, api_key: str) -> None:
        self.role, self.name, self.api_key = role, name, api_key
        self.inbound = protocol.agent_inbound if role == "agent" else protocol.gateway_inbound
        self.first_config = asyncio.Event()
        self.version = 0
        self.heartbeat_seconds = protocol.DEFAULT_HEARTBEAT_SECONDS
        self.waiting: tuple[Callable[[Any], bool], asyncio.Future[float]] | None = None
        self.error: str | None = None
        self.subnet: str | None = None
        """An agent's subnet, from its first config."""
        self.configs = 0
        self.handling_s = 0.0
        """Configs received, and the time this process spent parsing and acknowledging them
        (the load clients share the machine with the operator)."""

    def expect(self, predicate: Callable[[Any], bool]) -> asyncio.Future[float]:
        """A future of the moment a config satisfying ``predicate`` is acknowledged."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting = (predicate, future)
        return future

    async def run(self, http: aiohttp.ClientSession, url: str) -> None:
        try:
            async with http.ws_connect(url, max_msg_size=16 << 20) as socket:
                client = protocol.ClientInfo(version=__version__, os="linux", hostname=self.name)
                auth = protocol.AuthMessage(api_key=self.api_key, client=client)
                await socket.send_str(protocol.encode(auth))
                beats = asyncio.create_task(self._beat(socket))
                try:
                    async for frame in socket:
                        if frame.type == aiohttp.WSMsgType.TEXT:
                            await self._handle(socket, frame.data)
                        elif frame.type == aiohttp.WSMsgType.ERROR:
                            break
                finally:
                    beats.cancel()
                self.error = f"closed by control (code {socket.close_code})"
        except (aiohttp.ClientError, OSError) as error:
            self.error = str(error)
        self.first_config.set()  # nobody waits for a client that is gone

    async def _handle(self, socket: aiohttp.ClientWebSocketResponse, text: str) -> None:
        started = time.perf_counter()
        try:
            await self._handle_frame(socket, text)
        finally:
            self.handling_s += time.perf_counter() - started

    async def _handle_frame(self, socket: aiohttp.ClientWebSocketResponse, text: str) -> None:
        frame = json.loads(text)
        if frame.get("type") == "error" or (self.configs == 0 or STRICT_CLIENTS):
            # The protocol's own models check every client's first frames (and all frames with
            # --strict-clients): one process parsing 1,000 clients' configs with them would
            # measure itself, not the operator (real edges parse on their own machines).
            message = self.inbound.validate_json(text)
            if isinstance(message, protocol.ErrorMessage):
                self.error = f"{message.code}: {message.message}"
                return
        if frame.get("type") != "config":
            return
        config = frame["data"]
        self.configs += 1
        if "agent" in config:
            self.subnet = config["agent"]["subnet"]
        if config["version"] > self.version:
            self.version = config["version"]
            self.heartbeat_seconds = config.get(
                "heartbeatSeconds", protocol.DEFAULT_HEARTBEAT_SECONDS
            )
        await socket.send_str(protocol.encode(protocol.AckMessage(version=self.version)))
        acked = time.monotonic()
        self.first_config.set()
        if self.waiting is not None and self.waiting[0](config):
            _, future = self.waiting
            self.waiting = None
            if not future.done():
                future.set_result(acked)
        report = protocol.StatusReport(
            client=protocol.ClientInfo(version=__version__, os="linux", hostname=self.name),
            config_version=self.version,
        )
        await socket.send_str(protocol.encode(protocol.StatusMessage(data=report)))

    async def _beat(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            await socket.send_str(protocol.encode(protocol.HeartbeatMessage()))


Change = tuple[str, list["LoadClient"], Callable[[Any], bool], Callable[[], Awaitable[Any]]]
"""What is changed, who must receive it, how a config (its JSON ``data``) shows it, and the API
write."""


@dataclass
class FanoutResult:
    change: str
    connected: int
    recipients: int
    connect_s: float
    last_ack_s: float
    p50_ack_s: float
    rss_end_mib: float


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def fanout_run(
    agents: int,
    gateways: int,
    workdir: Path,
    parallel: int,
    subnet_last: int = SUBNETS_PER_OCTET,
) -> list[FanoutResult]:
    # The agents and the one the change adds, on as few third octets as they need.
    third_octets = -(-(agents + 1) // subnet_last)
    if not 1 <= third_octets <= THIRD_OCTETS_MAX or not 1 <= gateways < MAX_GATEWAYS:
        raise ValueError(
            f"the address plan allows {subnet_last * THIRD_OCTETS_MAX} agents and "
            f"{MAX_GATEWAYS} gateway instances; one of each is kept for the change: at most "
            f"{subnet_last * THIRD_OCTETS_MAX - 1} agents and {MAX_GATEWAYS - 1} gateways"
        )
    results = []
    progress(f"fan-out: operator with --subnet-pool 1-{subnet_last} "
             f"--subnet-third-octets {third_octets}")  # fmt: skip
    with system(workdir, subnet_last, third_octets) as (kube, operator):
        async with Api(kube.kubeconfig) as api:
            agent_names = [f"a{i}" for i in range(agents)]
            gateway_names = [f"g{i}" for i in range(gateways)]
            progress(f"fan-out: creating {agents} agents and {gateways} gateways")
            watches = [
                api.watch_ready("agents", agents, lambda at: None),
                api.watch_ready("gateways", gateways, lambda at: None, namespaced=False),
            ]  # fmt: skip
            items = [(api.path("agents"), agent_body(n)) for n in agent_names]
            items += [(api.path("gateways", namespaced=False), gateway_body(n, gateway_ip(i + 1)))
                      for i, n in enumerate(gateway_names)]  # fmt: skip
            await asyncio.gather(api.create_all(items, parallel), *watches)
            clients = []
            for role, names, prefix in (
                ("agent", agent_names, "kakuremichi-agent-"),
                ("gateway", gateway_names, "kakuremichi-gateway-"),
            ):
                for name in names:
                    secret = await api.request("GET", api.path("secrets", prefix + name, core=True))
                    api_key = base64.b64decode(secret["data"]["apiKey"]).decode()
                    clients.append(LoadClient(role, name, api_key))
            progress(f"fan-out: connecting {len(clients)} WebSocket clients")
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as http:
                start = time.monotonic()
                websocket = f"{operator.control_url}/ws"
                tasks = [asyncio.create_task(c.run(http, websocket)) for c in clients]
                await asyncio.wait_for(
                    asyncio.gather(*(c.first_config.wait() for c in clients)), 300
                )
                connect_s = time.monotonic() - start
                failed = [c for c in clients if c.error]
                if failed:
                    raise RuntimeError(f"{len(failed)} clients failed: {failed[0].error}")
                progress(f"  all {len(clients)} hold their first config after {connect_s:.1f}s")
                thirds = sorted({int(c.subnet.split(".")[2]) for c in clients if c.subnet})
                progress(f"  agent subnets 10.N.M.0/24 with M in {thirds[0]}..{thirds[-1]}")
                await asyncio.sleep(3)  # let presence writes of the connections settle
                agent_clients = [c for c in clients if c.role == "agent"]
                gateway_clients = [c for c in clients if c.role == "gateway"]

                new_ip = gateway_ip(gateways + 1)
                changes: list[Change] = [
                    (
                        "new Gateway -> every agent",
                        agent_clients,
                        lambda config: any(g["publicIp"] == new_ip for g in config["gateways"]),
                        lambda: api.request(
                            "POST",
                            api.path("gateways", namespaced=False),
                            gateway_body("fanout", new_ip),
                        ),
                    ),
                    (
                        "new Agent -> every gateway",
                        gateway_clients,
                        lambda config: len(config["agents"]) == agents + 1,
                        lambda: api.request("POST", api.path("agents"), agent_body("fanout")),
                    ),
                ]
                for change, recipients, predicate, write in changes:
                    with profiled(operator, f"fanout-{recipients[0].role if recipients else ''}"):
                        results.append(
                            await _fan_out(
                                change,
                                len(clients),
                                connect_s,
                                recipients,
                                predicate,
                                write,
                                operator,
                            )
                        )
                    await asyncio.sleep(2)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    return results


async def _fan_out(
    change: str,
    connected: int,
    connect_s: float,
    recipients: Sequence[LoadClient],
    predicate: Callable[[Any], bool],
    write: Callable[[], Awaitable[Any]],
    operator: Operator,
) -> FanoutResult:
    """Write one change; the time until each recipient has acknowledged a config with it."""
    futures = [c.expect(predicate) for c in recipients]
    configs = sum(c.configs for c in recipients)
    handling = sum(c.handling_s for c in recipients)
    started = time.monotonic()
    await write()
    acked = await asyncio.wait_for(asyncio.gather(*futures), 120)
    delays = [at - started for at in acked]
    progress(f"  {sum(c.configs for c in recipients) - configs} configs to the recipients; "
             f"the load clients spent {sum(c.handling_s for c in recipients) - handling:.2f} s "
             "parsing and acknowledging them")  # fmt: skip
    result = FanoutResult(
        change=change, connected=connected, recipients=len(recipients), connect_s=connect_s,
        last_ack_s=max(delays), p50_ack_s=statistics.median(delays),
        rss_end_mib=operator.memory_kib()[0] / 1024,
    )  # fmt: skip
    progress(f"  {change}: last of {len(recipients)} acked after "
             f"{result.last_ack_s * 1000:.0f} ms")  # fmt: skip
    return result


# --- report --------------------------------------------------------------------------------------


def linearity(scale: Sequence[ScaleResult]) -> float | None:
    """Time per object at the largest size over the smallest (1.0: perfectly linear)."""
    if len(scale) < 2:
        return None
    return scale[-1].ms_per_object / scale[0].ms_per_object


def table(scale: Sequence[ScaleResult], fanout: Sequence[FanoutResult]) -> str:
    lines = []
    if scale:
        lines += [
            "| agents | tunnels | applied (s) | agents Ready (s) | tunnels Ready (s) "
            "| mirrored (s) | all done (s) | ms/object | RSS start / peak / end (MiB) "
            "| operator CPU (s) | API server + etcd CPU (s) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r.agents} | {r.tunnels} | {r.applied_s:.1f} | {r.agents_ready_s:.1f} "
            f"| {r.tunnels_ready_s:.1f} | {r.mirrored_s:.1f} | {r.done_s:.1f} "
            f"| {r.ms_per_object:.1f} | {r.rss_start_mib:.0f} / {r.rss_peak_mib:.0f} / "
            f"{r.rss_end_mib:.0f} | {r.cpu_s:.0f} | {r.apiserver_etcd_cpu_s:.0f} |"
            for r in scale
        ]
        ratio = linearity(scale)
        if ratio is not None:
            lines += ["", f"time per object, largest size / smallest: {ratio:.2f} "
                          "(1.0 is linear growth)"]  # fmt: skip
    if fanout:
        lines += [
            "",
            "| change | clients connected | recipients | connect all (s) | last ack (ms) "
            "| median ack (ms) | RSS (MiB) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r.change} | {r.connected} | {r.recipients} | {r.connect_s:.1f} "
            f"| {r.last_ack_s * 1000:.0f} | {r.p50_ack_s * 1000:.0f} | {r.rss_end_mib:.0f} |"
            for r in fanout
        ]
    return "\n".join(line for line in lines).strip("\n")


def goals(scale: Sequence[ScaleResult], fanout: Sequence[FanoutResult]) -> list[str]:
    out = []
    if scale:
        biggest = scale[-1]
        ratio = linearity(scale)
        out.append(
            f"- {biggest.agents} agents / {biggest.tunnels} tunnels Ready and mirrored in "
            f"{biggest.done_s:.0f} s (goal < {GOAL_SCALE_SECONDS:.0f} s): "
            f"{'met' if biggest.done_s < GOAL_SCALE_SECONDS else 'NOT met'}"
        )
        peak = max(r.rss_peak_mib for r in scale)
        out.append(f"- operator RSS peak {peak:.0f} MiB (goal < {GOAL_RSS_MIB:.0f} MiB): "
                   f"{'met' if peak < GOAL_RSS_MIB else 'NOT met'}")  # fmt: skip
        if ratio is not None:
            shape = "linear or better" if ratio <= 1.25 else "worse than linear"
            out.append(
                f"- growth: time per object x{ratio:.2f} from the smallest to the largest size "
                f"({shape})"
            )
    for r in fanout:
        out.append(
            f"- fan-out ({r.change}, {r.connected} clients connected): last ack after "
            f"{r.last_ack_s * 1000:.0f} ms (goal < {GOAL_FANOUT_SECONDS * 1000:.0f} ms): "
            f"{'met' if r.last_ack_s < GOAL_FANOUT_SECONDS else 'NOT met'}"
        )
    return out


def versions() -> dict[str, str]:
    found = {"kakuremichi": __version__, "python": platform.python_version()}
    for name in ("kube-apiserver", "etcd"):
        path = binaries.find(name)
        if path:
            done = subprocess.run([str(path), "--version"], capture_output=True, text=True)
            found[name] = (done.stdout or done.stderr).splitlines()[0].strip()
    import kopf

    found["kopf"] = kopf.__version__ if hasattr(kopf, "__version__") else "?"
    found["aiohttp"] = aiohttp.__version__
    return found


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip()
         for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor() or "?",
    )  # fmt: skip
    memory = next(
        int(line.split()[1]) // 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return (
        f"{platform.node()}: {os.cpu_count()} cores ({model}), {memory} MiB, {platform.release()}"
    )


def write_results(
    scale: Sequence[ScaleResult], fanout: Sequence[FanoutResult], args: argparse.Namespace
) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    found = versions()
    # A run of one part (--only) keeps the other part's figures from the previous run.
    dates = {"scale": now, "fanout": now}
    if args.only and RESULTS_JSON.exists():
        previous = json.loads(RESULTS_JSON.read_text())
        kept = "fanout" if args.only == "scale" else "scale"
        dates[kept] = previous.get(f"{kept}_date", previous["date"])
        if kept == "scale":
            scale = [ScaleResult(**r) for r in previous.get("scale", [])]
        else:
            fanout = [FanoutResult(**r) for r in previous.get("fanout", [])]
    text = "\n".join([
        "# Control-plane benchmark results",
        "",
        f"Latest run of `make bench-control` (`bench/control_plane.py`): {now}.",
        "",
        f"- machine: {machine()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in found.items()),
        f"- options: {' '.join(args.argv) or '(defaults)'}",
        f"- scale figures from the run of {dates['scale']}, fan-out figures from the run of "
        f"{dates['fanout']}",
        "",
        "## Control plane",
        "",
        table(scale, fanout),
        "",
        "Goals (issue 8):",
        "",
        *goals(scale, fanout),
        "",
    ])  # fmt: skip
    RESULTS_MD.write_text(text)
    RESULTS_JSON.write_text(json.dumps({
        "date": now, "machine": machine(), "versions": found, "argv": args.argv,
        "scale_date": dates["scale"], "fanout_date": dates["fanout"],
        "scale": [asdict(r) for r in scale], "fanout": [asdict(r) for r in fanout],
    }, indent=2) + "\n")  # fmt: skip


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``50/1000,125/2500`` → [(50, 1000), (125, 2500)]."""
    sizes = []
    for part in text.split(","):
        agents, _, tunnels = part.partition("/")
        sizes.append((int(agents), int(tunnels)))
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", type=parse_sizes, default=None,
        help="AGENTS/TUNNELS,... of the scale run (default 50/1000,125/2500,250/5000)",
    )  # fmt: skip
    parser.add_argument(
        "--fanout-agents", type=int, default=FANOUT_AGENTS,
        help=f"connected agents (default {FANOUT_AGENTS}); the operator gets enough third octets",
    )  # fmt: skip
    parser.add_argument(
        "--fanout-gateways", type=int, default=FANOUT_GATEWAYS,
        help=f"connected gateways (default and at most {FANOUT_GATEWAYS}: one index is kept)",
    )  # fmt: skip
    parser.add_argument("--parallel", type=int, default=32, help="concurrent API requests")
    parser.add_argument("--only", choices=("scale", "fanout"), help="run one of the two")
    parser.add_argument(
        "--smoke", action="store_true",
        help="tiny sizes (3/12, fan-out 3 agents + 2 gateways, agent subnets 10.1-2.M.0/24 so "
        "the enlarged pool is used); no results file",
    )  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="do not write the results files")
    parser.add_argument(
        "--strict-clients", action="store_true",
        help="load clients validate every config with the protocol's models (default: the first "
        "one per client; later ones are decoded with json only)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", type=Path, default=None,
        help="record py-spy profiles of the operator (collapsed stacks) here",
    )  # fmt: skip
    parser.add_argument(
        "--workdir", type=Path, default=None,
        help="where clusters and operator logs go (default: a temporary folder)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    # Always a cluster of its own: the runs create hundreds of objects and stop what they start.
    os.environ.pop(cluster.EXISTING_CLUSTER_FLAG, None)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    sizes = args.sizes or (SMOKE_SIZES if args.smoke else DEFAULT_SIZES)
    global PROFILE, STRICT_CLIENTS
    PROFILE = args.profile
    STRICT_CLIENTS = args.strict_clients or args.smoke
    if args.smoke:
        args.fanout_agents, args.fanout_gateways = 3, 2
    return asyncio.run(_main(args, sizes))


async def _main(args: argparse.Namespace, sizes: Iterable[tuple[int, int]]) -> int:
    scale: list[ScaleResult] = []
    fanout: list[FanoutResult] = []
    base = args.workdir or Path(tempfile.mkdtemp(prefix="kmbench-control-"))
    progress(f"work folder {base} (operator logs, cluster state)")
    if args.only in (None, "scale"):
        for run, (agents, tunnels) in enumerate(sizes):
            scale.append(await scale_run(agents, tunnels, base / f"scale-{run}", args.parallel))
    if args.only in (None, "fanout"):
        fanout = await fanout_run(
            args.fanout_agents,
            args.fanout_gateways,
            base / "fanout",
            args.parallel,
            subnet_last=2 if args.smoke else SUBNETS_PER_OCTET,
        )
    print(table(scale, fanout))
    print()
    print("\n".join(goals(scale, fanout)))
    if not (args.smoke or args.no_write):
        write_results(scale, fanout, args)
        progress(f"wrote {RESULTS_MD.relative_to(REPO)} and {RESULTS_JSON.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
