"""Segment descriptors: what an engine publishes so peers can reach its registered buffers.

Encoded as JSON with msgspec (Mooncake's descriptors are JSON too) and never unpickled. A
descriptor comes from the network (a peer, the HTTP server, etcd), so :func:`decode_descriptor`
bounds its size, checks every field, and rejects overlapping or out-of-range buffers before
anything is looked up in it.
"""
from __future__ import annotations

import bisect
import re
from typing import Any

import msgspec

from transfer.errors import AddressError, DescriptorError
from transfer.memory import MAX_ADDRESS
from transfer.shm import check_shm_name

__all__ = [
    "MAX_BUFFERS",
    "MAX_DESCRIPTOR_SIZE",
    "BufferDesc",
    "PeerSegment",
    "SegmentDescriptor",
    "decode_descriptor",
    "encode_descriptor",
]

MAX_DESCRIPTOR_SIZE = 16 << 20
MAX_BUFFERS = 65536
_LOCATION_RE = re.compile(r"^(cpu|cuda):\d{1,4}$|^file:/.{0,4095}$", re.DOTALL)
_NAME_MAX = 512


class BufferDesc(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One registered buffer as peers see it; ``info`` holds per-transport data (RDMA rkeys)."""

    address: int
    length: int
    location: str
    shm_name: str | None = None
    shm_offset: int = 0
    info: dict[str, dict[str, Any]] = {}


class SegmentDescriptor(msgspec.Struct, forbid_unknown_fields=False):
    """An engine's whole segment: identity, transports offered, and buffers."""

    name: str
    engine_id: str
    rpc_host: str
    rpc_port: int
    transports: dict[str, dict[str, Any]]
    buffers: list[BufferDesc] = []
    protocol_version: int = 1


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SegmentDescriptor)


def encode_descriptor(desc: SegmentDescriptor) -> bytes:
    return _encoder.encode(desc)


def decode_descriptor(data: bytes, *, expected_name: str | None = None) -> SegmentDescriptor:
    """Decode and validate; raises :class:`DescriptorError` saying what is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DescriptorError(f"descriptor must be bytes, got {type(data).__name__}")
    if len(data) > MAX_DESCRIPTOR_SIZE:
        raise DescriptorError(
            f"descriptor is {len(data)} bytes, the limit is {MAX_DESCRIPTOR_SIZE}")
    try:
        desc = _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as e:  # RecursionError: too deep
        raise DescriptorError(f"malformed segment descriptor: {e}") from None
    _validate(desc, expected_name)
    return desc


def _validate(desc: SegmentDescriptor, expected_name: str | None) -> None:
    if not desc.name or len(desc.name) > _NAME_MAX:
        raise DescriptorError("descriptor has an empty or oversized name")
    if expected_name is not None and desc.name != expected_name:
        raise DescriptorError(f"asked for segment {expected_name!r}, got {desc.name!r}")
    if not 0 < desc.rpc_port < 65536 or not desc.rpc_host or len(desc.rpc_host) > 255:
        raise DescriptorError(f"descriptor of {desc.name!r} has a bad rpc address")
    if len(desc.buffers) > MAX_BUFFERS:
        raise DescriptorError(f"descriptor of {desc.name!r} lists {len(desc.buffers)} buffers")
    end = 0
    for b in sorted(desc.buffers, key=lambda b: b.address):
        if not (0 < b.address and 0 < b.length and b.address + b.length - 1 <= MAX_ADDRESS):
            raise DescriptorError(f"buffer 0x{b.address:x}+{b.length} is not a valid range")
        if b.address < end:
            raise DescriptorError(f"buffers of {desc.name!r} overlap at 0x{b.address:x}")
        end = b.address + b.length
        if not _LOCATION_RE.match(b.location):
            raise DescriptorError(
                f"buffer location {b.location[:80]!r} is not cpu:N, cuda:N or file:/path")
        if b.shm_name is not None:
            check_shm_name(b.shm_name)
            if b.shm_offset < 0:
                raise DescriptorError("negative shm_offset")
    tcp = desc.transports.get("tcp")
    if tcp is not None and not (isinstance(tcp.get("host"), str)
                                and isinstance(tcp.get("port"), int) and 0 < tcp["port"] < 65536):
        raise DescriptorError(f"descriptor of {desc.name!r} has a bad tcp entry")


class PeerSegment:
    """A validated peer descriptor with an address index for range checks."""

    __slots__ = ("_buffers", "_starts", "desc", "entries")

    def __init__(self, desc: SegmentDescriptor) -> None:
        self.desc = desc
        self._buffers = sorted(desc.buffers, key=lambda b: b.address)
        self._starts = [b.address for b in self._buffers]
        self.entries = [msgspec.to_builtins(b) for b in self._buffers]

    @property
    def name(self) -> str:
        return self.desc.name

    def find(self, address: int, length: int) -> BufferDesc:
        """The peer buffer holding ``[address, address + length)`` or :class:`AddressError`."""
        if length <= 0:
            raise AddressError(f"length must be positive, got {length}")
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0 or address >= self._buffers[i].address + self._buffers[i].length:
            raise AddressError(
                f"address 0x{address:x} is not in any buffer registered by segment {self.name!r}")
        b = self._buffers[i]
        if address + length > b.address + b.length:
            raise AddressError(
                f"range 0x{address:x}+{length} runs past the end of {self.name!r}'s buffer "
                f"0x{b.address:x}+{b.length}")
        return b

    def first_address(self) -> int:
        return self._starts[0] if self._starts else 0
