"""A software RDMA fabric inside one process: NICs that execute one-sided READ/WRITE by memcpy.

Why: there is no RDMA hardware (nor rxe) on the machines that run our CI, yet the transport's
own logic — descriptor entries, the QP handshake, QP state transitions, NIC striping, rkey/lkey
checks, completion routing, error statuses, retries on another path — deserves real tests.
:class:`LoopbackNic` implements the same :class:`~.verbs.NicDevice` protocol as the pyverbs
NIC and enforces what a NIC enforces: RC QPs must be moved INIT->RTR->RTS with a destination
that exists, every access is checked against a registered MR (a wild access completes with
``IBV_WC_LOC_PROT_ERR`` / ``IBV_WC_REM_ACCESS_ERR`` and moves the QP to the error state, after
which posts are flushed), and completions go through a CQ that is polled from another thread.
"""
from __future__ import annotations

import collections
import ctypes
import itertools
import threading
from typing import Any

from transfer.transports.base import Opcode, TransportError
from transfer.transports.rdma.handshake import NicInfo
from transfer.transports.rdma.qp import QpTransition
from transfer.transports.rdma.verbs import Completion, MemoryKeys

__all__ = ["LoopbackFabric", "LoopbackNic"]

WC_SUCCESS, WC_LOC_PROT_ERR, WC_WR_FLUSH_ERR, WC_REM_ACCESS_ERR = 0, 4, 5, 10
_STATUS_NAMES = {0: "IBV_WC_SUCCESS", 4: "IBV_WC_LOC_PROT_ERR", 5: "IBV_WC_WR_FLUSH_ERR",
                 10: "IBV_WC_REM_ACCESS_ERR", 12: "IBV_WC_RETRY_EXC_ERR"}


class LoopbackFabric:
    """The "switch": finds a NIC by GID. ``hold_completions`` parks completions (a stuck
    link, for timeout tests)."""

    def __init__(self) -> None:
        self._nics: dict[str, LoopbackNic] = {}
        self._gids = itertools.count(1)
        self._lock = threading.Lock()
        self.posted: collections.Counter[str] = collections.Counter()  # per NIC name

    def open(self, name: str, *, host: str = "h0", mtu: int = 4096,
             link_layer: str = "Ethernet") -> LoopbackNic:
        with self._lock:
            gid = f"0000:0000:0000:0000:0000:ffff:0a00:{next(self._gids):04x}"
            nic = LoopbackNic(self, name, gid, mtu, link_layer, host)
            self._nics[gid] = nic
            return nic

    def lookup(self, gid: str) -> LoopbackNic | None:
        with self._lock:
            return self._nics.get(gid)

    def drop(self, nic: LoopbackNic) -> None:
        with self._lock:
            self._nics.pop(nic.info.gid, None)


