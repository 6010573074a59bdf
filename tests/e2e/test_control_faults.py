"""The control channel under faults and attack, with real edges: a gateway pod is admitted as
itself only; edges ride out a stopped API server (traffic flows, nobody is dropped, an edge
restarted meanwhile is served, statuses catch up); 50 edges come back after an operator restart
without a storm and without one refusal."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kakuremichi.api import protocol
from kakuremichi.api.resources import AGENT, GATEWAY
from kakuremichi.edge.control_client import ControlClient
from kakuremichi.edge.settings import EdgeSettings
from tests.e2e.world import CONTROL_NAME, HEARTBEAT_TIMEOUT, World, serving_world
from tests.infra import netns
from tests.infra.cluster import Cluster, unique_name
from tests.infra.edge_sessions import Recorder
from tests.infra.fixtures import local_operator
from tests.infra.objects import Objects, Secrets
from tests.infra.polling import wait_until

OUTAGE_SECONDS = 30.0


@pytest.fixture(scope="module")
def world(
    kube: Cluster, namespaces_supported: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    with serving_world(kube, tmp_path_factory.mktemp("faults")) as made:
        yield made


def instances(world: World) -> list[str]:
    gateway = Objects(world.kube, world.namespace, GATEWAY).get(world.gateway_name)
    return [i["name"] for i in ((gateway or {}).get("status") or {}).get("instances", [])]


def test_a_gateway_pod_is_admitted_as_itself_only(world: World) -> None:
    """A second node joins the pool; its gateway first presents the token of the first node's
    pod (what an attacker who can read one pod's token would do) and is refused with 4401,
    learning nothing; with its own pod's token it is admitted as its node."""
    second = netns.Host("gateway2")
    try:
        public, _ = netns.link(second, world.agent_host, "192.168.249.0")
        netns.link_root(second, "192.168.247.0")
        second.set_hosts({CONTROL_NAME: world.control_ip})
        node = world.add_node(str(public.ip))
        impostor = world.start_gateway(
            second, node, "--wireguard-interface", "kmgateway1", token_of=world.node
        )
        wait_until(
            lambda: "control refused the pool's key with this pod's token" in impostor.tail(),
            "the refusal",
        )
        assert "admitted this node" not in impostor.tail()
        assert node not in instances(world)
        impostor.kill()
        admitted = world.start_gateway(second, node, "--wireguard-interface", "kmgateway1")
        wait_until(lambda: f"control admitted this node as {node}" in admitted.tail(),
                   "the node's own pod to be admitted")  # fmt: skip
        wait_until(lambda: node in instances(world), "the node's instance in status")
        admitted.kill()
    finally:
        second.destroy()
    assert world.get("/")[0] == 200


def _log_since(path: Path, offset: int) -> str:
    return path.read_bytes()[offset:].decode(errors="replace")


def test_edges_ride_out_an_api_server_outage(world: World) -> None:
    """The API server stops answering for 30 s (SIGSTOP: hung, or cut off by a partition)."""
    assert world.gateway is not None and world.agent is not None
    if world.kube.state_dir is None:
        pytest.skip("needs the local control plane (its API server's process)")
    api_server = int((world.kube.state_dir / "kube-apiserver.pid").read_text())
    operator_log = world.operator.log_path
    marks = {log: log.stat().st_size for log in (world.gateway.log, operator_log)}
    assert world.get("/")[0] == 200
    agent_metrics = ("curl", "-s", "http://127.0.0.1:9471/metrics")

    def agent_metric(name: str) -> float | None:
        text = world.agent_host.exec(*agent_metrics, check=False)
        for line in text.splitlines():
            if line.startswith(f"kakuremichi_agent_{name} "):
                return float(line.split()[1])
        return None

    version_before = agent_metric("config_version")
    os.kill(api_server, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        answers = []
        while time.monotonic() - stopped < 8:  # traffic flows
            answers.append(world.get("/")[0])
            time.sleep(0.5)
        assert set(answers) == {200}, answers
        # An edge restarted during the outage is admitted from the cached state and served.
        world.agent.kill()
        agent_mark = world.agent.log.stat().st_size
        restarted_at = datetime.now(UTC).replace(microsecond=0)
        world.agent.start()
        wait_until(lambda: agent_metric("control_connected") == 1.0, "the agent to reconnect")
        wait_until(
            lambda: (agent_metric("config_version") or 0) > (version_before or 0),
            "the restarted agent to be served a config",
        )
        wait_until(lambda: world.get("/")[0] == 200, "traffic through the restarted agent")
        assert "refused" not in _log_since(world.agent.log, agent_mark)
        assert time.monotonic() - stopped < OUTAGE_SECONDS, "all that while the API was away"
        while time.monotonic() - stopped < OUTAGE_SECONDS:
            answers.append(world.get("/")[0])
            time.sleep(0.5)
        assert answers[-1] == 200
    finally:
        os.kill(api_server, signal.SIGCONT)
    # Nobody was dropped: the gateway's session lasted throughout.
    gateway_log = _log_since(world.gateway.log, marks[world.gateway.log])
    assert "reconnecting to control" not in gateway_log, gateway_log[-2000:]
    during = _log_since(operator_log, marks[operator_log])
    assert "gateway" not in " ".join(
        line for line in during.splitlines() if "disconnected" in line
    ), during[-3000:]
    # Statuses catch up once the API server answers: the restarted agent is online again,
    # seen after its restart.

    def caught_up() -> bool:
        status = (world.agents.get("web") or {}).get("status") or {}
        seen: str = status.get("lastSeenAt") or ""
        return status.get("state") == "online" and bool(seen) and (
            datetime.fromisoformat(seen.replace("Z", "+00:00")) >= restarted_at
        )  # fmt: skip

    wait_until(caught_up, "the Agent's status to catch up", timeout=90)
    assert world.get("/")[0] == 200


def test_a_restarted_gateway_serves_again_within_seconds(world: World) -> None:
    """A gateway pod restarts (same identity, a new process): the agent behind NAT, whose
    WireGuard session with it died, is told the gateway's new boot id and starts a new session
    at once, instead of when the dead one is two minutes old."""
    assert world.gateway is not None
    assert world.get("/")[0] == 200
    world.gateway.kill()
    world.gateway.start()
    restarted = time.monotonic()
    wait_until(lambda: world.get("/")[0] == 200, "the restarted gateway serving", timeout=30)
    assert time.monotonic() - restarted < 20


def test_a_tunnel_whose_agent_dies_says_agent_offline_and_recovers(world: World) -> None:
    """The agent is SIGKILLed: within the heartbeat timeout its Tunnel is no longer Ready, with
    AgentOffline (``kubectl get kmtun`` shows it), and it is back soon after the agent is."""
    assert world.agent is not None
    assert world.tunnels.ready("app")
    world.agent.kill()
    killed = time.monotonic()
    world.tunnels.ready("app", "False", "AgentOffline", timeout=HEARTBEAT_TIMEOUT + 10)
    assert time.monotonic() - killed < HEARTBEAT_TIMEOUT + 5
    listed = world.kube.kubectl("get", "kmtun", "app", "-n", world.namespace)
    assert "AgentOffline" in listed and "False" in listed
    world.agent.start()
    back = time.monotonic()
    world.tunnels.ready("app", timeout=30)
    assert time.monotonic() - back < 20
    wait_until(lambda: world.get("/")[0] == 200, "traffic through the returned agent")


class CountingClient(ControlClient):
    """The edges' own control client, counting its connection attempts and close codes."""

    def __init__(self, settings: EdgeSettings, edge: Recorder) -> None:
        super().__init__(settings, edge)
        self.recorder = edge
        self.attempts: list[float] = []
        self.codes: list[int | None] = []

    async def _session(self, http: aiohttp.ClientSession) -> int | None:
        self.attempts.append(time.monotonic())
        code = await super()._session(http)
        self.codes.append(code)
        return code


EDGES = 50


def test_fifty_edges_come_back_after_an_operator_restart_without_a_storm(
    kube: Cluster, tmp_path: Path
) -> None:
    namespace = unique_name("restart")
    kube.kubectl("create", "namespace", namespace)
    operator = local_operator(kube, namespace, tmp_path, "--subnet-pool", "1-64")
    operator.start()
    agents = Objects(kube, namespace, AGENT)
    try:
        names = [f"edge-{i:02d}" for i in range(EDGES)]
        for name in names:
            agents.create(name)
        secrets = Secrets(kube, namespace)
        keys = [
            (secrets.read(agents.ready(name, timeout=120)["credentialsSecret"]) or {})["apiKey"]
            for name in names
        ]

        async def scenario() -> tuple[list[CountingClient], float, float]:
            clients = [
                CountingClient(
                    EdgeSettings(control_url=operator.control_url, api_key=key), Recorder()
                )
                for key in keys
            ]
            random.shuffle(clients)
            tasks = [asyncio.create_task(c.run_forever()) for c in clients]
            try:
                await wait_for(lambda: all(c.recorder.applied for c in clients), 60, "all up")
                down = time.monotonic()
                await asyncio.to_thread(operator.restart)
                up = time.monotonic()
                await wait_for(
                    lambda: all(c.recorder.applied[-1] > up for c in clients), 30, "all back"
                )
                return clients, down, up
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        clients, down, up = asyncio.run(scenario())
    finally:
        operator.stop()
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)

    back = [min(t for t in c.recorder.applied if t > up) - up for c in clients]
    assert max(back) < 30, back  # all back within 30 s of the operator answering again
    codes = [code for c in clients for code in c.codes]
    assert protocol.CLOSE_UNAUTHORIZED not in codes  # no valid key was ever refused
    # No storm: backoff with jitter, not every edge every second or two.
    per_edge = [sum(1 for t in c.attempts if t > down) for c in clients]
    assert max(per_edge) <= 10, per_edge
    # ... and spread out: the attempts that brought the edges back (each one's last before
    # its config) do not come all at once (jitter), unlike a fixed retry interval's would.
    returns = sorted(max(t for t in c.attempts if t < min(a for a in c.recorder.applied if a > up))
                     for c in clients)  # fmt: skip
    assert returns[-1] - returns[0] >= 1.0, returns


async def wait_for(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {seconds:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)
