"""The master client: typed calls over :mod:`transfer.rpc`, leader discovery and failover retry.

:class:`MasterClient` (async) and :class:`SyncMasterClient` (blocking, any thread) expose one
method per master RPC. Single-key failures raise :class:`~transfer.rpc.RpcError` whose ``code``
is a :class:`~store.master.errors.MasterErrorCode`; batch calls return per-item codes.

Failover: given ``etcd_endpoints`` the client asks etcd for the leader (:func:`afind_master`)
and, when a call fails because the connection was lost or the master says it is not the leader,
looks the leader up again and retries until ``retry_timeout``. A retried call may have run on the
old leader; that is harmless because a new leader starts empty and rebuilds from remounts (and
a retried put_start on the *same* master answers OBJECT_PUT_IN_PROGRESS, never a torn object).
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Sequence
from typing import TypeVar

import msgspec

from transfer.config import split_address
from transfer.rpc import BackgroundLoop, RpcClient, RpcConnectionError, RpcError, get_background_loop

from .errors import MasterErrorCode
from .ha import afind_master
from .messages import (
    BatchExistsReply,
    BatchGetReplicaListReply,
    BatchKeysRequest,
    BatchPutStartReply,
    BatchPutStartRequest,
    BatchReplicaStartReply,
    BatchReplicaStartRequest,
    CodesReply,
    DemoteEndReply,
    DemoteEndRequest,
    DemoteTask,
    ExistsReply,
    ExistsRequest,
    GetReplicaListReply,
    KeyRequest,
    KeysRequest,
    MountSegmentReply,
    MountSegmentRequest,
    OkReply,
    OwnedKeyRequest,
    OwnedKeysRequest,
    PingReply,
    PingRequest,
    PutStartItem,
    PutStartReply,
    PutStartRequest,
    RemountObject,
    RemoveAllReply,
    RemoveAllRequest,
    RemoveRequest,
    ReplicaDesc,
    ReplicateConfig,
    ReplicaStartReply,
    ReplicaStartRequest,
    SegmentDesc,
    StatsReply,
    StatsRequest,
    TakeDemotionsReply,
    TakeDemotionsRequest,
    UnmountSegmentReply,
    UnmountSegmentRequest,
)

__all__ = ["MasterClient", "SyncMasterClient"]

logger = logging.getLogger(__name__)
R = TypeVar("R")
_DEFAULT_CONFIG = ReplicateConfig()
_NOT_LEADER = int(MasterErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)


class MasterClient:
    """Async client of the master (use from one event loop)."""

    def __init__(self, address: str | None = None, *,
                 etcd_endpoints: str | Sequence[str] | None = None,
                 secret: bytes | None = None, timeout: float = 10.0,
                 retry_timeout: float = 15.0, connect_timeout: float = 2.0,
                 identity: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        if address is None and not etcd_endpoints:
            raise ValueError("give the master's address or the etcd endpoints to find it")
        self.address = address
        self.etcd_endpoints = etcd_endpoints
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self._secret = secret
        self._identity = identity  # a tenant id, with secret being the tenant's
        self._tls = tls
        self._connect_timeout = connect_timeout
        self.put_timeout_s: float | None = None
        """The master's reservation timeout, as its last ``batch_put_start`` reply said."""
        self._rpc: RpcClient | None = None

    async def _client(self) -> RpcClient:
        if self._rpc is None:
            if self.etcd_endpoints:
                self.address = await afind_master(self.etcd_endpoints,
                                                  timeout=self.retry_timeout)
            assert self.address is not None
            host, port = split_address(self.address)
            self._rpc = RpcClient(host, port, secret=self._secret,
                                  connect_timeout=self._connect_timeout, identity=self._identity,
                                  tls=self._tls)
        return self._rpc

    async def call(self, method: str, request: msgspec.Struct, response_type: type[R]) -> R:
        """One RPC, retried across reconnects and leader changes until ``retry_timeout``."""
        rpc = self._rpc
        if rpc is not None:  # fast path
            try:
                return await rpc.call(method, request, response_type, self.timeout)
            except RpcError as e:
                if not _retryable(e):
                    raise
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.05
        while True:
            try:
                rpc = await self._client()
                return await rpc.call(method, request, response_type, self.timeout)
            except (RpcError, TimeoutError, OSError) as e:
                if isinstance(e, RpcError) and not _retryable(e):
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                logger.info("master call %s failed (%s); retrying", method, e)
                await self._reset()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _reset(self) -> None:
        rpc, self._rpc = self._rpc, None
        if rpc is not None:
            await rpc.close()

    async def close(self) -> None:
        await self._reset()

    async def __aenter__(self) -> MasterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- segments and liveness -----------------------------------------------------------------

    async def mount_segment(self, segment: SegmentDesc,
                            objects: Sequence[RemountObject] = ()) -> int:
        """Mount ``segment``; ``objects`` (on remount) rebuilds them. Returns objects rebuilt."""
        req = MountSegmentRequest(segment=segment, objects=list(objects))
        return (await self.call("mount_segment", req, MountSegmentReply)).rebuilt_objects

    async def unmount_segment(self, client_id: str, name: str) -> int:
        """Unmount; returns how many objects disappeared with it."""
        req = UnmountSegmentRequest(client_id, name)
        return (await self.call("unmount_segment", req, UnmountSegmentReply)).lost_objects

    async def ping(self, client_id: str) -> PingReply:
        """Heartbeat; ``known=False`` means remount your segments."""
        return await self.call("ping", PingRequest(client_id), PingReply)

    # -- puts ----------------------------------------------------------------------------------

    async def put_start(self, client_id: str, key: str, size: int,
                        config: ReplicateConfig = _DEFAULT_CONFIG) -> list[ReplicaDesc]:
        req = PutStartRequest(client_id=client_id, key=key, size=size, config=config)
        return (await self.call("put_start", req, PutStartReply)).replicas

    async def put_end(self, client_id: str, key: str) -> None:
        await self.call("put_end", OwnedKeyRequest(client_id, key), OkReply)

    async def put_revoke(self, client_id: str, key: str) -> None:
        await self.call("put_revoke", OwnedKeyRequest(client_id, key), OkReply)

    async def batch_put_start(self, client_id: str, keys: list[str], sizes: list[int],
                              config: ReplicateConfig = _DEFAULT_CONFIG) -> list[PutStartItem]:
        req = BatchPutStartRequest(client_id=client_id, keys=keys, sizes=sizes, config=config)
        reply = await self.call("batch_put_start", req, BatchPutStartReply)
        if reply.put_timeout_ms > 0:
            self.put_timeout_s = reply.put_timeout_ms / 1000.0
        return reply.items

    async def batch_put_end(self, client_id: str, keys: list[str]) -> list[int]:
        return (await self.call("batch_put_end", OwnedKeysRequest(client_id, keys),
                                CodesReply)).codes

    async def batch_put_revoke(self, client_id: str, keys: list[str]) -> list[int]:
        return (await self.call("batch_put_revoke", OwnedKeysRequest(client_id, keys),
                                CodesReply)).codes

    # -- added replicas (hot-spot replication, see .replication) ------------------------------

    async def replica_start(self, client_id: str, key: str, segment: str) -> ReplicaStartReply:
        """Reserve a replica of ``key`` on ``segment``: where to copy to, and from."""
        req = ReplicaStartRequest(client_id=client_id, key=key, segment=segment)
        return await self.call("replica_start", req, ReplicaStartReply)

    async def replica_end(self, client_id: str, key: str) -> None:
        await self.call("replica_end", OwnedKeyRequest(client_id, key), OkReply)

    async def replica_revoke(self, client_id: str, key: str) -> None:
        await self.call("replica_revoke", OwnedKeyRequest(client_id, key), OkReply)

    async def batch_replica_start(self, client_id: str, keys: list[str],
                                  segment: str) -> BatchReplicaStartReply:
        req = BatchReplicaStartRequest(client_id=client_id, keys=keys, segment=segment)
        return await self.call("batch_replica_start", req, BatchReplicaStartReply)

    async def batch_replica_end(self, client_id: str, keys: list[str]) -> list[int]:
        return (await self.call("batch_replica_end", OwnedKeysRequest(client_id, keys),
                                CodesReply)).codes

    async def batch_replica_revoke(self, client_id: str, keys: list[str]) -> list[int]:
        return (await self.call("batch_replica_revoke", OwnedKeysRequest(client_id, keys),
                                CodesReply)).codes

    # -- reads and removal ---------------------------------------------------------------------

    async def get_replica_list(self, key: str) -> GetReplicaListReply:
        return await self.call("get_replica_list", KeyRequest(key), GetReplicaListReply)

    async def batch_get_replica_list(self, keys: list[str]) -> BatchGetReplicaListReply:
        return await self.call("batch_get_replica_list", KeysRequest(keys),
                               BatchGetReplicaListReply)

    async def exists(self, key: str, grant_lease: bool = False) -> bool:
        return (await self.call("exists", ExistsRequest(key, grant_lease), ExistsReply)).exists

    async def batch_exists(self, keys: list[str], grant_lease: bool = False) -> list[bool]:
        return (await self.call("batch_exists", BatchKeysRequest(keys, grant_lease),
                                BatchExistsReply)).exists

    async def remove(self, key: str, force: bool = False) -> None:
        await self.call("remove", RemoveRequest(key, force), OkReply)

    async def batch_remove(self, keys: list[str]) -> list[int]:
        return (await self.call("batch_remove", KeysRequest(keys), CodesReply)).codes

    async def remove_all(self, force: bool = False) -> int:
        return (await self.call("remove_all", RemoveAllRequest(force), RemoveAllReply)).removed

    async def stats(self) -> StatsReply:
        return await self.call("stats", StatsRequest(), StatsReply)

    # -- SSD tier ------------------------------------------------------------------------------

    async def take_demotions(self, client_id: str) -> list[DemoteTask]:
        """Demotions of objects whose memory replica this client holds (see .demotion)."""
        return (await self.call("take_demotions", TakeDemotionsRequest(client_id),
                                TakeDemotionsReply)).tasks

    async def demote_end(self, client_id: str, done: list[int], failed: list[int]) -> list[int]:
        """Report copied (``done``) and failed demotions; returns the ids published."""
        return (await self.call("demote_end", DemoteEndRequest(client_id, done, failed),
                                DemoteEndReply)).published


