"""High availability: leader election through an etcd lease, and leader discovery for clients.

Election: every master tries to *create* ``mooncake-store/master/leader`` holding its RPC
address, attached to a lease of ``ttl`` seconds that it keeps alive (a compare-and-set with
"must not exist", so exactly one wins). Standbys poll the key; when the leader dies its lease
runs out, the key vanishes and the next standby's create succeeds - takeover takes at most
``ttl`` plus one poll interval. A leader that finds the key gone or someone else's steps down.

Metadata across failover: **rebuilt from clients, not persisted in etcd.** A new leader starts
empty; clients learn it from their next heartbeat (``known=False``, a new ``view_version``) and
remount their segments passing the complete objects each holds (``mount_segment`` with
``objects``), from which the leader rebuilds objects, replicas and allocators. This is what
Mooncake does; it keeps etcd out of the hot path (a put would otherwise cost an etcd write),
and the clients hold the data anyway - an object whose holder is gone is lost with or without
persisted metadata. Puts in flight at failover are lost: their writers get a connection error
and retry on the new leader.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from transfer.metadata.base import MetadataError

__all__ = ["LEADER_KEY", "LeaderElection", "afind_master", "find_master"]

logger = logging.getLogger(__name__)

LEADER_KEY = "mooncake-store/master/leader"


class LeaderElection:
    """Campaign for, hold and give up the leader key of one master."""

    def __init__(self, endpoints: str | Sequence[str], address: str, *, ttl: float = 2.0,
                 poll_interval: float = 0.2, key: str = LEADER_KEY) -> None:
        self.address = address
        self.ttl = ttl
        self.poll_interval = poll_interval
        self.key = key
        from transfer.metadata.etcd import EtcdMetadataStore  # needs the optional aetcd

        self._etcd = EtcdMetadataStore(endpoints, timeout=max(1.0, ttl))
        self.is_leader = False

    async def campaign(self) -> None:
        """Return once this master holds the leader key (wait while another does)."""
        value = self.address.encode()
        logged = False
        while True:
            try:
                current = await self._etcd.get(self.key)
                if current is None and await self._etcd.compare_and_set(
                        self.key, value, None, ttl=self.ttl):
                    self.is_leader = True
                    logger.info("elected leader at %s", self.address)
                    return
                if current == value:  # our own key from a previous life: wait for it to expire
                    pass
                elif not logged and current is not None:
                    logger.info("standing by: leader is %s", current.decode(errors="replace"))
                    logged = True
            except MetadataError as e:
                logger.warning("election: etcd unavailable, retrying: %s", e)
            await asyncio.sleep(self.poll_interval)

    async def watch(self) -> None:
        """Return when leadership is lost (the key expired or names another master)."""
        value = self.address.encode()
        failures_since: float | None = None
        while True:
            await asyncio.sleep(min(self.poll_interval * 2, self.ttl / 3))
            try:
                current = await self._etcd.get(self.key)
            except MetadataError as e:
                # Cannot confirm: after a full TTL without etcd another master may lead.
                now = time.monotonic()
                failures_since = failures_since or now
                if now - failures_since >= self.ttl:
                    logger.error("lost contact with etcd for %.1fs: stepping down: %s",
                                 self.ttl, e)
                    break
                continue
            failures_since = None
            if current != value:
                logger.error("leader key now holds %r: stepping down", current)
                break
        self.is_leader = False

    async def close(self) -> None:
        """Give up the key (if ours) so a standby takes over at once, then close."""
        if self.is_leader:
            with contextlib.suppress(MetadataError):
                found = await self._etcd.get_with_version(self.key)
                if found is not None and found[0] == self.address.encode():
                    await self._etcd.delete(self.key)
            self.is_leader = False
        await self._etcd.close()


async def afind_master(etcd_endpoints: str | Sequence[str], *, timeout: float = 10.0,
                       key: str = LEADER_KEY) -> str:
    """The current leader's ``host:port``, waiting up to ``timeout`` for one to be elected."""
    deadline = time.monotonic() + timeout
    from transfer.metadata.etcd import EtcdMetadataStore  # needs the optional aetcd

    async with EtcdMetadataStore(etcd_endpoints, timeout=min(5.0, max(timeout, 0.5))) as etcd:
        while True:
            try:
                value = await etcd.get(key)
            except MetadataError:
                value = None
                if time.monotonic() >= deadline:
                    raise
            if value:
                return value.decode()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no master leader registered in etcd within {timeout}s")
            await asyncio.sleep(0.1)


def find_master(etcd_endpoints: str | Sequence[str], *, timeout: float = 10.0,
                key: str = LEADER_KEY) -> str:
    """Blocking :func:`afind_master` (call it from a thread without a running event loop)."""
    return asyncio.run(afind_master(etcd_endpoints, timeout=timeout, key=key))
