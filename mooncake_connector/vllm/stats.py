"""Connector stats: hits, blocks and bytes moved, and time spent, per logging interval.

Why a ``KVConnectorStats`` subclass: vLLM ships it from workers (and from the scheduler-side
connector) to the logger process, aggregates it across workers and steps, prints ``reduce()`` in
its periodic stats line and hands ``to_dict()`` to the connector's Prometheus metrics
(:class:`PyMooncakePromMetrics`, built by ``PyMooncakeConnector.build_prom_metrics``).

The payload is plain numbers plus two short lists of per-transfer durations (for the load/save
time histograms), so it serialises trivially. The lists are capped per payload: a stats object
that somehow is not drained for a long time cannot grow without bound, it just samples fewer
durations (the counters stay exact).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

__all__ = ["COUNTERS", "DURATIONS", "PyMooncakePromMetrics", "PyMooncakeStats"]

# Counter name -> Prometheus help text. Scheduler side: lookups/hits; worker side: the rest.
COUNTERS: dict[str, str] = {
    "lookups": "Store lookups (one batch exists call each) for new requests.",
    "lookup_hit_blocks": "Blocks a lookup found loadable from the store (beyond vLLM's own cache).",
    "loaded_blocks": "KV blocks loaded from the store.",
    "loaded_bytes": "Bytes of KV loaded from the store.",
    "load_errors": "KV blocks that failed to load (recomputed under kv_load_failure_policy).",
    "load_time_s": "Seconds spent loading KV from the store.",
    "saved_blocks": "KV blocks saved to the store.",
    "saved_bytes": "Bytes of KV saved to the store.",
    "save_skipped_blocks": "KV blocks not saved because the store had them already.",
    "save_errors": "KV blocks whose save failed.",
    "layer_saved_blocks": "KV blocks saved layer by layer during the forward pass "
                          "(save_mode=layer; the rest of saved_blocks were put whole).",
    "save_time_s": "Seconds spent saving KV to the store.",
}
# Per-transfer duration lists (one entry per request's load or save) -> histogram help text.
DURATIONS: dict[str, str] = {
    "load_durations_s": "Time to load one request's blocks from the store.",
    "save_durations_s": "Time to save one request's blocks (one step's worth) to the store.",
}
MAX_DURATIONS = 1024
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class PyMooncakeStats(KVConnectorStats):
    """Counters summed over workers and steps, plus capped per-transfer duration samples."""

    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)
        for name in DURATIONS:
            samples = self.data.get(name)
            self.data[name] = list(samples) if isinstance(samples, (list, tuple)) else []

    def add(self, **values: float) -> None:
        for name, value in values.items():
            if name not in COUNTERS:
                raise KeyError(f"unknown PyMooncakeStats counter {name!r}")
            self.data[name] += value

    def observe(self, name: str, seconds: float) -> None:
        """Record one transfer's duration (``load_durations_s`` or ``save_durations_s``)."""
        samples = self.data[name]
        if len(samples) < MAX_DURATIONS:
            samples.append(seconds)

    def reset(self) -> None:
        for name in COUNTERS:
            self.data[name] = 0
        for name in DURATIONS:
            self.data[name] = []

    def aggregate(self, other: KVConnectorStats) -> "PyMooncakeStats":
        for name in COUNTERS:
            self.data[name] = self.data.get(name, 0) + other.data.get(name, 0)
        for name in DURATIONS:
            samples = other.data.get(name)
            if isinstance(samples, (list, tuple)):
                room = MAX_DURATIONS - len(self.data[name])
                self.data[name].extend(list(samples)[:max(room, 0)])
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: round(self.data[name], 4) if isinstance(self.data[name], float)
                else self.data[name] for name in COUNTERS}

    def is_empty(self) -> bool:
        return not any(self.data.get(name) for name in COUNTERS)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)


class PyMooncakePromMetrics(KVConnectorPromMetrics):
    """``vllm:pymooncake_*`` counters and load/save time histograms on vLLM's ``/metrics``.

    vLLM calls :meth:`observe` in the process that serves ``/metrics`` with the stats payload
    aggregated over workers for one scheduler step; values that are not numbers are ignored (a
    stats payload is data from another process: it must never break the metrics endpoint).
    """

    def __init__(self, vllm_config: Any, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: self._counter_cls(name=f"vllm:pymooncake_{name}", documentation=doc,
                                    labelnames=labelnames)
            for name, doc in COUNTERS.items()}
        self._histograms = {
            name: self._histogram_cls(name=f"vllm:pymooncake_{name[:-len('_durations_s')]}"
                                      "_time_seconds", documentation=doc,
                                      labelnames=labelnames, buckets=list(_BUCKETS))
            for name, doc in DURATIONS.items()}
        self._per_engine: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}

    def _engine(self, engine_idx: int) -> tuple[dict[str, Any], dict[str, Any]]:
        got = self._per_engine.get(engine_idx)
        if got is None:
            values = self.per_engine_labelvalues[engine_idx]
            got = ({n: c.labels(*values) for n, c in self._counters.items()},
                   {n: h.labels(*values) for n, h in self._histograms.items()})
            self._per_engine[engine_idx] = got
        return got

    def observe(self, transfer_stats_data: Mapping[str, Any] | None, engine_idx: int = 0) -> None:
        if not transfer_stats_data:
            return
        counters, histograms = self._engine(engine_idx)
        for name, counter in counters.items():
            value = transfer_stats_data.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                counter.inc(value)
        for name, hist in histograms.items():
            samples = transfer_stats_data.get(name)
            if isinstance(samples, list):
                for s in samples[:MAX_DURATIONS]:
                    if isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0:
                        hist.observe(s)