def _retryable(e: RpcError) -> bool:
    return isinstance(e, RpcConnectionError) or e.code == _NOT_LEADER


class SyncMasterClient:
    """Blocking wrapper: runs a :class:`MasterClient` on a background loop; thread-safe."""

    def __init__(self, address: str | None = None, *, loop: BackgroundLoop | None = None,
                 **kwargs: object) -> None:
        self._loop = loop if loop is not None else get_background_loop()
        self.client = MasterClient(address, **kwargs)  # type: ignore[arg-type]
        self._loop.on_stop(self.client.close)

    def _run(self, coro: object) -> R:  # type: ignore[type-var]
        return self._loop.run(coro)  # type: ignore[arg-type]

    def close(self) -> None:
        self._loop.run(self.client.close())

    def __enter__(self) -> SyncMasterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mount_segment(self, segment: SegmentDesc, objects: Sequence[RemountObject] = ()) -> int:
        return self._run(self.client.mount_segment(segment, objects))

    def unmount_segment(self, client_id: str, name: str) -> int:
        return self._run(self.client.unmount_segment(client_id, name))

    def ping(self, client_id: str) -> PingReply:
        return self._run(self.client.ping(client_id))

    def put_start(self, client_id: str, key: str, size: int,
                  config: ReplicateConfig = _DEFAULT_CONFIG) -> list[ReplicaDesc]:
        return self._run(self.client.put_start(client_id, key, size, config))

    def put_end(self, client_id: str, key: str) -> None:
        self._run(self.client.put_end(client_id, key))

    def put_revoke(self, client_id: str, key: str) -> None:
        self._run(self.client.put_revoke(client_id, key))

    def batch_put_start(self, client_id: str, keys: list[str], sizes: list[int],
                        config: ReplicateConfig = _DEFAULT_CONFIG) -> list[PutStartItem]:
        return self._run(self.client.batch_put_start(client_id, keys, sizes, config))

    def batch_put_end(self, client_id: str, keys: list[str]) -> list[int]:
        return self._run(self.client.batch_put_end(client_id, keys))

    def batch_put_revoke(self, client_id: str, keys: list[str]) -> list[int]:
        return self._run(self.client.batch_put_revoke(client_id, keys))

    def replica_start(self, client_id: str, key: str, segment: str) -> ReplicaStartReply:
        return self._run(self.client.replica_start(client_id, key, segment))

    def replica_end(self, client_id: str, key: str) -> None:
        self._run(self.client.replica_end(client_id, key))

    def replica_revoke(self, client_id: str, key: str) -> None:
        self._run(self.client.replica_revoke(client_id, key))

    def batch_replica_start(self, client_id: str, keys: list[str],
                            segment: str) -> BatchReplicaStartReply:
        return self._run(self.client.batch_replica_start(client_id, keys, segment))

    def batch_replica_end(self, client_id: str, keys: list[str]) -> list[int]:
        return self._run(self.client.batch_replica_end(client_id, keys))

    def batch_replica_revoke(self, client_id: str, keys: list[str]) -> list[int]:
        return self._run(self.client.batch_replica_revoke(client_id, keys))

    def get_replica_list(self, key: str) -> GetReplicaListReply:
        return self._run(self.client.get_replica_list(key))

    def batch_get_replica_list(self, keys: list[str]) -> BatchGetReplicaListReply:
        return self._run(self.client.batch_get_replica_list(keys))

    def exists(self, key: str, grant_lease: bool = False) -> bool:
        return self._run(self.client.exists(key, grant_lease))

    def batch_exists(self, keys: list[str], grant_lease: bool = False) -> list[bool]:
        return self._run(self.client.batch_exists(keys, grant_lease))

    def remove(self, key: str, force: bool = False) -> None:
        self._run(self.client.remove(key, force))

    def batch_remove(self, keys: list[str]) -> list[int]:
        return self._run(self.client.batch_remove(keys))

    def remove_all(self, force: bool = False) -> int:
        return self._run(self.client.remove_all(force))

    def stats(self) -> StatsReply:
        return self._run(self.client.stats())
