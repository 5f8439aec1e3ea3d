"""Tenants of the master: proven identities, one key namespace each, byte quotas, metrics.

Why here and not in the store: the object store stays single-namespace and fast; tenancy is a
thin layer at the RPC boundary that (1) lets a client authenticate as a tenant with the tenant's
own secret (the RPC handshake's *identity*, see :func:`transfer.rpc.peer_identity`: the identity
is proven by an HMAC under that tenant's secret, never merely claimed), (2) rewrites every key of
a tenant's request into that tenant's namespace, so a tenant can neither read, test, remove nor
list another tenant's objects (it cannot even name them), and (3) charges the bytes a tenant's
puts reserve against its quota.

Who is who on a multi-tenant master:

* a connection authenticated with the cluster ``auth_secret`` (no identity) is infrastructure:
  store nodes, admin tools. It sees the raw key space and alone may mount segments. Holders of
  that secret are trusted: the same secret guards the transfer engines' data ports;
* a connection authenticated as a tenant sees only its namespace and only object operations;
  segment operations (mount, unmount, demotions) are refused with ``PERMISSION_DENIED``.

Quota: a put_start is refused with ``QUOTA_EXCEEDED`` when the tenant's charged bytes plus
``size * replica_num`` would exceed its quota. A put is charged ``size`` times the replicas it got
and released when the object goes, whatever removes it (remove, revoke, eviction, a lost
segment, a stale put). The master does not evict a tenant's objects to make room under its
quota: which of its objects matter is the tenant's call, so it removes some or lets them be
evicted by the cluster's normal LRU. Replicas added later (``replicate``) and objects rebuilt by
a remount after failover are not charged.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import yaml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from transfer.config import MooncakeConfig, parse_size
from transfer.rpc import peer_identity
from transfer.tls import tls_contexts

from .errors import MasterError, MasterErrorCode
from .messages import (
    BatchPutStartReply,
    BatchPutStartRequest,
    PutStartItem,
    PutStartReply,
    PutStartRequest,
    RemoveAllReply,
    RemoveAllRequest,
    StatsReply,
)
from .objects import ObjectStore

__all__ = ["Tenancy", "Tenant", "load_tenants", "master_credentials"]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAX_FILE = 1 << 20

# Requests whose `key` / `keys` are scoped; everything not listed here is refused to tenants.
_KEY_METHODS = frozenset({"put_end", "put_revoke", "get_replica_list", "exists", "remove",
                          "replica_start", "replica_end", "replica_revoke"})
_KEYS_METHODS = frozenset({"batch_put_end", "batch_put_revoke", "batch_get_replica_list",
                           "batch_exists", "batch_remove", "batch_replica_start",
                           "batch_replica_end", "batch_replica_revoke"})
_OPEN_METHODS = frozenset({"ping"})
_QUOTA = int(MasterErrorCode.QUOTA_EXCEEDED)

Handler = Callable[[Any], Any]


@dataclass(frozen=True)
class Tenant:
    """One tenant: its id, its secret and its quota in bytes (0 = unlimited)."""

    id: str
    secret: bytes
    quota: int = 0

    def __repr__(self) -> str:
        return f"Tenant(id={self.id!r}, secret=<redacted>, quota={self.quota})"


def load_tenants(path: str | os.PathLike[str]) -> dict[str, Tenant]:
    """Read a tenants file (YAML or JSON)::

        tenants:
          team-a: {secret: "a long random string", quota: 10GiB}
          team-b: {secret: "another one"}            # no quota

    Raises :class:`ValueError` naming the file and the tenant for anything malformed.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE + 1)
    except OSError as e:
        raise ValueError(f"cannot read tenants file {os.fspath(path)!r}: {e}") from None
    if len(raw) > _MAX_FILE:
        raise ValueError(f"tenants file {os.fspath(path)!r} is over {_MAX_FILE} bytes")
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"tenants file {os.fspath(path)!r} is not YAML/JSON: {e}") from None
    entries = doc.get("tenants") if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"tenants file {os.fspath(path)!r} needs a non-empty 'tenants' mapping")
    return {tid: _tenant(os.fspath(path), tid, spec) for tid, spec in entries.items()}


