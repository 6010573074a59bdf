"""A gateway's HTTPS worker processes, for real on loopback (no root): they share the port with
the gateway's own loop, serve every config before it counts as applied, report their counters
to the gateway's /metrics, and are replaced when they die."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kakuremichi.api.protocol import CertificateBundle
from kakuremichi.edge import https_workers
from kakuremichi.edge.agent_relay import AgentRelay, AgentTarget
from kakuremichi.edge.gateway_routes import FrontEndConfig, GatewayRoute
from kakuremichi.edge.https_proxy import HttpsProxy, serve
from kakuremichi.edge.https_workers import HttpsWorkers
from kakuremichi.edge.sni import SniContexts
from kakuremichi.edge.stats import DataPathCounters, EdgeStats
from kakuremichi.edge.worker_count import default_worker_count, quota_cpus
from tests.e2e import origin
from tests.infra.ports import free_port
from tests.infra.tlsgen import TestCA

FIRST, SECOND = "one.example.com", "two.example.com"


@pytest.mark.parametrize(
    ("cpu_max", "cpus"),
    [("max 100000", None), ("150000 100000", 2), ("100000 100000", 1), ("5000 100000", 1),
     ("400000 100000\n", 4), ("", None), ("garbage", None)],
)  # fmt: skip
def test_auto_workers_follow_the_pods_cpu_limit(cpu_max: str, cpus: int | None) -> None:
    assert quota_cpus(cpu_max) == cpus


def test_auto_workers_are_one_per_cpu_within_the_cpu_and_memory_limits(tmp_path: Path) -> None:
    available = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert default_worker_count(tmp_path) == available
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert default_worker_count(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("6400000 100000\n")  # 64 CPUs
    (tmp_path / "memory.max").write_text(f"{256 * 2**20}\n")  # the gateway pod's limit
    assert default_worker_count(tmp_path) == min(available, 2)
    (tmp_path / "memory.max").write_text(f"{64 * 2**20}\n")
    assert default_worker_count(tmp_path) == 1
    assert default_worker_count(tmp_path / "missing") == available


def test_counters_of_exited_workers_are_kept_without_their_connections() -> None:
    stats = EdgeStats("gateway")
    stats.requests[(FIRST, 200)] += 2
    stats.active_connections = 1
    stats.workers[1] = DataPathCounters(
        requests=[(FIRST, 200, 3), (FIRST, 502, 1)], active_connections=4, connections_total=5,
        sent_bytes={FIRST: 10}, http2_connections={SECOND: 2},
    )  # fmt: skip
    assert stats.requests_total == 6
    assert stats.combined().active_connections == 5
    stats.retire(1)
    stats.workers[1] = DataPathCounters(requests=[(FIRST, 200, 1)], active_connections=1)
    combined = stats.combined()
    assert sorted(combined.requests) == [(FIRST, 200, 6), (FIRST, 502, 1)]
    assert combined.active_connections == 2  # the exited worker's 4 are gone
    assert combined.connections_total == 5
    assert combined.sent_bytes == {FIRST: 10}
    assert combined.http2_connections == {SECOND: 2}


@dataclass
class Gateway:
    port: int
    stats: EdgeStats
    workers: HttpsWorkers
    proxy: HttpsProxy
    sni: SniContexts
    client_tls: ssl.SSLContext
    bundles: dict[str, CertificateBundle]

    async def apply(self, *domains: str) -> None:
        """What the gateway does with a config: serve it itself, then in every worker."""
        bundles = [self.bundles[d] for d in domains]
        self.sni.install(self.sni.prepare(bundles))
        routes = [GatewayRoute(domain=d, agent_ip="127.0.0.1") for d in domains]
        self.proxy.set_routes({r.domain: r for r in routes})
        await self.workers.apply(FrontEndConfig(routes=routes, certificates=bundles))

    async def get(self, name: str) -> int:
        """The status of one request on a connection of its own; 0 if the handshake failed."""
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", self.port, ssl=self.client_tls, server_hostname=name
            )
        except ssl.SSLError:
            return 0
        writer.write(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        status = int((await asyncio.wait_for(reader.readline(), 10)).split()[1])
        writer.close()
        return status


@asynccontextmanager
async def gateway(worker_count: int) -> AsyncIterator[Gateway]:
    ca = TestCA()
    bundles = {}
    for name in (FIRST, SECOND):
        issued = ca.issue(name)
        bundles[name] = CertificateBundle(
            domain=name, certificate=issued.certificate_pem, private_key=issued.private_key_pem
        )
    runner = web.AppRunner(origin.app(), access_log=None)
    await runner.setup()
    origin_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", origin_port).start()
    relay = AgentRelay(EdgeStats("agent"))
    relay.set_targets({name: AgentTarget(f"localhost:{origin_port}") for name in (FIRST, SECOND)})
    relay.set_gateways({"127.0.0.1"})  # the gateway connects from loopback here
    relay_port = free_port()
    relay_server = await asyncio.get_running_loop().create_server(
        relay.protocol, "127.0.0.1", relay_port
    )
    stats = EdgeStats("gateway")
    proxy = HttpsProxy(stats, relay_port=relay_port)
    sni = SniContexts()
    workers = HttpsWorkers(worker_count, stats, relay_port=relay_port)
    port = free_port()
    server = await serve(proxy, sni.front, "127.0.0.1", port, reuse_port=True)
    made = Gateway(
        port, stats, workers, proxy, sni, ssl.create_default_context(cadata=ca.pem), bundles
    )
    try:
        await made.apply(FIRST)
        await workers.listen(server.sockets)
        yield made
    finally:
        server.close()
        await workers.stop()
        proxy.close_all()
        relay.close_all()
        relay_server.close()
        await runner.cleanup()


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(200):  # 10 s
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_every_process_serves_each_change_before_it_counts_as_applied() -> None:
    asyncio.run(asyncio.wait_for(every_process_serves_each_change(), 60))


async def every_process_serves_each_change() -> None:
    async with gateway(worker_count=2) as made:
        assert len(made.workers.workers) == 2
        statuses = await asyncio.gather(*(made.get(FIRST) for _ in range(40)))
        assert statuses == [200] * 40
        await made.apply(FIRST, SECOND)  # returns once every worker serves it
        statuses = await asyncio.gather(*(made.get(SECOND) for _ in range(40)))
        assert statuses == [200] * 40
        await made.apply(SECOND)
        statuses = await asyncio.gather(*(made.get(FIRST) for _ in range(40)))
        assert statuses == [0] * 40  # no process hands out the removed certificate
        # The workers' counters reach the gateway's (and so /metrics and status reports).
        await until(lambda: made.stats.requests_total >= 80, "the workers' counters")
        assert made.stats.requests_total == 80
        assert 0 < sum(c.connections_total for c in made.stats.workers.values()) < 120


def test_a_worker_that_dies_is_replaced_with_the_current_config() -> None:
    asyncio.run(asyncio.wait_for(a_dead_worker_is_replaced(), 60))


async def a_dead_worker_is_replaced() -> None:
    async with gateway(worker_count=1) as made:
        await made.apply(FIRST, SECOND)
        first = made.workers.workers[1].process.pid
        os.kill(first, signal.SIGKILL)
        replaced = made.workers.workers
        await until(lambda: 1 in replaced and replaced[1].process.pid != first, "a new worker")
        await replaced[1].wait_applied(made.workers.sequence)
        statuses = await asyncio.gather(*(made.get(SECOND) for _ in range(40)))
        assert statuses == [200] * 40
        assert made.stats.errors["https_worker_exit"] == 1


def test_a_worker_that_cannot_be_started_is_retried_until_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Starting a replacement fails twice (say, no file descriptors left): the slot is tried
    again, each time later, until a worker serves in it."""
    monkeypatch.setattr(https_workers, "RESTART_DELAY", 0.05)
    real_start = asyncio.create_subprocess_exec
    failures = [OSError(24, "Too many open files")] * 2

    async def flaky_start(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        if failures:
            raise failures.pop()
        return await real_start(*args, **kwargs)

    async def scenario() -> None:
        async with gateway(worker_count=1) as made:
            await made.apply(FIRST, SECOND)
            first = made.workers.workers[1].process.pid
            monkeypatch.setattr(asyncio, "create_subprocess_exec", flaky_start)
            os.kill(first, signal.SIGKILL)
            replaced = made.workers.workers
            await until(lambda: 1 in replaced and replaced[1].process.pid != first, "a worker")
            assert not failures and made.stats.errors["https_worker_start"] == 2
            await replaced[1].wait_applied(made.workers.sequence)
            statuses = await asyncio.gather(*(made.get(SECOND) for _ in range(20)))
            assert statuses == [200] * 20

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_worker_that_cannot_be_started_at_first_is_retried_while_the_others_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(https_workers, "RESTART_DELAY", 0.05)
    real_start = asyncio.create_subprocess_exec
    calls = 0

    async def second_fails_once(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(24, "Too many open files")
        return await real_start(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", second_fails_once)

    async def scenario() -> None:
        async with gateway(worker_count=2) as made:
            assert made.stats.errors["https_worker_start"] == 1
            workers = made.workers.workers
            await until(lambda: set(workers) == {1, 2}, "the second slot filled")
            await workers[2].wait_applied(made.workers.sequence)
            statuses = await asyncio.gather(*(made.get(FIRST) for _ in range(20)))
            assert statuses == [200] * 20

    asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.parametrize("signal_number", [None, signal.SIGTERM])
def test_workers_leave_with_the_gateway(signal_number: int | None) -> None:
    """Closing stdin (the gateway exited, however) or SIGTERM ends a worker."""
    asyncio.run(asyncio.wait_for(workers_leave(signal_number), 60))


async def workers_leave(signal_number: int | None) -> None:
    async with gateway(worker_count=1) as made:
        worker = made.workers.workers[1]
        if signal_number is not None:
            worker.process.send_signal(signal_number)
            made.workers.stopping = True
            async with asyncio.timeout(5):
                assert await worker.process.wait() == 0
        else:
            await made.workers.stop()
            assert worker.process.returncode == 0
