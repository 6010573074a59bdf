"""``make bench``: the data plane measured side by side, in one run, on this machine.

The real system comes up as in ``make demo`` (API server, operator, gateway and agent started
from the DaemonSet and sidecar the operator rendered, WireGuard between them); the demo origin is
replaced by nginx. A client namespace joins the gateway's. Variants, interleaved round by round:

- ``direct``: client → origin over a plain veth link (the machine's limit);
- ``routed``: client → gateway namespace forwarding plain IP over its own WireGuard pair
  (wireguard-go, as kakuremichi's) → origin; no proxy, no TLS (the WireGuard limit);
- ``hand-built``: nginx in the gateway namespace terminating TLS, proxying over that WireGuard
  pair with kept-alive upstream connections and ``X-Forwarded-For`` (what a user would build);
- ``kakuremichi``: gateway → WireGuard → agent → origin, as users run it;
- ``hand-built-plain`` and ``kakuremichi-plain``: the same two over a plain veth instead of
  WireGuard, which isolates the proxies' own cost (it stands in for kernel WireGuard).

Figures (wrk, 64 connections, keep-alive, 1 KiB bodies): requests/s, p50 and p99 latency; new
TLS connections/s (``Connection: close``); MiB/s of a 100 MiB body (curl). Medians over the
rounds; ratios of kakuremichi to the others; ``bench/RESULTS.md`` records the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "hack"))

import demo  # noqa: E402 - the demo brings the real system up
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

CLIENT_NS = "kmbench-client"
WORK = REPO / ".bench"
DOMAIN = demo.DOMAIN
# client ↔ gateway, client ↔ agent (direct), the routed WireGuard pair
CLIENT_GATEWAY = ("10.77.1.2", "10.77.1.1")
CLIENT_AGENT = ("10.77.3.1", "10.77.3.2")
ROUTED_WG = ("10.77.9.1", "10.77.9.2")  # gateway, agent
ROUTED_WG_PORT = 51999
ORIGIN_PORT = demo.ORIGIN_PORT
HAND_BUILT_PORT, HAND_BUILT_PLAIN_PORT = 8443, 8444
BODY_1K, BODY_100M = "1k", "100m"


@dataclass
class Figures:
    """Samples of each figure per variant."""

    samples: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, variant: str, figure: str, value: float | None) -> None:
        if value is not None:
            self.samples[(variant, figure)].append(value)

    def median(self, variant: str, figure: str) -> float | None:
        values = self.samples.get((variant, figure))
        return statistics.median(values) if values else None


def sh(*args: str, check: bool = True, capture: bool = True) -> str:
    done = subprocess.run(args, capture_output=capture, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {(done.stderr or '').strip()[-500:]}")
    return done.stdout if capture else ""


def ns(namespace: str, *args: str, check: bool = True) -> str:
    return sh("ip", "netns", "exec", namespace, *args, check=check)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- setting up ----------------------------------------------------------------------------------


def veth(a: str, b: str, a_address: str, b_address: str, name: str) -> None:
    sh("ip", "link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
    for namespace, end, address in ((a, f"{name}a", a_address), (b, f"{name}b", b_address)):
        sh("ip", "link", "set", end, "netns", namespace)
        ns(namespace, "ip", "addr", "add", f"{address}/24", "dev", end)
        ns(namespace, "ip", "link", "set", end, "up")


def wireguard_pair() -> None:
    """The routed variant's own WireGuard (wireguard-go, the one kakuremichi's edges run: first
    on PATH, from hack/build-binaries.sh)."""
    keys = {}
    for side in ("gw", "ag"):
        private = sh("wg", "genkey").strip()
        keys[side] = (private, _pubkey(private))
    for side, namespace, address, peer, endpoint, allowed in (
        ("gw", demo.GATEWAY_NS, ROUTED_WG[0], "ag", None, f"{ROUTED_WG[1]}/32"),
        ("ag", demo.AGENT_NS, ROUTED_WG[1], "gw", f"{demo.PUBLIC_IP}:{ROUTED_WG_PORT}",
         f"{ROUTED_WG[0]}/32,{CLIENT_GATEWAY[0].rsplit('.', 1)[0]}.0/24"),
    ):  # fmt: skip
        interface = f"kmb-wg-{side}"
        ns(namespace, "wireguard-go", interface)
        key_file = WORK / f"wg-{side}.key"
        key_file.write_text(keys[side][0])
        command = ["wg", "set", interface, "private-key", str(key_file)]
        if side == "gw":
            command += ["listen-port", str(ROUTED_WG_PORT)]
        command += ["peer", keys[peer][1], "allowed-ips", allowed]
        if endpoint:
            command += ["endpoint", endpoint, "persistent-keepalive", "25"]
        ns(namespace, *command)
        ns(namespace, "ip", "addr", "add", f"{address}/24", "dev", interface)
        ns(namespace, "ip", "link", "set", interface, "up")
    ns(demo.AGENT_NS, "ip", "route", "add", f"{CLIENT_GATEWAY[0].rsplit('.', 1)[0]}.0/24",
       "dev", "kmb-wg-ag")  # fmt: skip


def _pubkey(private: str) -> str:
    done = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True)
    return done.stdout.strip()


NGINX_ORIGIN = """
worker_processes auto;
pid {work}/origin.pid;
error_log {work}/origin-error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    listen {direct}:{port} backlog=4096;
    listen {routed}:{port} backlog=4096;
    listen {public}:{port} backlog=4096;
    root {work}/www;
  }}
}}
"""

NGINX_HAND_BUILT = """
worker_processes auto;
pid {work}/hand-built.pid;
error_log {work}/hand-built-error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  upstream over_wireguard {{ server {routed}:{port}; keepalive 128; }}
  upstream over_plain_link {{ server {public}:{port}; keepalive 128; }}
  ssl_certificate {cert};
  ssl_certificate_key {key};
  ssl_protocols TLSv1.2 TLSv1.3;
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header Host $host;
  proxy_set_header X-Forwarded-For $remote_addr;
  proxy_set_header X-Forwarded-Proto https;
  proxy_buffering off;
  server {{
    listen {listen}:{hand_built} ssl backlog=4096;
    server_name {domain};
    location / {{ proxy_pass http://over_wireguard; }}
  }}
  server {{
    listen {listen}:{hand_built_plain} ssl backlog=4096;
    server_name {domain};
    location / {{ proxy_pass http://over_plain_link; }}
  }}
}}
"""


def start_nginx(namespace: str, name: str, config: str) -> None:
    path = WORK / f"{name}.conf"
    path.write_text(config)
    ns(namespace, "nginx", "-c", str(path))


def setup(skip_demo: bool) -> None:
    if not skip_demo:
        progress("bringing the system up (make demo)")
        # The -plain variants reach the agent's relay over a veth, which its packet filter and
        # its binding to the WireGuard interface exist to refuse: the edges run without them
        # (the relay still takes only its gateways' address). See bench/README.md.
        os.environ["KAKUREMICHI_NO_FIREWALL"] = "1"
        demo.up()
    WORK.mkdir(exist_ok=True)
    progress("client namespace, direct link, routed WireGuard pair")
    sh("ip", "netns", "add", CLIENT_NS)
    ns(CLIENT_NS, "ip", "link", "set", "lo", "up")
    veth(CLIENT_NS, demo.GATEWAY_NS, *CLIENT_GATEWAY, name="kmbcg")
    veth(CLIENT_NS, demo.AGENT_NS, *CLIENT_AGENT, name="kmbca")
    ns(demo.GATEWAY_NS, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    wireguard_pair()
    ns(CLIENT_NS, "ip", "route", "add", f"{ROUTED_WG[1]}/32", "via", CLIENT_GATEWAY[1])
    folder = Path("/etc/netns") / CLIENT_NS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hosts").write_text(f"127.0.0.1 localhost\n{CLIENT_GATEWAY[1]} {DOMAIN}\n")

    progress("nginx: the origin beside the agent, the hand-built proxy in the gateway")
    www = WORK / "www"
    www.mkdir(exist_ok=True)
    (www / BODY_1K).write_bytes(os.urandom(1024))
    with (www / BODY_100M).open("wb") as out:
        for _ in range(100):
            out.write(os.urandom(1 << 20))
    _stop_demo_origin()
    start_nginx(demo.AGENT_NS, "origin", NGINX_ORIGIN.format(
        work=WORK, port=ORIGIN_PORT, direct=CLIENT_AGENT[1], routed=ROUTED_WG[1],
        public=demo.AGENT_PUBLIC_IP,
    ))  # fmt: skip
    start_nginx(demo.GATEWAY_NS, "hand-built", NGINX_HAND_BUILT.format(
        work=WORK, port=ORIGIN_PORT, routed=ROUTED_WG[1], public=demo.AGENT_PUBLIC_IP,
        cert=demo.STATE / f"{demo.CERT_NAME}.crt", key=demo.STATE / f"{demo.CERT_NAME}.key",
        listen=CLIENT_GATEWAY[1], hand_built=HAND_BUILT_PORT,
        hand_built_plain=HAND_BUILT_PLAIN_PORT, domain=DOMAIN,
    ))  # fmt: skip


def _stop_demo_origin() -> None:
    """nginx takes the demo origin's port."""
    entry = demo._load_processes().get("origin")
    if entry:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry["pid"]), 15)
    time.sleep(0.5)


