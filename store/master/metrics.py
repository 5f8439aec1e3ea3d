"""Prometheus metrics and the ``/metrics`` + ``/health`` HTTP endpoints of the master.

Gauges that mirror store state (objects, bytes, per-segment usage) are computed at scrape time
by a custom collector, so the hot path never updates them; only op latencies (one histogram
observation per RPC, batch or not) and counters are recorded as operations happen. Each master
has its own registry, so two masters in one process (tests) never collide.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .eviction import Evictor
from .liveness import ClientRegistry
from .objects import ObjectStore

__all__ = ["MasterMetrics"]

_BUCKETS = (2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0)


class _StoreCollector:
    def __init__(self, store: ObjectStore, clients: ClientRegistry, evictor: Evictor,
                 role: Callable[[], str]) -> None:
        self.store, self.clients, self.evictor, self.role = store, clients, evictor, role

    def collect(self) -> Iterator[Metric]:
        store = self.store
        segs = store.segments
        yield GaugeMetricFamily("mooncake_master_objects", "objects stored (complete or not)",
                                value=len(store.objects))
        yield GaugeMetricFamily("mooncake_master_pending_puts", "puts started and not ended",
                                value=len(store.pending))
        yield GaugeMetricFamily("mooncake_master_stored_bytes",
                                "bytes of complete objects (one replica each)",
                                value=store.stored_bytes)
        yield GaugeMetricFamily("mooncake_master_reserved_bytes",
                                "bytes reserved ahead for writers and not yet used",
                                value=store.reservations.reserved_bytes)
        yield CounterMetricFamily("mooncake_master_reserved_puts",
                                  "puts committed from space reserved ahead",
                                  value=store.reservations.commits)
        yield GaugeMetricFamily("mooncake_master_memory_capacity_bytes",
                                "memory-tier capacity of all mounted segments",
                                value=segs.memory_capacity)
        yield GaugeMetricFamily("mooncake_master_memory_used_bytes",
                                "memory-tier bytes allocated", value=segs.memory_used)
        yield GaugeMetricFamily("mooncake_master_clients", "live clients", value=len(self.clients))
        used = GaugeMetricFamily("mooncake_master_segment_used_bytes", "bytes allocated per segment",
                                 labels=["segment", "tier"])
        cap = GaugeMetricFamily("mooncake_master_segment_capacity_bytes", "capacity per segment",
                                labels=["segment", "tier"])
        for seg in segs.segments.values():
            used.add_metric([seg.name, seg.tier], seg.allocator.used)
            cap.add_metric([seg.name, seg.tier], seg.allocator.capacity)
        yield used
        yield cap
        yield CounterMetricFamily("mooncake_master_evicted_objects", "objects evicted",
                                  value=self.evictor.evicted_objects)
        yield CounterMetricFamily("mooncake_master_evicted_bytes", "replica bytes evicted",
                                  value=self.evictor.evicted_bytes)
        demoter = self.evictor.demoter
        yield CounterMetricFamily("mooncake_master_demoted_objects",
                                  "objects moved from the memory to the file tier",
                                  value=demoter.demoted_objects)
        yield CounterMetricFamily("mooncake_master_demoted_bytes",
                                  "bytes moved from the memory to the file tier",
                                  value=demoter.demoted_bytes)
        yield CounterMetricFamily("mooncake_master_demotions_abandoned",
                                  "demotions not completed in time (objects evicted instead)",
                                  value=demoter.abandoned)
        yield GaugeMetricFamily("mooncake_master_demotions_in_flight",
                                "demotions handed out or queued and not ended", value=len(demoter))
        yield CounterMetricFamily("mooncake_master_expired_clients",
                                  "clients declared dead after their TTL",
                                  value=self.clients.expired_clients)
        leader = GaugeMetricFamily("mooncake_master_is_leader", "1 if serving as leader")
        leader.add_metric([], 1.0 if self.role() == "leader" else 0.0)
        yield leader


class MasterMetrics:
    """The master's registry; :meth:`observe` records one op latency."""

    def __init__(self, store: ObjectStore, clients: ClientRegistry, evictor: Evictor,
                 role: Callable[[], str]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._latency = Histogram("mooncake_master_op_latency_seconds",
                                  "handler time per RPC (a batch counts once)", ["op"],
                                  buckets=_BUCKETS, registry=self.registry)
        self._children: dict[str, Histogram] = {}
        self.registry.register(_StoreCollector(store, clients, evictor, role))  # type: ignore[arg-type]
        self._role = role

    def observe(self, op: str, seconds: float) -> None:
        child = self._children.get(op)
        if child is None:
            child = self._children[op] = self._latency.labels(op)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def add_routes(self, app: web.Application) -> None:
        """``GET /metrics`` (Prometheus text) and ``GET /health`` (200 with the role)."""
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.render(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        role = self._role()
        return web.json_response({"status": "ok", "role": role})
