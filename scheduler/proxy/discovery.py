"""Instances discovered from etcd: engines announce themselves, proxies follow.

Why polling a prefix: every proxy replica must see the same fleet, and etcd is the one shared
place. Engines (their connector, see ``mooncake_connector.registry``) write
``mooncake/instances/<role>/<id>`` = ``{"url", "role", "id", "namespace"}`` on a lease; a dead
engine's lease runs out and its key vanishes. One ``list(prefix)`` per interval is a single
range read, cheap for fleets of thousands, and it survives etcd restarts and failovers without
the bookkeeping a watch needs (lost revisions, compaction). Health checks still decide whether a
listed instance gets traffic.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence

from scheduler.proxy.instances import InstanceSpec

__all__ = ["INSTANCES_PREFIX", "EtcdDiscovery", "parse_record"]

log = logging.getLogger(__name__)
INSTANCES_PREFIX = "mooncake/instances/"
MAX_RECORD_BYTES = 64 << 10


def parse_record(key: str, value: bytes) -> InstanceSpec:
    """One etcd record as an :class:`InstanceSpec`; ``ValueError`` names what is wrong."""
    if len(value) > MAX_RECORD_BYTES:
        raise ValueError(f"{key}: record of {len(value)} bytes is over {MAX_RECORD_BYTES}")
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{key}: not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        raise ValueError(f"{key}: expected an object with a 'url'")
    parts = key[len(INSTANCES_PREFIX):].split("/", 1)
    if len(parts) != 2 or not parts[1]:
        raise ValueError(f"{key}: expected {INSTANCES_PREFIX}<role>/<id>")
    role, instance_id = parts
    if data.get("role", role) != role:
        raise ValueError(f"{key}: record says role {data.get('role')!r}")
    namespace = data.get("namespace") or {}
    if not isinstance(namespace, dict):
        raise ValueError(f"{key}: 'namespace' must be an object")
    segment = data.get("store_segment", "")
    if not isinstance(segment, str):
        raise ValueError(f"{key}: 'store_segment' must be a string")
    return InstanceSpec(url=data["url"], role=role, id=instance_id, namespace=namespace,
                        store_segment=segment)


class EtcdDiscovery:
    """Poll ``mooncake/instances/`` and report instances that appear, change or vanish."""

    def __init__(self, endpoints: str | Sequence[str], *, on_add: Callable[[InstanceSpec], None],
                 on_remove: Callable[[str], None], interval: float = 1.0,
                 prefix: str = INSTANCES_PREFIX) -> None:
        from transfer.metadata.etcd import EtcdMetadataStore  # needs the optional aetcd

        self.store = EtcdMetadataStore(endpoints)
        self.on_add = on_add
        self.on_remove = on_remove
        self.interval = interval
        self.prefix = prefix
        self.known: dict[str, InstanceSpec] = {}
        self._task: asyncio.Task[None] | None = None
        self._bad: set[str] = set()

    async def start(self) -> None:
        """One synchronous poll (so the proxy starts with the fleet), then poll in background."""
        try:
            await self.poll()
        except Exception as exc:  # etcd down at start: keep trying in the background
            log.warning("etcd discovery: first poll failed: %s", exc)
        self._task = asyncio.create_task(self._loop(), name="etcd-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.store.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception as exc:  # keep the last known fleet while etcd is unreachable
                log.warning("etcd discovery poll failed (keeping %d instances): %s",
                            len(self.known), exc)

    async def poll(self) -> None:
        """List the prefix once and apply the difference to the pool."""
        records = await self.store.list(self.prefix)
        seen: dict[str, InstanceSpec] = {}
        for key, value in records.items():
            try:
                spec = parse_record(key, value)
            except ValueError as exc:
                if key not in self._bad:
                    log.warning("etcd discovery: ignoring %s", exc)
                    self._bad.add(key)
                continue
            seen[spec.id] = spec
        for instance_id in [i for i in self.known if i not in seen]:
            log.info("etcd discovery: instance %s left", instance_id)
            del self.known[instance_id]
            self.on_remove(instance_id)
        for instance_id, spec in seen.items():
            if self.known.get(instance_id) != spec:
                log.info("etcd discovery: instance %s (%s) at %s", instance_id, spec.role, spec.url)
                self.known[instance_id] = spec
                self.on_add(spec)
