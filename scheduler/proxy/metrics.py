"""Prometheus metrics of the proxy, on a registry of its own (several proxies per process in tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ProxyMetrics"]

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mooncake_proxy_requests", "requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.rejected = Counter("mooncake_proxy_rejected", "requests rejected early, by reason",
                                ["reason"], registry=r)
        self.ttft = Histogram("mooncake_proxy_ttft_seconds", "time to the first byte relayed",
                              buckets=_TTFT, registry=r)
        self.stage = Histogram("mooncake_proxy_stage_seconds", "time spent per routing stage",
                               ["stage"], buckets=_FAST, registry=r)
        self.replications = Counter(
            "mooncake_proxy_replications", "hot-spot replications the Conductor asked for, by "
            "outcome (done, failed, dropped: too many in flight, skipped: no replicator)",
            ["outcome"], registry=r)
        self.healthy = Gauge("mooncake_proxy_healthy_instances", "healthy instances, by role",
                             ["role"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