def teardown(keep_demo: bool) -> None:
    for name in ("origin", "hand-built"):
        pid_file = WORK / f"{name}.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), 15)
    for namespace, interface in ((demo.GATEWAY_NS, "kmb-wg-gw"), (demo.AGENT_NS, "kmb-wg-ag")):
        ns(namespace, "ip", "link", "del", interface, check=False)
    sh("ip", "netns", "del", CLIENT_NS, check=False)
    shutil.rmtree(Path("/etc/netns") / CLIENT_NS, ignore_errors=True)
    if not keep_demo:
        demo.down(quiet=True)
    shutil.rmtree(WORK, ignore_errors=True)


# --- measuring -----------------------------------------------------------------------------------


def agent_virtual_ip() -> str:
    out = ns(
        demo.AGENT_NS, "ip", "-4", "-o", "addr", "show", "dev", demo.WIREGUARD_INTERFACES["agent"]
    )
    return out.split()[3].split("/")[0]


@contextlib.contextmanager
def kakuremichi_over_plain_link() -> Iterator[None]:
    """Send the gateway's traffic for the agent over the veth instead of WireGuard, from the
    gateway's WireGuard address (the only one the agent's relay takes), replies the same way."""
    vip = agent_virtual_ip()
    gateway_address = vip.rsplit(".", 1)[0] + ".1"
    ns(demo.GATEWAY_NS, "ip", "route", "add", f"{vip}/32", "via", demo.AGENT_PUBLIC_IP,
       "src", gateway_address)  # fmt: skip
    ns(demo.AGENT_NS, "ip", "route", "add", f"{gateway_address}/32", "via", demo.PUBLIC_IP)
    drop_gateway_to_agent_connection(vip)  # it was made over WireGuard
    try:
        yield
    finally:
        ns(demo.GATEWAY_NS, "ip", "route", "del", f"{vip}/32", check=False)
        ns(demo.AGENT_NS, "ip", "route", "del", f"{gateway_address}/32", check=False)
        drop_gateway_to_agent_connection(vip)


