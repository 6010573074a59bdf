"""gRPC through a gateway: calls routed one by one (a GRPCRoute with matches; the gateway ends
the client's HTTP/2 and makes its own to the backend, edge/grpc_calls.py) against the HTTP/2
connection passed whole (a GRPCRoute of one backend, an H2C Tunnel), and against the service
reached directly. No root, no cluster: the gateway's HTTPS port and the agent's relay on
loopback in this process, a grpcio service (h2c) and a grpcio client in processes of their own.
Writes bench/RESULTS-grpc-calls.md.

    .venv/bin/python bench/grpc_calls.py [--calls N] [--rounds N]

Each round runs the three paths one after another (interleaved, so the shared machine's noise
falls on all of them); each path: ``--calls`` unary calls of 100 bytes, 16 in flight, over one
channel (one HTTP/2 connection), then a stream of 2,000 messages. Reported: the median calls/s
and messages/s over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kakuremichi.api.protocol import (
    CertificateBundle,
    PathMatch,
    RequestMatch,
    RequestRule,
    WeightedBackend,
)
from kakuremichi.edge.agent_relay import AgentRelay, AgentTarget
from kakuremichi.edge.gateway_routes import GatewayRoute
from kakuremichi.edge.https_proxy import HttpsProxy, serve
from kakuremichi.edge.sni import SniContexts
from kakuremichi.edge.stats import EdgeStats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.infra.tlsgen import TestCA  # noqa: E402 - the repository's own test CA

RESULTS = Path(__file__).resolve().parent / "RESULTS-grpc-calls.md"
WHOLE, ROUTED = "whole.example.com", "routed.example.com"
SERVICE = "bench.Echo"

SERVER = """
import sys
from concurrent import futures
import grpc
def say(request, context):
    return request
def count(request, context):
    for _ in range(int(request)):
        yield b"x" * 100
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Count": grpc.unary_stream_rpc_method_handler(count),
}),))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""

CLIENT = """
import sys, time
from concurrent import futures
import grpc
target, name, ca, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if ca == "-":
    channel = grpc.insecure_channel(target)
else:
    credentials = grpc.ssl_channel_credentials(open(ca, "rb").read())
    options = (("grpc.ssl_target_name_override", name), ("grpc.default_authority", name))
    channel = grpc.secure_channel(target, credentials, options=options)
say = channel.unary_unary("/bench.Echo/Say")
say(b"x", timeout=10)  # (connected)
body = b"x" * 100
started = time.perf_counter()
pending = []
done = 0
for _ in range(calls):
    pending.append(say.future(body, timeout=30))
    if len(pending) >= 16:
        pending.pop(0).result()
        done += 1
for call in pending:
    call.result()
unary = calls / (time.perf_counter() - started)
started = time.perf_counter()
count = sum(1 for _ in channel.unary_stream("/bench.Echo/Count")(b"2000", timeout=30))
streamed = count / (time.perf_counter() - started)
print(f"{unary:.1f} {streamed:.1f}")
"""


async def measure(port: int, calls: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    relay = AgentRelay(EdgeStats("agent"))
    place = f"127.0.0.1:{port}"
    relay.set_targets({
        WHOLE: AgentTarget(place), "bench/echo:80": AgentTarget("", endpoints=(place,)),
    })  # fmt: skip
    relay.set_gateways({"127.0.0.1"})
    loop = asyncio.get_running_loop()
    relay_server = await loop.create_server(relay.protocol, "127.0.0.1", 0)
    relay_port = relay_server.sockets[0].getsockname()[1]
    proxy = HttpsProxy(EdgeStats("gateway"), relay_port=relay_port)
    rules = (RequestRule(
        matches=[RequestMatch(path=PathMatch(type="Exact", value=f"/{SERVICE}/Say")),
                 RequestMatch(path=PathMatch(type="Exact", value=f"/{SERVICE}/Count"))],
        backends=[WeightedBackend(stream="bench/echo:80")],
    ),)  # fmt: skip
    proxy.set_routes({
        WHOLE: GatewayRoute(domain=WHOLE, agent_ip="127.0.0.1", h2c=True),
        ROUTED: GatewayRoute(domain=ROUTED, agent_ip="127.0.0.1", h2c=True, rules=rules),
    })  # fmt: skip
    ca = TestCA()
    bundles = []
    for name in (WHOLE, ROUTED):
        issued = ca.issue(name)
        bundles.append(CertificateBundle(domain=name, certificate=issued.certificate_pem,
                                         private_key=issued.private_key_pem))  # fmt: skip
    sni = SniContexts()
    sni.install(sni.prepare(bundles, h2_domains={WHOLE, ROUTED}))
    https = await serve(proxy, sni.front, "127.0.0.1", 0)
    https_port = https.sockets[0].getsockname()[1]
    results: dict[str, list[tuple[float, float]]] = {"direct": [], "whole": [], "routed": []}
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as ca_file:
        ca_file.write(ca.pem)
        ca_file.flush()
        paths = {
            "direct": (place, "-", "-"),
            "whole": (f"127.0.0.1:{https_port}", WHOLE, ca_file.name),
            "routed": (f"127.0.0.1:{https_port}", ROUTED, ca_file.name),
        }
        try:
            for _ in range(rounds):
                for label, (target, name, ca_path) in paths.items():
                    client = await asyncio.create_subprocess_exec(
                        sys.executable, "-c", CLIENT, target, name, ca_path, str(calls),
                        stdout=asyncio.subprocess.PIPE,
                    )  # fmt: skip
                    out, _ = await client.communicate()
                    unary, streamed = (float(v) for v in out.split())
                    results[label].append((unary, streamed))
        finally:
            https.close()
            proxy.close_all()
            relay.close_all()
            relay_server.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    started = time.time()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        results = asyncio.run(measure(port, args.calls, args.rounds))
    finally:
        server.kill()
    medians = {
        label: (statistics.median(u for u, _ in runs), statistics.median(s for _, s in runs))
        for label, runs in results.items()
    }
    lines = [
        "# gRPC through a gateway (bench/grpc_calls.py)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {args.rounds} rounds of {args.calls} unary calls (16 in "
        "flight, 100 bytes) and a 2,000-message stream per path, interleaved; gateway, relay, "
        "service and client on loopback of this machine (2 cores, shared). Medians.",
        "",
        "| path | unary calls/s | vs direct | streamed messages/s | vs direct |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    direct = medians["direct"]
    for label, said in (("direct", "service reached directly (h2c)"),
                        ("whole", "HTTP/2 passed whole (one backend)"),
                        ("routed", "calls routed one by one (rules)")):  # fmt: skip
        unary, streamed = medians[label]
        lines.append(f"| {said} | {unary:.0f} | {unary / direct[0]:.2f} | {streamed:.0f} | "
                     f"{streamed / direct[1]:.2f} |")  # fmt: skip
    lines += ["", f"Took {time.time() - started:.0f} s.", ""]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
