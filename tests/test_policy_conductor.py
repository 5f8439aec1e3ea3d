"""The Conductor: each policy, balancing threshold and replication, rejection modes, feedback."""
from __future__ import annotations

import pytest

from scheduler.policy import (
    Conductor,
    ConductorConfig,
    ConductorError,
    InstanceInfo,
    ManualClock,
    RequestInfo,
    Role,
    should_transfer,
)


def make(policy="global_cache", rejection="none", n_prefill=4, n_decode=2, **kw):
    clock = ManualClock()
    c = Conductor(ConductorConfig(policy=policy, rejection=rejection, **kw), clock)
    for i in range(n_prefill):
        c.add_instance(InstanceInfo(f"p{i}", Role.PREFILL, cache_capacity_blocks=1000))
    for i in range(n_decode):
        c.add_instance(InstanceInfo(f"d{i}", Role.DECODE, kv_capacity_tokens=100_000))
    return c, clock


def req(rid, blocks, n=None, out=100):
    return RequestInfo(str(rid), list(blocks), n or len(blocks) * 512, out)


def test_round_robin_cycles_and_random_is_seeded():
    c, _ = make("round_robin")
    assert [c.decide(req(i, [i])).prefill_id for i in range(5)] == ["p0", "p1", "p2", "p3", "p0"]
    picks = []
    for _ in range(2):
        c, _ = make("random", seed=7)
        picks.append([c.decide(req(i, [i])).prefill_id for i in range(20)])
    assert picks[0] == picks[1] and len(set(picks[0])) > 1


def test_load_balance_picks_shortest_queue():
    c, _ = make("load_balance")
    first = c.decide(req(1, range(20)))
    second = c.decide(req(2, range(100, 120)))
    assert second.prefill_id != first.prefill_id
    assert second.predicted_queue_time == 0.0


def test_local_cache_prefers_holder_until_its_queue_is_too_long():
    c, _ = make("local_cache")
    c.on_blocks_cached("p2", list(range(40)))
    d = c.decide(req(1, range(40)))
    assert d.prefill_id == "p2" and d.cached_blocks_local == 40 and not d.transfer_blocks
    for i in range(2, 30):  # pile big uncached prompts on p2's queue through the policy
        c._prefill["p2"].queued[f"x{i}"] = 5.0
        c._prefill["p2"].queued_sum += 5.0
    d = c.decide(req(99, list(range(40)) + [7777]))
    assert d.prefill_id != "p2" and d.cached_blocks_local == 0


def test_global_cache_transfers_from_best_holder_and_replicates():
    c, _ = make("global_cache")
    c.on_blocks_cached("p0", list(range(60)))
    c._prefill["p0"].queued["busy"] = 30.0  # the hot holder is busy
    c._prefill["p0"].queued_sum = 30.0
    d = c.decide(req(1, range(64)))
    assert d.prefill_id != "p0"
    assert d.transfer_from == "p0" and len(d.transfer_blocks) == 60
    assert d.replicate_blocks == tuple(range(60)) and d.prefix_blocks == 60
    assert d.predicted_transfer_time > 0
    # the holder is now sending: a second transfer from it is predicted slower
    d2 = c.decide(req(2, range(64)))
    assert d2.predicted_transfer_time > d.predicted_transfer_time


def test_balancing_threshold_keeps_short_gains_local():
    assert should_transfer(0, 1, 2.0)  # nothing local: any remote prefix is worth it
    assert not should_transfer(10, 10, 1.0)
    assert not should_transfer(10, 15, 2.0)
    assert should_transfer(10, 20, 2.0)
    c, _ = make("global_cache", kvcache_balancing_threshold=4.0)
    c.on_blocks_cached("p0", list(range(30)))
    c.on_blocks_cached("p1", list(range(10)))
    for p in ("p0", "p2", "p3"):
        c._prefill[p].queued[p] = 100.0
        c._prefill[p].queued_sum = 100.0
    d = c.decide(req(1, range(32)))
    assert d.prefill_id == "p1" and not d.transfer_blocks  # 30/10 < 4: recompute locally
    assert d.prefix_blocks == 10


def test_feedback_drains_queue_and_trains_model():
    c, clock = make("load_balance")
    d = c.decide(req(1, range(20), n=10_000))
    assert c.queue_time(d.prefill_id) == pytest.approx(d.predicted_prefill_time)
    c.on_prefill_started("1")
    clock.advance_to(0.5)
    assert c.queue_time(d.prefill_id) == pytest.approx(d.predicted_prefill_time - 0.5)
    c.on_prefill_finished("1", compute_seconds=3.0)
    assert c.queue_time(d.prefill_id) == 0.0
    assert c.prefill_model.observations == 1
    assert c.prefill_model.predict(10_000) > d.predicted_prefill_time  # slower than the prior
    c.on_decode_started("1")
    assert c.decode_load(d.decode_id) > 0
    c.on_decode_finished("1", output_len=50)
    assert c.in_flight == 0 and c.decode_load(d.decode_id) == 0.0
    assert c.expected_output_len == 50
    with pytest.raises(ConductorError):
        c.on_prefill_started("1")


def test_rejection_modes():
    # TTFT SLO: none never rejects; naive and predictive reject a prompt that cannot make it.
    for mode, accepted in (("none", True), ("naive", False), ("predictive", False)):
        c, _ = make(rejection=mode, ttft_slo_s=0.5)
        assert c.decide(req(1, range(40))).accepted is accepted
    # Decode load: a decode instance full now but draining before this prefill ends.
    results = {}
    for mode in ("naive", "predictive"):
        c, clock = make("load_balance", rejection=mode, n_decode=1, ttft_slo_s=0)
        c.add_instance(InstanceInfo("p9", Role.PREFILL))
        d = c.decide(req("big", range(100, 260), out=1))  # 80k KV tokens, 1-token answer
        c.on_prefill_started("big")
        c.on_prefill_finished("big")
        c.on_decode_started("big")
        results[mode] = c.decide(req("next", range(300, 340), out=10))
        assert d.accepted
    assert not results["naive"].accepted and "now" in results["naive"].reason
    assert results["predictive"].accepted  # "big" is predicted done before "next" arrives


def test_bad_input_and_instance_removal():
    with pytest.raises(ConductorError):
        ConductorConfig(policy="fastest")  # type: ignore[arg-type]
    with pytest.raises(ConductorError):
        ConductorConfig(kvcache_balancing_threshold=0.5)
    with pytest.raises(ConductorError):
        RequestInfo("x", [], 0)
    c, _ = make()
    with pytest.raises(ConductorError):
        c.add_instance(InstanceInfo("p0", Role.PREFILL))
    d = c.decide(req(1, range(4)))
    with pytest.raises(ConductorError):
        c.decide(req(1, range(4)))
    assert c.remove_instance(d.prefill_id) == ["1"] and c.in_flight == 0
    empty = Conductor(ConductorConfig(), ManualClock())
    assert not empty.decide(req(1, [1])).accepted
    mixed = Conductor(ConductorConfig(), ManualClock())
    mixed.add_instance(InstanceInfo("m", Role.MIXED))
    d = mixed.decide(req(1, [1]))
    assert d.accepted and d.prefill_id == d.decode_id == "m"