def drop_gateway_to_agent_connection(vip: str) -> None:
    """The gateway keeps one connection to the agent for as long as it works; a route change
    does not move it (its source address stays), so destroy it (``ss -K``) and let the gateway
    connect again on the new path with its next request."""
    ns(demo.GATEWAY_NS, "ss", "-K", "dst", vip, "dport", "=", "8471", check=False)
    time.sleep(0.5)


def url(variant: str, body: str) -> str:
    return {
        "direct": f"http://{CLIENT_AGENT[1]}:{ORIGIN_PORT}/{body}",
        "routed": f"http://{ROUTED_WG[1]}:{ORIGIN_PORT}/{body}",
        "hand-built": f"https://{DOMAIN}:{HAND_BUILT_PORT}/{body}",
        "hand-built-plain": f"https://{DOMAIN}:{HAND_BUILT_PLAIN_PORT}/{body}",
        "kakuremichi": f"https://{DOMAIN}/{body}",
        "kakuremichi-plain": f"https://{DOMAIN}/{body}",
    }[variant]


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(target: str, seconds: int, connections: int, close: bool = False) -> dict[str, float]:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if close:
        command += ["-H", "Connection: close"]
    out = ns(CLIENT_NS, *command, target)
    figures: dict[str, float] = {}
    if match := re.search(r"Requests/sec:\s+([\d.]+)", out):
        figures["rps"] = float(match.group(1))
    for label, name in (("50%", "p50_ms"), ("99%", "p99_ms")):
        if match := re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
            figures[name] = float(match.group(1)) * _UNITS[match.group(2)]
    if errors := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        figures["errors"] = float(errors.group(1))
    return figures


