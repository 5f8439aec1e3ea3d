"""Adding a replica of existing objects on a chosen segment (the Conductor's hot-spot replication).

Why through a client and not the master: the master never touches bytes (see
:mod:`store.master.replication`). ``batch_replica_start`` reserves the new replicas on the target
segment, hidden from readers, and tells us where the complete ones are (leased while we copy).
We read each object from its nearest readable source into local scratch memory (falling back
source by source), write every copy to its target in one transfer batch, then publish the copies
with ``batch_replica_end`` - or give the space back with ``batch_replica_revoke`` for the ones
that could not be copied. Raw replica bytes are copied, checksum trailer included, so the new
replica is byte-identical to the old.

The target's holder is told about its new object (the same announcement a put sends) so that it
can report the object on a remount after a master failover.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from store.master import ReplicaDesc

from .errors import TRANSFER_FAIL, MasterErrorCode, StoreError, as_store_error
from .locations import order_replicas
from .transfers import move

if TYPE_CHECKING:
    from .core import AsyncStoreClient

__all__ = ["check_segment", "replicate"]

_ALIGN = 64


async def replicate(client: AsyncStoreClient, keys: Sequence[str], segment: str) -> list[int]:
    """Add a replica of each complete object in ``keys`` on ``segment``; per-key codes.

    0 = a replica on ``segment`` was published. Otherwise a
    :class:`~store.master.MasterErrorCode` (OBJECT_NOT_FOUND, OBJECT_ALREADY_EXISTS when the
    object already has a replica there, NO_AVAILABLE_HANDLE when the segment is full,
    SEGMENT_NOT_FOUND...) or TRANSFER_FAIL when no source could be copied."""
    codes = [0] * len(keys)
    if not keys:
        return codes
    try:
        reply = await client.master.batch_replica_start(client.client_id, list(keys), segment)
    except Exception as e:
        return [as_store_error(e).code] * len(keys)
    started = [(i, item.target, item.sources) for i, item in enumerate(reply.items)
               if item.code == 0 and item.target is not None]
    for i, item in enumerate(reply.items):
        if item.code:
            codes[i] = item.code
    if not started:
        return codes
    total = sum(_round(t.size) for _, t, _ in started)
    failed: dict[int, str] = {}
    async with client.scratch(total) as base:
        staged: list[tuple[int, ReplicaDesc, list[tuple[int, int]]]] = []
        offset = base
        reads: dict[int, tuple[list[ReplicaDesc], list[tuple[int, int]]]] = {}
        for i, target, sources in started:
            others = [s for s in sources if s.segment != target.segment and s.size == target.size]
            ordered = order_replicas(others, client._local_segments, client._host)
            parts = [(offset, target.size)]
            reads[i] = (ordered, parts)
            staged.append((i, target, parts))
            offset += _round(target.size)
        failed.update(await _read_any(client, reads))
        writes = [(i, t, p) for i, t, p in staged if i not in failed]
        if writes:
            failed.update(await move(client, "write", writes))
    good = [i for i, _, _ in started if i not in failed]
    bad = [i for i, _, _ in started if i in failed]
    if bad:
        with contextlib.suppress(Exception):
            await client.master.batch_replica_revoke(client.client_id, [keys[i] for i in bad])
        for i in bad:
            codes[i] = TRANSFER_FAIL
    if good:
        try:
            ended = await client.master.batch_replica_end(client.client_id,
                                                          [keys[i] for i in good])
        except Exception as e:
            ended = [as_store_error(e).code] * len(good)
        targets = {i: t for i, t, _ in started}
        for i, code in zip(good, ended):
            codes[i] = code
            if code == 0:
                client.locations.invalidate(keys[i])
                _announce(client, keys[i], targets[i])
    return codes


async def _read_any(client: AsyncStoreClient,
                    reads: dict[int, tuple[list[ReplicaDesc], list[tuple[int, int]]]]
                    ) -> dict[int, str]:
    """Read each object from its first readable source; ``{index: why}`` for those none gave."""
    pending = set(reads)
    why: dict[int, str] = {}
    attempt = 0
    while pending:
        batch = [(i, reads[i][0][attempt], reads[i][1]) for i in sorted(pending)
                 if attempt < len(reads[i][0])]
        if not batch:
            break
        failed = await move(client, "read", batch)
        for i, rep, _ in batch:
            if i in failed:
                why[i] = f"{rep.segment}: {failed[i]}"
            else:
                pending.discard(i)
                why.pop(i, None)
        attempt += 1
    return {i: why.get(i, "no complete replica to copy from") for i in pending}


def _announce(client: AsyncStoreClient, key: str, target: ReplicaDesc) -> None:
    if target.segment in client._local_segments:
        client.holdings[target.segment].add_object(key, target.address, target.size)
    elif client._announcer is not None:
        client._announcer.add(target.segment, key, target.address, target.size)


def _round(size: int) -> int:
    return (size + _ALIGN - 1) & ~(_ALIGN - 1)


def check_segment(segment: object) -> None:
    """Reject a segment name that is not a non-empty str before any master call."""
    if not isinstance(segment, str) or not segment:
        raise StoreError(MasterErrorCode.INVALID_PARAMS, "segment must be a non-empty str")
