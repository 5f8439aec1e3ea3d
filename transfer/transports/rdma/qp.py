"""Pure builders for RC queue-pair state transitions (RESET->INIT->RTR->RTS).

Why pure: the attribute values and masks are where RC connections go wrong (a wrong MTU, GID
index or missing mask bit gives silent timeouts, not errors), and none of it needs hardware.
The builders return :class:`QpTransition` (a state, the attribute values and the names of the
``ibv_qp_attr_mask`` bits); :mod:`.verbs` turns that into a ``pyverbs.qp.QPAttr`` and a
``modify()`` call, so the values tested here are exactly the values the NIC receives.
"""
from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "MTU_BYTES",
    "PSN_MASK",
    "GidEntry",
    "QpTransition",
    "RemoteQp",
    "choose_gid_index",
    "choose_mtu",
    "init_transition",
    "mtu_from_enum",
    "mtu_to_enum",
    "new_psn",
    "rtr_transition",
    "rts_transition",
]

# ibv_mtu: IBV_MTU_256 = 1 ... IBV_MTU_4096 = 5
MTU_BYTES: Mapping[int, int] = MappingProxyType({1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096})
_MTU_ENUM = {v: k for k, v in MTU_BYTES.items()}
PSN_MASK = (1 << 24) - 1  # PSNs and QP numbers are 24-bit on the wire

# Defaults follow Mooncake's rdma_context / rdma_endpoint settings.
DEFAULT_TIMEOUT = 14        # 4.096 us * 2^14 ~= 67 ms per transport retry
DEFAULT_RETRY_CNT = 7
DEFAULT_RNR_RETRY = 7       # 7 = infinite; one-sided ops never see RNR, so it cannot loop
DEFAULT_MIN_RNR_TIMER = 12
DEFAULT_RD_ATOMIC = 16      # outstanding RDMA READs; clamped to the device limit by verbs
DEFAULT_HOP_LIMIT = 64

ACCESS_FLAGS = ("IBV_ACCESS_LOCAL_WRITE", "IBV_ACCESS_REMOTE_READ", "IBV_ACCESS_REMOTE_WRITE")


def mtu_to_enum(nbytes: int) -> int:
    """``ibv_mtu`` value of an MTU given in bytes (ValueError for non-IB sizes)."""
    try:
        return _MTU_ENUM[nbytes]
    except KeyError:
        raise ValueError(f"invalid RDMA MTU {nbytes}; expected one of "
                         f"{sorted(_MTU_ENUM)}") from None


def mtu_from_enum(value: int) -> int:
    """MTU in bytes of an ``ibv_mtu`` value."""
    try:
        return MTU_BYTES[int(value)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"invalid ibv_mtu value {value!r}") from None


def choose_mtu(local: int, remote: int, cap: int | None = None) -> int:
    """Path MTU in bytes: the smallest of both ports' active MTUs and an optional cap
    (``MC_MTU`` in Mooncake). A QP set above the path MTU drops every packet, silently."""
    candidates = [local, remote] + ([cap] if cap is not None else [])
    for value in candidates:
        mtu_to_enum(value)
    return min(candidates)


def new_psn(rng: random.Random | None = None) -> int:
    """A random 24-bit initial packet sequence number. Random (not 0) so that a stale packet
    from a previous connection with the same QP number is rejected by the responder."""
    return (rng or random.SystemRandom()).getrandbits(24)


@dataclass(frozen=True, slots=True)
class GidEntry:
    """One row of a port's GID table, as read by :mod:`.verbs` (or from sysfs)."""

    index: int
    gid: str            # 8 groups of 4 hex digits, pyverbs' ``GID.gid`` format
    gid_type: str       # "IB", "RoCE v1" or "RoCE v2"


def _gid_address(gid: str) -> ipaddress.IPv6Address | None:
    try:
        return ipaddress.IPv6Address(gid)
    except ValueError:
        return None


def choose_gid_index(entries: Iterable[GidEntry], link_layer: str,
                     configured: int | None = None) -> int:
    """The GID index a QP should source from.

    InfiniBand: index 0 (the port GID; routing uses the LID). RoCE: prefer RoCE v2 with an
    IPv4-mapped address (routable, what Mooncake's auto-detection picks), then other RoCE v2
    global addresses, then RoCE v1. Zero and unparsable GIDs are never picked. A configured
    index (``MC_GID_INDEX``) wins when it names a valid entry; otherwise ValueError.
    """
    table = {e.index: e for e in entries}
    usable = {i: e for i, e in table.items()
              if (addr := _gid_address(e.gid)) is not None and int(addr) != 0}
    if configured is not None:
        if configured not in usable:
            raise ValueError(f"configured GID index {configured} is not a valid GID on this "
                             f"port (valid: {sorted(usable)})")
        return configured
    if not usable:
        raise ValueError("port has no usable GID")
    if link_layer.lower() != "ethernet":
        return 0 if 0 in usable else min(usable)

    def rank(entry: GidEntry) -> tuple[int, int]:
        addr = _gid_address(entry.gid)
        assert addr is not None
        v2 = entry.gid_type.replace(" ", "").lower() == "rocev2"
        if v2 and addr.ipv4_mapped is not None:
            return (0, entry.index)
        if v2 and not addr.is_link_local:
            return (1, entry.index)
        if v2:
            return (2, entry.index)
        return (3, entry.index)

    return min(usable.values(), key=rank).index


