"""A thin wrapper over pyverbs: open a NIC, register memory, build RC QPs, post and poll.

Why a wrapper: the transport is written against the small :class:`NicDevice` /
:class:`QueuePair` protocols below, not against pyverbs, so (a) importing ``transfer`` never
imports pyverbs (it is loaded on first :func:`open_nic`), and (b) the transport's logic
(handshake, striping, completion routing, error handling) runs unchanged over
:mod:`.loopback`, a software NIC, on machines without RDMA hardware.

pyverbs comes from rdma-core: ``pip install pyverbs`` needs rdma-core >= 59; on Debian 12 use the
distribution's ``python3-pyverbs`` (rdma-core 44), whose API this module sticks to.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

from transfer.transports.base import Opcode, TransportError
from transfer.transports.rdma.handshake import NicInfo
from transfer.transports.rdma.qp import (
    GidEntry,
    QpTransition,
    choose_gid_index,
    init_transition,
    mtu_from_enum,
)

__all__ = [
    "Completion",
    "MemoryKeys",
    "NicDevice",
    "PyverbsNic",
    "QueuePair",
    "RdmaUnavailable",
    "load_pyverbs",
    "open_nic",
    "peer_memory_available",
]

logger = logging.getLogger(__name__)

MAX_CQE = 4096
MAX_GID_SCAN = 256
PEER_MEMORY_MODULES = ("nvidia_peermem", "nv_peer_mem")


class RdmaUnavailable(TransportError):
    """pyverbs or the NIC is missing; retrying on another path cannot help."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@dataclass(frozen=True, slots=True)
class Completion:
    """One work completion, reduced to what the transport needs."""

    wr_id: int
    status: int
    status_name: str
    vendor_err: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 0  # IBV_WC_SUCCESS


@dataclass(frozen=True, slots=True)
class MemoryKeys:
    lkey: int
    rkey: int


class QueuePair(Protocol):
    """An RC QP in INIT state until :meth:`connect` moves it to RTS."""

    qp_num: int

    def connect(self, rtr: QpTransition, rts: QpTransition) -> None: ...

    def post(self, wr_id: int, opcode: Opcode, local_addr: int, length: int, lkey: int,
             remote_addr: int, rkey: int) -> None: ...

    def close(self) -> None: ...


class NicDevice(Protocol):
    """One opened NIC port with its PD and CQ."""

    name: str
    info: NicInfo
    max_send_wr: int
    max_rd_atomic: int

    def register(self, address: int, length: int) -> tuple[MemoryKeys, Any]: ...

    def deregister(self, handle: Any) -> None: ...

    def create_qp(self, depth: int) -> QueuePair: ...

    def poll(self, max_entries: int) -> list[Completion]: ...

    def close(self) -> None: ...


def peer_memory_available(root: str | os.PathLike[str] = "/") -> bool:
    """Whether a GPU peer-memory kernel module is loaded, i.e. whether ``ibv_reg_mr`` accepts
    CUDA device pointers (GPUDirect RDMA). Without it registration of a device address fails
    with EFAULT, so the transport stages through host memory instead."""
    base = Path(root) / "sys/module"
    return any((base / name).is_dir() for name in PEER_MEMORY_MODULES)


def load_pyverbs() -> SimpleNamespace:
    """Import pyverbs on first use, with an actionable error when it is absent."""
    try:
        import pyverbs.addr as addr  # noqa: PLC0415 - lazy by design
        import pyverbs.cq as cq  # noqa: PLC0415
        import pyverbs.device as device  # noqa: PLC0415
        import pyverbs.enums as enums  # noqa: PLC0415
        import pyverbs.mr as mr  # noqa: PLC0415
        import pyverbs.pd as pd  # noqa: PLC0415
        import pyverbs.qp as qp  # noqa: PLC0415
        import pyverbs.wr as wr  # noqa: PLC0415
    except ImportError as exc:
        raise RdmaUnavailable(
            f"the rdma transport needs pyverbs ({exc}); install rdma-core's Python bindings: "
            "`pip install pyverbs` (needs rdma-core >= 59) or, on Debian/Ubuntu, "
            "`apt-get install python3-pyverbs` and a venv with --system-site-packages"
        ) from exc
    return SimpleNamespace(addr=addr, cq=cq, device=device, e=enums, mr=mr, pd=pd, qp=qp, wr=wr)


