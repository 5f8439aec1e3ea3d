"""What the P2P store keeps in the metadata store, and how every record is checked on the way in.

Two kinds of keys, both under ``mooncake/p2p/``:

* ``objects/<name>``: an :class:`ObjectRecord` - size, chunk size, one SHA-256 per chunk and the
  holders (segment name plus the buffer extents that hold the object, in order). It is rewritten
  only with compare-and-set, so two getters registering themselves as replicas at once both end
  up in the list: the loser of a race re-reads and retries instead of overwriting.
* ``leases/<name>/<segment>``: a tiny TTL key each holder keeps alive while it serves. A holder
  listed in the record without a lease died without saying goodbye; getters skip it and prune it.

Why SHA-256 for chunk checksums: the bytes come from peers, not from the node that registered the
object, so the checksum must pin the content, not just catch bit flips (a CRC can be forged by a
buggy or hostile peer). hashlib's SHA-256 uses the CPUs' SHA extensions (~1 GB/s per core here)
and releases the GIL, so verification runs on worker threads next to the transfers.

Records come from the network: they are JSON decoded by msgspec into typed structs (never
unpickled), size-bounded, and :func:`decode_object` re-checks every invariant before use.
"""
from __future__ import annotations

import re

import msgspec

__all__ = [
    "CHECKSUM_ALGORITHM",
    "MAX_CHUNKS",
    "MAX_HOLDERS",
    "MAX_RECORD_SIZE",
    "OBJECTS_PREFIX",
    "LEASES_PREFIX",
    "PARTIAL_PREFIX",
    "Partial",
    "decode_partial",
    "encode_partial",
    "partial_prefix",
    "Extent",
    "Holder",
    "ObjectRecord",
    "RecordError",
    "check_name",
    "decode_object",
    "encode_object",
    "lease_key",
    "lease_prefix",
    "object_key",
]

