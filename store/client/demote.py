"""The holder's side of the SSD tier: copy objects the master is demoting to a file segment.

Why the holder copies: the master never touches bytes (see :mod:`store.master.demotion`). When
it picks an object for eviction and a file segment has room, it asks the client that holds the
memory replica to copy it there. That client - a store node, or an embedded client - polls
``take_demotions`` while its pings say the SSD tier is on, writes each source replica (memory it
contributed, so registered with its engine) to the target file replica in one transfer batch (the
engine picks the path: local file I/O on the same host, a transport otherwise), and reports with
one ``demote_end``. The master publishes the file replica and only then frees the memory.

A task whose source is not memory this client contributed is refused (reported failed) rather
than trusted: the master's view and ours disagree, and copying foreign memory could leak it.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from store.master.demotion import MAX_TASKS_PER_TAKE
from store.master.messages import DemoteTask

from .transfers import move

if TYPE_CHECKING:
    from .core import AsyncStoreClient

__all__ = ["serve_demotions"]

logger = logging.getLogger(__name__)


async def serve_demotions(client: AsyncStoreClient, max_rounds: int = 16) -> int:
    """Take, copy and end this client's pending demotions; returns how many were published.

    Our holdings (the remount lists) move the object to the file segment only once the master
    published it there: an abandoned demotion's file space is the master's to reuse."""
    published = 0
    for _ in range(max_rounds):
        tasks = await client.master.take_demotions(client.client_id)
        if not tasks:
            break
        done, failed = await copy_demotions(client, tasks)
        ids = set(await client.master.demote_end(client.client_id, done, failed))
        for task in tasks:
            if task.id in ids:
                _move_holding(client, task)
        published += len(ids)
        if len(tasks) < MAX_TASKS_PER_TAKE:
            break
    return published


def _move_holding(client: AsyncStoreClient, task: DemoteTask) -> None:
    source = client.holdings.get(task.source.segment)
    if source is not None:
        source.discard(task.source.address)
    target = client.holdings.get(task.target.segment)
    if target is not None:
        target.add_object(task.key, task.target.address, task.target.size)


async def copy_demotions(client: AsyncStoreClient, tasks: list[DemoteTask]
                         ) -> tuple[list[int], list[int]]:
    """Copy each task's source replica to its target; returns (done ids, failed ids)."""
    failed: list[int] = []
    items = []
    for j, task in enumerate(tasks):
        src, dst = task.source, task.target
        if not _ours(client, src.segment, src.address, src.size) or src.size != dst.size:
            logger.warning("refusing demotion of %r: %s+%d is not memory this client holds",
                           task.key, src.segment, src.size)
            failed.append(task.id)
            continue
        items.append((j, dst, [(src.address, src.size)]))
    why = await move(client, "write", items) if items else {}
    done = []
    for j, dst, _ in items:
        task = tasks[j]
        if j in why:
            logger.warning("demotion of %r to %s failed: %s", task.key, dst.segment, why[j])
            failed.append(task.id)
            continue
        done.append(task.id)
    return done, failed


def _ours(client: AsyncStoreClient, segment: str, address: int, size: int) -> bool:
    for desc in client.segments:
        if (desc.name == segment and desc.tier == "memory" and desc.base <= address
                and address + size <= desc.base + desc.size):
            return True
    return False