def download_mib_s(target: str) -> float | None:
    out = ns(CLIENT_NS, "curl", "-sk", "-o", "/dev/null", "-w", "%{http_code} %{speed_download}",
             "--max-time", "120", target, check=False)  # fmt: skip
    code, _, speed = out.partition(" ")
    return float(speed) / (1 << 20) if code == "200" else None


VARIANTS = ("direct", "routed", "hand-built", "kakuremichi")
PLAIN_VARIANTS = ("hand-built-plain", "kakuremichi-plain")
TLS_VARIANTS = ("hand-built", "kakuremichi")


CPU_ROLES = ("proxy", "agent", "origin", "wireguard")
"""Processes whose CPU time per request is recorded (``cpu_<role>`` figures, µs)."""


def _wireguard_go_pids(prefix: str) -> list[int]:
    return [int(p) for p in sh("pgrep", "-f", f"wireguard-go.* {prefix}", check=False).split()]


def role_pids(variant: str) -> dict[str, list[int]]:
    """The processes doing each variant's work (wrk, the client, is left out)."""
    origin = nginx_pids("origin")
    if variant == "kakuremichi":
        return {
            "proxy": edge_pids(demo.GATEWAY_NS, "gateway"),
            "agent": edge_pids(demo.AGENT_NS, "agent"),
            "origin": origin,
            "wireguard": _wireguard_go_pids("kmdemo-wg-"),
        }
    routed = {"origin": origin, "wireguard": _wireguard_go_pids("kmb-wg-")}
    return {"proxy": nginx_pids("hand-built"), **routed} if variant == "hand-built" else routed


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def client_cpu_seconds() -> float:
    """CPU time of the finished child processes (wrk and curl, run through ``ip netns exec``)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_idle() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of the whole machine."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def measure_round(figures: Figures, seconds: int, connections: int) -> None:
    for variant in VARIANTS:
        roles = role_pids(variant) if variant != "direct" else {}
        before = {role: cpu_seconds(pids) for role, pids in roles.items()}
        client_before, machine_before = client_cpu_seconds(), machine_idle()
        result = wrk(url(variant, BODY_1K), seconds, connections)
        requests = result.get("rps", 0.0) * seconds
        if requests:
            spent = {r: (cpu_seconds(p) - before[r]) * 1e6 / requests for r, p in roles.items()}
            for role, micros in spent.items():
                figures.add(variant, f"cpu_{role}", micros)
            if spent:
                figures.add(variant, "cpu_total", sum(spent.values()))
            client = (client_cpu_seconds() - client_before) * 1e6 / requests
            figures.add(variant, "cpu_client", client)
            (idle_now, total_now), (idle_then, total_then) = machine_idle(), machine_before
            idle, total = idle_now - idle_then, total_now - total_then
            figures.add(variant, "idle_pct", 100 * idle / total if total else None)
        rps, p50, p99 = (result.get(k, 0.0) for k in ("rps", "p50_ms", "p99_ms"))
        cpu = figures.samples.get((variant, "cpu_total"), [0.0])[-1] if roles else 0.0
        progress(f"  {variant:18} {rps:9.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
                 + (f"  {cpu:5.0f} µs CPU/req" if cpu else ""))  # fmt: skip
        for name in ("rps", "p50_ms", "p99_ms"):
            figures.add(variant, name, result.get(name))
        if variant in TLS_VARIANTS:
            handshakes = wrk(url(variant, BODY_1K), max(3, seconds // 2), connections, close=True)
            figures.add(variant, "new_tls_per_s", handshakes.get("rps"))
        figures.add(variant, "mib_s", download_mib_s(url(variant, BODY_100M)))
    figures.add("hand-built-plain", "rps",
                wrk(url("hand-built-plain", BODY_1K), seconds, connections).get("rps"))  # fmt: skip
    figures.add("hand-built-plain", "mib_s", download_mib_s(url("hand-built-plain", BODY_100M)))
    with kakuremichi_over_plain_link():
        figures.add("kakuremichi-plain", "rps",
                    wrk(url("kakuremichi", BODY_1K), seconds, connections).get("rps"))  # fmt: skip
        figures.add("kakuremichi-plain", "mib_s", download_mib_s(url("kakuremichi", BODY_100M)))


def demo_ca() -> demo.DemoCA:
    """The running demo's CA, loaded from its state folder."""
    ca = demo.DemoCA.__new__(demo.DemoCA)
    key = serialization.load_pem_private_key((demo.STATE / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    ca.key = key
    ca.certificate = x509.load_pem_x509_certificate((demo.STATE / "ca.pem").read_bytes())
    return ca


def time_to_first_response(attempts: int = 3) -> list[float]:
    """``kubectl apply`` of a Tunnel (Secret-backed certificate) → the first HTTPS 200 through
    the gateway, polled every 10 ms from the client."""
    kube, ca = demo.Kube(), demo_ca()
    names = [f"bench{n}" for n in range(attempts)]
    hosts = " ".join(f"{name}.kakuremichi.test" for name in names)
    (Path("/etc/netns") / CLIENT_NS / "hosts").write_text(
        f"127.0.0.1 localhost\n{CLIENT_GATEWAY[1]} {DOMAIN} {hosts}\n"
    )
    results = []
    for name in names:
        domain = f"{name}.kakuremichi.test"
        chain, key = ca.issue(domain)
        kube.apply(SECRET_YAML.format(name=name, namespace=demo.NAMESPACE,
                                      chain=_indent(chain), key=_indent(key)))  # fmt: skip
        started = time.monotonic()
        kube.apply(BENCH_TUNNEL_YAML.format(name=name, namespace=demo.NAMESPACE, domain=domain,
                                            port=ORIGIN_PORT))  # fmt: skip
        while time.monotonic() - started < 30:
            out = ns(CLIENT_NS, "curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                     "--max-time", "1", f"https://{domain}/{BODY_1K}", check=False)  # fmt: skip
            if out == "200":
                results.append(time.monotonic() - started)
                break
            time.sleep(0.01)
        kube("delete", "tunnel", name, "-n", demo.NAMESPACE, "--wait=false", check=False)
    return results


def _indent(pem: str) -> str:
    return "\n".join("    " + line for line in pem.strip().splitlines())


SECRET_YAML = """\
apiVersion: v1
kind: Secret
metadata: {{name: {name}-tls, namespace: {namespace}}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
{chain}
  tls.key: |
{key}
"""

BENCH_TUNNEL_YAML = """\
apiVersion: kakuremichi.io/v1alpha1
kind: Tunnel
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  domain: {domain}
  agent: demo
  target: localhost:{port}
  tls: {{issuer: Secret, secretName: {name}-tls}}
"""


IDLE_CLIENT = """
import asyncio, resource, ssl, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
tls = ssl.create_default_context()
tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
request = f"GET /1k HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n".encode()
async def one(limit):
    async with limit:
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        writer.write(request)
        await reader.readuntil(b"\\r\\n\\r\\n")
        await reader.readexactly(1024)
        return writer
async def main():
    limit = asyncio.Semaphore(200)
    writers = await asyncio.gather(*(one(limit) for _ in range(count)))
    print("open", len(writers), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
asyncio.run(main())
"""


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def edge_pids(namespace: str, role: str) -> list[int]:
    """The ``kakuremichi <role>`` processes in ``namespace`` (a gateway's HTTPS workers too)."""
    found = []
    for pid in sh("ip", "netns", "pids", namespace).split():
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            named = any(part.endswith(b"kakuremichi") for part in command)
            edge = named and role.encode() in command
            worker = role == "gateway" and b"kakuremichi.edge.https_worker" in command
            if edge or worker:
                found.append(int(pid))
    return found


def nginx_pids(name: str) -> list[int]:
    master = int((WORK / f"{name}.pid").read_text())
    children = sh("pgrep", "-P", str(master), check=False).split()
    return [master, *map(int, children)]


def idle_connection_kib(count: int) -> dict[str, float]:
    """Memory per idle keep-alive TLS connection: RSS growth with ``count`` connections that
    each made one request, divided by ``count``."""
    results = {}

    def kakuremichi() -> list[int]:
        return edge_pids(demo.GATEWAY_NS, "gateway") + edge_pids(demo.AGENT_NS, "agent")

    def hand_built() -> list[int]:
        return nginx_pids("hand-built")

    setups: dict[str, tuple[Callable[[], list[int]], int]] = {
        "kakuremichi": (kakuremichi, 443),
        "hand-built": (hand_built, HAND_BUILT_PORT),
    }
    for variant, (pids, port) in setups.items():
        before = rss_kib(pids())
        client = subprocess.Popen(
            ["ip", "netns", "exec", CLIENT_NS, sys.executable, "-c", IDLE_CLIENT, DOMAIN,
             str(port), str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert client.stdout is not None
        assert client.stdin is not None
        line = client.stdout.readline()
        if line.startswith("open"):
            time.sleep(1)
            results[variant] = (rss_kib(pids()) - before) / count
        client.stdin.write("\n")
        client.stdin.flush()
        client.wait(timeout=60)
        progress(f"  {variant:18} {results.get(variant, float('nan')):.1f} KiB per idle connection")
        time.sleep(2)
    return results


# --- reporting -----------------------------------------------------------------------------------

RATIOS = (
    ("rps", "routed"), ("mib_s", "routed"),
    ("rps", "hand-built"), ("mib_s", "hand-built"), ("p99_ms", "hand-built"),
    ("new_tls_per_s", "hand-built"), ("idle_kib", "hand-built"),
)  # fmt: skip


def ratio_lines(figures: Figures) -> list[str]:
    lines = []
    for figure, baseline in RATIOS:
        ours, theirs = figures.median("kakuremichi", figure), figures.median(baseline, figure)
        if ours and theirs:
            lines.append(f"ratio {figure} kakuremichi/{baseline}: {ours / theirs:.2f}")
    ours, theirs = (
        figures.median("kakuremichi-plain", "rps"),
        figures.median("hand-built-plain", "rps"),
    )
    if ours and theirs:
        lines.append(f"ratio rps kakuremichi-plain/hand-built-plain: {ours / theirs:.2f}")
    ours, theirs = (
        figures.median("kakuremichi-plain", "mib_s"),
        figures.median("hand-built-plain", "mib_s"),
    )
    if ours and theirs:
        lines.append(f"ratio mib_s kakuremichi-plain/hand-built-plain: {ours / theirs:.2f}")
    return lines


def table(figures: Figures) -> str:
    columns = ("rps", "p50_ms", "p99_ms", "new_tls_per_s", "mib_s", "idle_kib")
    header = (
        "| variant | req/s | p50 ms | p99 ms | new TLS/s | MiB/s (100 MiB) "
        "| KiB per idle TLS connection |"
    )
    rows = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for variant in (*VARIANTS, *PLAIN_VARIANTS):
        cells = []
        for column in columns:
            value = figures.median(variant, column)
            cells.append(
                "—" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
            )
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cpu_table(figures: Figures) -> str:
    rows = [
        "| variant | " + " | ".join(CPU_ROLES) + " | total | client (wrk) | machine idle % |",
        "| --- |" + " ---: |" * (len(CPU_ROLES) + 3),
    ]
    for variant in ("direct", "routed", "hand-built", "kakuremichi"):
        cells = []
        roles = (*(f"cpu_{role}" for role in CPU_ROLES), "cpu_total", "cpu_client", "idle_pct")
        for figure in roles:
            value = figures.median(variant, figure)
            cells.append("—" if value is None else f"{value:.1f}")
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def versions() -> dict[str, str]:
    def first_line(*command: str) -> str:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        return (
            (done.stdout or done.stderr).strip().splitlines()[0]
            if (done.stdout or done.stderr)
            else "?"
        )

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?"
    )
    return {
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "nginx": first_line("nginx", "-v"),
        "wrk": first_line("wrk", "-v"),
        "wireguard-go": first_line("wireguard-go", "--version"),
    }


def write_results(figures: Figures, rounds: int, seconds: int, connections: int,
                  first_response: list[float]) -> str:  # fmt: skip
    info = versions()
    lines = [
        "# Benchmark results",
        "",
        f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} with `make bench` "
        f"({rounds} rounds interleaved, {seconds} s per wrk run, {connections} connections, "
        "medians).",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
        table(figures),
        "",
        "CPU time per request in the keep-alive 1 KiB runs, µs, by process (proxy: kakuremichi's "
        "gateway with its HTTPS workers, or the hand-built nginx; wireguard: both wireguard-go "
        "processes; total: all of these; client: wrk, which shares the two CPUs; machine idle: "
        "the share of both CPUs nobody used during the run):",
        "",
        cpu_table(figures),
        "",
        "Control plane: time from `kubectl apply` of a Tunnel (Secret-backed certificate) to the "
        "first HTTPS 200 through the gateway: "
        + (", ".join(f"{t * 1000:.0f} ms" for t in first_response) or "not measured"),
        "",
        "```",
        *ratio_lines(figures),
        "```",
        "",
    ]
    text = "\n".join(lines)
    (REPO / "bench" / "RESULTS.md").write_text(text)
    (REPO / "bench" / "results.json").write_text(json.dumps(
        {f"{v}/{f}": s for (v, f), s in figures.samples.items()}, indent=1) + "\n")  # fmt: skip
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/dataplane.py", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8, help="per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--idle", type=int, default=10000, help="idle connections for memory")
    parser.add_argument("--keep", action="store_true", help="leave the demo up afterwards")
    parser.add_argument("--reuse-demo", action="store_true", help="use a demo that is already up")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("make bench needs root (network namespaces)", file=sys.stderr)
        return 2
    # The wireguard-go hack/build-binaries.sh builds, as the demo's edges run it (also with
    # --reuse-demo): the routed pair and the versions line use it too.
    demo.use_built_binaries()
    for tool in ("nginx", "wrk", "wg", "wireguard-go"):
        if shutil.which(tool) is None:
            print(f"make bench needs {tool}: run hack/install-deps.sh bench", file=sys.stderr)
            return 2
    teardown(keep_demo=True)
    figures = Figures()
    try:
        setup(skip_demo=args.reuse_demo)
        for number in range(1, args.rounds + 1):
            progress(f"round {number}/{args.rounds}")
            measure_round(figures, args.seconds, args.connections)
        progress(f"memory with {args.idle} idle keep-alive TLS connections")
        for variant, kib in idle_connection_kib(args.idle).items():
            figures.add(variant, "idle_kib", kib)
        first = time_to_first_response()
        text = write_results(figures, args.rounds, args.seconds, args.connections, first)
        print(text)
    finally:
        teardown(keep_demo=args.keep or args.reuse_demo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
