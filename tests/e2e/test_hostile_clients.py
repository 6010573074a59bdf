"""Hostile clients against a real gateway (its DaemonSet command, HTTPS worker processes) and a
real agent over WireGuard, driven through the API server, with an origin that answers early,
keeps connections alive, refuses upgrades and echoes what it got
(:mod:`tests.infra.plain_origin`). The Gateway's ``clientLimits`` and ``trustedProxies`` travel
from its spec to every HTTPS process. The client is :mod:`tests.e2e.hostile_client`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kakuremichi.api.resources import GATEWAY
from tests.e2e.world import World, running_world, skip_unless_possible
from tests.infra.cluster import Cluster
from tests.infra.objects import Objects
from tests.infra.polling import wait_until

ORIGIN_PORT = 8090


@pytest.fixture(scope="module")
def world(
    kube: Cluster, namespaces_supported: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    skip_unless_possible()
    workdir = tmp_path_factory.mktemp("hostile")
    with running_world(kube, workdir) as made:
        made.agent_host.spawn(
            [sys.executable, "-m", "tests.infra.plain_origin", str(ORIGIN_PORT),
             str(workdir / "plain-origin.jsonl")],
            log=workdir / "plain-origin.log",
        )  # fmt: skip
        Objects(kube, made.namespace, GATEWAY).patch_spec(
            made.gateway_name, {"clientLimits": {"headTimeoutSeconds": 2}}
        )
        made.create_tunnel("app", made.domain, target=f"localhost:{ORIGIN_PORT}")
        made.tunnels.ready("app")
        wait_until(lambda: made.get("/")[0] == 200, "the first HTTPS response", timeout=60)
        wait_until(lambda: front_end(made).get("clientLimits"), "the limits at the gateway")
        yield made


def front_end(world: World) -> dict[str, Any]:
    saved = world.state_dir(f"gateway-{world.node}") / "gateway-config.json"
    gateway: dict[str, Any] = json.loads(saved.read_text())["config"]["gateway"]
    return gateway


def hostile(world: World, scenario: str) -> Any:
    out = world.client_host.exec(
        sys.executable, "-m", "tests.e2e.hostile_client", scenario, world.domain,
        world.gateway_client_ip, str(world.ca_file),
    )  # fmt: skip
    return json.loads(out)


def gateway_rss(world: World) -> int:
    """Resident bytes of the gateway process and its HTTPS workers."""
    assert world.gateway is not None and world.gateway.process is not None
    pids = [world.gateway.process.pid]
    pids += [int(p) for p in subprocess.run(
        ["pgrep", "-P", str(pids[0])], capture_output=True, text=True, check=False
    ).stdout.split()]  # fmt: skip
    total = 0
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        total += int(match.group(1)) * 1024 if match else 0
    return total


def test_a_body_left_short_never_hands_one_clients_response_to_another(world: World) -> None:
    answers = hostile(world, "desync")["answers"]
    expected = ["you are warm-up"]
    for _ in range(3):
        expected += ["401", "you are victim", "you are bob", "you are carol"]
    assert answers == expected


def test_20_mib_of_header_lines_get_431_at_the_limit_with_bounded_memory(world: World) -> None:
    hostile(world, "big_head")  # warm-up: the connection paths and buffers exist
    before = gateway_rss(world)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(gateway_rss(world))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        seen = hostile(world, "big_head")
    finally:
        done.set()
        sampler.join()
    assert seen["status"] == 431
    assert seen["seconds"] < 1
    assert max(peak) - before < 10 * 1024 * 1024, (before, max(peak))


def test_a_head_trickling_in_is_closed_at_the_gateways_deadline(world: World) -> None:
    seen = hostile(world, "slow_head")
    assert seen["status"] == 408
    assert 1.5 < seen["seconds"] < 5  # clientLimits.headTimeoutSeconds: 2 (plus the sweep)


def test_an_upgrade_answered_200_keeps_the_http_checks(world: World) -> None:
    seen = hostile(world, "upgrade_refused")
    assert seen["first"] == [200, "no upgrades here\n"]
    status, headers = seen["second"]
    assert status == 200
    assert ["X-Real-IP", "6.6.6.6"] not in headers
    assert ["X-Forwarded-For", world.client_host_address] in headers
    assert seen["third"] in (404, 421)  # the Host check applied, not passed as raw bytes


def test_spoofed_address_fields_never_reach_the_origin_unless_from_a_trusted_proxy(
    world: World,
) -> None:
    seen = hostile(world, "headers")
    names = [name.lower() for name, _ in seen["headers"]]
    for gone in ("forwarded", "true-client-ip", "x_real_ip", "x-secret", "connection"):
        assert gone not in names
    client = world.client_host_address
    assert ["X-Forwarded-For", client] in seen["headers"]
    assert ["X-Real-IP", client] in seen["headers"]
    # The client's address becomes a trusted proxy's: its X-Forwarded-For is appended to.
    gateways = Objects(world.kube, world.namespace, GATEWAY)
    gateways.patch_spec(world.gateway_name, {"trustedProxies": [f"{client}/32"]})
    try:
        wait_until(lambda: front_end(world).get("trustedProxies"), "the trusted proxy")
        wait_until(
            lambda: ["X-Real-IP", "203.0.113.9"] in hostile(world, "headers")["headers"],
            "X-Real-IP from the trusted proxy's list",
        )
        headers = hostile(world, "headers")["headers"]
        assert ["X-Forwarded-For", f"203.0.113.9, {client}"] in headers
    finally:
        gateways.patch_spec(world.gateway_name, {"trustedProxies": []})


def test_testssl_finds_no_cbc_suite(world: World) -> None:
    report = world.workdir / "testssl.json"
    world.client_host.exec(
        "testssl", "--quiet", "--color", "0", "--warnings", "off", "--ip",
        world.gateway_client_ip, "-s", "-L", "-E", "--jsonfile", str(report),
        f"https://{world.domain}/", check=False,
    )  # fmt: skip
    findings = {entry["id"]: entry for entry in json.loads(report.read_text())}
    assert findings["cipherlist_AVERAGE"]["finding"] == "not offered"  # CBC suites
    assert findings["cipherlist_3DES_IDEA"]["finding"] == "not offered"
    assert findings["LUCKY13"]["severity"] == "OK"
    offered = [e["finding"] for key, e in findings.items() if key.startswith("cipher-tls1_2")]
    assert offered and all("GCM" in f or "CHACHA20" in f for f in offered), offered
    assert all("ECDHE" in f for f in offered), offered