@dataclass(frozen=True, slots=True)
class RemoteQp:
    """What the other end of an RC connection told us in the handshake."""

    qp_num: int
    psn: int
    lid: int
    gid: str
    mtu: int


@dataclass(frozen=True, slots=True)
class QpTransition:
    """One ``ibv_modify_qp`` call: target state, attribute values and mask bit names
    (``IBV_QP_*``); ``ah`` holds the address-vector fields for INIT->RTR."""

    state: str
    attrs: Mapping[str, Any]
    mask: frozenset[str]
    ah: Mapping[str, Any] | None = None


def init_transition(port_num: int, pkey_index: int = 0) -> QpTransition:
    """RESET->INIT: bind to the port and allow the peer one-sided READ and WRITE."""
    return QpTransition(
        state="IBV_QPS_INIT",
        attrs={"pkey_index": pkey_index, "port_num": port_num, "qp_access_flags": ACCESS_FLAGS},
        mask=frozenset({"IBV_QP_STATE", "IBV_QP_PKEY_INDEX", "IBV_QP_PORT",
                        "IBV_QP_ACCESS_FLAGS"}),
    )


def rtr_transition(remote: RemoteQp, *, port_num: int, sgid_index: int, local_mtu: int,
                   link_layer: str, max_dest_rd_atomic: int = DEFAULT_RD_ATOMIC,
                   mtu_cap: int | None = None, service_level: int = 0,
                   traffic_class: int = 0) -> QpTransition:
    """INIT->RTR: point the QP at the remote QP (number, PSN, address).

    RoCE has no LIDs, so the address vector is always global (GRH with the remote GID);
    InfiniBand uses the LID and adds a GRH only when the peer is on another subnet, which we
    cannot know, so we add it whenever the remote GID is non-zero (harmless within a subnet).
    """
    if not 1 <= remote.qp_num <= PSN_MASK:
        raise ValueError(f"remote qp_num {remote.qp_num} out of range")
    if not 0 <= remote.psn <= PSN_MASK:
        raise ValueError(f"remote psn {remote.psn} out of range")
    gid = _gid_address(remote.gid)
    if gid is None:
        raise ValueError(f"remote GID {remote.gid!r} is not a GID")
    ethernet = link_layer.lower() == "ethernet"
    if ethernet and int(gid) == 0:
        raise ValueError("RoCE peer advertised a zero GID")
    if not ethernet and remote.lid == 0 and int(gid) == 0:
        raise ValueError("InfiniBand peer advertised neither a LID nor a GID")
    is_global = ethernet or int(gid) != 0
    ah: dict[str, Any] = {
        "dlid": 0 if ethernet else remote.lid,
        "sl": service_level,
        "port_num": port_num,
        "is_global": 1 if is_global else 0,
    }
    if is_global:
        ah.update(dgid=remote.gid, sgid_index=sgid_index, hop_limit=DEFAULT_HOP_LIMIT,
                  traffic_class=traffic_class, flow_label=0)
    mtu = choose_mtu(local_mtu, remote.mtu, mtu_cap)
    return QpTransition(
        state="IBV_QPS_RTR",
        attrs={"path_mtu": mtu_to_enum(mtu), "dest_qp_num": remote.qp_num,
               "rq_psn": remote.psn, "max_dest_rd_atomic": max_dest_rd_atomic,
               "min_rnr_timer": DEFAULT_MIN_RNR_TIMER},
        mask=frozenset({"IBV_QP_STATE", "IBV_QP_AV", "IBV_QP_PATH_MTU", "IBV_QP_DEST_QPN",
                        "IBV_QP_RQ_PSN", "IBV_QP_MAX_DEST_RD_ATOMIC", "IBV_QP_MIN_RNR_TIMER"}),
        ah=ah,
    )


def rts_transition(local_psn: int, *, max_rd_atomic: int = DEFAULT_RD_ATOMIC,
                   timeout: int = DEFAULT_TIMEOUT, retry_cnt: int = DEFAULT_RETRY_CNT,
                   rnr_retry: int = DEFAULT_RNR_RETRY) -> QpTransition:
    """RTR->RTS: our own send PSN (the one we advertised) and the retry policy."""
    if not 0 <= local_psn <= PSN_MASK:
        raise ValueError(f"local psn {local_psn} out of range")
    if not 0 <= timeout <= 31 or not 0 <= retry_cnt <= 7 or not 0 <= rnr_retry <= 7:
        raise ValueError("timeout must be 0..31, retry_cnt and rnr_retry 0..7")
    return QpTransition(
        state="IBV_QPS_RTS",
        attrs={"sq_psn": local_psn, "timeout": timeout, "retry_cnt": retry_cnt,
               "rnr_retry": rnr_retry, "max_rd_atomic": max_rd_atomic},
        mask=frozenset({"IBV_QP_STATE", "IBV_QP_SQ_PSN", "IBV_QP_TIMEOUT",
                        "IBV_QP_RETRY_CNT", "IBV_QP_RNR_RETRY", "IBV_QP_MAX_QP_RD_ATOMIC"}),
    )
