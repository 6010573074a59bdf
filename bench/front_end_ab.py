"""The gateway's HTTPS front end, one revision against another, interleaved (part of ``make
bench``): what a change on the request path costs in keep-alive requests per second.

Both gateways run at once on loopback, each in its own process with the code of its revision
(``git worktree`` of ``--before``; the working tree for ``after``), in front of the same agent
relay process and the same nginx origin (1 KiB bodies). wrk (64 connections, keep-alive) hits
them in turn, A B A B ..., so that drift of the shared machine falls on both alike. Two figures
per run: requests per second, and the gateway process's CPU time per request (user + system
from ``/proc``, which CPU steal on a shared machine moves far less). Medians and the ratios go to
``bench/RESULTS-front-end.md``; the raw samples to ``bench/results-front-end.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.infra.ports import free_port  # noqa: E402 - one way to pick ports
from tests.infra.tlsgen import TestCA  # noqa: E402 - the repository's own test CA

BASELINE = "c34a41a"
"""The last revision before the hostile-client front end (issue 15)."""
DOMAIN = "localhost"
"""wrk sends the URL's host as SNI and does not verify: a name that resolves without DNS."""

GATEWAY = """
import asyncio, sys
import uvloop
from kakuremichi.edge.https_proxy import HttpsProxy, serve
from kakuremichi.edge.sni import SniContexts
from kakuremichi.edge.stats import EdgeStats
try:  # (the revisions compared may come from either side of a move)
    from kakuremichi.api.protocol import CertificateBundle
    from kakuremichi.edge.gateway_routes import GatewayRoute
    route = GatewayRoute(domain="localhost", agent_ip="127.0.0.1")
except ImportError:
    from kakuremichi.edge.https_proxy import Route
    from kakuremichi.protocol import CertificateBundle
    route = Route("localhost", "127.0.0.1")
async def main():
    https_port, relay_port = int(sys.argv[1]), int(sys.argv[2])
    chain, key = sys.argv[3], sys.argv[4]
    proxy = HttpsProxy(EdgeStats("gateway"), relay_port=relay_port)
    proxy.set_routes({"localhost": route})
    sni = SniContexts()
    bundle = CertificateBundle.model_construct(  # (a one-label name: not a tunnel's)
        domain="localhost", certificate=open(chain).read(), private_key=open(key).read())
    sni.install(sni.prepare([bundle]))
    await serve(proxy, sni.front, "127.0.0.1", https_port)
    asyncio.create_task(proxy.sweep_forever())
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""

RELAY = """
import asyncio, sys
import uvloop
from kakuremichi.edge.agent_relay import AgentRelay, AgentTarget
from kakuremichi.edge.stats import EdgeStats
async def main():
    relay = AgentRelay(EdgeStats("agent"))
    relay.set_targets({"localhost": AgentTarget(f"127.0.0.1:{sys.argv[2]}")})
    relay.set_gateways({"127.0.0.1"})
    await asyncio.get_running_loop().create_server(relay.protocol, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""

NGINX = """
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {work};
    proxy_temp_path {work};
    fastcgi_temp_path {work};
    uwsgi_temp_path {work};
    scgi_temp_path {work};
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "{body}"; }}
    }}
}}
"""


def start(args: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        args, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=log.open("wb")
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != b"ready":
        raise RuntimeError(f"{args[:3]} did not start: {log.read_text()[-2000:]}")
    return process


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(port: int, seconds: int, connections: int) -> tuple[float, float]:
    """(requests/s, requests) of one run."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"https://{DOMAIN}:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rate is None or total is None:
        raise RuntimeError(f"wrk said nothing measurable:\n{out}")
    return float(rate.group(1)), float(total.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BASELINE, help="revision A (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    options = parser.parse_args(argv)
    for tool in ("wrk", "nginx", "git"):
        if shutil.which(tool) is None:
            print(f"front_end_ab: {tool} is not installed (hack/install-deps.sh bench)")
            return 2
    work = Path(tempfile.mkdtemp(prefix="kakuremichi-ab-"))
    before_tree = work / "before"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before_tree),
                    options.before], check=True, capture_output=True)  # fmt: skip
    processes: list[subprocess.Popen[bytes]] = []
    try:
        issued = TestCA().issue(DOMAIN)
        chain, key = work / "chain.pem", work / "key.pem"
        chain.write_text(issued.certificate_pem)
        key.write_text(issued.private_key_pem)
        origin_port, relay_port = free_port(), free_port()
        (work / "nginx.conf").write_text(NGINX.format(work=work, port=origin_port, body="x" * 1024))
        processes.append(subprocess.Popen(["nginx", "-c", str(work / "nginx.conf")]))
        after_env = {"PYTHONPATH": str(REPO / "operator")}
        processes.append(start([sys.executable, "-c", RELAY, str(relay_port), str(origin_port)],
                               after_env, work / "relay.log"))  # fmt: skip
        ports = {"before": free_port(), "after": free_port()}
        trees = {"before": before_tree, "after": REPO}
        pids: dict[str, int] = {}
        for name, port in ports.items():
            env = {"PYTHONPATH": str(trees[name] / "operator")}
            processes.append(start(
                [sys.executable, "-c", GATEWAY, str(port), str(relay_port), str(chain), str(key)],
                env, work / f"gateway-{name}.log",
            ))  # fmt: skip
            pids[name] = processes[-1].pid
        samples: dict[str, list[float]] = {"before": [], "after": []}
        cpu_us: dict[str, list[float]] = {"before": [], "after": []}
        for port in ports.values():
            wrk(port, 2, options.connections)  # warm-up
        for round_ in range(options.rounds):
            order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
            for name in order:
                used = cpu_seconds(pids[name])
                rate, requests = wrk(ports[name], options.seconds, options.connections)
                samples[name].append(rate)
                cpu_us[name].append((cpu_seconds(pids[name]) - used) / requests * 1e6)
            figures = ", ".join(
                f"{n} {samples[n][-1]:.0f} req/s {cpu_us[n][-1]:.1f} µs"
                for n in ("before", "after")
            )
            print(f"round {round_ + 1}: {figures}", flush=True)
        write_results(options, samples, cpu_us)
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=10)
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_tree)],
                       check=False, capture_output=True)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
    return 0


def paired(figures: dict[str, list[float]]) -> float:
    """The median of each round's after/before: the two ran back to back, so the machine's
    drift between rounds cancels out."""
    return statistics.median(
        a / b for a, b in zip(figures["after"], figures["before"], strict=True)
    )


def write_results(
    options: argparse.Namespace, samples: dict[str, list[float]], cpu_us: dict[str, list[float]]
) -> None:
    before, after = (statistics.median(samples[n]) for n in ("before", "after"))
    cpu_before, cpu_after = (statistics.median(cpu_us[n]) for n in ("before", "after"))
    revision = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    lines = [
        "# The HTTPS front end, before and after (bench/front_end_ab.py)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs; A = {options.before}, "
        f"B = working tree at {revision}; {options.rounds} rounds interleaved, "
        f"{options.seconds} s per wrk run, {options.connections} keep-alive connections, "
        "1 KiB bodies from nginx through the agent relay, all on loopback.",
        "",
        "| revision | median req/s | gateway CPU µs per request | req/s samples |",
        "| --- | ---: | ---: | --- |",
        f"| before ({options.before}) | {before:.0f} | {cpu_before:.1f} | "
        + ", ".join(f"{v:.0f}" for v in samples["before"])
        + " |",
        f"| after | {after:.0f} | {cpu_after:.1f} | "
        + ", ".join(f"{v:.0f}" for v in samples["after"])
        + " |",
        "",
        f"ratio rps after/before: {after / before:.3f}",
        f"ratio cpu_per_request after/before: {cpu_after / cpu_before:.3f}",
        f"paired rps after/before (median of the rounds' ratios): {paired(samples):.3f}",
        f"paired cpu_per_request after/before: {paired(cpu_us):.3f}",
        "",
    ]
    (REPO / "bench" / "RESULTS-front-end.md").write_text("\n".join(lines))
    raw = {"rps": samples, "cpu_us_per_request": cpu_us}
    (REPO / "bench" / "results-front-end.json").write_text(json.dumps(raw, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
