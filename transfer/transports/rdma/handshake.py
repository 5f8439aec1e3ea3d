"""Wire format of the RDMA connection exchange: per-NIC info in the descriptor and the
per-peer QP handshake.

Why a separate, pure module: these dicts arrive from the network (through the engine's RPC and
the metadata store), so every field is type-, range- and size-checked here before any of it
reaches a verbs call; a malformed message raises :class:`HandshakeError` (a ValueError) with
a message naming the field, never a crash deeper down.

Descriptor entry (``RdmaTransport.start()``)::

    {"nics": [{"name": "mlx5_0", "port": 1, "lid": 0, "gid": "fe80:...", "gid_index": 3,
               "mtu": 4096, "link_layer": "Ethernet"}, ...],
     "topology": {"cpu:0": [["mlx5_0"], ["mlx5_1"]], "cuda:0": [...], ...}}

Handshake request (initiator -> responder) and reply (responder -> initiator)::

    {"version": 1, "peer": "<sender's segment name>",
     "qps": [{"local_nic": "<sender's NIC>", "remote_nic": "<receiver's NIC>",
              "qp_num": 1234, "psn": 5678, "lid": 0, "gid": "fe80:...", "mtu": 4096}, ...]}
"""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transfer.transports.rdma.qp import MTU_BYTES, PSN_MASK

__all__ = [
    "HANDSHAKE_VERSION",
    "MAX_NICS",
    "MAX_QPS",
    "Handshake",
    "HandshakeError",
    "NicInfo",
    "QpInfo",
    "parse_handshake",
    "parse_nic_info",
    "parse_peer_entry",
]

HANDSHAKE_VERSION = 1
MAX_NICS = 64          # per host; real machines have <= 16
MAX_QPS = MAX_NICS * MAX_NICS
MAX_NAME = 255
LINK_LAYERS = ("InfiniBand", "Ethernet")


class HandshakeError(ValueError):
    """A descriptor entry or handshake message is malformed."""


@dataclass(frozen=True, slots=True)
class NicInfo:
    """How a peer reaches one of our NICs."""

    name: str
    port: int
    lid: int
    gid: str
    gid_index: int
    mtu: int
    link_layer: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "lid": self.lid, "gid": self.gid,
                "gid_index": self.gid_index, "mtu": self.mtu, "link_layer": self.link_layer}


@dataclass(frozen=True, slots=True)
class QpInfo:
    """One end of one RC connection: the sender's QP on ``local_nic`` wants to talk to the
    receiver's ``remote_nic``."""

    local_nic: str
    remote_nic: str
    qp_num: int
    psn: int
    lid: int
    gid: str
    mtu: int

    def to_dict(self) -> dict[str, Any]:
        return {"local_nic": self.local_nic, "remote_nic": self.remote_nic,
                "qp_num": self.qp_num, "psn": self.psn, "lid": self.lid, "gid": self.gid,
                "mtu": self.mtu}


@dataclass(frozen=True, slots=True)
class Handshake:
    """A parsed request or reply."""

    peer: str
    qps: tuple[QpInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"version": HANDSHAKE_VERSION, "peer": self.peer,
                "qps": [qp.to_dict() for qp in self.qps]}


def _field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise HandshakeError(f"{where}: missing field {key!r}")
    return obj[key]


