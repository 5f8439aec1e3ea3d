"""The engine's control plane over :mod:`transfer.rpc`: descriptor fetch and notifications.

Why RPC and not the data port: with ``P2PHANDSHAKE`` there is no metadata server, so a peer asks
the engine itself for its descriptor at the segment name's address (``host:rpc_port``), exactly
like Mooncake's handshake; and completion notifications are small typed messages that belong on
the same authenticated channel.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from transfer.rpc import ErrorCode, RpcClient, RpcError, RpcServer
from transfer.tls import TlsContexts

__all__ = ["MAX_NOTIFY_SIZE", "ControlPlane", "Notification", "split_name"]

MAX_NOTIFY_SIZE = 64 << 10
_MAX_QUEUED = 65536


class DescriptorRequest(msgspec.Struct):
    name: str


class DescriptorReply(msgspec.Struct):
    data: bytes | None


class HandshakeMessage(msgspec.Struct):
    """An RDMA QP handshake request or reply; the transport validates the body itself."""

    body: dict[str, Any]


class NotifyRequest(msgspec.Struct):
    sender: str
    message: bytes


class NotifyReply(msgspec.Struct):
    accepted: bool


@dataclass(frozen=True, slots=True)
class Notification:
    """A message a peer sent with (after) a batch: who sent it and what."""

    sender: str
    message: bytes
    received_at: float


def split_name(name: str) -> tuple[str, int]:
    """``"host:port"`` (``[v6]:port`` too) -> ``(host, port)``; ``ValueError`` otherwise."""
    host, sep, port = name.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"segment name {name!r} is not host:port")
    return host.strip("[]"), int(port)


class ControlPlane:
    """Serves this engine's descriptor and receives notifications; asks peers for theirs."""

    def __init__(self, host: str, port: int, *, secret: bytes | None, max_frame_size: int,
                 connect_timeout: float, local_descriptor: Callable[[str], bytes | None],
                 tls: TlsContexts | None = None) -> None:
        self._server = RpcServer(host, port, secret=secret, max_frame_size=max_frame_size,
                                 tls=None if tls is None else tls.server)
        self._tls = None if tls is None else tls.client
        self._secret = secret
        self._max_frame_size = max_frame_size
        self._connect_timeout = connect_timeout
        self._local_descriptor = local_descriptor
        self._clients: dict[str, RpcClient] = {}
        self._notifications: collections.deque[Notification] = collections.deque(maxlen=_MAX_QUEUED)
        self._server.register("te.descriptor", DescriptorRequest, DescriptorReply,
                              self._serve_descriptor)
        self._server.register("te.notify", NotifyRequest, NotifyReply, self._receive_notify)

    @property
    def port(self) -> int:
        return self._server.port

    async def start(self) -> None:
        await self._server.start()

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for c in clients.values():
            await c.close()
        await self._server.stop()

    def serve_handshake(self, accept: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Answer peers' RDMA QP handshakes with ``accept`` (the transport's passive side)."""

        def handle(req: HandshakeMessage) -> HandshakeMessage:
            try:
                return HandshakeMessage(accept(req.body))
            except ValueError as e:  # HandshakeError: malformed or unsatisfiable
                raise RpcError(ErrorCode.BAD_REQUEST, f"rdma handshake refused: {e}") from None

        self._server.register("te.rdma_handshake", HandshakeMessage, HandshakeMessage, handle)

    async def handshake(self, name: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send an RDMA handshake to the engine at ``name`` and return its reply body."""
        reply = await self._client(name).call("te.rdma_handshake", HandshakeMessage(body),
                                              HandshakeMessage, timeout=timeout)
        return reply.body

    def _serve_descriptor(self, req: DescriptorRequest) -> DescriptorReply:
        return DescriptorReply(self._local_descriptor(req.name))

    def _receive_notify(self, req: NotifyRequest) -> NotifyReply:
        if len(req.message) > MAX_NOTIFY_SIZE or len(req.sender) > 512:
            return NotifyReply(False)
        self._notifications.append(Notification(req.sender, req.message, time.time()))
        return NotifyReply(True)

    def _client(self, name: str) -> RpcClient:
        client = self._clients.get(name)
        if client is None or client.closed:
            host, port = split_name(name)
            client = RpcClient(host, port, secret=self._secret, max_frame_size=self._max_frame_size,
                               connect_timeout=self._connect_timeout, tls=self._tls)
            self._clients[name] = client
        return client

    async def fetch_descriptor(self, name: str, timeout: float) -> bytes | None:
        """Ask the engine at ``name`` (``host:rpc_port``) for its descriptor."""
        reply = await self._client(name).call("te.descriptor", DescriptorRequest(name),
                                              DescriptorReply, timeout=timeout)
        return reply.data

    async def notify(self, name: str, rpc_address: str, sender: str, message: bytes,
                     timeout: float) -> bool:
        """Send ``message`` to the engine whose RPC server is ``rpc_address``."""
        if len(message) > MAX_NOTIFY_SIZE:
            raise ValueError(f"notification is {len(message)} bytes, limit {MAX_NOTIFY_SIZE}")
        reply = await self._client(rpc_address).call("te.notify", NotifyRequest(sender, message),
                                                     NotifyReply, timeout=timeout)
        return reply.accepted

    def drop_client(self, name: str) -> None:
        client = self._clients.pop(name, None)
        if client is not None:
            import asyncio

            asyncio.ensure_future(client.close())

    def take_notifications(self, prefix: bytes | None = None) -> list[Notification]:
        """Notifications received since the last call, oldest first.

        With ``prefix``, only messages starting with it are taken; the others stay queued, in
        order, for their own consumers (several components share one engine per process).
        """
        if prefix is None:
            out = list(self._notifications)
            self._notifications.clear()
            return out
        out, rest = [], []
        for note in self._notifications:
            (out if note.message.startswith(prefix) else rest).append(note)
        if out:
            self._notifications.clear()
            self._notifications.extend(rest)
        return out
