"""The proxy's hot-spot replicator: copy a hot prefix's blocks to the chosen instance's store node.

Why: when the Conductor routes a request to an instance whose local prefix is much shorter than
the best holder's (``kvcache_balancing_threshold``), it asks for ``replicate_blocks``. Loading
those blocks from another host's store node puts every such request's load on that one node;
a replica on the chosen instance's *local* node (its ``store_segment``, from the instances file or
its etcd record) makes this and later loads local. The copy is the store's own protocol
(:meth:`store.client.AsyncStoreClient.replicate`): the master reserves the replica, this client
moves the bytes through its transfer engine, the master publishes it.

The client lends the pool no memory (``global_segment_size=0``): it only needs a staging buffer
to pass the bytes through, so a proxy restart loses nothing. Blocks already on that segment cost
one master lookup and no copy (the master answers OBJECT_ALREADY_EXISTS for them).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from store.client.core import AsyncStoreClient
from store.client.errors import MasterErrorCode
from transfer.config import MooncakeConfig
from transfer.engine import Engine

from .instances import Instance

__all__ = ["ReplicationError", "StoreReplicator"]

log = logging.getLogger("mooncake.proxy")

_BENIGN = frozenset({0, int(MasterErrorCode.OBJECT_ALREADY_EXISTS),
                     int(MasterErrorCode.OBJECT_NOT_FOUND),
                     int(MasterErrorCode.OBJECT_PUT_IN_PROGRESS)})
"""Outcomes that are not failures: added, already there, evicted/removed meanwhile, or another
replication of the same block by this proxy is already under way."""


class ReplicationError(RuntimeError):
    """Some blocks could not be replicated (no room, segment gone, transfer failed)."""


class StoreReplicator:
    """A :data:`~scheduler.proxy.app.Replicator` backed by a real store client.

    Build it with :meth:`create` on the proxy's event loop; pass the instance itself as
    ``Proxy(..., replicator=...)``; :meth:`close` it after the proxy stops."""

    def __init__(self, client: AsyncStoreClient, engine: Engine) -> None:
        self.client = client
        self.engine = engine
        self.added = 0

    @classmethod
    async def create(cls, master_address: str, config: MooncakeConfig | None = None, *,
                     staging_bytes: int = 64 << 20) -> StoreReplicator:
        """Start a transfer engine and a store client lending no memory to the pool."""
        cfg = (config or MooncakeConfig()).replace(master_server_address=master_address)
        engine = Engine(cfg)
        await engine.start()
        try:
            client = AsyncStoreClient(engine, cfg, global_segment_size=0,
                                      local_buffer_size=staging_bytes,
                                      master_address=master_address)
            await client.start()
        except BaseException:
            await engine.close()
            raise
        return cls(client, engine)

    async def __call__(self, keys: Sequence[str], instance: Instance) -> None:
        """Replicate ``keys`` onto ``instance``'s store segment; raises if some could not be."""
        segment = instance.store_segment
        if not segment or not keys:
            log.debug("no store segment known next to %s: not replicating", instance.id)
            return
        codes = await self.client.replicate(list(keys), segment)
        self.added += sum(1 for c in codes if c == 0)
        bad = [c for c in codes if c not in _BENIGN]
        if bad:
            raise ReplicationError(f"{len(bad)} of {len(keys)} blocks not replicated to "
                                   f"{segment} (first code {bad[0]})")

    async def close(self) -> None:
        await self.client.close()
        await self.engine.close()
