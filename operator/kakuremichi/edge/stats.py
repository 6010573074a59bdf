"""What an edge counts, and its ``/metrics`` exposition.

The data path increments plain integers (a dict lookup per event, no locks or label objects);
Prometheus reads them through a collector at scrape time, so counting costs almost nothing.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from kakuremichi import __version__


@dataclass
class PeerSample:
    public_key: str
    """base64"""
    latest_handshake: int
    """Unix seconds; 0 before the first handshake."""
    rx_bytes: int
    tx_bytes: int


class DataPathCounters(BaseModel):
    """What one process serving the HTTPS port counted: a gateway's HTTPS workers report theirs
    to the gateway process, which exposes the sum."""

    model_config = ConfigDict(frozen=True)

    received_bytes: dict[str, int] = Field(default_factory=dict)
    sent_bytes: dict[str, int] = Field(default_factory=dict)
    requests: list[tuple[str, int, int]] = Field(default_factory=list)
    """(tunnel, status code, count)"""
    connections_total: int = 0
    active_connections: int = 0
    errors: dict[str, int] = Field(default_factory=dict)
    http2_connections: dict[str, int] = Field(default_factory=dict)
    """HTTP/2 connections passed through to h2c targets, by tunnel."""
    limit_hits: dict[str, int] = Field(default_factory=dict)
    """Clients refused or closed by a ClientLimits limit, by limit."""
    tunnel_connections: dict[str, int] = Field(default_factory=dict)
    """Connections of TCP and TLS-passthrough tunnels (an agent's: streams), by tunnel."""
    datagrams_in: dict[str, int] = Field(default_factory=dict)
    """UDP tunnels' datagrams from clients toward targets, by tunnel."""
    datagrams_out: dict[str, int] = Field(default_factory=dict)
    dropped: dict[str, int] = Field(default_factory=dict)
    """Datagrams dropped, by ``tunnel/reason``."""

    def plus(self, other: DataPathCounters, *, active: bool = True) -> DataPathCounters:
        """The sum; ``active=False`` leaves ``other``'s open connections out (its process is
        gone, so they are closed)."""
        requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        for domain, code, count in (*self.requests, *other.requests):
            requests[(domain, code)] += count
        return DataPathCounters(
            received_bytes=_add(self.received_bytes, other.received_bytes),
            sent_bytes=_add(self.sent_bytes, other.sent_bytes),
            requests=[(domain, code, count) for (domain, code), count in requests.items()],
            connections_total=self.connections_total + other.connections_total,
            active_connections=self.active_connections
            + (other.active_connections if active else 0),
            errors=_add(self.errors, other.errors),
            http2_connections=_add(self.http2_connections, other.http2_connections),
            limit_hits=_add(self.limit_hits, other.limit_hits),
            tunnel_connections=_add(self.tunnel_connections, other.tunnel_connections),
            datagrams_in=_add(self.datagrams_in, other.datagrams_in),
            datagrams_out=_add(self.datagrams_out, other.datagrams_out),
            dropped=_add(self.dropped, other.dropped),
        )


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    total = dict(a)
    for key, count in b.items():
        total[key] = total.get(key, 0) + count
    return total


@dataclass
class EdgeStats:
    role: str
    wireguard_mode: str = "unknown"
    received_bytes: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Bytes from clients toward origins, by tunnel (domain)."""
    sent_bytes: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Bytes from origins back to clients, by tunnel."""
    requests: defaultdict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    """Completed requests by tunnel and status code (gateways)."""
    connections_total: int = 0
    active_connections: int = 0
    errors: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    http2_connections: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """HTTP/2 connections passed through to h2c targets, by tunnel (their requests are not
    seen, so not in ``requests``)."""
    limit_hits: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Clients refused or closed by a limit (max_head_bytes, head_timeout, ...), by limit."""
    tunnel_connections: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Connections of TCP and TLS-passthrough tunnels (an agent's: streams), by tunnel."""
    datagrams_in: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """UDP tunnels' datagrams from clients toward targets, by tunnel."""
    datagrams_out: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    dropped: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Datagrams dropped, by ``tunnel/reason`` (too_large, flow_cap, no_flow, no_agent, ...)."""
    config_version: int = 0
    config_applied_at: float = 0.0
    config_errors: int = 0
    tunnels: int = 0
    control_connected: bool = False
    peers: list[PeerSample] = field(default_factory=list)
    workers: dict[int, DataPathCounters] = field(default_factory=dict)
    """The latest counters of each HTTPS worker process (gateways), by worker slot."""
    retired: DataPathCounters = field(default_factory=DataPathCounters)
    """What worker processes that have exited had counted."""

    def counters(self) -> DataPathCounters:
        """This process's own data-path counters."""
        return DataPathCounters(
            received_bytes=dict(self.received_bytes),
            sent_bytes=dict(self.sent_bytes),
            requests=[(domain, code, count) for (domain, code), count in self.requests.items()],
            connections_total=self.connections_total,
            active_connections=self.active_connections,
            errors=dict(self.errors),
            http2_connections=dict(self.http2_connections),
            limit_hits=dict(self.limit_hits),
            tunnel_connections=dict(self.tunnel_connections),
            datagrams_in=dict(self.datagrams_in),
            datagrams_out=dict(self.datagrams_out),
            dropped=dict(self.dropped),
        )

    def drop(self, tunnel: str, reason: str) -> None:
        self.dropped[f"{tunnel}/{reason}"] += 1

    def combined(self) -> DataPathCounters:
        """This process's counters plus every worker's."""
        total = self.counters().plus(self.retired)
        for counters in self.workers.values():
            total = total.plus(counters)
        return total

    def retire(self, slot: int) -> None:
        """Worker ``slot`` exited: keep what it counted, not its connections."""
        counters = self.workers.pop(slot, None)
        if counters is not None:
            self.retired = self.retired.plus(counters, active=False)

    @property
    def requests_total(self) -> int:
        if not self.workers and not self.retired.requests:
            return sum(self.requests.values())
        return sum(count for _, _, count in self.combined().requests)

    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return registry


class _Collector(Collector):
    def __init__(self, stats: EdgeStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        data = s.combined()
        prefix = f"kakuremichi_{s.role}"
        info = GaugeMetricFamily(
            f"{prefix}_info", "Version and WireGuard mode", labels=["version", "wireguard_mode"]
        )
        info.add_metric([__version__, s.wireguard_mode], 1)
        yield info
        traffic = CounterMetricFamily(
            f"{prefix}_bytes",
            "Bytes relayed, by tunnel and direction",
            labels=["tunnel", "direction"],
        )
        for domain, count in sorted(data.received_bytes.items()):
            traffic.add_metric([domain, "in"], count)
        for domain, count in sorted(data.sent_bytes.items()):
            traffic.add_metric([domain, "out"], count)
        yield traffic
        if s.role == "gateway":
            requests = CounterMetricFamily(
                f"{prefix}_requests",
                "Requests by tunnel and status code",
                labels=["tunnel", "code"],
            )
            for domain, code, count in sorted(data.requests):
                requests.add_metric([domain, str(code)], count)
            yield requests
            http2 = CounterMetricFamily(
                f"{prefix}_http2_connections",
                "HTTP/2 connections passed through to h2c targets (gRPC), by tunnel",
                labels=["tunnel"],
            )
            for domain, count in sorted(data.http2_connections.items()):
                http2.add_metric([domain], count)
            yield http2
            hits = CounterMetricFamily(
                f"{prefix}_limit_hits",
                "Clients refused or closed by a client limit (spec.clientLimits), by limit",
                labels=["limit"],
            )
            for limit, count in sorted(data.limit_hits.items()):
                hits.add_metric([limit], count)
            yield hits
        connections = CounterMetricFamily(
            f"{prefix}_tunnel_connections",
            "Connections of TCP and TLS-passthrough tunnels (agents: streams of every tunnel), "
            "by tunnel",
            labels=["tunnel"],
        )
        for domain, count in sorted(data.tunnel_connections.items()):
            connections.add_metric([domain], count)
        yield connections
        datagrams = CounterMetricFamily(
            f"{prefix}_datagrams",
            "UDP tunnels' datagrams relayed, by tunnel and direction",
            labels=["tunnel", "direction"],
        )
        for domain, count in sorted(data.datagrams_in.items()):
            datagrams.add_metric([domain, "in"], count)
        for domain, count in sorted(data.datagrams_out.items()):
            datagrams.add_metric([domain, "out"], count)
        yield datagrams
        dropped = CounterMetricFamily(
            f"{prefix}_datagrams_dropped",
            "UDP datagrams dropped, by tunnel and reason",
            labels=["tunnel", "reason"],
        )
        for key, count in sorted(data.dropped.items()):
            domain, _, reason = key.rpartition("/")
            dropped.add_metric([domain, reason], count)
        yield dropped
        yield CounterMetricFamily(
            f"{prefix}_connections", "Connections accepted", value=data.connections_total
        )
        yield GaugeMetricFamily(
            f"{prefix}_active_connections", "Connections open now", value=data.active_connections
        )
        errors = CounterMetricFamily(f"{prefix}_errors", "Errors by kind", labels=["kind"])
        for kind, count in sorted(data.errors.items()):
            errors.add_metric([kind], count)
        yield errors
        yield GaugeMetricFamily(
            f"{prefix}_config_version", "Version of the applied config", value=s.config_version
        )
        yield GaugeMetricFamily(
            f"{prefix}_config_applied_timestamp_seconds",
            "When the last config was applied",
            value=s.config_applied_at,
        )
        yield CounterMetricFamily(
            f"{prefix}_config_errors", "Configs that could not be applied", value=s.config_errors
        )
        yield GaugeMetricFamily(f"{prefix}_tunnels", "Tunnels served", value=s.tunnels)
        yield GaugeMetricFamily(
            f"{prefix}_control_connected",
            "1 while the control channel is up",
            value=1 if s.control_connected else 0,
        )
        handshake = GaugeMetricFamily(
            f"{prefix}_wireguard_peer_handshake_age_seconds",
            "Seconds since each WireGuard peer's latest handshake",
            labels=["peer"],
        )
        now = time.time()
        for peer in s.peers:
            if peer.latest_handshake:
                handshake.add_metric([peer.public_key], max(0.0, now - peer.latest_handshake))
        yield handshake
