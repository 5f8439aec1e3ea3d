"""Plain data shared by the Conductor and its drivers (the proxy and the simulator).

The policy library speaks only in block ids, instance ids and seconds on a clock it is given. Block
ids are opaque hashables: the proxy passes ``store.keys`` block keys (bytes), the simulator the
traces' ``hash_ids`` (ints). Nothing here knows about HTTP, tokenizers or the store's wire format,
so that what the simulator measures is exactly the code the proxy runs.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

BlockId = Hashable
"""A prefix-block id. Equal ids must mean equal prefixes (ids are chained hashes)."""

PolicyName = Literal["random", "round_robin", "load_balance", "local_cache", "global_cache"]
RejectionMode = Literal["none", "naive", "predictive"]
EvictionPolicy = Literal["lru", "lfu", "length"]

POLICY_NAMES: tuple[PolicyName, ...] = (
    "random",
    "round_robin",
    "load_balance",
    "local_cache",
    "global_cache",
)
REJECTION_MODES: tuple[RejectionMode, ...] = ("none", "naive", "predictive")
EVICTION_POLICIES: tuple[EvictionPolicy, ...] = ("lru", "lfu", "length")


class ConductorError(ValueError):
    """Bad input to the Conductor: unknown instance, duplicate request id, invalid config."""


class Clock(Protocol):
    """Seconds on a monotonic clock: real time in the proxy, simulated time in the simulator."""

    def __call__(self) -> float: ...


def monotonic_clock() -> float:
    """The proxy's clock."""
    return time.monotonic()


class ManualClock:
    """A clock that only moves when told to; the simulator and the tests drive time with it."""

    __slots__ = ("now",)

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        """Move forward (never backward: a discrete-event loop that goes back in time has a bug)."""
        if t < self.now:
            raise ValueError(f"clock cannot go back: {t} < {self.now}")
        self.now = float(t)


class Role(str, enum.Enum):
    """What an instance does. ``store`` is a cache holder that never computes (a store node)."""

    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"
    STORE = "store"

    @property
    def prefills(self) -> bool:
        return self in (Role.PREFILL, Role.MIXED)

    @property
    def decodes(self) -> bool:
        return self in (Role.DECODE, Role.MIXED)

    @property
    def holds_cache(self) -> bool:
        return self is not Role.DECODE


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """One engine (or store node) the Conductor may route to or fetch blocks from.

    ``cache_capacity_blocks`` bounds this instance's entry in the block index (its DRAM cache in the
    simulator); ``None`` means unbounded. ``bandwidth_bytes_per_s`` is what this instance can send
    to others, shared among its concurrent outgoing transfers (sender congestion).
    ``kv_capacity_tokens`` is a decode instance's KV memory, the hard limit on its batch.
    """

    id: str
    role: Role
    cache_capacity_blocks: int | None = None
    bandwidth_bytes_per_s: float = 25e9
    kv_capacity_tokens: int = 1_600_000

    def __post_init__(self) -> None:
        if not self.id:
            raise ConductorError("instance id must be non-empty")
        if not isinstance(self.role, Role):
            object.__setattr__(self, "role", Role(self.role))
        if self.cache_capacity_blocks is not None and self.cache_capacity_blocks < 0:
            raise ConductorError("cache_capacity_blocks must be >= 0 or None")
        if not self.bandwidth_bytes_per_s > 0:
            raise ConductorError("bandwidth_bytes_per_s must be > 0")
        if self.kv_capacity_tokens <= 0:
            raise ConductorError("kv_capacity_tokens must be > 0")


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the Conductor needs to know about a request: its prefix blocks and its size.

    ``expected_output_len`` is a hint (the proxy knows ``max_tokens``; the simulator may pass the
    trace's length or nothing); without it the Conductor uses the running mean of observed outputs.
    """

    id: str
    block_ids: Sequence[BlockId]
    input_len: int
    expected_output_len: int | None = None

    def __post_init__(self) -> None:
        if self.input_len <= 0:
            raise ConductorError(f"request {self.id!r}: input_len must be > 0")
        if self.expected_output_len is not None and self.expected_output_len < 0:
            raise ConductorError(f"request {self.id!r}: expected_output_len must be >= 0")


@dataclass(frozen=True, slots=True)
class Decision:
    """The Conductor's answer for one request.

    ``cached_blocks_local`` blocks are already on the chosen prefill instance;
    ``transfer_blocks`` come from ``transfer_from`` (the best holder) before prefill;
    ``replicate_blocks`` are the hot blocks the driver should replicate next to the chosen
    instance (the proxy asks the store for a local replica; the simulator copies them into the
    instance's cache). ``predicted_decode_load`` is the chosen decode instance's load (1.0 = full)
    as the rejection mode sees it.
    """

    request_id: str
    accepted: bool
    reason: str
    prefill_id: str | None = None
    decode_id: str | None = None
    predicted_ttft: float = 0.0
    predicted_tbt: float = 0.0
    predicted_prefill_time: float = 0.0
    predicted_queue_time: float = 0.0
    predicted_transfer_time: float = 0.0
    predicted_decode_load: float = 0.0
    cached_blocks_local: int = 0
    transfer_from: str | None = None
    transfer_blocks: tuple[BlockId, ...] = ()
    replicate_blocks: tuple[BlockId, ...] = ()
    prefix_blocks: int = field(default=0)
    """Blocks reused after the transfer (local + transferred); the rest are computed."""
