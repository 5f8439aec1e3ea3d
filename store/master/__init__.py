"""The Mooncake Store master: metadata of the pooled KV cache (never the data).

Modules, one concept each: :mod:`.allocator` (per-segment offset allocator), :mod:`.segments`
(mounted segments, placement), :mod:`.objects` (two-phase puts, replicas, leases, pins, LRU),
:mod:`.eviction`, :mod:`.demotion` (the SSD tier), :mod:`.replication` (adding a replica on a chosen segment), :mod:`.liveness` (heartbeats, dead clients, stale puts), :mod:`.service` (RPC
handlers), :mod:`.messages` (wire structs), :mod:`.errors`, :mod:`.metrics`, :mod:`.ha` (leader
election, :func:`find_master`), :mod:`.server` (the assembled process), :mod:`.client`.
"""
from __future__ import annotations

from .client import MasterClient, SyncMasterClient
from .errors import MasterError, MasterErrorCode
from .ha import LEADER_KEY, afind_master, find_master
from .messages import ReplicaDesc, ReplicateConfig, RemountObject, SegmentDesc
from .server import MasterServer

__all__ = [
    "LEADER_KEY",
    "MasterClient",
    "MasterError",
    "MasterErrorCode",
    "MasterServer",
    "RemountObject",
    "ReplicaDesc",
    "ReplicateConfig",
    "SegmentDesc",
    "SyncMasterClient",
    "afind_master",
    "find_master",
]
