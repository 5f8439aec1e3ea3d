"""Wire messages of the master RPC (msgspec structs, decoded straight into these types).

Why ``array_like`` on the per-item structs: a batch of 256 replica lists is the hot path, and
encoding structs as arrays instead of maps roughly halves both the bytes and the codec time.
Requests are bounded by the RPC frame limit; list lengths and key sizes are checked by the store.
"""
from __future__ import annotations

import msgspec

__all__ = [
    "MAX_BATCH",
    "BatchExistsReply",
    "BatchGetReplicaListReply",
    "BatchKeysRequest",
    "BatchPutEndReply",
    "BatchPutStartReply",
    "BatchPutStartRequest",
    "CodesReply",
    "DemoteEndReply",
    "DemoteEndRequest",
    "DemoteTask",
    "TakeDemotionsReply",
    "TakeDemotionsRequest",
    "ExistsReply",
    "ExistsRequest",
    "OkReply",
    "OwnedKeyRequest",
    "OwnedKeysRequest",
    "RemoveRequest",
    "UnmountSegmentReply",
    "GetReplicaListReply",
    "KeyRequest",
    "KeysRequest",
    "MountSegmentReply",
    "MountSegmentRequest",
    "PingReply",
    "PingRequest",
    "PutStartReply",
    "PutStartRequest",
    "RemoveAllReply",
    "RemoveAllRequest",
    "RemountObject",
    "ReplicaDesc",
    "ReplicaListItem",
    "BatchReplicaStartReply",
    "BatchReplicaStartRequest",
    "ReplicaStartItem",
    "ReplicaStartReply",
    "ReplicaStartRequest",
    "ReplicateConfig",
    "SegmentDesc",
    "StatsReply",
    "StatsRequest",
    "UnmountSegmentRequest",
    "PutStartItem",
]

MAX_BATCH = 65536
"""Most keys one batch call may carry (the frame limit usually binds first)."""

TIER_MEMORY = "memory"
TIER_FILE = "file"
TIERS = (TIER_MEMORY, TIER_FILE)


class ReplicateConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Mooncake's ``ReplicateConfig``: where and how a put's replicas are placed."""

    replica_num: int = 1
    preferred_segment: str = ""
    preferred_segments: list[str] = []
    prefer_alloc_in_same_node: bool = False
    with_hard_pin: bool = False
    soft_pin: bool = False
    soft_pin_action: str = ""
    """Mooncake's pin action names; any non-empty value other than "none" also soft-pins."""
    soft_pin_ttl_ms: int = 0
    """0 = the master's default soft-pin TTL."""
    group_ids: list[int] = []


class SegmentDesc(msgspec.Struct, kw_only=True):
    """A memory (DRAM) or file (SSD tier) segment a client contributes to the pool."""

    name: str
    """The owning transfer-engine segment name (peers address data by it)."""
    base: int
    size: int
    client_id: str
    host_id: str = ""
    tier: str = TIER_MEMORY


class RemountObject(msgspec.Struct, array_like=True):
    """A complete object a client still holds, reported on remount so a new leader rebuilds."""

    key: str
    address: int
    size: int


class MountSegmentRequest(msgspec.Struct, kw_only=True):
    segment: SegmentDesc
    objects: list[RemountObject] = []
    """Non-empty on a remount after failover: the objects stored in this segment."""


class MountSegmentReply(msgspec.Struct):
    rebuilt_objects: int
    """How many of the reported objects were re-registered (others already existed)."""
    discarded: list[int] = []
    """Addresses of reported copies the master did not take back (possibly stale versions):
    the holder forgets them, or a later failover rebuild would offer them again."""


class UnmountSegmentRequest(msgspec.Struct):
    client_id: str
    name: str


class PingRequest(msgspec.Struct):
    client_id: str


class PingReply(msgspec.Struct):
    known: bool
    """False: this master does not know the client (declared dead, or a new leader): remount."""
    view_version: int
    """Changes when the master restarts or a new leader takes over."""
    offload: bool = False
    """The SSD tier is on: clients holding memory should poll ``take_demotions``."""


class ReplicaDesc(msgspec.Struct, array_like=True):
    """Where one complete replica lives: the reader transfers ``size`` bytes from there."""

    segment: str
    address: int
    size: int
    tier: str


class KeyRequest(msgspec.Struct):
    key: str


class KeysRequest(msgspec.Struct):
    keys: list[str]


class OwnedKeyRequest(msgspec.Struct):
    """put_end / put_revoke: only the client that started the put may finish it."""

    client_id: str
    key: str


class OwnedKeysRequest(msgspec.Struct):
    client_id: str
    keys: list[str]


class ExistsRequest(msgspec.Struct):
    key: str
    grant_lease: bool = False


class RemoveRequest(msgspec.Struct):
    key: str
    force: bool = False
    """Remove even while leased."""


class OkReply(msgspec.Struct):
    pass


class UnmountSegmentReply(msgspec.Struct):
    lost_objects: int
    """Objects that disappeared because their only replicas were on this segment."""