class LoopbackQueuePair:
    def __init__(self, nic: LoopbackNic, qp_num: int, depth: int) -> None:
        self.nic = nic
        self.qp_num = qp_num
        self.depth = depth
        self.state = "INIT"
        self.remote: tuple[str, int] | None = None  # (gid, qp_num)
        self.sq_psn: int | None = None

    def connect(self, rtr: QpTransition, rts: QpTransition) -> None:
        if self.state != "INIT" or rtr.state != "IBV_QPS_RTR" or rts.state != "IBV_QPS_RTS":
            raise TransportError(f"QP {self.qp_num}: bad transition from {self.state}")
        if rtr.ah is None or not rtr.ah.get("is_global"):
            raise TransportError("RoCE QP needs a global address vector")
        if not {"IBV_QP_AV", "IBV_QP_DEST_QPN", "IBV_QP_RQ_PSN"} <= rtr.mask:
            raise TransportError("RTR mask lacks AV/DEST_QPN/RQ_PSN")
        self.remote = (str(rtr.ah["dgid"]), int(rtr.attrs["dest_qp_num"]))
        self.sq_psn = int(rts.attrs["sq_psn"])
        self.state = "RTS"

    def _peer(self) -> LoopbackQueuePair | None:
        if self.remote is None:
            return None
        nic = self.nic.fabric.lookup(self.remote[0])
        return None if nic is None else nic.qps.get(self.remote[1])

    def post(self, wr_id: int, opcode: Opcode, local_addr: int, length: int, lkey: int,
             remote_addr: int, rkey: int) -> None:
        if self.state == "CLOSED":
            raise TransportError(f"QP {self.qp_num} is destroyed")
        if self.state == "INIT":
            raise TransportError(f"QP {self.qp_num}: post_send in state INIT")
        self.nic.fabric.posted[self.nic.name] += 1
        if self.state == "ERR":
            self.nic.complete(wr_id, WC_WR_FLUSH_ERR)
            return
        peer = self._peer()
        if peer is None or peer.state != "RTS" or peer.remote != (self.nic.info.gid, self.qp_num):
            self.state = "ERR"
            self.nic.complete(wr_id, 12)  # nobody answers: transport retries exhausted
            return
        if not self.nic.covers(lkey, local_addr, length, remote=False):
            self.state = "ERR"
            self.nic.complete(wr_id, WC_LOC_PROT_ERR)
            return
        if not peer.nic.covers(rkey, remote_addr, length, remote=True):
            self.state = "ERR"
            self.nic.complete(wr_id, WC_REM_ACCESS_ERR)
            return
        if opcode is Opcode.WRITE:
            ctypes.memmove(remote_addr, local_addr, length)
        else:
            ctypes.memmove(local_addr, remote_addr, length)
        self.nic.complete(wr_id, WC_SUCCESS)

    def close(self) -> None:
        self.state = "CLOSED"
        self.nic.qps.pop(self.qp_num, None)


class LoopbackNic:
    """A NIC of the :class:`LoopbackFabric`; see the module docstring for what it enforces."""

    def __init__(self, fabric: LoopbackFabric, name: str, gid: str, mtu: int, link_layer: str,
                 host: str) -> None:
        self.fabric = fabric
        self.name = name
        self.host = host
        self.info = NicInfo(name=name, port=1, lid=0, gid=gid, gid_index=3, mtu=mtu,
                            link_layer=link_layer)
        self.max_send_wr = 256
        self.max_rd_atomic = 16
        self.qps: dict[int, LoopbackQueuePair] = {}
        self.hold_completions = False
        self._mrs: dict[int, tuple[int, int]] = {}
        self._keys = itertools.count(0x100)
        self._qp_nums = itertools.count(0x40)
        self._cq: collections.deque[Completion] = collections.deque()
        self._held: list[Completion] = []
        self._lock = threading.Lock()
        self.closed = False

    def register(self, address: int, length: int) -> tuple[MemoryKeys, Any]:
        if self.closed:
            raise TransportError(f"{self.name} is closed", retryable=False)
        if address <= 0 or length <= 0:
            raise TransportError(f"{self.name}: cannot register [{address:#x}, +{length})",
                                 retryable=False)
        key = next(self._keys)
        self._mrs[key] = (address, length)
        return MemoryKeys(lkey=key, rkey=key), key

    def deregister(self, handle: Any) -> None:
        self._mrs.pop(handle, None)

    def covers(self, key: int, address: int, length: int, *, remote: bool) -> bool:
        region = self._mrs.get(key)
        if region is None:
            return False
        start, size = region
        return start <= address and address + length <= start + size

    def create_qp(self, depth: int) -> LoopbackQueuePair:
        qp = LoopbackQueuePair(self, next(self._qp_nums), depth)
        self.qps[qp.qp_num] = qp
        return qp

    def complete(self, wr_id: int, status: int) -> None:
        completion = Completion(wr_id, status, _STATUS_NAMES.get(status, f"IBV_WC_{status}"))
        with self._lock:
            (self._held if self.hold_completions else self._cq).append(completion)

    def release_held(self) -> None:
        with self._lock:
            self.hold_completions = False
            self._cq.extend(self._held)
            self._held.clear()

    def poll(self, max_entries: int) -> list[Completion]:
        with self._lock:
            out = []
            while self._cq and len(out) < max_entries:
                out.append(self._cq.popleft())
            return out

    def close(self) -> None:
        self.closed = True
        for qp in list(self.qps.values()):
            qp.close()
        self._mrs.clear()
        self.fabric.drop(self)
