"""Simulator mechanics on small synthetic traces: determinism, accounting, trace validation, CLI."""
from __future__ import annotations

import json
import random

import pytest

from scheduler.sim.__main__ import main
from scheduler.sim.cluster import ClusterConfig
from scheduler.sim.engine import SimOptions, simulate
from scheduler.sim.trace import TraceError, TraceRequest, hit_ceiling, load_trace


def synthetic(n=400, seed=3):
    rng = random.Random(seed)
    out, t, next_id = [], 0.0, 10_000
    roots = [list(range(i * 100, i * 100 + 8)) for i in range(10)]
    for i in range(n):
        t += rng.expovariate(4.0)
        k = rng.randint(1, 8)
        tail = list(range(next_id, next_id + rng.randint(1, 6)))
        next_id += len(tail)
        blocks = tuple(roots[rng.randrange(10)][:k] + tail)
        out.append(TraceRequest(i, t, len(blocks) * 512 - 100, rng.randint(1, 300), blocks))
    return out


def test_deterministic_for_a_seed_and_accounts_every_request():
    trace = synthetic()
    cl = ClusterConfig(n_prefill=4, n_decode=2, speed=1.0)
    for policy in ("random", "round_robin", "load_balance", "local_cache", "global_cache"):
        a = simulate(trace, cl, SimOptions(policy=policy, seed=5))
        b = simulate(trace, cl, SimOptions(policy=policy, seed=5))
        assert [(r.outcome, r.ttft, r.tbt, r.prefill_id) for r in a.records] == [
            (r.outcome, r.ttft, r.tbt, r.prefill_id) for r in b.records
        ]
        s = a.summary
        assert s.completed + s.rejected == len(trace)
        assert all(r.outcome in ("completed", "rejected_early", "rejected_late") for r in a.records)
        assert s.ttft_mean > 0 and 0 < s.tbt_mean < 0.1


def test_global_cache_beats_random_and_hits_more():
    trace = synthetic(600)
    cl = ClusterConfig(n_prefill=4, n_decode=2, speed=1.5)
    rnd = simulate(trace, cl, SimOptions(policy="random")).summary
    glob = simulate(trace, cl, SimOptions(policy="global_cache")).summary
    assert glob.hit_rate_tokens > rnd.hit_rate_tokens
    assert glob.ttft_mean < rnd.ttft_mean
    assert glob.transferred_blocks > 0 and rnd.transferred_blocks == 0
    ceiling = hit_ceiling(trace)
    assert glob.hit_rate_tokens <= ceiling.token_weighted + 1e-9


def test_decode_overload_rejects_late_without_early_rejection():
    trace = synthetic(300)
    cl = ClusterConfig(n_prefill=4, n_decode=1, speed=1.0, kv_capacity_tokens=20_000)
    none = simulate(trace, cl, SimOptions(rejection="none")).summary
    pred = simulate(trace, cl, SimOptions(rejection="predictive")).summary
    assert none.rejected_early == 0 and none.rejected_late > 0
    assert none.wasted_prefill_s > 0
    assert pred.rejected_early > 0 and pred.wasted_prefill_requests < none.wasted_prefill_requests


def test_trace_validation(tmp_path):
    good = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(good) + "\n")
    assert load_trace(p)[0].block_ids == (1, 2)
    for bad in (
        "{not json",
        json.dumps({**good, "hash_ids": [1]}),
        json.dumps({**good, "input_length": -3}),
        json.dumps({**good, "hash_ids": "x"}),
    ):
        p.write_text(bad + "\n")
        with pytest.raises(TraceError, match=":1:"):
            load_trace(p)
    with pytest.raises(TraceError, match="FAST25-release"):
        load_trace(tmp_path / "missing.jsonl")


def test_cli_table_and_json(tmp_path, capsys):
    p = tmp_path / "t.jsonl"
    p.write_text(
        "".join(
            json.dumps(
                {
                    "timestamp": r.arrival * 1000,
                    "input_length": r.input_len,
                    "output_length": r.output_len,
                    "hash_ids": list(r.block_ids),
                }
            )
            + "\n"
            for r in synthetic(100)
        )
    )
    out = tmp_path / "o.json"
    rc = main(["--trace", str(p), "--policies", "load_balance,global_cache", "--prefill", "2",
               "--decode", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "global_cache" in text and "hit ceiling" in text
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["results"]] == ["load_balance", "global_cache"]
    assert main(["--trace", str(tmp_path / "nope.jsonl")]) == 2
    with pytest.raises(SystemExit):
        main(["--trace", str(p), "--policies", "fastest"])