class GetReplicaListReply(msgspec.Struct):
    replicas: list[ReplicaDesc]
    lease_ttl_ms: int
    """The lease granted: replica locations may be cached and read for this long."""


class ReplicaListItem(msgspec.Struct, array_like=True):
    code: int
    replicas: list[ReplicaDesc]


class BatchGetReplicaListReply(msgspec.Struct):
    items: list[ReplicaListItem]
    lease_ttl_ms: int


class BatchKeysRequest(msgspec.Struct):
    keys: list[str]
    grant_lease: bool = False
    """For exists: also lease found objects, so a following load cannot race eviction."""


class ExistsReply(msgspec.Struct):
    exists: bool
    lease_ttl_ms: int = 0


class BatchExistsReply(msgspec.Struct):
    exists: list[bool]
    lease_ttl_ms: int = 0


class PutStartRequest(msgspec.Struct, kw_only=True):
    client_id: str
    key: str
    size: int
    config: ReplicateConfig = msgspec.field(default_factory=ReplicateConfig)


class PutStartReply(msgspec.Struct):
    replicas: list[ReplicaDesc]
    """Where to write: the client writes the value to every one, then calls put_end."""


class PutStartItem(msgspec.Struct, array_like=True):
    code: int
    replicas: list[ReplicaDesc]


class BatchPutStartRequest(msgspec.Struct, kw_only=True):
    client_id: str
    keys: list[str]
    sizes: list[int]
    config: ReplicateConfig = msgspec.field(default_factory=ReplicateConfig)


class BatchPutStartReply(msgspec.Struct):
    items: list[PutStartItem]
    put_timeout_ms: int = 0
    """The master reclaims a reservation not ended within this long (0: not said, an older
    master). Writers that fill a reservation over time (staged puts) stop well before it."""


class DemoteTask(msgspec.Struct, array_like=True):
    """Copy ``source`` (a memory replica you hold) to ``target`` (a file replica), then report."""

    id: int
    key: str
    source: ReplicaDesc
    target: ReplicaDesc


class TakeDemotionsRequest(msgspec.Struct):
    client_id: str


class TakeDemotionsReply(msgspec.Struct):
    tasks: list[DemoteTask]


class DemoteEndRequest(msgspec.Struct):
    client_id: str
    done: list[int]
    """Ids of demotions copied: publish the file replica, free the memory one."""
    failed: list[int] = []
    """Ids of demotions that could not be copied: evict those objects the old way."""


class DemoteEndReply(msgspec.Struct):
    published: list[int]
    """Ids whose file replica is now published (the others were abandoned or unknown)."""


class ReplicaStartRequest(msgspec.Struct, kw_only=True):
    """Add one replica of the complete object ``key`` on ``segment`` (see :mod:`.replication`)."""

    client_id: str
    key: str
    segment: str


class ReplicaStartReply(msgspec.Struct):
    target: ReplicaDesc
    """Reserved, hidden from readers: copy the object here, then ``replica_end``."""
    sources: list[ReplicaDesc]
    """The object's complete replicas (leased for ``lease_ttl_ms``): copy from one of them."""
    lease_ttl_ms: int


class BatchReplicaStartRequest(msgspec.Struct, kw_only=True):
    client_id: str
    keys: list[str]
    segment: str


class ReplicaStartItem(msgspec.Struct, array_like=True):
    code: int
    target: ReplicaDesc | None
    sources: list[ReplicaDesc]


class BatchReplicaStartReply(msgspec.Struct):
    items: list[ReplicaStartItem]
    lease_ttl_ms: int


class CodesReply(msgspec.Struct):
    """Per-key result codes of a batch call (0 = OK)."""

    codes: list[int]


BatchPutEndReply = CodesReply


class ReserveRequest(msgspec.Struct):
    """Space ahead for ``client_id``'s next puts (see ``store.master.reservations``)."""

    client_id: str
    size: int
    release: int = 0
    """A reservation of this client whose rest goes back first (0: none)."""


class ReserveReply(msgspec.Struct):
    reservation: int
    segment: str
    address: int
    """Where the first object goes (the reservation's front)."""
    size: int
    alignment: int
    """Each object takes its size rounded up to this; the next one starts there."""
    ttl_ms: int
    """The reservation goes back this long after it was made; write into it for half that."""


class PutCommitRequest(msgspec.Struct):
    """Publish ``key``, already written at the front (``address``) of ``reservation``."""

    client_id: str
    reservation: int
    key: str
    size: int
    address: int
    config: ReplicateConfig = msgspec.field(default_factory=ReplicateConfig)


class RemoveAllRequest(msgspec.Struct):
    force: bool = False
    """Also remove leased objects (never hard-pinned ones unless forced)."""


class RemoveAllReply(msgspec.Struct):
    removed: int


class StatsRequest(msgspec.Struct):
    pass


class StatsReply(msgspec.Struct):
    objects: int
    bytes: int
    capacity: int
    used: int
    segments: int
    clients: int
    evicted_objects: int
    view_version: int
    demoted_objects: int = 0
