"""The master's RPC surface: typed handlers over the store, registered on an RpcServer.

Every handler is synchronous and runs inline on the RPC loop (no task per request): the store
is single-threaded by design and a batch of 256 keys is handled in one call. Single-key calls
report failure as an RPC application error (:class:`~store.master.errors.MasterError`); batch
calls report a per-item code (0 = OK) so one bad key does not fail its 255 neighbours.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from transfer.rpc import RpcServer

from .errors import MasterError, MasterErrorCode
from .eviction import Evictor
from .liveness import ClientRegistry
from .messages import (
    MAX_BATCH,
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
    PutCommitRequest,
    PutStartRequest,
    RemoveAllReply,
    RemoveAllRequest,
    RemoveRequest,
    ReplicaListItem,
    ReplicaStartItem,
    ReplicaStartReply,
    ReplicaStartRequest,
    ReserveReply,
    ReserveRequest,
    StatsReply,
    StatsRequest,
    TakeDemotionsReply,
    TakeDemotionsRequest,
    UnmountSegmentReply,
    UnmountSegmentRequest,
)
from .objects import ObjectStore
from .replication import Replications
from .tenants import Tenancy

__all__ = ["MasterService"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Observer = Callable[[str, float], None]

_OK = 0
_OK_REPLY = OkReply()


def _check_batch(n: int) -> None:
    if n > MAX_BATCH:
        raise MasterError(MasterErrorCode.INVALID_PARAMS,
                          f"batch of {n} keys exceeds the limit of {MAX_BATCH}")


class MasterService:
    """Handlers for one store; :meth:`register` puts them on an :class:`RpcServer`."""

    def __init__(self, store: ObjectStore, clients: ClientRegistry, evictor: Evictor,
                 *, observe: Observer | None = None, tenancy: Tenancy | None = None) -> None:
        self.store = store
        self.clients = clients
        self.evictor = evictor
        self.replications = Replications(store)
        self.view_version = random.getrandbits(62) | 1
        self.serving = True
        """Cleared when this master loses leadership: every call then fails clearly."""
        self._observe = observe
        self.tenancy = tenancy
        """Multi-tenant masters scope every handler to the caller's tenant (see .tenants)."""

    def register(self, server: RpcServer) -> None:
        """Register every master method on ``server``."""
        methods: list[tuple[str, type[Any], type[Any], Callable[[Any], Any]]] = [
            ("mount_segment", MountSegmentRequest, MountSegmentReply, self.mount_segment),
            ("unmount_segment", UnmountSegmentRequest, UnmountSegmentReply, self.unmount_segment),
            ("ping", PingRequest, PingReply, self.ping),
            ("put_start", PutStartRequest, PutStartReply, self.put_start),
            ("put_end", OwnedKeyRequest, OkReply, self.put_end),
            ("put_revoke", OwnedKeyRequest, OkReply, self.put_revoke),
            ("batch_put_start", BatchPutStartRequest, BatchPutStartReply, self.batch_put_start),
            ("batch_put_end", OwnedKeysRequest, CodesReply, self.batch_put_end),
            ("batch_put_revoke", OwnedKeysRequest, CodesReply, self.batch_put_revoke),
            ("reserve_space", ReserveRequest, ReserveReply, self.reserve_space),
            ("put_commit", PutCommitRequest, OkReply, self.put_commit),
            ("get_replica_list", KeyRequest, GetReplicaListReply, self.get_replica_list),
            ("batch_get_replica_list", KeysRequest, BatchGetReplicaListReply,
             self.batch_get_replica_list),
            ("exists", ExistsRequest, ExistsReply, self.exists),
            ("batch_exists", BatchKeysRequest, BatchExistsReply, self.batch_exists),
            ("remove", RemoveRequest, OkReply, self.remove),
            ("batch_remove", KeysRequest, CodesReply, self.batch_remove),
            ("remove_all", RemoveAllRequest, RemoveAllReply, self.remove_all),
            ("stats", StatsRequest, StatsReply, self.stats),
            ("replica_start", ReplicaStartRequest, ReplicaStartReply, self.replica_start),
            ("replica_end", OwnedKeyRequest, OkReply, self.replica_end),
            ("replica_revoke", OwnedKeyRequest, OkReply, self.replica_revoke),
            ("batch_replica_start", BatchReplicaStartRequest, BatchReplicaStartReply,
             self.batch_replica_start),
            ("batch_replica_end", OwnedKeysRequest, CodesReply, self.batch_replica_end),
            ("batch_replica_revoke", OwnedKeysRequest, CodesReply, self.batch_replica_revoke),
            ("take_demotions", TakeDemotionsRequest, TakeDemotionsReply, self.take_demotions),
            ("demote_end", DemoteEndRequest, DemoteEndReply, self.demote_end),
        ]
        for name, req, resp, handler in methods:
            if self.tenancy is not None:
                handler = self.tenancy.guard(name, handler)
            server.register(name, req, resp, self._wrap(name, handler))

    def _wrap(self, name: str, handler: Callable[[Req], Resp]) -> Callable[[Req], Resp]:
        observe = self._observe
        perf = time.perf_counter

        def call(request: Req) -> Resp:
            if not self.serving:
                raise MasterError(MasterErrorCode.UNAVAILABLE_IN_CURRENT_STATUS,
                                  "this master is not the leader; look it up again")
            if observe is None:
                return handler(request)
            t0 = perf()
            try:
                return handler(request)
            finally:
                observe(name, perf() - t0)

        call.__name__ = name
        return call

    # -- segments and clients -----------------------------------------------------------------

    def mount_segment(self, req: MountSegmentRequest) -> MountSegmentReply:
        reply = self.store.mount(req.segment, req.objects)
        self.clients.mounted(req.segment.client_id, req.segment.name)
        return reply

    def unmount_segment(self, req: UnmountSegmentRequest) -> UnmountSegmentReply:
        lost = self.store.unmount(req.name, req.client_id)
        self.clients.unmounted(req.client_id, req.name)
        return UnmountSegmentReply(lost)

    def ping(self, req: PingRequest) -> PingReply:
        if not req.client_id:
            raise MasterError(MasterErrorCode.INVALID_PARAMS, "client_id must not be empty")
        return PingReply(self.clients.ping(req.client_id), self.view_version,
                         self.evictor.demoter.active)

    # -- SSD tier (see .demotion) ---------------------------------------------------------------

    def take_demotions(self, req: TakeDemotionsRequest) -> TakeDemotionsReply:
        return TakeDemotionsReply(self.evictor.demoter.take(req.client_id))

    def demote_end(self, req: DemoteEndRequest) -> DemoteEndReply:
        _check_batch(len(req.done) + len(req.failed))
        demoter = self.evictor.demoter
        published = [i for i in req.done if demoter.end(req.client_id, i, True)]
        for i in req.failed:
            demoter.end(req.client_id, i, False)
        return DemoteEndReply(published)

    # -- puts ---------------------------------------------------------------------------------

    def put_start(self, req: PutStartRequest) -> PutStartReply:
        self.evictor.run()
        return PutStartReply(self.store.put_start(req.client_id, req.key, req.size, req.config))

    def put_end(self, req: OwnedKeyRequest) -> OkReply:
        self.store.put_end(req.client_id, req.key)
        return _OK_REPLY

    def put_revoke(self, req: OwnedKeyRequest) -> OkReply:
        self.store.put_revoke(req.client_id, req.key)
        return _OK_REPLY

    def batch_put_start(self, req: BatchPutStartRequest) -> BatchPutStartReply:
        keys, sizes = req.keys, req.sizes
        _check_batch(len(keys))
        if len(sizes) != len(keys):
            raise MasterError(MasterErrorCode.INVALID_PARAMS,
                              f"{len(keys)} keys but {len(sizes)} sizes")
        self.evictor.run()
        store = self.store
        now = store.clock()
        client, config = req.client_id, req.config
        items = []
        for key, size in zip(keys, sizes):
            try:
                items.append(PutStartItem(_OK, store.put_start(client, key, size, config, now)))
            except MasterError as e:
                items.append(PutStartItem(int(e.code), []))
        return BatchPutStartReply(items, int(self.clients.put_timeout * 1000))

    def batch_put_end(self, req: OwnedKeysRequest) -> CodesReply:
        return CodesReply(_each(self.store.put_end, req.client_id, req.keys))

    def batch_put_revoke(self, req: OwnedKeysRequest) -> CodesReply:
        return CodesReply(_each(self.store.put_revoke, req.client_id, req.keys))

    # -- puts from space reserved ahead (see .reservations) ---------------------------------

    def reserve_space(self, req: ReserveRequest) -> ReserveReply:
        if not req.client_id or req.size <= 0:
            raise MasterError(MasterErrorCode.INVALID_PARAMS,
                              "reserve_space needs a client_id and a positive size")
        self.evictor.run()
        ttl = self.clients.put_timeout
        res = self.store.reservations.reserve(req.client_id, req.size, ttl, req.release)
        seg = res.segment
        return ReserveReply(res.id, seg.name, seg.base + res.front, res.end - res.front,
                            seg.allocator.alignment, int(ttl * 1000))

    def put_commit(self, req: PutCommitRequest) -> OkReply:
        config = req.config
        if config.replica_num != 1 or config.preferred_segment or config.preferred_segments:
            raise MasterError(MasterErrorCode.INVALID_PARAMS,
                              "a commit from reserved space is one replica where the space is; "
                              "use put_start for more replicas or preferred segments")
        self.store.reservations.commit(req.client_id, req.reservation, req.key, req.size,
                                       req.address, config)
        return _OK_REPLY

    # -- added replicas (see .replication) -----------------------------------------------------

    def replica_start(self, req: ReplicaStartRequest) -> ReplicaStartReply:
        self.evictor.run()
        target, sources = self.replications.start(req.client_id, req.key, req.segment)
        return ReplicaStartReply(target, sources, self.store.lease_ttl_ms)

    def replica_end(self, req: OwnedKeyRequest) -> OkReply:
        self.replications.end(req.client_id, req.key)
        return _OK_REPLY

    def replica_revoke(self, req: OwnedKeyRequest) -> OkReply:
        self.replications.revoke(req.client_id, req.key)
        return _OK_REPLY

    def batch_replica_start(self, req: BatchReplicaStartRequest) -> BatchReplicaStartReply:
        _check_batch(len(req.keys))
        self.evictor.run()
        start = self.replications.start
        now = self.store.clock()
        items = []
        for key in req.keys:
            try:
                target, sources = start(req.client_id, key, req.segment, now)
                items.append(ReplicaStartItem(_OK, target, sources))
            except MasterError as e:
                items.append(ReplicaStartItem(int(e.code), None, []))
        return BatchReplicaStartReply(items, self.store.lease_ttl_ms)

    def batch_replica_end(self, req: OwnedKeysRequest) -> CodesReply:
        return CodesReply(_each(self.replications.end, req.client_id, req.keys))

    def batch_replica_revoke(self, req: OwnedKeysRequest) -> CodesReply:
        return CodesReply(_each(self.replications.revoke, req.client_id, req.keys))

    # -- reads --------------------------------------------------------------------------------

    def get_replica_list(self, req: KeyRequest) -> GetReplicaListReply:
        return GetReplicaListReply(self.store.get_replica_list(req.key), self.store.lease_ttl_ms)

    def batch_get_replica_list(self, req: KeysRequest) -> BatchGetReplicaListReply:
        _check_batch(len(req.keys))
        store = self.store
        now = store.clock()
        items = [ReplicaListItem(*store.lookup(key, now)) for key in req.keys]
        return BatchGetReplicaListReply(items, store.lease_ttl_ms)

    def exists(self, req: ExistsRequest) -> ExistsReply:
        store = self.store
        found = store.exists(req.key, req.grant_lease, store.clock())
        return ExistsReply(found, store.lease_ttl_ms if found and req.grant_lease else 0)

    def batch_exists(self, req: BatchKeysRequest) -> BatchExistsReply:
        _check_batch(len(req.keys))
        store = self.store
        found = store.batch_exists(req.keys, req.grant_lease)
        return BatchExistsReply(found, store.lease_ttl_ms if req.grant_lease else 0)

    # -- removal ------------------------------------------------------------------------------

    def remove(self, req: RemoveRequest) -> OkReply:
        self.store.remove(req.key, req.force)
        return _OK_REPLY

    def batch_remove(self, req: KeysRequest) -> CodesReply:
        _check_batch(len(req.keys))
        store = self.store
        now = store.clock()
        codes = []
        for key in req.keys:
            try:
                store.remove(key, False, now)
                codes.append(_OK)
            except MasterError as e:
                codes.append(int(e.code))
        return CodesReply(codes)

    def remove_all(self, req: RemoveAllRequest) -> RemoveAllReply:
        return RemoveAllReply(self.store.remove_all(req.force))

    def stats(self, req: StatsRequest) -> StatsReply:
        store = self.store
        segs = store.segments
        return StatsReply(
            objects=len(store.objects), bytes=store.stored_bytes,
            capacity=segs.memory_capacity, used=segs.memory_used, segments=len(segs),
            clients=len(self.clients), evicted_objects=self.evictor.evicted_objects,
            view_version=self.view_version, demoted_objects=self.evictor.demoter.demoted_objects)


def _each(op: Callable[[str, str], None], client_id: str, keys: list[str]) -> list[int]:
    _check_batch(len(keys))
    codes = []
    for key in keys:
        try:
            op(client_id, key)
            codes.append(_OK)
        except MasterError as e:
            codes.append(int(e.code))
    return codes