def _int(obj: Mapping[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    value = _field(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise HandshakeError(f"{where}: {key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _name(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = _field(obj, key, where)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not value.isprintable():
        raise HandshakeError(f"{where}: {key} must be a non-empty printable string of at most "
                             f"{MAX_NAME} characters")
    return value


def _gid(obj: Mapping[str, Any], where: str) -> str:
    value = _field(obj, "gid", where)
    if not isinstance(value, str) or len(value) > 64:
        raise HandshakeError(f"{where}: gid must be a string")
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        raise HandshakeError(f"{where}: gid {value!r} is not a GID") from None
    return value


def _mtu(obj: Mapping[str, Any], where: str) -> int:
    value = _field(obj, "mtu", where)
    if isinstance(value, bool) or value not in MTU_BYTES.values():
        raise HandshakeError(f"{where}: mtu must be one of {sorted(MTU_BYTES.values())}, "
                             f"got {value!r}")
    return int(value)


def _mapping(obj: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise HandshakeError(f"{where}: expected an object, got {type(obj).__name__}")
    return obj


def _list(obj: Any, limit: int, where: str) -> Sequence[Any]:
    if not isinstance(obj, (list, tuple)):
        raise HandshakeError(f"{where}: expected a list, got {type(obj).__name__}")
    if len(obj) > limit:
        raise HandshakeError(f"{where}: {len(obj)} entries, at most {limit} allowed")
    return obj


def parse_nic_info(obj: Any, where: str = "nic") -> NicInfo:
    """Validate one descriptor NIC entry."""
    entry = _mapping(obj, where)
    link_layer = _field(entry, "link_layer", where)
    if link_layer not in LINK_LAYERS:
        raise HandshakeError(f"{where}: link_layer must be one of {LINK_LAYERS}")
    return NicInfo(
        name=_name(entry, "name", where),
        port=_int(entry, "port", 1, 255, where),
        lid=_int(entry, "lid", 0, 0xFFFF, where),
        gid=_gid(entry, where),
        gid_index=_int(entry, "gid_index", 0, 0xFFFF, where),
        mtu=_mtu(entry, where),
        link_layer=link_layer,
    )


def parse_peer_entry(obj: Any) -> tuple[dict[str, NicInfo], dict[str, list[list[str]]]]:
    """Validate a peer's rdma descriptor entry: its NICs by name and, per location, its NIC
    preference tiers (from the topology matrix; names it does not list as NICs are dropped)."""
    entry = _mapping(obj, "rdma entry")
    nics: dict[str, NicInfo] = {}
    for i, raw in enumerate(_list(_field(entry, "nics", "rdma entry"), MAX_NICS, "nics")):
        nic = parse_nic_info(raw, f"nics[{i}]")
        if nic.name in nics:
            raise HandshakeError(f"nics[{i}]: duplicate NIC {nic.name!r}")
        nics[nic.name] = nic
    order: dict[str, list[list[str]]] = {}
    topology = _mapping(entry.get("topology", {}), "topology")
    if len(topology) > 4 * MAX_NICS:
        raise HandshakeError("topology: too many locations")
    for location, tiers in topology.items():
        if not isinstance(location, str) or len(location) > MAX_NAME:
            raise HandshakeError("topology: location keys must be short strings")
        seen: set[str] = set()
        kept: list[list[str]] = []
        for tier in _list(tiers, 8, f"topology[{location!r}]"):
            names = [name for name in _list(tier, MAX_NICS, f"topology[{location!r}]")
                     if isinstance(name, str) and name in nics and name not in seen]
            seen.update(names)
            if names:
                kept.append(names)
        order[location] = kept
    return nics, order


def parse_handshake(obj: Any) -> Handshake:
    """Validate a handshake request or reply (same shape both ways)."""
    msg = _mapping(obj, "handshake")
    version = _field(msg, "version", "handshake")
    if version != HANDSHAKE_VERSION:
        raise HandshakeError(f"handshake: unsupported version {version!r} "
                             f"(this side speaks {HANDSHAKE_VERSION})")
    peer = _name(msg, "peer", "handshake")
    qps: list[QpInfo] = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(_list(_field(msg, "qps", "handshake"), MAX_QPS, "qps")):
        where = f"qps[{i}]"
        entry = _mapping(raw, where)
        info = QpInfo(
            local_nic=_name(entry, "local_nic", where),
            remote_nic=_name(entry, "remote_nic", where),
            qp_num=_int(entry, "qp_num", 1, PSN_MASK, where),
            psn=_int(entry, "psn", 0, PSN_MASK, where),
            lid=_int(entry, "lid", 0, 0xFFFF, where),
            gid=_gid(entry, where),
            mtu=_mtu(entry, where),
        )
        pair = (info.local_nic, info.remote_nic)
        if pair in seen:
            raise HandshakeError(f"{where}: duplicate NIC pair {pair}")
        seen.add(pair)
        qps.append(info)
    return Handshake(peer=peer, qps=tuple(qps))
