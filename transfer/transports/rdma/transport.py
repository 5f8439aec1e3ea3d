"""RdmaTransport: one-sided RDMA READ/WRITE over RC queue pairs, striped across NICs.

How the engine wires it
-----------------------
1. ``entry = await transport.start()`` opens the NICs (all of them, or those named by
   ``device_name``) and returns ``{"nics": [...], "topology": {...}}`` for the segment
   descriptor (format in :mod:`.handshake`).
2. ``info = await transport.register(buffer)`` registers one MR per NIC and returns
   ``{"rkeys": {nic_name: rkey}}``; the engine publishes it in the buffer's descriptor entry
   either as-is or under an ``"rdma"`` key (both are read back). A ``cuda:N`` buffer is
   registered directly when GPUDirect is available (nvidia-peermem loaded); otherwise it gets
   no rkeys (peers cannot reach it by RDMA) and *local* transfers on it are staged through
   pinned host chunks from :class:`transfer.cuda.StagingPool`.
3. QP handshake. RC QPs are per (peer, local NIC, remote NIC) and are created on first use.
   The engine supplies ``handshake=async fn(peer_name, request: dict) -> dict``, which sends the
   request over its RPC to the peer, whose RPC handler returns
   ``peer_transport.accept_handshake(request)``. Inside ``execute`` the transport calls
   :meth:`RdmaTransport.handshake_request`, the hook, then
   :meth:`RdmaTransport.complete_handshake`; an engine that prefers to drive the exchange itself
   can call those three methods directly. A ``HandshakeError`` (ValueError) from
   ``accept_handshake`` means a malformed request and should become an RPC error reply.
4. ``execute(peer, entry, buffers, slices, path=p)``: slice ``k`` uses the NIC pair
   ``k``-th in the preferred tier of the buffers' locations on each side; ``path > 0`` shifts
   to other NICs, so a retry goes elsewhere. Every work request is signalled; completions come
   from a per-NIC poller thread. A bad completion raises a :class:`TransportError` carrying the
   ``IBV_WC_*`` status name, and the QP (now in the error state) is destroyed, so the next use
   of that pair re-handshakes. A timeout destroys the QPs involved too, which guarantees that no
   late DMA touches memory after the caller has been told the transfer failed.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transfer.transports.base import LocalBuffer, Opcode, Slice, Transport, TransportError
from transfer.transports.rdma.completion import CompletionPoller, WcError
from transfer.transports.rdma.handshake import (
    Handshake,
    HandshakeError,
    NicInfo,
    QpInfo,
    parse_handshake,
    parse_peer_entry,
)
from transfer.transports.rdma.qp import RemoteQp, new_psn, rtr_transition, rts_transition
from transfer.transports.rdma.topology import Topology, discover_topology, nic_tiers
from transfer.transports.rdma.verbs import (
    MemoryKeys,
    NicDevice,
    QueuePair,
    RdmaUnavailable,
    open_nic,
    peer_memory_available,
)

__all__ = ["HandshakeSender", "RdmaTransport"]

logger = logging.getLogger(__name__)

HandshakeSender = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_WR_BYTES = 1 << 30       # below every NIC's max_msg_sz (2 GiB)
MAX_PASSIVE_QPS = 16384      # a peer cannot make us allocate QPs without bound
RKEY_MAX = (1 << 32) - 1


@dataclass(eq=False)
class _Conn:
    peer: str
    local_nic: str
    remote_nic: str
    qp: QueuePair
    psn: int
    slots: asyncio.Semaphore | None = None  # created in the loop that first uses it


@dataclass
class _LocalReg:
    buffer: LocalBuffer
    keys: dict[str, MemoryKeys] = field(default_factory=dict)
    handles: dict[str, Any] = field(default_factory=dict)
    staged_device: int | None = None  # cuda device whose transfers go through host staging


@dataclass(frozen=True, slots=True)
class _RemoteBuf:
    address: int
    length: int
    location: str
    rkeys: Mapping[str, int]


def _remote_buffers(peer_buffers: Sequence[Mapping[str, Any]]) -> list[_RemoteBuf]:
    out: list[_RemoteBuf] = []
    for i, entry in enumerate(peer_buffers):
        info = entry.get("rdma") if isinstance(entry.get("rdma"), Mapping) else entry
        raw = info.get("rkeys", {}) if isinstance(info, Mapping) else {}
        address, length = entry.get("address"), entry.get("length")
        if (not isinstance(address, int) or not isinstance(length, int)
                or not isinstance(raw, Mapping)):
            raise TransportError(f"peer buffer #{i} is malformed", retryable=False)
        rkeys = {k: v for k, v in raw.items()
                 if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                 and 0 <= v <= RKEY_MAX}
        out.append(_RemoteBuf(address, length, str(entry.get("location", "")), rkeys))
    out.sort(key=lambda b: b.address)
    return out


def _find_remote(bufs: list[_RemoteBuf], starts: list[int], addr: int, n: int) -> _RemoteBuf | None:
    i = bisect.bisect_right(starts, addr) - 1
    if i >= 0 and addr + n <= bufs[i].address + bufs[i].length:
        return bufs[i]
    return None


def _pick(tiers: list[list[str]], k: int, path: int) -> str:
    """Slice ``k`` stripes over the first tier; each further path moves one NIC down the list."""
    flat = [name for tier in tiers for name in tier]
    first = k % len(tiers[0])
    return flat[(first + path) % len(flat)]


class RdmaTransport(Transport):
    """See the module docstring for the wiring; one instance per engine."""

    name: ClassVar[str] = "rdma"

    def __init__(self, local_name: str, *, device_name: str = "",
                 sysfs_root: str | os.PathLike[str] = "/",
                 handshake: HandshakeSender | None = None,
                 nic_opener: Callable[[str], NicDevice] | None = None,
                 timeout: float = 10.0, qp_depth: int = 128, mtu_cap: int | None = None,
                 gid_index: int | None = None, gpudirect: bool | None = None,
                 staging_pool: Any = None,
                 staging_copy: tuple[Callable[..., None], Callable[..., None]] | None = None
                 ) -> None:
        self.local_name = local_name
        self.handshake = handshake
        self._device_name = device_name
        self._root = sysfs_root
        self._opener = nic_opener or (lambda n: open_nic(n, gid_index=gid_index))
        self._timeout = timeout
        self._qp_depth = qp_depth
        self._mtu_cap = mtu_cap
        self._gpudirect = peer_memory_available(sysfs_root) if gpudirect is None else gpudirect
        self._staging_pool = staging_pool
        self._staging_copy = staging_copy
        self._staging_keys: dict[tuple[str, int], tuple[MemoryKeys, Any]] = {}
        self._topology = Topology((), ())
        self._nics: dict[str, NicDevice] = {}
        self._pollers: dict[str, CompletionPoller] = {}
        self._regs: dict[int, _LocalReg] = {}
        self._starts: list[int] = []
        self._conns: dict[tuple[str, str, str], _Conn] = {}
        self._pending: dict[str, dict[tuple[str, str], tuple[QueuePair, int]]] = {}
        self._passive: dict[tuple[str, str, str], _Conn] = {}
        self._peer_locks: dict[str, asyncio.Lock] = {}
        self._lock = threading.Lock()
        self._staging_logged = False

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        topology = discover_topology(self._root, self._device_name)
        if not topology.nics:
            where = f" matching device_name={self._device_name!r}" if self._device_name else ""
            raise RdmaUnavailable(f"no RDMA NIC under {self._root}/sys/class/infiniband{where}")
        for name in topology.nic_names:
            try:
                self._nics[name] = self._opener(name)
            except TransportError as exc:
                logger.warning("skipping RDMA NIC %s: %s", name, exc)
        if not self._nics:
            raise RdmaUnavailable("no RDMA NIC could be opened (see the warnings above)")
        self._topology = topology
        self._pollers = {name: CompletionPoller(nic) for name, nic in self._nics.items()}
        matrix = {loc: [[n for n in tier if n in self._nics] for tier in tiers]
                  for loc, tiers in topology.matrix().items()}
        return {"nics": [nic.info.to_dict() for nic in self._nics.values()], "topology": matrix}

    async def close(self) -> None:
        for poller in self._pollers.values():
            poller.close()
        with self._lock:
            conns = list(self._conns.values()) + list(self._passive.values())
            pending = [qp for qps in self._pending.values() for qp, _ in qps.values()]
            self._conns.clear(), self._passive.clear(), self._pending.clear()
        for qp in [c.qp for c in conns] + pending:
            _quiet_close(qp)
        for reg in self._regs.values():
            self._deregister(reg)
        self._regs.clear(), self._starts.clear()
        for (nic_name, _), (_, handle) in self._staging_keys.items():
            if nic_name in self._nics:
                _quiet(lambda n=nic_name, h=handle: self._nics[n].deregister(h))
        self._staging_keys.clear()
        for nic in self._nics.values():
            _quiet(nic.close)
        self._nics.clear()
        self._pollers.clear()

    # -- memory -------------------------------------------------------------------------

    async def register(self, buffer: LocalBuffer) -> dict[str, Any]:
        if not self._nics:
            raise TransportError("rdma transport is not started", retryable=False)
        if buffer.address in self._regs:
            raise TransportError(f"buffer at {buffer.address:#x} already registered",
                                 retryable=False)
        device = _cuda_device(buffer.location)
        reg = _LocalReg(buffer)
        if device is not None and not self._gpudirect:
            self._use_staging(reg, device, "no GPU peer-memory module (nvidia_peermem) loaded")
        else:
            try:
                for name, nic in self._nics.items():
                    reg.keys[name], reg.handles[name] = nic.register(buffer.address, buffer.length)
            except TransportError as exc:
                self._deregister(reg)
                if device is None:
                    raise
                self._use_staging(reg, device, f"registering device memory failed: {exc}")
        self._regs[buffer.address] = reg
        bisect.insort(self._starts, buffer.address)
        return {"rkeys": {name: keys.rkey for name, keys in reg.keys.items()}}

    def _use_staging(self, reg: _LocalReg, device: int, why: str) -> None:
        reg.keys.clear(), reg.handles.clear()
        reg.staged_device = device
        if not self._staging_logged:
            self._staging_logged = True
            logger.warning("GPUDirect RDMA unavailable (%s): CUDA buffers are staged through "
                           "pinned host memory and cannot be targets of peers' RDMA", why)

    async def unregister(self, buffer: LocalBuffer) -> None:
        reg = self._regs.pop(buffer.address, None)
        if reg is not None:
            self._starts.remove(buffer.address)
            self._deregister(reg)

    def _deregister(self, reg: _LocalReg) -> None:
        for name, handle in reg.handles.items():
            if name in self._nics:
                _quiet(lambda n=name, h=handle: self._nics[n].deregister(h))
        reg.handles.clear()

    def _find_local(self, addr: int, n: int) -> _LocalReg | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        reg = self._regs[self._starts[i]]
        return reg if addr + n <= reg.buffer.address + reg.buffer.length else None

    # -- reachability and NIC choice ----------------------------------------------------

    def reachable(self, peer_entry: Mapping[str, Any]) -> bool:
        try:
            nics, _ = parse_peer_entry(peer_entry)
        except HandshakeError:
            return False
        layers = {nic.info.link_layer for nic in self._nics.values()}
        return any(info.link_layer in layers for info in nics.values())

    def _local_tiers(self, location: str) -> list[list[str]]:
        tiers = [[n for n in tier if n in self._nics]
                 for tier in nic_tiers(self._topology, location)]
        tiers = [t for t in tiers if t]
        return tiers or [sorted(self._nics)]

    def _remote_tiers(self, buf: _RemoteBuf, order: Mapping[str, list[list[str]]],
                      nics: Mapping[str, NicInfo], link_layer: str) -> list[list[str]]:
        usable = {n for n in buf.rkeys if n in nics and nics[n].link_layer == link_layer}
        tiers = [[n for n in tier if n in usable] for tier in order.get(buf.location, [])]
        tiers = [t for t in tiers if t]
        listed = {n for t in tiers for n in t}
        rest = sorted(usable - listed)
        return tiers + [rest] if rest else tiers

    # -- handshake ----------------------------------------------------------------------

    def handshake_request(self, peer_name: str, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
        """Create INIT QPs for (local NIC, remote NIC) ``pairs`` and the request announcing them."""
        qps: list[QpInfo] = []
        created: dict[tuple[str, str], tuple[QueuePair, int]] = {}
        try:
            for local, remote in pairs:
                nic = self._nics[local]
                qp, psn = nic.create_qp(self._qp_depth), new_psn()
                created[(local, remote)] = (qp, psn)
                qps.append(QpInfo(local, remote, qp.qp_num, psn, nic.info.lid, nic.info.gid,
                                  nic.info.mtu))
        except BaseException:
            for qp, _ in created.values():
                _quiet_close(qp)
            raise
        with self._lock:
            for qp, _ in self._pending.pop(peer_name, {}).values():
                _quiet_close(qp)  # an abandoned earlier attempt
            self._pending[peer_name] = created
        return Handshake(self.local_name, tuple(qps)).to_dict()

    def accept_handshake(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Passive side: connect a QP to each of the initiator's and return ours (raises
        :class:`HandshakeError` on a malformed or unsatisfiable request)."""
        hs = parse_handshake(request)
        replies: list[QpInfo] = []
        made: dict[tuple[str, str, str], _Conn] = {}
        try:
            for info in hs.qps:
                nic = self._nics.get(info.remote_nic)
                if nic is None:
                    raise HandshakeError(f"no local RDMA NIC named {info.remote_nic!r}")
                qp, psn = nic.create_qp(self._qp_depth), new_psn()
                made[(hs.peer, info.remote_nic, info.local_nic)] = _Conn(
                    hs.peer, info.remote_nic, info.local_nic, qp, psn)
                self._connect(nic, qp, psn, info)
                replies.append(QpInfo(info.remote_nic, info.local_nic, qp.qp_num, psn,
                                      nic.info.lid, nic.info.gid, nic.info.mtu))
            with self._lock:
                if len(self._passive) + len(made) > MAX_PASSIVE_QPS:
                    raise HandshakeError("too many RDMA connections")
                old = [self._passive.pop(key) for key in made if key in self._passive]
                self._passive.update(made)
        except BaseException as exc:
            for conn in made.values():
                _quiet_close(conn.qp)
            if isinstance(exc, TransportError):
                raise HandshakeError(str(exc)) from exc
            raise
        for conn in old:
            _quiet_close(conn.qp)  # the initiator re-handshook: its old QP is gone anyway
        return Handshake(self.local_name, tuple(replies)).to_dict()

    def complete_handshake(self, peer_name: str, reply: Mapping[str, Any]) -> None:
        """Initiator side: connect the QPs of :meth:`handshake_request` to the responder's."""
        with self._lock:
            created = self._pending.pop(peer_name, {})
        try:
            hs = parse_handshake(reply)
            infos = {(i.remote_nic, i.local_nic): i for i in hs.qps}
            if set(infos) != set(created):
                raise HandshakeError(f"reply covers NIC pairs {sorted(infos)}, "
                                     f"asked for {sorted(created)}")
            conns = []
            for pair, (qp, psn) in created.items():
                self._connect(self._nics[pair[0]], qp, psn, infos[pair])
                conns.append(_Conn(peer_name, pair[0], pair[1], qp, psn))
        except BaseException:
            for qp, _ in created.values():
                _quiet_close(qp)
            raise
        with self._lock:
            for conn in conns:
                old = self._conns.pop((peer_name, conn.local_nic, conn.remote_nic), None)
                if old is not None:
                    _quiet_close(old.qp)
                self._conns[(peer_name, conn.local_nic, conn.remote_nic)] = conn

    def _connect(self, nic: NicDevice, qp: QueuePair, psn: int, remote: QpInfo) -> None:
        try:
            rtr = rtr_transition(RemoteQp(remote.qp_num, remote.psn, remote.lid, remote.gid,
                                          remote.mtu),
                                 port_num=nic.info.port, sgid_index=nic.info.gid_index,
                                 local_mtu=nic.info.mtu, link_layer=nic.info.link_layer,
                                 max_dest_rd_atomic=nic.max_rd_atomic, mtu_cap=self._mtu_cap)
            rts = rts_transition(psn, max_rd_atomic=nic.max_rd_atomic)
        except ValueError as exc:
            raise HandshakeError(str(exc)) from exc
        qp.connect(rtr, rts)

    async def _ensure_connected(self, peer_name: str, pairs: set[tuple[str, str]],
                                deadline: float) -> None:
        lock = self._peer_locks.setdefault(peer_name, asyncio.Lock())
        async with lock:
            with self._lock:
                missing = sorted(p for p in pairs if (peer_name, *p) not in self._conns)
            if not missing:
                return
            if self.handshake is None:
                raise TransportError("rdma: no handshake hook configured", retryable=False)
            request = self.handshake_request(peer_name, missing)
            try:
                reply = await asyncio.wait_for(self.handshake(peer_name, request),
                                               max(0.0, deadline - time.monotonic()))
                self.complete_handshake(peer_name, reply)
            except (asyncio.TimeoutError, HandshakeError, OSError) as exc:
                with self._lock:
                    for qp, _ in self._pending.pop(peer_name, {}).values():
                        _quiet_close(qp)
                raise TransportError(f"rdma handshake with {peer_name} failed: "
                                     f"{type(exc).__name__}: {exc}") from exc

    # -- data path ----------------------------------------------------------------------

    async def execute(self, peer_name: str, peer_entry: Mapping[str, Any],
                      peer_buffers: Sequence[Mapping[str, Any]], slices: Sequence[Slice],
                      *, path: int = 0) -> None:
        if not self._nics:
            raise TransportError("rdma transport is not started", retryable=False)
        deadline = time.monotonic() + self._timeout
        try:
            remote_nics, order = parse_peer_entry(peer_entry)
        except HandshakeError as exc:
            raise TransportError(f"peer {peer_name}: {exc}", retryable=False) from exc
        bufs = _remote_buffers(peer_buffers)
        starts = [b.address for b in bufs]
        plans: list[tuple[Slice, _LocalReg, int, str, str]] = []
        for k, s in enumerate(slices):
            if s.length <= 0:
                continue
            reg = self._find_local(s.local_addr, s.length)
            if reg is None:
                raise TransportError(f"local range [{s.local_addr:#x}, +{s.length}) is not "
                                     "registered with the rdma transport", retryable=False)
            rbuf = _find_remote(bufs, starts, s.remote_addr, s.length)
            if rbuf is None or not rbuf.rkeys:
                raise TransportError(f"peer {peer_name} offers no RDMA key for "
                                     f"[{s.remote_addr:#x}, +{s.length}) (unregistered, or a "
                                     "GPU buffer without GPUDirect)", retryable=False)
            local = _pick(self._local_tiers(reg.buffer.location), k, path)
            rtiers = self._remote_tiers(rbuf, order, remote_nics,
                                        self._nics[local].info.link_layer)
            if not rtiers:
                raise TransportError(f"peer {peer_name}: no NIC compatible with {local}",
                                     retryable=False)
            remote = _pick(rtiers, k, path)
            plans.append((s, reg, rbuf.rkeys[remote], local, remote))
        if not plans:
            return
        await self._ensure_connected(peer_name, {(p[3], p[4]) for p in plans}, deadline)
        await self._run(peer_name, plans, deadline)

    async def _run(self, peer: str, plans: list[tuple[Slice, _LocalReg, int, str, str]],
                   deadline: float) -> None:
        posted: list[tuple[asyncio.Future[None], _Conn, int]] = []
        tasks: list[asyncio.Task[None]] = []
        error: BaseException | None = None
        try:
            for s, reg, rkey, local, remote in plans:
                with self._lock:
                    conn = self._conns.get((peer, local, remote))
                if conn is None:
                    raise TransportError(f"rdma connection {local}->{peer}:{remote} was reset")
                if reg.staged_device is not None:
                    tasks.append(asyncio.ensure_future(
                        self._staged(conn, s, reg.staged_device, rkey, deadline)))
                    continue
                lkey = reg.keys[local].lkey
                for off in range(0, s.length, MAX_WR_BYTES):
                    n = min(MAX_WR_BYTES, s.length - off)
                    posted.append(await self._post(conn, s.opcode, s.local_addr + off, n, lkey,
                                                   s.remote_addr + off, rkey, deadline))
        except BaseException as exc:  # stop posting; still settle what is in flight
            error = exc
        futures = [f for f, _, _ in posted] + tasks
        done, pending = (await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
                         if futures else (set(), set()))
        broken: set[_Conn] = set()
        if pending:
            for future, conn, wr_id in posted:
                if not future.done():
                    broken.add(conn)
                    self._pollers[conn.local_nic].forget(wr_id)
            for conn in broken:
                self._drop(conn)  # destroys the QP: no DMA after we return
            for f in pending:
                f.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            error = error or TransportError(
                f"rdma transfer with {peer} timed out after {self._timeout} s "
                f"({len(pending)} of {len(futures)} operations incomplete)")
        first_wc: WcError | None = None
        for future, conn, _ in posted:
            if future.done() and not future.cancelled() and future.exception() is not None:
                exc = future.exception()
                broken.add(conn)
                if isinstance(exc, WcError) and (first_wc is None or
                                                 first_wc.status_name == "IBV_WC_WR_FLUSH_ERR"):
                    first_wc = exc
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                if isinstance(exc, WcError) and first_wc is None:
                    first_wc = exc
                error = error or exc
        for conn in broken:
            self._drop(conn)
        error = error or first_wc
        if error is not None:
            if isinstance(error, TransportError):
                raise error
            raise TransportError(f"rdma transfer with {peer} failed: {error!r}") from error

    async def _post(self, conn: _Conn, opcode: Opcode, local_addr: int, n: int, lkey: int,
                    remote_addr: int, rkey: int, deadline: float
                    ) -> tuple[asyncio.Future[None], _Conn, int]:
        if conn.slots is None:
            conn.slots = asyncio.Semaphore(self._qp_depth)
        try:
            await asyncio.wait_for(conn.slots.acquire(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise TransportError(f"rdma transfer with {conn.peer} timed out after "
                                 f"{self._timeout} s "
                                 "waiting for a free send-queue slot") from None
        poller = self._pollers[conn.local_nic]
        wr_id, future = poller.expect()
        future.add_done_callback(lambda _f, sem=conn.slots: sem.release())
        try:
            conn.qp.post(wr_id, opcode, local_addr, n, lkey, remote_addr, rkey)
        except BaseException:
            poller.forget(wr_id)
            future.cancel()
            raise
        return future, conn, wr_id

    async def _staged(self, conn: _Conn, s: Slice, device: int, rkey: int,
                      deadline: float) -> None:
        """A slice of local CUDA memory without GPUDirect: bounce through a pinned chunk."""
        pool = self._ensure_staging_pool()
        d2h, h2d = self._staging_copy or _cuda_copies()
        nic = self._nics[conn.local_nic]
        for off in range(0, s.length, pool.chunk_size):
            n = min(pool.chunk_size, s.length - off)
            chunk = await pool.acquire_async(max(0.0, deadline - time.monotonic()))
            try:
                key = (conn.local_nic, chunk.index)
                if key not in self._staging_keys:
                    self._staging_keys[key] = nic.register(chunk.address, chunk.nbytes)
                lkey = self._staging_keys[key][0].lkey
                if s.opcode is Opcode.WRITE:
                    await asyncio.to_thread(d2h, s.local_addr + off, chunk.address, n, device)
                future, _, _ = await self._post(conn, s.opcode, chunk.address, n, lkey,
                                                s.remote_addr + off, rkey, deadline)
                await future
                if s.opcode is Opcode.READ:
                    await asyncio.to_thread(h2d, chunk.address, s.local_addr + off, n, device)
            except asyncio.CancelledError:
                self._drop(conn)  # the chunk may still be a DMA target: kill the QP first
                raise
            finally:
                pool.release(chunk)

    def _ensure_staging_pool(self) -> Any:
        if self._staging_pool is None:
            from transfer.cuda import StagingPool  # noqa: PLC0415 - only for CUDA buffers

            self._staging_pool = StagingPool(chunk_size=4 << 20, count=16)
        return self._staging_pool

    def _drop(self, conn: _Conn) -> None:
        with self._lock:
            key = (conn.peer, conn.local_nic, conn.remote_nic)
            if self._conns.get(key) is conn:
                del self._conns[key]
        _quiet_close(conn.qp)

    def connections(self) -> list[tuple[str, str, str]]:
        """(peer, local NIC, remote NIC) of every connected initiator QP (for diagnostics)."""
        with self._lock:
            return sorted(self._conns)


def _cuda_device(location: str) -> int | None:
    kind, sep, index = location.partition(":")
    return int(index) if kind == "cuda" and sep and index.isdigit() else None


def _cuda_copies() -> tuple[Callable[..., None], Callable[..., None]]:
    from transfer.cuda import copy_device_to_host, copy_host_to_device  # noqa: PLC0415

    return copy_device_to_host, copy_host_to_device


def _quiet(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # cleanup must go on; the cause is logged, not raised
        logger.debug("rdma cleanup step failed", exc_info=True)


def _quiet_close(qp: QueuePair) -> None:
    _quiet(qp.close)
