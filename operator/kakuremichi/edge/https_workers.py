"""HTTPS worker processes: a gateway serves its HTTPS port from as many processes as it has CPUs.

One Python process proxies on one core. Like nginx's ``worker_processes auto``, the gateway
process starts ``workers - 1`` more processes serving the same HTTPS port; each gets listening
sockets of its own bound with ``SO_REUSEPORT`` (so the kernel spreads new connections across the
processes, and no worker needs the privilege to bind port 443: the gateway binds them and hands
them over). The gateway process keeps everything else: the control channel, WireGuard, the
plain-HTTP port with ACME answers, and ``/metrics``.

A worker is ``python -m kakuremichi.edge.https_workers``: it reads :class:`WorkerConfig` lines
(routes and certificates) on stdin and writes :class:`WorkerReport` lines on stdout (which config
it serves, its counters). The gateway waits until every worker serves a config before it
reports the config applied, replaces a worker that dies, and a worker exits when its stdin
closes, so none outlives the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kakuremichi.api.protocol import RELAY_PORT, CertificateBundle
from kakuremichi.api.resources import ClientLimits, Hsts
from kakuremichi.edge.file_limit import raise_file_limit
from kakuremichi.edge.https_proxy import HttpsProxy, Route
from kakuremichi.edge.sni import CertificateError, SniContexts
from kakuremichi.edge.stats import DataPathCounters, EdgeStats
from kakuremichi.edge.tls import TlsServerConnection

APPLY_TIMEOUT = 15.0
"""A worker that has not applied a config this long after it was sent is replaced."""
REPORT_INTERVAL = 0.25
"""How often a worker sends its counters (when they changed)."""
RESTART_DELAY = 1.0
RESTART_MAX_DELAY = 30.0
"""A worker that keeps dying young, or cannot be started, is retried ever more slowly."""
STABLE_SECONDS = 60.0
"""A worker that served this long died of something else than its start: retry at once."""
STOP_TIMEOUT = 5.0
LINE_LIMIT = 1 << 28
"""A config carries every certificate the gateway serves: lines can be large."""
log = logging.getLogger(__name__)


class WorkerRoute(BaseModel):
    model_config = ConfigDict(frozen=True)

    domain: str
    agent_ip: str | None
    """None: no agent reaches the domain now (503)."""
    enabled: bool = True
    h2c: bool = False
    hsts: Hsts | None = None

    def proxy_route(self) -> Route:
        hsts = self.hsts.header() if self.hsts is not None else None
        return Route(self.domain, self.agent_ip, self.enabled, self.h2c, hsts)


def h2c_domains(routes: Sequence[WorkerRoute]) -> set[str]:
    """The domains whose targets speak h2c: their TLS offers HTTP/2."""
    return {r.domain.lower() for r in routes if r.h2c}


class WorkerConfig(BaseModel):
    """What a worker serves: the gateway's routes and certificates."""

    model_config = ConfigDict(frozen=True)

    sequence: int
    routes: list[WorkerRoute] = Field(default_factory=list)
    certificates: list[CertificateBundle] = Field(default_factory=list)
    client_limits: ClientLimits | None = None
    trusted_proxies: list[str] = Field(default_factory=list)


class WorkerReport(BaseModel):
    """A worker's line to the gateway."""

    applied: int | None = None
    """The sequence of the config it now serves."""
    error: str | None = None
    """Why it could not serve that config (it keeps serving the one before)."""
    counters: DataPathCounters | None = None


MEMORY_PER_PROCESS = 128 * 1024 * 1024
"""What ``auto`` budgets per HTTPS process under a memory limit: ~45 MiB at rest, the rest for
connections (~18 KiB each when idle)."""
CGROUP = Path("/sys/fs/cgroup")