def _tenant(path: str, tid: object, spec: object) -> Tenant:
    where = f"tenants file {path!r}, tenant {tid!r}"
    if not isinstance(tid, str) or not _ID.fullmatch(tid):
        raise ValueError(f"{where}: ids are 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
    if not isinstance(spec, dict) or set(spec) - {"secret", "quota"}:
        raise ValueError(f"{where}: expected a mapping with 'secret' and optional 'quota'")
    secret = spec.get("secret")
    if not isinstance(secret, str) or not secret:
        raise ValueError(f"{where}: 'secret' must be a non-empty string")
    try:
        quota = parse_size(spec.get("quota", 0))
    except ValueError as e:
        raise ValueError(f"{where}: bad quota: {e}") from None
    return Tenant(tid, secret.encode("utf-8"), quota)


def master_credentials(config: MooncakeConfig) -> dict[str, Any]:
    """``secret``, ``identity`` and ``tls`` keyword arguments for an RPC client of the master:
    the tenant's (``store.tenant_id``/``tenant_secret``) if configured, else the cluster's."""
    s = config.store
    tls = tls_contexts(config)
    creds: dict[str, Any] = ({"secret": s.tenant_secret, "identity": s.tenant_id}
                             if s.tenant_id else {"secret": config.auth_secret})
    creds["tls"] = None if tls is None else tls.client
    return creds


class _Usage:
    __slots__ = ("bytes", "objects", "rejections", "tenant")

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.bytes = 0
        self.objects = 0
        self.rejections = 0


class Tenancy:
    """The tenants of one master; :meth:`guard` wraps each RPC handler."""

    def __init__(self, tenants: Mapping[str, Tenant], store: ObjectStore) -> None:
        self.store = store
        self._usage = {tid: _Usage(t) for tid, t in tenants.items()}
        self._prefix = {tid: f"{tid}/" for tid in tenants}
        self._charges: dict[str, tuple[_Usage, int]] = {}
        store.on_drop = self._dropped

    @staticmethod
    def key_of(tenant_id: str, key: str) -> str:
        """The store key under which ``tenant_id``'s ``key`` lives (for infrastructure tools)."""
        return f"{tenant_id}/{key}"

    def secret_of(self, identity: str) -> bytes | None:
        """The RPC server's identity resolver: a tenant's secret, ``None`` if unknown."""
        usage = self._usage.get(identity)
        return None if usage is None else usage.tenant.secret

    def usage(self, tenant_id: str) -> tuple[int, int, int]:
        """``(charged bytes, objects, quota rejections)`` of a tenant."""
        u = self._usage[tenant_id]
        return u.bytes, u.objects, u.rejections

    # -- accounting ---------------------------------------------------------------------------

    def _charge(self, usage: _Usage, key: str, size: int) -> None:
        self._charges[key] = (usage, size)
        usage.bytes += size
        usage.objects += 1

    def _dropped(self, key: str) -> None:
        entry = self._charges.pop(key, None)
        if entry is not None:
            usage, size = entry
            usage.bytes -= size
            usage.objects -= 1

    def _admit(self, usage: _Usage, planned: int, need: int) -> bool:
        quota = usage.tenant.quota
        if quota and usage.bytes + planned + need > quota:
            usage.rejections += 1
            return False
        return True

    # -- handlers -----------------------------------------------------------------------------

    def guard(self, method: str, handler: Handler) -> Handler:
        """``handler`` as infrastructure sees it, scoped to the caller's tenant otherwise."""
        scoped = self._scoped(method, handler)

        def call(request: Any) -> Any:
            tid = peer_identity()
            if tid is None:
                return handler(request)
            usage = self._usage.get(tid)
            if usage is None:  # authenticated as an identity that is not a tenant
                raise MasterError(MasterErrorCode.PERMISSION_DENIED, "unknown tenant")
            try:
                return scoped(usage, request)
            except MasterError as e:  # never show the namespace prefix back
                raise MasterError(e.code, e.message.replace(self._prefix[tid], "")) from None

        call.__name__ = method
        return call

    def _scoped(self, method: str, handler: Handler) -> Callable[[_Usage, Any], Any]:
        prefix = self._prefix

        def one(usage: _Usage, req: Any) -> Any:
            return handler(msgspec.structs.replace(req, key=_scope(prefix[usage.tenant.id],
                                                                   req.key)))

        def many(usage: _Usage, req: Any) -> Any:
            p = prefix[usage.tenant.id]
            return handler(msgspec.structs.replace(req, keys=[_scope(p, k) for k in req.keys]))

        def open_(usage: _Usage, req: Any) -> Any:
            return handler(req)

        def denied(usage: _Usage, req: Any) -> Any:
            raise MasterError(MasterErrorCode.PERMISSION_DENIED,
                              f"{method!r} is reserved to the cluster's infrastructure "
                              f"(tenant {usage.tenant.id!r})")

        if method in _KEY_METHODS:
            return one
        if method in _KEYS_METHODS:
            return many
        if method in _OPEN_METHODS:
            return open_
        special = {"put_start": lambda u, r: self._put_start(u, r, handler),
                   "batch_put_start": lambda u, r: self._batch_put_start(u, r, handler),
                   "remove_all": self._remove_all, "stats": lambda u, r: self._stats(u, handler(r))}
        return special.get(method, denied)

    def _put_start(self, usage: _Usage, req: PutStartRequest, handler: Handler) -> Any:
        need = req.size * max(1, req.config.replica_num)
        if req.size > 0 and not self._admit(usage, 0, need):
            raise MasterError(MasterErrorCode.QUOTA_EXCEEDED,
                              f"tenant {usage.tenant.id!r} quota exceeded: {usage.bytes} bytes "
                              f"used + {need} requested > {usage.tenant.quota}")
        key = _scope(self._prefix[usage.tenant.id], req.key)
        reply: PutStartReply = handler(msgspec.structs.replace(req, key=key))
        self._charge(usage, key, req.size * len(reply.replicas))
        return reply

    def _batch_put_start(self, usage: _Usage, req: BatchPutStartRequest,
                         handler: Handler) -> BatchPutStartReply:
        if len(req.keys) != len(req.sizes):
            return handler(req)  # the handler reports the mismatch
        p = self._prefix[usage.tenant.id]
        replicas = max(1, req.config.replica_num)
        admitted: list[int] = []
        planned = 0
        for i, size in enumerate(req.sizes):
            need = size * replicas
            if size > 0 and not self._admit(usage, planned, need):
                continue
            admitted.append(i)
            planned += max(0, need)
        items: list[PutStartItem] = [PutStartItem(_QUOTA, []) for _ in req.keys]
        put_timeout_ms = 0
        if admitted:
            keys = [_scope(p, req.keys[i]) for i in admitted]
            reply: BatchPutStartReply = handler(msgspec.structs.replace(
                req, keys=keys, sizes=[req.sizes[i] for i in admitted]))
            put_timeout_ms = reply.put_timeout_ms
            for i, key, item in zip(admitted, keys, reply.items):
                items[i] = item
                if item.code == 0:
                    self._charge(usage, key, req.sizes[i] * len(item.replicas))
        return BatchPutStartReply(items, put_timeout_ms)

    def _remove_all(self, usage: _Usage, req: RemoveAllRequest) -> RemoveAllReply:
        store = self.store
        p = self._prefix[usage.tenant.id]
        now = store.clock()
        doomed = [k for k, m in store.objects.items()
                  if k.startswith(p) and m.complete and (req.force or m.lease_until <= now)]
        for key in doomed:
            store.drop(key, store.objects[key])
        return RemoveAllReply(len(doomed))

    def _stats(self, usage: _Usage, cluster: StatsReply) -> StatsReply:
        """A tenant's view: its own objects and bytes; its quota as its capacity."""
        return msgspec.structs.replace(
            cluster, objects=usage.objects, bytes=usage.bytes, used=usage.bytes,
            capacity=usage.tenant.quota or cluster.capacity)

    # -- metrics ------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Per-tenant gauges and counters (registered on the master's Prometheus registry)."""
        labels = ["tenant"]
        used = GaugeMetricFamily("mooncake_master_tenant_bytes",
                                 "bytes charged to each tenant (size x replicas)", labels=labels)
        objects = GaugeMetricFamily("mooncake_master_tenant_objects",
                                    "objects of each tenant (complete or not)", labels=labels)
        quota = GaugeMetricFamily("mooncake_master_tenant_quota_bytes",
                                  "each tenant's quota (0 = unlimited)", labels=labels)
        rejected = CounterMetricFamily("mooncake_master_tenant_quota_rejections",
                                       "puts refused with QUOTA_EXCEEDED", labels=labels)
        for tid, u in self._usage.items():
            used.add_metric([tid], u.bytes)
            objects.add_metric([tid], u.objects)
            quota.add_metric([tid], u.tenant.quota)
            rejected.add_metric([tid], u.rejections)
        yield from (used, objects, quota, rejected)


def _scope(prefix: str, key: str) -> str:
    # An empty key stays empty, so the store rejects it (INVALID_KEY / not found) as usual.
    return prefix + key if key else ""
