"""The gateway's per-request Python path, one revision against another, without the network
(part of ``make bench``): what a change in ``edge/https_proxy.py`` costs per request where the
shared machine's CPU steal cannot hide it.

``bench/front_end_ab.py`` measures the whole front end (TLS, sockets, the agent relay, nginx) and
is the figure that counts, but on a 2-core shared machine its rounds swing by ±10 %, more than a
change of a few statements costs. Here one client connection of each revision's proxy is fed the
same keep-alive request 30,000 times in a row; the upstream stream is a stand-in that answers at
once (1 KiB body), so only the gateway's own Python work is timed (CPU time of the process, the
fastest of 7 repetitions). The revisions run in turn in fresh processes, A B A B ...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE = "20c1e29"
"""The last revision before per-request routing (issue 21)."""

MEASURE = r"""
import os, sys, time
from kakuremichi.edge.https_proxy import ClientConnection, HttpsProxy
from kakuremichi.edge.gateway_routes import GatewayRoute
from kakuremichi.edge.stats import EdgeStats

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost:4433\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"


class Client:
    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 5555) if name == "peername" else None
    def write(self, data): pass
    def is_closing(self): return False
    def pause_reading(self): pass
    def resume_reading(self): pass
    def close(self): pass
    def abort(self): pass
    def get_write_buffer_size(self): return 0


class Stream:
    on_existing_connection = True
    def __init__(self, upstream): self.upstream, self.closing = upstream, False
    def write(self, data):
        if data.endswith(b"\r\n\r\n"):
            self.upstream.data_received(RESPONSE)
    def is_closing(self): return self.closing
    def pause_reading(self): pass
    def resume_reading(self): pass
    def close(self): self.closing = True
    def abort(self): self.closing = True
    def get_extra_info(self, *args, **kwargs): return None


proxy = HttpsProxy(EdgeStats("gateway"))
rules = None
if int(os.environ.get("KM_RULES", "0")):  # N path rules that do not fit, then a catch-all
    from kakuremichi.api.protocol import RequestRule
    backend = [{"stream": "shop/web:80"}]
    rules = tuple(
        RequestRule.model_validate(
            {"matches": [{"path": {"value": f"/p{i}"}}], "backends": backend}
        )
        for i in range(int(os.environ["KM_RULES"]))
    ) + (RequestRule.model_validate({"backends": backend}),)
route = GatewayRoute(domain="localhost", agent_ip="127.0.0.1", rules=rules)
proxy.set_routes({"localhost": route})
proxy.dialer.open_stream = lambda ip, name, upstream: upstream.connection_made(Stream(upstream))
client = ClientConnection(proxy)
client.connection_made(Client())
client.domain = "localhost"
times = []
for _ in range(7):
    started = time.process_time()
    for _ in range(30000):
        client.data_received(REQUEST)
    times.append((time.process_time() - started) / 30000 * 1e6)
assert proxy.stats.requests[("localhost", 200)] == 7 * 30000
print(f"{min(times):.3f}")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BASELINE, help="revision A (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rules", type=int, default=0,
                        help="instead: the working tree, a host without rules against one whose "
                             "requests pass N path rules before a catch-all")  # fmt: skip
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kakuremichi-path-ab-"))
    before_tree = work / "before"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before_tree),
                    options.before], check=True, capture_output=True)  # fmt: skip
    trees = {"before": before_tree, "after": REPO}
    rules = {"before": "0", "after": "0"}
    if options.rules:
        trees["before"], rules["after"] = REPO, str(options.rules)
    figures: dict[str, list[float]] = {"before": [], "after": []}
    try:
        for round_ in range(options.rounds):
            order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
            for name in order:
                env = dict(os.environ, PYTHONPATH=str(trees[name] / "operator"),
                           KM_RULES=rules[name])  # fmt: skip
                out = subprocess.run([sys.executable, "-c", MEASURE], env=env, check=True,
                                     capture_output=True, text=True).stdout  # fmt: skip
                figures[name].append(float(out.strip()))
            print(f"round {round_ + 1}: before {figures['before'][-1]:.2f} µs, "
                  f"after {figures['after'][-1]:.2f} µs", flush=True)  # fmt: skip
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_tree)],
                       check=False, capture_output=True)  # fmt: skip
    before, after = min(figures["before"]), min(figures["after"])
    label = "no rules" if options.rules else f"before ({options.before})"
    after_label = f"{options.rules} rules" if options.rules else "after"
    print(f"fastest per request: {label} {before:.2f} µs, {after_label} {after:.2f} µs "
          f"(+{after - before:.2f} µs, ratio {after / before:.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
