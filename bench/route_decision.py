"""How long the route decision takes (Ingresses and the Gateway API, issue 21): the pure
``RouteSources.decide`` the route controller runs (in a thread) after every settled change,
for clusters of growing size and for one hostile tenant. No root, no cluster; writes
bench/RESULTS-route-decision.md.

    .venv/bin/python bench/route_decision.py [--rounds N]

Cases (each timed ``--rounds`` times, the median and the slowest reported):

- ``ingresses``: N namespaces, each with 10 Ingresses of 2 hosts and 2 paths, a Service and an
  EndpointSlice of 3 pods per Service;
- ``httproutes``: N namespaces, each with a Gateway (HTTPS, allowedRoutes Same) and 10
  HTTPRoutes of 2 hosts and 3 rules (a header match, weights), same backends;
- ``hostile``: one namespace whose 100 HTTPRoutes each name 16 Gateways of 64 listeners with a
  wildcard hostname (the attachment cap at work).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kakuremichi.control.gateway_api import GATEWAY_CONTROLLER
from kakuremichi.control.route_sources import RouteSources

RESULTS = Path(__file__).resolve().parent / "RESULTS-route-decision.md"


def _backends(sources: RouteSources, namespace: str, services: int) -> None:
    for s in range(services):
        name = f"svc{s}"
        sources.saw_service({"metadata": {"namespace": namespace, "name": name},
                             "spec": {"clusterIP": f"10.96.{s}.{len(namespace) % 250}",
                                      "ports": [{"port": 80}]}})  # fmt: skip
        ips = [f"10.{hash(namespace) % 200 + 1}.{s}.{p}" for p in range(3)]
        for i, ip in enumerate(ips):
            sources.saw_pod({"metadata": {"namespace": namespace, "name": f"{name}-{i}"},
                             "spec": {}, "status": {"podIP": ip}})  # fmt: skip
        sources.saw_slice({
            "metadata": {"namespace": namespace, "name": f"{name}-1",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "", "port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
        })  # fmt: skip


def ingresses(namespaces: int) -> RouteSources:
    sources = RouteSources(("kakuremichi", "agent"), "kakuremichi")
    sources.saw_class({"metadata": {"name": "kakuremichi"},
                       "spec": {"controller": "kakuremichi.io/ingress-controller"}})  # fmt: skip
    for n in range(namespaces):
        namespace = f"team{n}"
        _backends(sources, namespace, 2)
        for i in range(10):
            rules = [{"host": f"h{i}-{h}.{namespace}.example.com", "http": {"paths": [
                {"path": path, "pathType": "Prefix", "backend": {"service": {
                    "name": f"svc{p}", "port": {"number": 80}}}}
                for p, path in enumerate(("/", "/api"))]}} for h in range(2)]  # fmt: skip
            sources.saw_ingress(
                {
                    "metadata": {"namespace": namespace, "name": f"ing{i}", "uid": f"{n}-{i}"},
                    "spec": {"ingressClassName": "kakuremichi", "rules": rules},
                }
            )
    return sources


def httproutes(namespaces: int) -> RouteSources:
    sources = RouteSources(("kakuremichi", "agent"), "kakuremichi")
    sources.saw_gateway_class({"metadata": {"name": "kakuremichi"},
                               "spec": {"controllerName": GATEWAY_CONTROLLER}})  # fmt: skip
    for n in range(namespaces):
        namespace = f"team{n}"
        _backends(sources, namespace, 2)
        sources.saw_gateway({"metadata": {"namespace": namespace, "name": "edge"}, "spec": {
            "gatewayClassName": "kakuremichi", "listeners": [
                {"name": "https", "protocol": "HTTPS", "port": 443,
                 "tls": {"certificateRefs": [{"name": "cert"}]}}]}})  # fmt: skip
        for i in range(10):
            sources.saw_route("HTTPRoute", {
                "metadata": {"namespace": namespace, "name": f"route{i}", "uid": f"{n}-{i}",
                             "creationTimestamp": f"2026-01-01T00:{i:02d}:00Z"},
                "spec": {
                    "parentRefs": [{"name": "edge"}],
                    "hostnames": [f"h{i}-{h}.{namespace}.example.com" for h in range(2)],
                    "rules": [
                        {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                         "backendRefs": [{"name": "svc1", "port": 80}]},
                        {"matches": [{"headers": [{"name": "X-Canary", "value": "1"}]}],
                         "backendRefs": [{"name": "svc1", "port": 80}]},
                        {"backendRefs": [{"name": "svc0", "port": 80, "weight": 9},
                                         {"name": "svc1", "port": 80, "weight": 1}]},
                    ],
                },
            })  # fmt: skip
    return sources


def hostile(_: int) -> RouteSources:
    sources = RouteSources(("kakuremichi", "agent"), "kakuremichi")
    sources.saw_gateway_class({"metadata": {"name": "kakuremichi"},
                               "spec": {"controllerName": GATEWAY_CONTROLLER}})  # fmt: skip
    _backends(sources, "evil", 1)
    for g in range(16):
        sources.saw_gateway({"metadata": {"namespace": "evil", "name": f"g{g}"}, "spec": {
            "gatewayClassName": "kakuremichi", "listeners": [
                {"name": f"l{i}", "protocol": "HTTPS", "port": 443,
                 "hostname": f"h{i}.evil.example.com",
                 "tls": {"certificateRefs": [{"name": "c"}]}} for i in range(64)]}})  # fmt: skip
    for r in range(100):
        sources.saw_route("HTTPRoute", {
            "metadata": {"namespace": "evil", "name": f"r{r}", "uid": str(r),
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"parentRefs": [{"name": f"g{g}"} for g in range(16)],
                     "hostnames": ["*.evil.example.com"],
                     "rules": [{"backendRefs": [{"name": "svc0", "port": 80}]}]},
        })  # fmt: skip
    return sources


def timed(make: Callable[[int], RouteSources], size: int, rounds: int) -> dict[str, Any]:
    sources = make(size)
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        decided = sources.decide({}, datetime.now(UTC))
        seconds.append(time.perf_counter() - started)
    hosts = len(decided.claims())
    return {"median": statistics.median(seconds), "max": max(seconds), "hosts": hosts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    rows = []
    for label, make, sizes in (
        ("ingresses", ingresses, (10, 100, 500)),
        ("httproutes", httproutes, (10, 100, 500)),
        ("hostile", hostile, (1,)),
    ):
        for size in sizes:
            found = timed(make, size, rounds)
            rows.append((label, size, found))
            print(
                f"{label:10} namespaces={size:4} hosts={found['hosts']:6} "
                f"median={found['median'] * 1000:8.1f} ms max={found['max'] * 1000:8.1f} ms"
            )
    lines = [
        "# The route decision (bench/route_decision.py)", "",
        f"{datetime.now(UTC):%Y-%m-%d}, {rounds} rounds per case, one core of this machine "
        "(2 cores, shared). The route controller makes the decision in a thread, once per "
        "settled change (0.1 s), from a copy of its sources.", "",
        "| case | namespaces | hosts claimed | median | slowest |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for label, size, found in rows:
        lines.append(
            f"| {label} | {size} | {found['hosts']} | "
            f"{found['median'] * 1000:.1f} ms | {found['max'] * 1000:.1f} ms |"
        )
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
