"""``python -m scheduler.sim``: replay a trace through the Conductor for each policy.

Example::

    python -m scheduler.sim --trace conversation \\
        --policies random,load_balance,local_cache,global_cache --rejection none --json out.json

``--trace`` takes a name (``conversation``/``synthetic``, found in ``$MOONCAKE_TRACES_DIR`` or
``../shared/traces``) or a path.

``python -m scheduler.sim bench --url http://127.0.0.1:8000 --model NAME --trace conversation
--token-scale 0.01 --time-scale 0.01 --limit 100`` replays the trace as real HTTP load against a
running proxy (see :mod:`scheduler.sim.bench`) and prints the same table and JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..policy import EVICTION_POLICIES, POLICY_NAMES, REJECTION_MODES
from .cluster import ClusterConfig
from .engine import SimOptions, SimResult, simulate
from .metrics import format_table
from .trace import TraceError, hit_ceiling, load_trace


def _names(value: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {list(allowed)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scheduler.sim", description=__doc__.split("\n")[0])
    p.add_argument("--trace", default="conversation", help="name or path of a trace (JSON lines)")
    p.add_argument("--limit", type=int, default=None, help="first N requests only")
    p.add_argument(
        "--policies",
        type=lambda v: _names(v, POLICY_NAMES, "policy"),
        default=["random", "load_balance", "local_cache", "global_cache"],
    )
    p.add_argument(
        "--rejection",
        type=lambda v: _names(v, REJECTION_MODES, "rejection mode"),
        default=["none"],
        help="one or more of none,naive,predictive (each is run for every policy)",
    )
    p.add_argument("--prefill", type=int, default=8, help="prefill instances")
    p.add_argument("--decode", type=int, default=8, help="decode instances")
    p.add_argument("--cache-blocks", type=int, default=3000, help="DRAM cache per prefill (0=none)")
    p.add_argument("--unbounded-cache", action="store_true", help="no cache limit")
    p.add_argument("--eviction", choices=EVICTION_POLICIES, default="lru")
    p.add_argument("--bandwidth-gbps", type=float, default=200.0, help="per-node send bandwidth")
    p.add_argument("--kv-capacity-tokens", type=int, default=1_600_000, help="decode KV memory")
    p.add_argument("--ttft-slo", type=float, default=30.0, help="seconds")
    p.add_argument("--tbt-slo", type=float, default=0.1, help="seconds")
    p.add_argument("--speed", type=float, default=2.0, help="replay speed factor")
    p.add_argument("--threshold", type=float, default=1.25, help="kvcache_balancing_threshold")
    p.add_argument("--output-hint", choices=("mean", "oracle"), default="mean")
    p.add_argument("--prefill-noise", type=float, default=0.0)
    p.add_argument(
        "--ttft-timeout",
        action="store_true",
        help="clients give up at the TTFT SLO (counted as late rejections)",
    )
    p.add_argument(
        "--decode-admission",
        choices=("reject", "queue"),
        default="reject",
        help="a full decode instance rejects a prefilled request, or queues it",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", nargs="?", const="-", default=None, help="write JSON (file or -)")
    p.add_argument("--plots", default=None, help="directory for PNG plots")
    p.add_argument(
        "--capacity-sweep",
        default="500,1000,2000,4000,8000",
        help="cache sizes (blocks) for the hit-rate-vs-capacity plot",
    )
    return p


def cluster_from_args(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(
        n_prefill=args.prefill,
        n_decode=args.decode,
        cache_capacity_blocks=None if args.unbounded_cache else args.cache_blocks,
        eviction=args.eviction,
        bandwidth_bytes_per_s=args.bandwidth_gbps * 1e9 / 8,
        kv_capacity_tokens=args.kv_capacity_tokens,
        ttft_slo_s=args.ttft_slo,
        tbt_slo_s=args.tbt_slo,
        speed=args.speed,
        prefill_noise=args.prefill_noise,
        decode_admission=args.decode_admission,
    )


def build_bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scheduler.sim bench",
        description="Replay a trace, scaled down, as real HTTP load against a proxy (loopback).",
    )
    p.add_argument("--url", required=True, help="proxy (or engine) base URL, loopback only")
    p.add_argument("--model", required=True, help="model name to put in the requests")
    p.add_argument("--trace", default="conversation", help="name or path of a trace")
    p.add_argument("--limit", type=int, default=50, help="first N requests")
    p.add_argument("--token-scale", type=float, default=0.01, help="prompt/output length factor")
    p.add_argument("--time-scale", type=float, default=0.01, help="arrival-time factor")
    p.add_argument("--concurrency", type=int, default=64, help="max requests in flight")
    p.add_argument("--max-seconds", type=float, default=120.0, help="bound on the whole run")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--ttft-slo", type=float, default=30.0, help="seconds, for goodput")
    p.add_argument("--tbt-slo", type=float, default=0.1, help="seconds, for goodput")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write JSON (file or -)")
    return p


def bench_main(argv: Sequence[str]) -> int:
    import asyncio
    import time

    from .bench import BenchError, BenchOptions, bench_summary, run_bench

    args = build_bench_parser().parse_args(argv)
    try:
        opts = BenchOptions(
            url=args.url,
            model=args.model,
            token_scale=args.token_scale,
            time_scale=args.time_scale,
            limit=args.limit,
            concurrency=args.concurrency,
            max_seconds=args.max_seconds,
            request_timeout=args.timeout,
            chat=args.chat,
        )
        trace = load_trace(args.trace, limit=args.limit)
    except (BenchError, TraceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter()
    records = asyncio.run(run_bench(trace, opts))
    summary = bench_summary(
        records, args.ttft_slo, args.tbt_slo, wall_s=time.perf_counter() - wall
    )
    print(format_table([summary]))
    errors = [r for r in records if r.outcome == "error"]
    if errors:
        print(f"{len(errors)} errors, first: {errors[0].reason}", file=sys.stderr)
    if args.json is not None:
        doc = {
            "mode": "bench",
            "trace": str(args.trace),
            "requests": len(records),
            "options": {k: v for k, v in vars(args).items() if k != "json"},
            "results": [summary.to_dict()],
        }
        text = json.dumps(doc, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    return 0 if not errors else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        trace = load_trace(args.trace, limit=args.limit)
    except (TraceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cluster = cluster_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results: list[SimResult] = []
    for rejection in args.rejection:
        for policy in args.policies:
            opts = SimOptions(
                policy=policy,
                rejection=rejection,
                seed=args.seed,
                output_hint=args.output_hint,
                kvcache_balancing_threshold=args.threshold,
                sample_every_s=10.0 if args.plots else 0.0,
                ttft_timeout=args.ttft_timeout,
            )
            results.append(simulate(trace, cluster, opts))
    ceiling = hit_ceiling(trace)
    print(format_table([r.summary for r in results]))
    print(
        f"hit ceiling (unbounded global cache): {ceiling.per_request_mean:.3f} per-request mean, "
        f"{ceiling.token_weighted:.3f} token-weighted; {len(trace)} requests"
    )
    if args.plots:
        from .plots import write_plots  # matplotlib only when asked for

        sweep = [int(x) for x in args.capacity_sweep.split(",") if x.strip()]
        for path in write_plots(args.plots, results, trace, cluster, sweep, args.seed):
            print(f"wrote {path}")
    if args.json is not None:
        doc = {
            "trace": str(args.trace),
            "requests": len(trace),
            "cluster": {k: v for k, v in vars(args).items() if k not in ("json", "plots")},
            "hit_ceiling": {
                "per_request_mean": ceiling.per_request_mean,
                "token_weighted": ceiling.token_weighted,
            },
            "results": [r.summary.to_dict() for r in results],
        }
        text = json.dumps(doc, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
