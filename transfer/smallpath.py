"""The small-batch TCP path: one stream, one request/response per run, no tasks, no thread hops.

Why a separate path: a 4 KiB read over loopback is one ~30 us round trip, but the general path
(a batch task, one task per path, ``run_in_executor`` to a stream thread and back, per-slice
status) costs ~200 us around it, and each hop between the caller's thread, the loop and a
worker thread costs tens of microseconds on a 2-core machine. When a batch is small
(:data:`SMALL_BATCH_BYTES` in all), goes to one peer over TCP, and both sides are plain host
memory, this path instead

- from the event loop (:meth:`SmallTcpPath.run_on_loop`): drives a loop-owned, non-blocking
  socket to the peer with ``sock_*`` calls inside ``Engine.submit``, so the batch is complete
  when ``submit`` returns;
- from a blocking caller (:meth:`SmallTcpPath.run_blocking`): borrows an idle stream of the
  TCP transport and runs the exchange on the caller's own thread with the GIL released in
  every syscall, never touching the loop.

From a blocking caller, CUDA memory qualifies too: it is staged through host memory on the
caller's thread (:func:`transfer.staging.staged_slices`), in pinned chunks.

Like the shm fast path it never decides a failure: a bad address, another transport, a busy
stream, a broken connection or a peer error all return ``None``/``False`` and the batch takes
the general path, which retries and reports the precise per-request error. Every wait is
bounded by the transport's ``io_timeout``; a dead peer closes the socket and fails at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from transfer.batch import TransferRequest
from transfer.errors import AddressError
from transfer.memory import MemoryRegistry, Region, memory_at
from transfer.staging import Staging, staged_slices
from transfer.transports.base import Opcode, Slice
from transfer.transports.tcp import TcpTransport, _RemoteError
from transfer.transports.tcp_wire import _MAGIC, _MAX_ERROR_TEXT, _OK, _REQ, _RESP

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transfer.descriptor import BufferDesc, PeerSegment

__all__ = ["SMALL_BATCH_BYTES", "SmallTcpPath"]

#: Batches up to this many bytes take the small path; above it, the parallel streams and
#: slicing of the general path win.
SMALL_BATCH_BYTES = 512 << 10
_MAX_REQUESTS = 64


class _Failed(Exception):
    """The exchange did not complete; the general path takes the batch."""


class _LoopStream:
    """A connection to one peer driven only from the event loop (non-blocking socket)."""

    __slots__ = ("busy", "next_tag", "sock")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.busy = False
        self.next_tag = 1

    def drop(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class SmallTcpPath:
    """Plans and runs small TCP batches; see the module docstring."""

    def __init__(self, registry: MemoryRegistry, tcp: TcpTransport,
                 choose: Callable[[PeerSegment, BufferDesc], str], io_timeout: float,
                 staging: Staging | None = None) -> None:
        self._registry = registry
        self._staging = staging
        self._tcp = tcp
        self._choose = choose
        self._io_timeout = io_timeout
        self._loop_streams: dict[tuple[str, int], _LoopStream] = {}

    def plan(self, requests: Sequence[TransferRequest], peer: PeerSegment,
             max_bytes: int = SMALL_BATCH_BYTES) -> list[Slice] | None:
        """Coalesced slices for ``requests`` if the whole batch qualifies (at most ``max_bytes``
        in all, host memory on both sides), else ``None``.

        Only reads shared state that is swapped atomically, so any thread may call it.
        """
        planned = self._plan(requests, peer, max_bytes, device=False)
        return None if planned is None else planned[0]

    def _plan(self, requests: Sequence[TransferRequest], peer: PeerSegment, max_bytes: int,
              device: bool) -> tuple[list[Slice], list[Region | None]] | None:
        """Slices and, per slice, the local CUDA region to stage it through (``None``: host
        memory). ``device``: CUDA local memory qualifies too (blocking callers only, who stage
        it on their own thread); its slices are cut at the staging chunk size so that each one
        fits a pinned chunk."""
        if len(requests) > _MAX_REQUESTS:
            return None
        slices: list[Slice] = []
        regions: list[Region | None] = []
        total = 0
        name = peer.name
        for req in requests:
            if type(req) is not TransferRequest or req.segment != name:
                return None
            op, la, ra, n = req.opcode, req.local_addr, req.remote_addr, req.length
            if (op is not Opcode.READ and op is not Opcode.WRITE) or type(n) is not int \
                    or type(la) is not int or type(ra) is not int or n <= 0:
                return None
            total += n
            if total > max_bytes:
                return None
            try:
                local = self._registry.find(la, n)
                remote = peer.find(ra, n)
            except AddressError:
                return None
            staged = None
            if not local.direct:
                if not (device and local.is_cuda and self._staging is not None):
                    return None
                staged = local
            if self._choose(peer, remote) != "tcp":
                return None
            if slices:
                last = slices[-1]
                if (last.opcode is op and regions[-1] is staged
                        and last.local_addr + last.length == la
                        and last.remote_addr + last.length == ra):
                    slices[-1] = Slice(op, last.local_addr, last.remote_addr, last.length + n)
                    continue
            slices.append(Slice(op, la, ra, n))
            regions.append(staged)
        if any(r is not None for r in regions):
            assert self._staging is not None
            return _cut(slices, regions, self._staging.chunk_size)
        return slices, regions

    def try_blocking(self, requests: Sequence[TransferRequest], peer: PeerSegment,
                     max_bytes: int = SMALL_BATCH_BYTES) -> bool:
        """Plan and run ``requests`` on this thread; ``False``: use the general path.

        ``max_bytes`` may exceed :data:`SMALL_BATCH_BYTES` for a caller that knows one stream
        is its best choice (see ``store.client.direct``); the blocking exchange has no size
        limit of its own, only the loop's exchange does (it sends everything before reading).
        CUDA memory is staged through host memory on this thread."""
        planned = self._plan(requests, peer, max_bytes, device=True)
        return planned is not None and self.run_blocking(peer, *planned)

    async def try_on_loop(self, requests: Sequence[TransferRequest], peer: PeerSegment) -> bool:
        """Plan and run ``requests`` from the loop; ``False``: use the general path."""
        slices = self.plan(requests, peer)
        return slices is not None and await self.run_on_loop(peer, slices)

    # -- blocking callers ---------------------------------------------------------------------

    def run_blocking(self, peer: PeerSegment, slices: Sequence[Slice],
                     regions: Sequence[Region | None] = ()) -> bool:
        """Run ``slices`` on this thread over an idle stream; ``False`` if that was not possible
        (no idle stream, connection or peer error) and nothing can be said about the bytes.
        ``regions``: per slice, the CUDA region its local side is staged through, if any."""
        entry = peer.desc.transports.get("tcp", {})
        pool = self._tcp.streams(str(entry["host"]), int(entry["port"]))
        for stream in pool:
            if not stream.lock.acquire(blocking=False):
                continue
            try:
                if stream.sock is None:
                    stream.sock = self._tcp._connect(stream.host, stream.port)
                    self._tcp.reconnects += 1
                if any(r is not None for r in regions):
                    assert self._staging is not None
                    with staged_slices(self._staging, slices, regions) as host:
                        self._tcp._pipeline(stream, host, self._tcp.busy_poll)
                else:
                    self._tcp._pipeline(stream, slices, self._tcp.busy_poll)
                return True
            except (OSError, ConnectionError, struct.error, _RemoteError):  # the peer, the link:
                stream.drop()  # the general path redoes it, with retries, and reports why
                return False
            except Exception:  # noqa: BLE001 - a bug here must not fail the transfer...
                logger.warning("caller-thread exchange failed unexpectedly; the general path "
                               "takes over", exc_info=True)  # ...nor hide as lost speed
                stream.drop()
                return False
            finally:
                stream.lock.release()
        return False

    # -- the event loop -----------------------------------------------------------------------

    async def run_on_loop(self, peer: PeerSegment, slices: Sequence[Slice]) -> bool:
        """Run ``slices`` over this peer's loop stream; ``False`` if it is busy or failed.

        With TLS the loop's ``sock_*`` calls cannot drive an ``SSLSocket``, so the exchange
        runs as :meth:`run_blocking` on a worker thread instead (one hop, still one exchange).
        """
        if self._tcp.tls is not None:
            return await asyncio.get_running_loop().run_in_executor(
                None, self.run_blocking, peer, slices)
        entry = peer.desc.transports.get("tcp", {})
        key = (str(entry["host"]), int(entry["port"]))
        stream = self._loop_streams.get(key)
        if stream is None:
            stream = self._loop_streams[key] = _LoopStream()
        if stream.busy:
            return False
        stream.busy = True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._io_timeout):
                if stream.sock is None:
                    sock = await loop.run_in_executor(None, self._tcp._connect, *key)
                    sock.setblocking(False)
                    stream.sock = sock
                    self._tcp.reconnects += 1
                await self._exchange(loop, stream, stream.sock, slices)
            return True
        except BaseException as e:  # half an exchange leaves the stream out of sync
            stream.drop()
            if isinstance(e, Exception):  # the general path redoes it and reports why
                return False
            raise
        finally:
            stream.busy = False

    async def _exchange(self, loop: asyncio.AbstractEventLoop, stream: _LoopStream,
                        sock: socket.socket, slices: Sequence[Slice]) -> None:
        # Everything is sent before the first response is read. Neither side can stall: the
        # server answers a write with 16 bytes once its payload is in (at most _MAX_REQUESTS
        # answers, far below any receive buffer), and reads send only their small requests
        # before the first answer is read.
        tags = []
        for s in slices:
            tag = stream.next_tag
            stream.next_tag = (tag + 1) & 0xFFFFFFFF
            tags.append(tag)
            head = _REQ.pack(_MAGIC, s.opcode, 0, tag, s.remote_addr, s.length)
            if s.opcode is Opcode.WRITE:
                await _send(loop, sock, head, memory_at(s.local_addr, s.length))
            else:
                await _send(loop, sock, head, None)
        resp = bytearray(_RESP.size)
        for tag, s in zip(tags, slices):
            await _recv_exact(loop, sock, memoryview(resp))
            magic, status, _, rtag, length = _RESP.unpack(resp)
            if magic != _MAGIC or rtag != tag:
                raise _Failed("response out of sync")
            if status != _OK:
                raise _Failed(f"peer refused (status {status}, {min(length, _MAX_ERROR_TEXT)})")
            if s.opcode is Opcode.READ:
                if length != s.length:
                    raise _Failed(f"peer sent {length} bytes, asked for {s.length}")
                await _recv_exact(loop, sock, memory_at(s.local_addr, s.length))

    async def close(self) -> None:
        for stream in self._loop_streams.values():
            stream.drop()
        self._loop_streams.clear()


def _cut(slices: list[Slice], regions: list[Region | None],
         chunk: int) -> tuple[list[Slice], list[Region | None]]:
    """Staged slices cut into pieces of at most ``chunk`` bytes (host slices stay whole)."""
    out: list[Slice] = []
    out_regions: list[Region | None] = []
    for s, region in zip(slices, regions):
        if region is None or s.length <= chunk:
            out.append(s)
            out_regions.append(region)
            continue
        for off in range(0, s.length, chunk):
            out.append(Slice(s.opcode, s.local_addr + off, s.remote_addr + off,
                             min(chunk, s.length - off)))
            out_regions.append(region)
    return out, out_regions


async def _send(loop: asyncio.AbstractEventLoop, sock: socket.socket, head: bytes,
                payload: memoryview | None) -> None:
    """Try one ``sendmsg`` first (nearly always enough); hand any rest to the loop."""
    try:
        sent = sock.sendmsg([head] if payload is None else [head, payload])
    except (BlockingIOError, InterruptedError):
        sent = 0
    if sent < len(head):
        await loop.sock_sendall(sock, head[sent:])
        sent = len(head)
    if payload is not None and sent - len(head) < len(payload):
        await loop.sock_sendall(sock, payload[sent - len(head):])


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                      view: memoryview) -> None:
    while view:
        try:
            n = sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            n = await loop.sock_recv_into(sock, view)
        if n == 0:
            raise ConnectionError("peer closed the connection")
        view = view[n:]