def _flags(v: SimpleNamespace, names: Any) -> int:
    return reduce(lambda acc, name: acc | int(getattr(v.e, name)), names, 0)


class PyverbsQueuePair:
    """An RC QP over pyverbs; every state change goes through a :class:`QpTransition`."""

    def __init__(self, v: SimpleNamespace, nic: PyverbsNic, depth: int) -> None:
        self._v = v
        cap = v.qp.QPCap(max_send_wr=depth, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        init_attr = v.qp.QPInitAttr(qp_type=v.e.IBV_QPT_RC, scq=nic.cq, rcq=nic.cq, cap=cap,
                                    sq_sig_all=0)
        self._qp = v.qp.QP(nic.pd, init_attr)
        self.qp_num: int = int(self._qp.qp_num)
        self._apply(init_transition(nic.info.port))

    def _apply(self, transition: QpTransition) -> None:
        v = self._v
        attr = v.qp.QPAttr(qp_state=getattr(v.e, transition.state))
        for key, value in transition.attrs.items():
            if key == "qp_access_flags":
                value = _flags(v, value)
            setattr(attr, key, value)
        if transition.ah is not None:
            ah = dict(transition.ah)
            if ah.get("is_global"):
                gr = v.addr.GlobalRoute(dgid=v.addr.GID(ah["dgid"]), sgid_index=ah["sgid_index"],
                                        hop_limit=ah["hop_limit"],
                                        traffic_class=ah["traffic_class"],
                                        flow_label=ah["flow_label"])
                attr.ah_attr = v.addr.AHAttr(gr=gr, is_global=1, port_num=ah["port_num"],
                                             dlid=ah["dlid"], sl=ah["sl"])
            else:
                attr.ah_attr = v.addr.AHAttr(is_global=0, port_num=ah["port_num"],
                                             dlid=ah["dlid"], sl=ah["sl"])
        try:
            self._qp.modify(attr, _flags(v, transition.mask))
        except v.device.PyverbsError as exc:
            raise TransportError(f"QP {self.qp_num}: modify to {transition.state} failed: "
                                 f"{exc}") from exc

    def connect(self, rtr: QpTransition, rts: QpTransition) -> None:
        self._apply(rtr)
        self._apply(rts)

    def post(self, wr_id: int, opcode: Opcode, local_addr: int, length: int, lkey: int,
             remote_addr: int, rkey: int) -> None:
        v = self._v
        sge = v.wr.SGE(local_addr, length, lkey)
        op = v.e.IBV_WR_RDMA_WRITE if opcode is Opcode.WRITE else v.e.IBV_WR_RDMA_READ
        wr = v.wr.SendWR(wr_id=wr_id, opcode=op, num_sge=1, sg=[sge],
                         send_flags=v.e.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(rkey, remote_addr)
        try:
            self._qp.post_send(wr, None)
        except v.device.PyverbsError as exc:
            raise TransportError(f"QP {self.qp_num}: post_send failed: {exc}") from exc

    def close(self) -> None:
        # Destroying the QP stops any DMA still queued on it: after a timeout or an error we
        # must be sure no late READ lands in memory the caller has been told is free.
        self._qp.close()


class PyverbsNic:
    """One NIC port opened through pyverbs, with a PD and a shared send CQ."""

    def __init__(self, name: str, *, port: int | None = None, gid_index: int | None = None,
                 cq_depth: int = MAX_CQE) -> None:
        v = self._v = load_pyverbs()
        self.name = name
        try:
            self.context = v.device.Context(name=name)
        except v.device.PyverbsError as exc:
            raise RdmaUnavailable(f"cannot open RDMA device {name}: {exc}") from exc
        try:
            dev_attr = self.context.query_device()
            self.max_send_wr = max(1, min(int(dev_attr.max_qp_wr), 1024))
            self.max_rd_atomic = max(1, min(int(dev_attr.max_qp_rd_atom),
                                             int(dev_attr.max_qp_init_rd_atom), 16))
            port_num, port_attr = self._active_port(int(dev_attr.phys_port_cnt), port)
            ethernet = int(port_attr.link_layer) == int(v.e.IBV_LINK_LAYER_ETHERNET)
            link_layer = "Ethernet" if ethernet else "InfiniBand"
            entries = self._gid_table(port_num, int(port_attr.gid_tbl_len))
            index = choose_gid_index(entries, link_layer, gid_index)
            gid = next(entry.gid for entry in entries if entry.index == index)
            self.info = NicInfo(name=name, port=port_num, lid=int(port_attr.lid), gid=gid,
                                gid_index=index, mtu=mtu_from_enum(port_attr.active_mtu),
                                link_layer=link_layer)
            self.pd = v.pd.PD(self.context)
            self.cq = v.cq.CQ(self.context, max(16, min(cq_depth, int(dev_attr.max_cqe))))
        except (v.device.PyverbsError, ValueError) as exc:
            self.context.close()
            raise RdmaUnavailable(f"RDMA device {name} is not usable: {exc}") from exc
        logger.info("RDMA %s port %d: %s, lid %d, gid[%d] %s, mtu %d", name, port_num,
                    link_layer, self.info.lid, index, gid, self.info.mtu)

    def _active_port(self, count: int, wanted: int | None) -> tuple[int, Any]:
        v = self._v
        ports = [wanted] if wanted is not None else list(range(1, count + 1))
        for num in ports:
            attr = self.context.query_port(num)
            if int(attr.state) == int(v.e.IBV_PORT_ACTIVE):
                return num, attr
        raise ValueError(f"no active port among {ports}")

    def _gid_table(self, port: int, length: int) -> list[GidEntry]:
        v = self._v
        types = {int(v.e.IBV_GID_TYPE_IB): "IB", int(v.e.IBV_GID_TYPE_ROCE_V1): "RoCE v1",
                 int(v.e.IBV_GID_TYPE_ROCE_V2): "RoCE v2"}
        entries: list[GidEntry] = []
        for index in range(min(length, MAX_GID_SCAN)):
            try:
                entry = self.context.query_gid_ex(port, index)
            except v.device.PyverbsError:
                continue  # unpopulated slot
            gid = str(self.context.query_gid(port, index).gid)
            entries.append(GidEntry(index, gid, types.get(int(entry.gid_type), "IB")))
        return entries

    def register(self, address: int, length: int) -> tuple[MemoryKeys, Any]:
        v = self._v
        access = _flags(v, ("IBV_ACCESS_LOCAL_WRITE", "IBV_ACCESS_REMOTE_READ",
                            "IBV_ACCESS_REMOTE_WRITE"))
        try:
            mr = v.mr.MR(self.pd, length, access, address=address)
        except v.device.PyverbsError as exc:
            raise TransportError(f"{self.name}: ibv_reg_mr({address:#x}, {length}) failed: {exc}",
                                 retryable=False) from exc
        return MemoryKeys(int(mr.lkey), int(mr.rkey)), mr

    def deregister(self, handle: Any) -> None:
        handle.close()

    def create_qp(self, depth: int) -> PyverbsQueuePair:
        return PyverbsQueuePair(self._v, self, max(1, min(depth, self.max_send_wr)))

    def poll(self, max_entries: int) -> list[Completion]:
        v = self._v
        npolled, wcs = self.cq.poll(max_entries)
        out: list[Completion] = []
        for wc in wcs[:npolled]:
            status = int(wc.status)
            try:
                name = v.e.ibv_wc_status(status).name
            except ValueError:
                name = f"IBV_WC_STATUS_{status}"
            out.append(Completion(int(wc.wr_id), status, name, int(wc.vendor_err)))
        return out

    def close(self) -> None:
        # Context.close() closes its PD, MRs, CQ and QPs (pyverbs tracks the object tree).
        self.context.close()


def open_nic(name: str, *, port: int | None = None, gid_index: int | None = None) -> PyverbsNic:
    """Open ``name`` (e.g. ``mlx5_0``) through pyverbs on its first active port."""
    return PyverbsNic(name, port=port, gid_index=gid_index)
