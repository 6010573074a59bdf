"""HTTPS worker processes: a gateway serves its HTTPS port from as many processes as it has CPUs.

One Python process proxies on one core. Like nginx's ``worker_processes auto``, the gateway
process starts ``workers - 1`` more processes serving the same HTTPS port; each gets listening
sockets of its own bound with ``SO_REUSEPORT`` (so the kernel spreads new connections across the
processes, and no worker needs the privilege to bind port 443: the gateway binds them and hands
them over). The gateway process keeps everything else: the control channel, WireGuard, the
plain-HTTP port with ACME answers, and ``/metrics``.

A worker is ``python -m kakuremichi.edge.https_worker`` (that module): it reads
:class:`~kakuremichi.edge.https_worker.WorkerConfig` lines (the front end: routes, certificates,
limits) on stdin and writes report lines on stdout (which config it serves, its counters). This
module is the gateway's side: it waits until every worker serves a config before it reports the
config applied, replaces a worker that dies, and closes their stdin to stop them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from pydantic import ValidationError

from kakuremichi.api.protocol import RELAY_PORT
from kakuremichi.edge.gateway_routes import FrontEndConfig
from kakuremichi.edge.https_worker import LINE_LIMIT, WorkerConfig, WorkerReport
from kakuremichi.edge.stats import EdgeStats

APPLY_TIMEOUT = 15.0
"""A worker that has not applied a config this long after it was sent is replaced."""
RESTART_DELAY = 1.0
RESTART_MAX_DELAY = 30.0
"""A worker that keeps dying young, or cannot be started, is retried ever more slowly."""
STABLE_SECONDS = 60.0
"""A worker that served this long died of something else than its start: retry at once."""
STOP_TIMEOUT = 5.0
log = logging.getLogger(__name__)


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

    async def apply(self, front_end: FrontEndConfig) -> None:
        """Every worker serves ``front_end`` when this returns."""
        self.sequence += 1
        self.config = WorkerConfig(sequence=self.sequence, front_end=front_end)
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
                sys.executable, "-m", "kakuremichi.edge.https_worker",
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
