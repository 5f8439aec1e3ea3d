"""Announce an engine in etcd so that proxies find it: ``mooncake/instances/<role>/<id>``.

Why in the connector: the connector is the one piece that runs inside every engine and knows
both the engine's KV key namespace and (from its extra config) the URL clients reach it at. The
record lives on an etcd lease that :class:`transfer.metadata.etcd.EtcdMetadataStore` keeps alive,
so it disappears within ``ttl`` seconds of the engine dying, and proxies drop the instance.

Wire contract (read by ``scheduler.proxy.discovery``): the key is
``mooncake/instances/<role>/<id>`` with role ``prefill``, ``decode`` or ``mixed``, and the value
is a JSON object ``{"url": ..., "role": ..., "id": ..., "namespace": {KeyNamespace fields}}``.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from transfer.metadata.etcd import EtcdMetadataStore
from transfer.rpc.loop import BackgroundLoop

__all__ = ["INSTANCES_PREFIX", "InstanceRecord", "Registration", "instance_key",
           "role_of_kv_role", "register_in_background"]

log = logging.getLogger(__name__)
INSTANCES_PREFIX = "mooncake/instances/"
ROLES = ("prefill", "decode", "mixed")
_ID_RE = re.compile(r"^[A-Za-z0-9._:@\-]{1,200}$")


def role_of_kv_role(kv_role: str | None) -> str:
    """vLLM's ``kv_role`` as a proxy role: producer prefills, consumer decodes, both is mixed."""
    return {"kv_producer": "prefill", "kv_consumer": "decode"}.get(kv_role or "", "mixed")


def instance_key(role: str, instance_id: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role {role!r} not in {ROLES}")
    if not _ID_RE.match(instance_id):
        raise ValueError(f"instance id {instance_id!r}: 1-200 characters of [A-Za-z0-9._:@-]")
    return f"{INSTANCES_PREFIX}{role}/{instance_id}"


class InstanceRecord:
    """What one engine announces; ``encode`` is the exact value stored in etcd."""

    def __init__(self, url: str, role: str, namespace: dict[str, Any] | None = None,
                 instance_id: str | None = None, store_segment: str = "") -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"advertise_url {url!r}: expected http(s)://host:port")
        self.url = url.rstrip("/")
        self.role = role
        self.id = instance_id or f"{role}@{parsed.netloc}"
        self.namespace = dict(namespace or {})
        self.store_segment = store_segment
        """The store segment next to this engine (hot-spot replication copies prefixes there)."""
        self.key = instance_key(role, self.id)

    def encode(self) -> bytes:
        record: dict[str, Any] = {"url": self.url, "role": self.role, "id": self.id,
                                  "namespace": self.namespace}
        if self.store_segment:
            record["store_segment"] = self.store_segment
        return json.dumps(record, sort_keys=True).encode()


class Registration:
    """One engine's record in etcd, kept alive by a lease until :meth:`close` (or death)."""

    def __init__(self, endpoints: str | Sequence[str], record: InstanceRecord, *,
                 ttl: float = 10.0) -> None:
        self.record = record
        self.ttl = ttl
        self._store = EtcdMetadataStore(endpoints)

    async def start(self) -> "Registration":
        await self._store.put(self.record.key, self.record.encode(), ttl=self.ttl)
        log.info("registered %s at %s in etcd", self.record.url, self.record.key)
        return self

    async def close(self) -> None:
        """Revoke the lease: proxies see the instance leave at once, not after the TTL."""
        await self._store.close()


def register_in_background(endpoints: str | Sequence[str], record: InstanceRecord, *,
                           ttl: float = 10.0) -> tuple[Registration, BackgroundLoop]:
    """For synchronous callers (the connector inside vLLM): register on a loop thread of its own.

    The lease's keep-alive runs on that thread for the life of the process; when the process
    dies the lease expires after ``ttl`` seconds.
    """
    loop = BackgroundLoop(name="mooncake-registration")
    reg = Registration(endpoints, record, ttl=ttl)
    loop.run(reg.start(), timeout=30.0)
    return reg, loop
