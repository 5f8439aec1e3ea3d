"""Simulator mechanics on small synthetic traces: determinism, accounting, trace validation, CLI."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest

from scheduler.sim.__main__ import main
from scheduler.sim.cluster import ClusterConfig
from scheduler.sim.engine import SimOptions, simulate
from scheduler.sim.metrics import LoadSample, load_fluctuation
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


def _burst(n, input_len=20_000, output_len=50, gap=0.01):
    """``n`` unrelated requests arriving almost at once."""
    blocks = -(-input_len // 512)
    return [
        TraceRequest(i, i * gap, input_len, output_len, tuple(range(i * 1000, i * 1000 + blocks)))
        for i in range(n)
    ]


def test_ttft_timeout_drops_queued_requests_without_wasting_prefill():
    # One prefill node, ~2.6 s per 20k-token prompt, TTFT SLO 5 s: only the first two make it.
    trace = _burst(6)
    cl = ClusterConfig(n_prefill=1, n_decode=1, speed=1.0, ttft_slo_s=5.0)
    kept = simulate(trace, cl, SimOptions()).summary
    assert kept.completed == 6 and kept.ttft_p99 > 5.0
    res = simulate(trace, cl, SimOptions(ttft_timeout=True))
    s = res.summary
    assert s.completed + s.rejected_late == 6 and s.rejected_early == 0
    assert all(r.ttft <= 5.0 for r in res.records if r.outcome == "completed")
    reasons = [r.reason for r in res.records if r.outcome == "rejected_late"]
    assert any("during prefill" in x for x in reasons)  # started in time, finished too late
    assert any("queued for prefill" in x for x in reasons)  # never started: nothing wasted
    assert 0 < s.wasted_prefill_requests < s.rejected_late
    unstarted = [r for r in res.records if "queued" in r.reason]
    assert all(r.prefill_seconds == 0 and r.unserved for r in unstarted)


def test_decode_queue_waits_instead_of_rejecting():
    # Decode KV for two requests at a time: ``reject`` loses the rest late, ``queue`` serves all.
    trace = _burst(8, input_len=5_000, output_len=200, gap=0.5)
    base = ClusterConfig(n_prefill=4, n_decode=1, speed=1.0, kv_capacity_tokens=11_000)
    rejected = simulate(trace, base, SimOptions()).summary
    assert rejected.rejected_late > 0
    queued = simulate(trace, dataclasses.replace(base, decode_admission="queue"), SimOptions())
    s = queued.summary
    assert s.completed == 8 and s.rejected == 0
    prefill_end = [r.arrival + r.prefill_seconds for r in queued.records]
    waited = [r for r, end in zip(queued.records, prefill_end) if r.arrival + r.ttft > end + 1.0]
    assert waited  # TTFT counts the wait for a decode slot
    # With clients giving up at the TTFT SLO, a long wait for a slot is a late rejection.
    tight = dataclasses.replace(base, decode_admission="queue", ttft_slo_s=8.0)
    res = simulate(trace, tight, SimOptions(ttft_timeout=True))
    reasons = [r.reason for r in res.records if r.outcome == "rejected_late"]
    assert any("decode slot" in x for x in reasons)
    assert res.summary.completed + res.summary.rejected == 8
    with pytest.raises(ValueError):
        ClusterConfig(decode_admission="drop")  # type: ignore[arg-type]


def test_load_fluctuation_measures():
    samples = [
        LoadSample(float(t), [float(10 * (t % 2))], [0.2 + 0.6 * (1 - t % 2)]) for t in range(40)
    ]
    x = load_fluctuation(samples, ttft_slo=10.0, start=0.0, end=39.0)
    assert x["decode_load_mean"] == pytest.approx(0.5)
    assert x["decode_load_std"] == pytest.approx(0.3)
    assert x["decode_load_p2t"] == pytest.approx(0.6)
    assert x["prefill_decode_corr"] == pytest.approx(-1.0)  # perfectly anti-phase
    assert load_fluctuation(samples, 10.0, 100.0, 200.0) == {}
    res = simulate(synthetic(200), ClusterConfig(n_prefill=2, n_decode=1, speed=1.0),
                   SimOptions(sample_every_s=2.0))
    assert {"decode_load_std", "decode_load_p2t", "prefill_decode_corr"} <= set(res.summary.extra)


def test_cli_overload_flags(tmp_path, capsys):
    p = tmp_path / "t.jsonl"
    p.write_text(
        "".join(
            json.dumps({"timestamp": r.arrival * 1000, "input_length": r.input_len,
                        "output_length": r.output_len, "hash_ids": list(r.block_ids)}) + "\n"
            for r in _burst(6)
        )
    )
    out = tmp_path / "o.json"
    rc = main(["--trace", str(p), "--policies", "load_balance", "--prefill", "1", "--decode", "1",
               "--ttft-slo", "5", "--ttft-timeout", "--decode-admission", "queue",
               "--speed", "1", "--json", str(out)])
    assert rc == 0
    (res,) = json.loads(out.read_text())["results"]
    assert res["rejected_late"] > 0 and res["completed"] + res["rejected"] == 6
    with pytest.raises(SystemExit):
        main(["--trace", str(p), "--decode-admission", "drop"])
    capsys.readouterr()
