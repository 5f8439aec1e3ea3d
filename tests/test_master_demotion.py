"""The SSD tier's metadata protocol: demote instead of evict, publish on demote_end, abandon late
demotions, never free memory a lease protects (real master, real RPC; the holder's copy itself is
covered with real processes in test_store_ssd_tier.py)."""
from __future__ import annotations

import asyncio

from _master_util import segment, started
from store.master import MasterClient, ReplicateConfig

BLOCK = 4096


async def _fill(c: MasterClient, keys: list[str]) -> None:
    await c.batch_put_start("c1", keys, [BLOCK] * len(keys),
                            ReplicateConfig(preferred_segment="mem"))
    assert await c.batch_put_end("c1", keys) == [0] * len(keys)


async def test_demotion_publishes_file_replica_then_frees_memory() -> None:
    server = await started(eviction_high_watermark_ratio=0.5, eviction_ratio=0.25)
    try:
        async with MasterClient(server.rpc_address, retry_timeout=2.0) as c:
            await c.mount_segment(segment("mem", size=16 * BLOCK))
            assert not (await c.ping("c1")).offload  # no file tier yet
            await c.mount_segment(segment("ssd", size=64 * BLOCK, tier="file", base=2 << 40))
            assert (await c.ping("c1")).offload
            keys = [f"k{i}" for i in range(9)]
            await _fill(c, keys)
            await c.put_start("c1", "trigger", BLOCK)  # 9/16 > 0.5: demote 4 cold blocks
            tasks = await c.take_demotions("c1")
            assert [t.key for t in tasks] == ["k0", "k1", "k2", "k3"]
            assert await c.take_demotions("c1") == []  # handed out once
            assert await c.take_demotions("someone-else") == []
            t0 = tasks[0]
            assert t0.source.tier == "memory" and t0.target.tier == "file"
            assert t0.source.size == t0.target.size == BLOCK
            stats = await c.stats()
            assert stats.evicted_objects == 0 and stats.used == 10 * BLOCK  # not freed yet
            # Still readable from memory while the copy runs; a second pass does not re-pick them.
            reps = (await c.get_replica_list("k1")).replicas
            assert [r.tier for r in reps] == ["memory"]
            server.evictor.run()
            assert len(server.evictor.demoter) == 4
            assert await c.demote_end("intruder", [t.id for t in tasks], []) == []
            assert await c.demote_end("c1", [t.id for t in tasks], []) == [t.id for t in tasks]
            # (k1 is leased: it keeps its memory copy too)
            assert await c.demote_end("c1", [t.id for t in tasks], []) == []  # retried: no-op
            reps = (await c.get_replica_list("k0")).replicas
            assert reps == [t0.target]
            leased = (await c.get_replica_list("k1")).replicas
            assert sorted(r.tier for r in leased) == ["file", "memory"]
            stats = await c.stats()
            assert stats.demoted_objects == 4 and stats.used == 7 * BLOCK
            metrics = server.metrics.render().decode()
            assert "mooncake_master_demoted_objects_total 4.0" in metrics
            # Removing a demoted object frees its file space.
            ssd = server.store.segments.get("ssd")
            before = ssd.used
            await c.remove("k0", force=True)
            assert ssd.used == before - BLOCK
    finally:
        await server.stop()


async def test_late_or_failed_demotion_is_abandoned_and_object_evicted() -> None:
    server = await started(eviction_high_watermark_ratio=0.5, eviction_ratio=0.25,
                           ssd_offload_timeout=0.3)
    try:
        async with MasterClient(server.rpc_address, retry_timeout=2.0) as c:
            await c.mount_segment(segment("mem", size=16 * BLOCK))
            await c.mount_segment(segment("ssd", size=64 * BLOCK, tier="file", base=2 << 40))
            await _fill(c, [f"k{i}" for i in range(9)])
            await c.put_start("c1", "trigger", BLOCK)
            tasks = await c.take_demotions("c1")
            assert len(tasks) == 4
            await c.demote_end("c1", [], [tasks[0].id])  # the holder could not copy k0
            assert not await c.exists("k0")
            for _ in range(40):  # the rest time out (the master's sweep abandons them)
                await asyncio.sleep(0.05)
                if not len(server.evictor.demoter):
                    break
            assert await c.batch_exists(["k1", "k2", "k3", "k4"]) == [False, False, False, True]
            assert await c.demote_end("c1", [t.id for t in tasks[1:]], []) == []  # too late
            stats = await c.stats()
            assert stats.demoted_objects == 0 and stats.evicted_objects == 4
            assert server.store.segments.get("ssd").used == 0
            assert server.evictor.demoter.abandoned == 4
    finally:
        await server.stop()


async def test_offload_disabled_or_no_room_evicts_as_before() -> None:
    server = await started(eviction_high_watermark_ratio=0.5, eviction_ratio=0.25,
                           enable_ssd_offload=False)
    try:
        async with MasterClient(server.rpc_address, retry_timeout=2.0) as c:
            await c.mount_segment(segment("mem", size=16 * BLOCK))
            await c.mount_segment(segment("ssd", size=64 * BLOCK, tier="file", base=2 << 40))
            assert not (await c.ping("c1")).offload
            await _fill(c, [f"k{i}" for i in range(9)])
            await c.put_start("c1", "trigger", BLOCK)
            assert await c.take_demotions("c1") == []
            assert (await c.stats()).evicted_objects == 4
    finally:
        await server.stop()
    server = await started(eviction_high_watermark_ratio=0.5, eviction_ratio=0.25)
    try:
        async with MasterClient(server.rpc_address, retry_timeout=2.0) as c:
            await c.mount_segment(segment("mem", size=16 * BLOCK))
            await c.mount_segment(segment("ssd", size=2 * BLOCK, tier="file", base=2 << 40))
            await _fill(c, [f"k{i}" for i in range(9)])
            await c.put_start("c1", "trigger", BLOCK)
            assert [t.key for t in await c.take_demotions("c1")] == ["k0", "k1"]
            assert (await c.stats()).evicted_objects == 2  # no file room for k2, k3
    finally:
        await server.stop()
