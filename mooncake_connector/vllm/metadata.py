"""What the scheduler-side connector tells the worker-side one each step.

Why plain dataclasses of ints and strings: vLLM ships connector metadata from the scheduler
process to workers; keeping it to primitive fields makes it cheap to serialise and impossible to
smuggle objects through.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

__all__ = ["BlockTransfer", "PyMooncakeMetadata"]


@dataclass
class BlockTransfer:
    """Move whole KV blocks of one request: ``keys[i]`` <-> vLLM block ``block_ids[i]``."""

    req_id: str
    keys: list[str]
    block_ids: list[int]


@dataclass
class PyMooncakeMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)
    # Requests the scheduler preempted this step: their blocks may be reused, so in-flight saves
    # that read them must finish first.
    preempted: bool = False