P2P_PREFIX = "mooncake/p2p/"
OBJECTS_PREFIX = P2P_PREFIX + "objects/"
LEASES_PREFIX = P2P_PREFIX + "leases/"
PARTIAL_PREFIX = P2P_PREFIX + "partial/"
CHECKSUM_ALGORITHM = "sha256"
MAX_RECORD_SIZE = 4 << 20
MAX_CHUNKS = 65536
MAX_HOLDERS = 1024
MAX_EXTENTS = 1024
MAX_OBJECT_SIZE = 1 << 44
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 1 << 30
_NAME_RE = re.compile(r"^[A-Za-z0-9._\-][A-Za-z0-9._\-/]{0,254}$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:_]{1,300}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RecordError(ValueError):
    """A record in the metadata store is malformed or violates an invariant."""


class Extent(msgspec.Struct, array_like=True, frozen=True):
    """``length`` bytes at ``address`` in a holder's segment."""

    address: int
    length: int


class Holder(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A node serving the object: its transfer-engine segment and where the bytes lie there."""

    segment: str
    extents: list[Extent]
    origin: bool = False


class ObjectRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """An object as the cluster sees it (see the module docstring)."""

    name: str
    size: int
    chunk_size: int
    checksums: list[str]
    holders: list[Holder] = []
    algorithm: str = CHECKSUM_ALGORITHM
    version: int = 1

    @property
    def num_chunks(self) -> int:
        return len(self.checksums)

    def chunk(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``index``."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def same_content(self, other: ObjectRecord) -> bool:
        return (self.size, self.chunk_size, self.checksums, self.algorithm) == (
            other.size, other.chunk_size, other.checksums, other.algorithm)

    def with_holders(self, holders: list[Holder]) -> ObjectRecord:
        return msgspec.structs.replace(self, holders=holders)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ObjectRecord)


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid object name, else raise ``ValueError``.

    Names are path-like (``ckpt/step-100/shard-0``) so ``list(prefix)`` groups them.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or "//" in name \
            or name.endswith("/") or ".." in name.split("/"):
        raise ValueError(f"bad object name {name!r}: use 1-255 of [A-Za-z0-9._-/], no '//', "
                         "'..' or trailing '/'")
    return name


def object_key(name: str) -> str:
    return OBJECTS_PREFIX + check_name(name)


def lease_prefix(name: str) -> str:
    return LEASES_PREFIX + check_name(name) + "/"


def lease_key(name: str, segment: str) -> str:
    if not _SEGMENT_RE.match(segment):
        raise ValueError(f"bad segment name {segment!r}")
    return lease_prefix(name) + segment


def encode_object(record: ObjectRecord) -> bytes:
    _validate(record)
    data = _encoder.encode(record)
    if len(data) > MAX_RECORD_SIZE:
        raise RecordError(f"object record is {len(data)} bytes, the limit is {MAX_RECORD_SIZE}")
    return data


def decode_object(data: bytes, *, expected_name: str | None = None) -> ObjectRecord:
    """Decode and validate a record; raises :class:`RecordError` saying what is wrong."""
    if len(data) > MAX_RECORD_SIZE:
        raise RecordError(f"object record is {len(data)} bytes, the limit is {MAX_RECORD_SIZE}")
    try:
        record = _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as e:  # RecursionError: too deep
        raise RecordError(f"malformed object record: {e}") from None
    _validate(record)
    if expected_name is not None and record.name != expected_name:
        raise RecordError(f"record names {record.name!r}, expected {expected_name!r}")
    return record


def _int(value: object, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise RecordError(f"{what} must be an int in [{low}, {high}], got {value!r}")
    return value


def _validate(r: ObjectRecord) -> None:
    try:
        check_name(r.name)
    except ValueError as e:
        raise RecordError(str(e)) from None
    if r.version != 1:
        raise RecordError(f"unsupported record version {r.version!r}")
    if r.algorithm != CHECKSUM_ALGORITHM:
        raise RecordError(f"unsupported checksum algorithm {r.algorithm!r}")
    size = _int(r.size, 1, MAX_OBJECT_SIZE, "size")
    chunk = _int(r.chunk_size, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE, "chunk_size")
    expected = -(-size // chunk)
    if expected > MAX_CHUNKS:
        raise RecordError(f"{expected} chunks, the limit is {MAX_CHUNKS}: use larger chunks")
    if len(r.checksums) != expected:
        raise RecordError(f"{len(r.checksums)} checksums for {expected} chunks")
    for c in r.checksums:
        if not isinstance(c, str) or not _HEX64.match(c):
            raise RecordError(f"bad checksum {c!r}: want 64 lowercase hex digits")
    if len(r.holders) > MAX_HOLDERS:
        raise RecordError(f"{len(r.holders)} holders, the limit is {MAX_HOLDERS}")
    seen: set[str] = set()
    for h in r.holders:
        if not isinstance(h.segment, str) or not _SEGMENT_RE.match(h.segment):
            raise RecordError(f"bad holder segment {h.segment!r}")
        if h.segment in seen:
            raise RecordError(f"holder {h.segment!r} listed twice")
        seen.add(h.segment)
        if not 1 <= len(h.extents) <= MAX_EXTENTS:
            raise RecordError(f"holder {h.segment!r} has {len(h.extents)} extents")
        total = 0
        for e in h.extents:
            _int(e.address, 1, (1 << 64) - 1, "extent address")
            total += _int(e.length, 1, MAX_OBJECT_SIZE, "extent length")
        if total != size:
            raise RecordError(f"holder {h.segment!r} extents cover {total} bytes, not {size}")


class Partial(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A getter still fetching: where its copy lies and which chunks it verified so far.

    Published (with a TTL) under ``partial/<name>/<segment>`` so concurrent getters fetch the
    chunks it has from it instead of all queueing on the origin. ``have`` is a bitmap, bit i
    (LSB first) set when chunk i is verified.
    """

    segment: str
    extents: list[Extent]
    have: bytes


_partial_decoder = msgspec.json.Decoder(Partial)


def partial_prefix(name: str) -> str:
    return PARTIAL_PREFIX + check_name(name) + "/"


def encode_partial(p: Partial) -> bytes:
    return _encoder.encode(p)


def decode_partial(data: bytes, record: ObjectRecord) -> Partial:
    """Decode a progress entry and check it against the object's record."""
    if len(data) > MAX_RECORD_SIZE:
        raise RecordError(f"progress entry is {len(data)} bytes, the limit is {MAX_RECORD_SIZE}")
    try:
        p = _partial_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as e:  # RecursionError: too deep
        raise RecordError(f"malformed progress entry: {e}") from None
    probe = msgspec.structs.replace(record, holders=[Holder(p.segment, p.extents)])
    _validate(probe)
    if len(p.have) != (record.num_chunks + 7) // 8:
        raise RecordError(f"progress bitmap of {len(p.have)} bytes for {record.num_chunks} chunks")
    return p
