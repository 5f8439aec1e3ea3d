"""Connector stats: hits, blocks and bytes moved, and time spent, per logging interval.

Why a ``KVConnectorStats`` subclass: vLLM ships it from workers to the logger process, aggregates
it across workers and steps, and prints ``reduce()`` in its periodic stats line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

__all__ = ["COUNTERS", "PyMooncakeStats"]

COUNTERS = ("loaded_blocks", "loaded_bytes", "load_errors", "load_time_s",
            "saved_blocks", "saved_bytes", "save_skipped_blocks", "save_errors", "save_time_s")


@dataclass
class PyMooncakeStats(KVConnectorStats):
    """Counters summed over workers and steps (all plain numbers, so serialisation is trivial)."""

    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)

    def add(self, **values: float) -> None:
        for name, value in values.items():
            if name not in COUNTERS:
                raise KeyError(f"unknown PyMooncakeStats counter {name!r}")
            self.data[name] += value

    def reset(self) -> None:
        for name in COUNTERS:
            self.data[name] = 0

    def aggregate(self, other: KVConnectorStats) -> "PyMooncakeStats":
        for name in COUNTERS:
            self.data[name] = self.data.get(name, 0) + other.data.get(name, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: round(self.data[name], 4) if isinstance(self.data[name], float)
                else self.data[name] for name in COUNTERS}

    def is_empty(self) -> bool:
        return not any(self.data.get(name) for name in COUNTERS)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)
