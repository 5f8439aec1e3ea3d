"""The transfer engine: registered memory, published descriptors, and batches of transfers.

One engine per process normally (:func:`get_engine`), shared by everything in it; tests may make
several. An engine is named by its segment name ``host:port``: with ``P2PHANDSHAKE`` the port is
the RPC port the engine picked (Mooncake's ``get_rpc_port()``), otherwise the one in
``local_hostname`` (or the picked one when it has none).

The core is async and runs on one event loop; sync code drives it through :meth:`Engine.run`
(or the Mooncake-compatible :class:`transfer.compat.TransferEngine`). Bytes move on transport
worker threads, never on the loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from transfer.batch import Batch, RequestResult, RequestStatus, Route, TransferRequest, run_routes
from transfer.config import MooncakeConfig, load_config
from transfer.control import ControlPlane, Notification, split_name
from transfer.descriptor import (
    BufferDesc,
    PeerSegment,
    SegmentDescriptor,
    decode_descriptor,
    encode_descriptor,
)
from transfer.errors import (
    AddressError,
    DescriptorError,
    SegmentNotFoundError,
    TransferError,
)
from transfer.fastpath import ShmFastPath
from transfer.memory import FILE_ADDRESS_BASE, MemoryRegistry, Region
from transfer.registration import Registration
from transfer.metadata import (DescriptorCache, MetadataError, open_metadata_store,
                               parse_metadata_server, segment_key)
from transfer.rpc import BackgroundLoop, RpcError, get_background_loop
from transfer.shm import HostProbe, SharedBuffer, reap_stale
from transfer.smallpath import SMALL_BATCH_BYTES, SmallTcpPath
from transfer.staging import Staging
from transfer.transports.base import Opcode, Transport
from transfer.transports.file import FileTransport
from transfer.transports.shm import ShmTransport
from transfer.tls import tls_contexts
from transfer.transports.tcp import TcpTransport

__all__ = [
    "Batch",
    "Engine",
    "Notification",
    "Opcode",
    "RequestResult",
    "RequestStatus",
    "TransferRequest",
    "get_engine",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_TRACKED_BATCHES = 65536


class Engine(Registration):
    """Async transfer engine; see the module docstring."""

    def __init__(self, config: MooncakeConfig | None = None, *,
                 rdma_options: dict[str, Any] | None = None, **overrides: Any) -> None:
        """``overrides`` are config keys (``**{"transfer.enable_shm": False}``);
        ``rdma_options`` are extra :class:`~transfer.transports.rdma.RdmaTransport` arguments
        (e.g. ``device_name`` filters, or a NIC opener for tests)."""
        self._rdma_options = dict(rdma_options or {})
        base = config if config is not None else load_config()
        self.config = base.replace(**overrides) if overrides else base
        self.name = ""
        self.engine_id = uuid.uuid4().hex
        self.registry = MemoryRegistry()
        self._info: dict[int, dict[str, dict[str, Any]]] = {}
        self._shared: dict[int, SharedBuffer] = {}
        self._next_file_address = FILE_ADDRESS_BASE
        self._transports: dict[str, Transport] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        self._reachable: dict[tuple[str, str], bool] = {}
        self._batch_ids = itertools.count(1)
        self._batches: dict[int, Batch] = {}
        self._fast: ShmFastPath | None = None
        self._small: SmallTcpPath | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: BackgroundLoop | None = None
        self._started = False
        self._running = False
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the RPC and data listeners, pick the segment name and publish the descriptor.

        On failure everything opened so far is closed again and the error propagates.
        """
        if self._started:
            raise RuntimeError("engine already started")
        self._started = True
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise
        logger.info("transfer engine %s started (%s)", self.name, ", ".join(self._entries))

    async def _open(self) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        host, _, port_text = cfg.local_hostname.rpartition(":") if ":" in cfg.local_hostname \
            else (cfg.local_hostname, "", "")
        host = host.strip("[]")
        p2p = parse_metadata_server(cfg.metadata_server).kind == "p2p"
        rpc_port = 0 if p2p or not port_text else int(port_text)
        tls = tls_contexts(cfg)
        control = ControlPlane(host, rpc_port, secret=cfg.auth_secret,
                               max_frame_size=cfg.rpc.max_frame_size,
                               connect_timeout=cfg.rpc.connect_timeout,
                               local_descriptor=self._serve_descriptor, tls=tls)
        await control.start()
        self._control = control
        self.name = f"{host}:{self._control.port}" if rpc_port == 0 else f"{host}:{rpc_port}"
        # An HTTP metadata server is guarded by the same cluster secret (its bearer token).
        http = parse_metadata_server(cfg.metadata_server).kind == "http"
        self._metadata = open_metadata_store(cfg.metadata_server,
                                             fetch=self._fetch_descriptor if p2p else None,
                                             secret=cfg.auth_secret if http else None)
        self._cache: DescriptorCache[PeerSegment] = DescriptorCache(self._load_peer, ttl=30.0)
        reap_stale()
        self._probe = HostProbe()
        t = cfg.transfer
        self._staging = Staging(chunk_size=t.staging_chunk_size, count=t.staging_chunks)
        self._transports["tcp"] = TcpTransport(
            self.registry, host=host, secret=cfg.auth_secret, streams_per_peer=t.streams_per_peer,
            io_timeout=t.io_timeout, connect_timeout=cfg.rpc.connect_timeout,
            region_io=self._staging.region_io(), tls=tls, busy_poll=t.busy_poll_us / 1e6,
            serve_poll=t.serve_poll_us / 1e6)
        self._small = SmallTcpPath(self.registry, self._transports["tcp"], self._choose,
                                   t.io_timeout, self._staging)
        if t.enable_shm:  # same-host shortcuts: both trust the /dev/shm probe
            shm = self._transports["shm"] = ShmTransport(self._probe)
            self._fast = ShmFastPath(self.registry, shm, self._staging)
            self._transports["file"] = FileTransport(self._probe)
        if cfg.protocol == "rdma":
            from transfer.transports.rdma import RdmaTransport  # needs pyverbs: import lazily

            rdma = RdmaTransport(self.name, device_name=cfg.device_name,
                                 handshake=self._rdma_handshake,
                                 **{"timeout": t.io_timeout, **self._rdma_options})
            self._control.serve_handshake(rdma.accept_handshake)
            self._transports["rdma"] = rdma
        for name, transport in self._transports.items():
            self._entries[name] = await transport.start()
        self._running = True
        await self._publish()

    def start_in(self, loop: BackgroundLoop | None = None, timeout: float = 30.0) -> Engine:
        """Start on a background loop (default: the process-wide one) from sync code."""
        self._background = loop or get_background_loop()
        self._background.run(self.start(), timeout)
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run one of this engine's coroutines from a thread that is not its loop's."""
        if self._background is None:
            raise RuntimeError("engine was not started with start_in(); await it instead")
        return self._background.run(coro, timeout)

    async def close(self) -> None:
        """Fail running batches, close transports and listeners, unpublish. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._running = False
        for batch in list(self._batches.values()):
            if batch.task is not None and not batch.task.done():
                batch.task.cancel()
        metadata = getattr(self, "_metadata", None)
        if metadata is not None:
            with contextlib.suppress(MetadataError, OSError, ValueError):
                await metadata.delete(segment_key(self.name))
            await metadata.close()
        if self._small is not None:
            await self._small.close()
        for transport in self._transports.values():
            await transport.close()
        control = getattr(self, "_control", None)
        if control is not None:
            await control.close()
        for buf in self._shared.values():
            buf.free()
        self._shared.clear()
        for region in self.registry.regions():
            if region.file_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(region.file_fd)
        staging = getattr(self, "_staging", None)
        if staging is not None:
            staging.close()
        probe = getattr(self, "_probe", None)
        if probe is not None:
            probe.close()

    def close_in(self, timeout: float = 30.0) -> None:
        """Close an engine started with :meth:`start_in`."""
        self.run(self.close(), timeout)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def rpc_port(self) -> int:
        return self._control.port

    @property
    def transports(self) -> tuple[str, ...]:
        return tuple(self._transports)

    # -- descriptors --------------------------------------------------------------------------

    def descriptor(self) -> SegmentDescriptor:
        """This engine's segment descriptor as published."""
        host, port = split_name(self.name)
        buffers = [BufferDesc(r.address, r.length, r.location, r.shm_name, r.shm_offset,
                              self._info.get(r.address, {})) for r in self.registry.regions()]
        return SegmentDescriptor(self.name, self.engine_id, host, self._control.port,
                                 dict(self._entries), buffers)

    async def _publish(self) -> None:
        if self._running:
            await self._metadata.put(segment_key(self.name), encode_descriptor(self.descriptor()))

    def _serve_descriptor(self, name: str) -> bytes | None:
        if name != self.name:
            return None
        return encode_descriptor(self.descriptor())

    async def _fetch_descriptor(self, name: str) -> bytes | None:
        try:
            return await self._control.fetch_descriptor(name, self.config.rpc.connect_timeout)
        except (RpcError, ValueError) as e:
            raise MetadataError(f"P2P handshake with {name} failed: {e}") from None

    async def _load_peer(self, name: str) -> PeerSegment | None:
        data = await self._metadata.get(segment_key(name))
        if data is None:
            return None
        return PeerSegment(decode_descriptor(data, expected_name=name))

    async def open_segment(self, name: str, *, refresh: bool = False) -> PeerSegment:
        """The validated descriptor of segment ``name`` (cached; ``refresh`` re-reads it)."""
        self._check_running()
        if not isinstance(name, str) or not name:
            raise SegmentNotFoundError(f"segment name must be a non-empty str, got {name!r}")
        try:
            peer = await self._cache.get(name, refresh=refresh)
        except (MetadataError, DescriptorError) as e:
            raise SegmentNotFoundError(f"cannot open segment {name!r}: {e}") from None
        except ValueError as e:
            raise SegmentNotFoundError(f"bad segment name {name!r}: {e}") from None
        if peer is None:
            raise SegmentNotFoundError(f"no segment named {name!r} is published")
        return peer

    # -- transfers ----------------------------------------------------------------------------

    async def submit(self, requests: Sequence[TransferRequest], *,
                     notify: bytes | str | None = None) -> Batch:
        """Validate every request, then start moving bytes; returns the running batch.

        Bad requests (unregistered or out-of-range addresses on either side, unknown segment,
        non-positive length) raise before anything moves. ``notify`` is sent to every segment
        of the batch once all of its requests completed.
        """
        self._check_running()
        if not requests:
            raise ValueError("a batch needs at least one request")
        message = notify.encode() if isinstance(notify, str) else notify
        if message is None:
            direct = await self._submit_direct(requests)
            if direct is not None:
                return direct
        peers: dict[str, PeerSegment] = {}
        plan: list[tuple[Region, PeerSegment, BufferDesc]] = []
        # Requests of a batch nearly always hit the same few buffers: try the previous
        # request's buffers before a registry lookup (the checks are the same).
        local: Region | None = None
        remote: BufferDesc | None = None
        peer: PeerSegment | None = None
        refreshed: set[str] = set()
        for i, req in enumerate(requests):
            if type(req) is not TransferRequest:
                raise TypeError(f"request {i} is a {type(req).__name__}, not a TransferRequest")
            if req.opcode is not Opcode.READ and req.opcode is not Opcode.WRITE:
                raise ValueError(f"request {i}: bad opcode {req.opcode!r}")
            la, ra, n = req.local_addr, req.remote_addr, req.length
            fast = type(n) is int and n > 0 and type(la) is int and type(ra) is int
            if not (fast and local is not None and local.address <= la and la + n <= local.end):
                try:
                    local = self.registry.find(la, n)
                except AddressError as e:
                    raise AddressError(f"request {i}: local {e}") from None
            if peer is None or req.segment != peer.name:
                peer = peers.get(req.segment)
                if peer is None:
                    peer = peers[req.segment] = await self.open_segment(req.segment)
                remote = None
            if not (fast and remote is not None and remote.address <= ra
                    and ra + n <= remote.address + remote.length):
                try:
                    remote = peer.find(ra, n)
                except AddressError as e:
                    # The peer may have registered this memory after we cached its descriptor:
                    # read it again, once per segment and batch, before calling the address bad.
                    if req.segment in refreshed:
                        raise AddressError(f"request {i}: remote {e}") from None
                    refreshed.add(req.segment)
                    peer = peers[req.segment] = await self.open_segment(req.segment,
                                                                        refresh=True)
                    try:
                        remote = peer.find(ra, n)
                    except AddressError as e2:
                        raise AddressError(f"request {i}: remote {e2}") from None
            plan.append((local, peer, remote))
        batch = Batch(next(self._batch_ids), requests)
        batch.task = asyncio.create_task(self._run_batch(batch, plan, message))
        self._track(batch)
        return batch

    async def _submit_direct(self, requests: Sequence[TransferRequest]) -> Batch | None:
        """The shm fast path (:mod:`transfer.fastpath`) or the small tcp path
        (:mod:`transfer.smallpath`), or None when the batch takes neither - the general path
        then validates it and reports any error."""
        first = requests[0]
        if type(first) is not TransferRequest or not isinstance(first.segment, str):
            return None
        try:
            peer = await self.open_segment(first.segment)
        except SegmentNotFoundError:
            return None
        fast = self._fast_to(peer)
        if fast is not None:
            plan = fast.plan(requests, peer)
            if plan is not None:
                batch = fast.execute(next(self._batch_ids), requests, plan)
                self._track(batch)
                return batch
        if self._small is None or not await self._small.try_on_loop(requests, peer):
            return None
        batch = Batch.completed(next(self._batch_ids), requests, [r.length for r in requests])
        self._track(batch)
        return batch

    async def transfer(self, requests: Sequence[TransferRequest], *,
                       notify: bytes | str | None = None,
                       timeout: float | None = None) -> list[RequestResult]:
        """Submit and wait; raises :class:`TransferFailedError` if any request failed."""
        batch = await self.submit(requests, notify=notify)
        try:
            if not batch.done:
                await batch.wait(timeout)
        finally:
            self.release_batch(batch.id)
        batch.raise_for_status()
        return batch.results  # final: nobody mutates them any more

    def transfer_blocking(self, requests: Sequence[TransferRequest], *,
                          timeout: float | None = None,
                          one_stream_bytes: int = SMALL_BATCH_BYTES) -> list[RequestResult]:
        """:meth:`transfer` for a thread that is not the loop's. An shm fast-path batch or a
        tcp batch of up to ``one_stream_bytes`` to a known peer runs right on this thread, as
        one exchange on one stream (no hop to the loop and back, ~100 us here); anything else,
        including every error, takes the loop's path (parallel streams, slicing, retries)."""
        first = requests[0] if requests else None
        if type(first) is TransferRequest and self._running and isinstance(first.segment, str):
            peer = self._cache.lookup(first.segment)
            if peer is not None:
                fast = self._fast_to(peer)
                if fast is not None:
                    plan = fast.run_blocking(requests, peer)
                    if plan is not None:
                        return list(map(RequestResult, itertools.repeat(RequestStatus.COMPLETED),
                                        plan.lengths))
                if self._small is not None and self._small.try_blocking(requests, peer,
                                                                        one_stream_bytes):
                    return [RequestResult(RequestStatus.COMPLETED, r.length) for r in requests]
        return self.run(self.transfer(requests, timeout=timeout), timeout)

    def batch(self, batch_id: int) -> Batch | None:
        return self._batches.get(batch_id)

    def release_batch(self, batch_id: int) -> None:
        self._batches.pop(batch_id, None)

    def _track(self, batch: Batch) -> None:
        self._batches[batch.id] = batch
        while len(self._batches) > _MAX_TRACKED_BATCHES:
            oldest = next(iter(self._batches))
            if not self._batches[oldest].done:
                break
            del self._batches[oldest]

    async def _run_batch(self, batch: Batch, plan: list[tuple[Region, PeerSegment, BufferDesc]],
                         message: bytes | None) -> None:
        cfg = self.config.transfer
        routes: dict[tuple[str, str], Route] = {}
        staged = self._staging.new_batch()
        try:
            chosen: dict[tuple[str, int], Route] = {}
            for i, (req, (local, peer, remote)) in enumerate(zip(batch.requests, plan)):
                route = chosen.get((peer.name, remote.address))
                if route is None:
                    tname = self._choose(peer, remote)
                    route = routes.get((peer.name, tname))
                    if route is None:
                        buffers = peer.entries
                        if tname == "rdma":  # the rdma transport reads rkeys at entry["rdma"]
                            buffers = [{**e, "rdma": e.get("info", {}).get("rdma", {})}
                                       for e in buffers]
                        route = routes[(peer.name, tname)] = Route(
                            self._transports[tname], peer.name,
                            dict(peer.desc.transports.get(tname, {})), buffers,
                            on_failure=lambda name=peer.name: self._peer_failed(name))
                    chosen[(peer.name, remote.address)] = route
                if local.direct:
                    route.add(i, req.opcode, req.local_addr, req.remote_addr, req.length)
                    continue
                for address, off, n in staged.add(i, req, local):
                    route.add(i, req.opcode, address, req.remote_addr + off, n)
            for route in routes.values():
                route.cut(cfg.slice_size)
            await staged.load(batch)
        except (TransferError, OSError, RuntimeError) as e:
            for r in batch.results:
                r.status, r.error = RequestStatus.FAILED, f"staging failed: {e}"
            staged.release()
            batch._finish()
            return

        async def after() -> None:
            await staged.finish(batch)
            if message is not None and batch.ok:
                await self._notify_all(batch, message, {p.name: p for _, p, _ in plan})

        await run_routes(batch, list(routes.values()), paths=cfg.streams_per_peer,
                         max_retries=cfg.max_retries, after=after)

    def _choose(self, peer: PeerSegment, remote: BufferDesc) -> str:
        entries = peer.desc.transports
        if remote.location.startswith("file:"):
            return "file" if self._can_reach(peer, "file") else "tcp"
        if (remote.shm_name is not None and "shm" in self._transports
                and self._can_reach(peer, "shm")):
            return "shm"
        if "rdma" in self._transports and "rdma" in entries and self._can_reach(peer, "rdma"):
            return "rdma"
        return "tcp"

    def copies_to(self, segment: str) -> bool:
        """Whether a blocking caller's batch to ``segment`` (a peer already known) is a memory
        copy on the shm fast path, not a network exchange: splitting it over streams then only
        adds thread hand-offs."""
        peer = self._cache.lookup(segment)
        return peer is not None and self._fast_to(peer) is not None

    def _fast_to(self, peer: PeerSegment) -> ShmFastPath | None:
        """The shm fast path, if batches to ``peer`` can take it (a same-host memory copy)."""
        return self._fast if self._fast is not None and self._can_reach(peer, "shm") else None

    def _can_reach(self, peer: PeerSegment, tname: str) -> bool:
        key = (peer.desc.engine_id, tname)
        ok = self._reachable.get(key)
        if ok is None:
            entry = peer.desc.transports.get(tname)
            transport = self._transports.get(tname)
            ok = entry is not None and transport is not None and transport.reachable(entry)
            self._reachable[key] = ok
        return ok

    async def _rdma_handshake(self, peer_name: str, request: dict[str, Any]) -> dict[str, Any]:
        return await self._control.handshake(peer_name, request, self.config.rpc.connect_timeout)

    def _peer_failed(self, name: str) -> None:
        # The peer may have restarted with new buffers: the next lookup re-reads its descriptor.
        self._cache.invalidate(name)
        self._control.drop_client(name)

    async def _notify_all(self, batch: Batch, message: bytes,
                          peers: dict[str, PeerSegment]) -> None:
        for peer in peers.values():
            try:
                await self._control.notify(peer.name, f"{peer.desc.rpc_host}:{peer.desc.rpc_port}",
                                           self.name, message, self.config.rpc.request_timeout)
            except (RpcError, ValueError, OSError) as e:
                for r in batch.results:
                    r.status, r.error = RequestStatus.FAILED, f"notification failed: {e}"

    async def notify(self, segment: str, message: bytes | str) -> None:
        """Send a notification to ``segment`` without a batch."""
        peer = await self.open_segment(segment)
        data = message.encode() if isinstance(message, str) else message
        await self._control.notify(peer.name, f"{peer.desc.rpc_host}:{peer.desc.rpc_port}",
                                   self.name, data, self.config.rpc.request_timeout)

    def notifications(self, prefix: bytes | None = None) -> list[Notification]:
        """Notifications received since the last call; with ``prefix``, only those it starts."""
        return self._control.take_notifications(prefix)

    def stats(self) -> dict[str, int]:
        tcp = self._transports.get("tcp")
        return {"tcp_connects": getattr(tcp, "reconnects", 0), "batches": len(self._batches)}

    def _check_running(self) -> None:
        if not self._running:
            raise RuntimeError(
                "engine is not running (start() it first; closed engines stay closed)")


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine(config: MooncakeConfig | None = None) -> Engine:
    """The process-wide engine, started on the process-wide background loop on first use.

    Everything in a process (store client, connectors) shares it, as in Mooncake. ``config`` is
    used only by the first call.
    """
    global _engine
    with _engine_lock:
        if _engine is None or _engine._closed or _engine._background is None \
                or not _engine._background.is_running:
            _engine = Engine(config).start_in()
        return _engine


def buffer_address(buf: bytearray) -> int:
    """Address of a bytearray's storage (for tests and staging)."""
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