def default_worker_count(cgroup: Path = CGROUP) -> int:
    """``auto``: one process per CPU this process may run on, no more than its cgroup's CPU
    quota allows (a pod's CPU limit, rounded up), and one per :data:`MEMORY_PER_PROCESS` of its
    memory limit (the gateway pod's 256 MiB: two)."""
    count = max(1, len(os.sched_getaffinity(0)))
    with contextlib.suppress(OSError):
        quota = quota_cpus((cgroup / "cpu.max").read_text())
        if quota is not None:
            count = min(count, quota)
    with contextlib.suppress(OSError, ValueError):
        limit = (cgroup / "memory.max").read_text().strip()
        if limit.isdigit():
            count = min(count, max(1, int(limit) // MEMORY_PER_PROCESS))
    return count


def quota_cpus(cpu_max: str) -> int | None:
    """CPUs a cgroup v2 ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) allows,
    rounded up; None without a quota."""
    fields = cpu_max.split()
    if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit():
        return None
    quota, period = int(fields[0]), int(fields[1])
    return max(1, -(-quota // period)) if period else None


class WorkerFailed(Exception):
    pass


class _Worker:
    """One worker process, seen from the gateway."""

    def __init__(self, slot: int, process: asyncio.subprocess.Process) -> None:
        self.slot = slot
        self.process = process
        self.started = time.monotonic()
        self.applied = -1
        self.error: str | None = None
        self.changed = asyncio.Event()

    def send(self, line: bytes) -> None:
        assert self.process.stdin is not None
        if not self.process.stdin.is_closing():
            self.process.stdin.write(line)

    async def wait_applied(self, sequence: int) -> None:
        """Until the worker serves config ``sequence``, or has exited (the one started in its
        place gets the latest config before it accepts a connection)."""
        while self.applied < sequence and self.process.returncode is None:
            if self.error is not None:
                raise WorkerFailed(f"HTTPS worker {self.slot}: {self.error}")
            self.changed.clear()
            await self.changed.wait()


class HttpsWorkers:
    """The gateway's extra HTTPS processes: started on its listening addresses, kept serving the
    latest config, replaced when they die."""

    def __init__(self, count: int, stats: EdgeStats, relay_port: int = RELAY_PORT) -> None:
        self.count = count
        """Extra processes (the gateway process serves too)."""
        self.stats = stats
        self.relay_port = relay_port
        self.addresses: list[tuple[int, tuple[str, int]]] = []
        self.workers: dict[int, _Worker] = {}
        self.config: WorkerConfig | None = None
        self.sequence = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.restart_delays: dict[int, float] = {}

    async def listen(self, listening: Sequence[socket.socket]) -> None:
        """(Re)start every worker on the addresses of the gateway's ``listening`` sockets (which
        must have ``SO_REUSEPORT``)."""
        if self.count < 1:
            return
        await self._stop_workers()
        self.addresses = [(s.family, s.getsockname()[:2]) for s in listening]
        self.stopping = False
        started = await asyncio.gather(
            *(self._start(slot) for slot in range(1, self.count + 1)), return_exceptions=True
        )
        for slot, outcome in enumerate(started, start=1):
            if isinstance(outcome, OSError):  # the others serve; this slot is tried again
                self.stats.errors["https_worker_start"] += 1
                log.error("starting HTTPS worker %d failed: %s", slot, outcome)
                self._spawn(self._restart(slot, RESTART_DELAY), f"https-worker-{slot}-restart")
            elif isinstance(outcome, BaseException):
                raise outcome
        if self.config is not None:
            await self._until_applied(list(self.workers.values()))

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def apply_routes(
        self,
        routes: Sequence[WorkerRoute],
        certificates: Sequence[CertificateBundle],
        client_limits: ClientLimits | None = None,
        trusted_proxies: Sequence[str] = (),
    ) -> None:
        """Every worker serves ``routes`` and ``certificates`` (with these client limits and
        trusted proxies) when this returns."""
        self.sequence += 1
        self.config = WorkerConfig(
            sequence=self.sequence, routes=list(routes), certificates=list(certificates),
            client_limits=client_limits, trusted_proxies=list(trusted_proxies),
        )  # fmt: skip
        if not self.workers:
            return
        line = self.config.model_dump_json().encode() + b"\n"
        workers = list(self.workers.values())
        for worker in workers:
            worker.send(line)
        await self._until_applied(workers)

    async def _until_applied(self, workers: Sequence[_Worker]) -> None:
        """Until ``workers`` serve the latest config; a worker that has not within
        :data:`APPLY_TIMEOUT` is killed (and replaced) and the config fails."""
        try:
            async with asyncio.timeout(APPLY_TIMEOUT):
                await asyncio.gather(*(w.wait_applied(self.sequence) for w in workers))
        except TimeoutError:
            slow = [w for w in workers if w.applied < self.sequence]
            for worker in slow:  # the supervisor starts a fresh one with the config
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
            names = ", ".join(str(w.slot) for w in slow) or "?"
            raise WorkerFailed(
                f"HTTPS worker {names} did not apply the config in {APPLY_TIMEOUT:.0f} s"
            ) from None

    async def stop(self) -> None:
        self.stopping = True
        await self._stop_workers()

    async def _stop_workers(self) -> None:
        self.stopping = True
        workers = list(self.workers.values())
        for worker in workers:  # a closed stdin is a worker's signal to close and exit
            assert worker.process.stdin is not None
            worker.process.stdin.close()
        for worker in workers:
            try:
                await asyncio.wait_for(worker.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for slot in list(self.workers):
            self.stats.retire(slot)
        self.workers.clear()

    async def _start(self, slot: int) -> None:
        sockets: list[socket.socket] = []
        try:
            for family, address in self.addresses:
                sockets.append(_reuseport_listener(family, address))
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kakuremichi.edge.https_workers",
                "--slot", str(slot),
                "--listen-fds", ",".join(str(s.fileno()) for s in sockets),
                "--relay-port", str(self.relay_port),
                *(["--verbose"] if log.isEnabledFor(logging.DEBUG) else []),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                pass_fds=[s.fileno() for s in sockets], limit=LINE_LIMIT,
            )  # fmt: skip
        finally:
            for listener in sockets:  # the worker has its own copies now
                listener.close()
        worker = _Worker(slot, process)
        self.workers[slot] = worker
        self._spawn(self._follow(worker), f"https-worker-{slot}")
        if self.config is not None:  # it accepts connections once it serves a config
            worker.send(self.config.model_dump_json().encode() + b"\n")
        log.info("HTTPS worker %d started (pid %d)", slot, process.pid)

    async def _follow(self, worker: _Worker) -> None:
        """Read a worker's reports until it exits; then start another in its place."""
        assert worker.process.stdout is not None
        while line := await worker.process.stdout.readline():
            try:
                report = WorkerReport.model_validate_json(line)
            except ValidationError:
                continue
            if report.counters is not None and self.workers.get(worker.slot) is worker:
                self.stats.workers[worker.slot] = report.counters
            if report.applied is not None:
                worker.applied, worker.error = report.applied, None
                worker.changed.set()
            elif report.error is not None:
                worker.error = report.error
                worker.changed.set()
        code = await worker.process.wait()
        worker.changed.set()
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        self.stats.retire(worker.slot)
        if self.stopping:
            return
        self.stats.errors["https_worker_exit"] += 1
        delay = RESTART_DELAY
        if time.monotonic() - worker.started < STABLE_SECONDS:
            delay = self.restart_delays.get(worker.slot, RESTART_DELAY)
        log.error(
            "HTTPS worker %d exited with %d; starting another in %.0f s", worker.slot, code, delay
        )
        await self._restart(worker.slot, delay)

    async def _restart(self, slot: int, delay: float) -> None:
        """Start a worker in ``slot`` after ``delay``, and keep trying (each wait twice the
        last, up to :data:`RESTART_MAX_DELAY`) while it cannot be started: a slot is never
        left empty for good."""
        while True:
            self.restart_delays[slot] = min(delay * 2, RESTART_MAX_DELAY)
            await asyncio.sleep(delay)
            if self.stopping or slot in self.workers:
                return
            try:
                await self._start(slot)
                return
            except OSError as error:
                self.stats.errors["https_worker_start"] += 1
                delay = self.restart_delays[slot]
                log.error(
                    "starting HTTPS worker %d failed: %s; again in %.0f s", slot, error, delay
                )


def _reuseport_listener(family: int, address: tuple[str, int]) -> socket.socket:
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind(address)
        listener.listen(4096)
    except OSError:
        listener.close()
        raise
    listener.set_inheritable(True)
    return listener


# --- the worker process ----------------------------------------------------------------------


class _WorkerProcess:
    def __init__(self, slot: int, relay_port: int) -> None:
        self.slot = slot
        self.stats = EdgeStats("gateway")
        self.proxy = HttpsProxy(self.stats, relay_port)
        self.sni = SniContexts()
        self.out = sys.stdout.buffer

    def report(self, report: WorkerReport) -> None:
        self.out.write(report.model_dump_json(exclude_none=True).encode() + b"\n")
        self.out.flush()

    def apply(self, config: WorkerConfig) -> None:
        try:
            prepared = self.sni.prepare(config.certificates, h2c_domains(config.routes))
        except CertificateError as error:
            self.report(WorkerReport(error=str(error)))
            return
        self.sni.install(prepared)
        self.proxy.set_front_end(config.client_limits, config.trusted_proxies)
        self.proxy.set_routes({r.domain: r.proxy_route() for r in config.routes})
        self.report(WorkerReport(applied=config.sequence))

    async def report_counters(self) -> None:
        last: DataPathCounters | None = None
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            counters = self.stats.counters()
            if counters != last:
                self.report(WorkerReport(counters=counters))
                last = counters

    async def serve(self, fds: Sequence[int]) -> None:
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader(limit=LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stdin.feed_eof)
        tasks = [
            asyncio.create_task(self.proxy.sweep_forever()),
            asyncio.create_task(self.report_counters()),
        ]
        servers: list[asyncio.Server] = []
        try:
            while line := await stdin.readline():
                try:
                    self.apply(WorkerConfig.model_validate_json(line))
                except ValidationError as error:
                    self.report(WorkerReport(error=f"unreadable config: {error}"))
                    continue
                # Connections wait in the kernel's queue until the first config is served.
                while len(servers) < len(fds):
                    listener = socket.socket(fileno=fds[len(servers)])
                    server = await loop.create_server(self.connection, sock=listener, backlog=4096)
                    servers.append(server)
        finally:
            for server in servers:
                server.close()
            self.proxy.close_all()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def connection(self) -> TlsServerConnection:
        return TlsServerConnection(self.sni.front, self.proxy.protocol, self.stats, self.proxy.caps)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kakuremichi.edge.https_workers")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--listen-fds", required=True, help="comma-separated listening sockets")
    parser.add_argument("--relay-port", type=int, default=RELAY_PORT)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s[worker {args.slot}]: %(message)s",
    )
    raise_file_limit()
    fds = [int(fd) for fd in args.listen_fds.split(",") if fd]
    worker = _WorkerProcess(args.slot, args.relay_port)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(worker.serve(fds))
    else:
        uvloop.run(worker.serve(fds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
