"""Full-trace simulator runs: per-policy TTFT vs the paper, rejection modes, and wall time.

Target: the 12k-request conversation trace on 16 instances in under a minute per run.

    python benchmarks/sim_bench.py [--json] [--trace conversation] [--plots DIR]

The rejection part is the paper's Table 3 / Fig. 9 experiment (``scheduler.sim.scenarios``,
where its parameters are explained): for each setup, per mode, rejected requests, wasted
prefill, goodput and the decode-load fluctuation (std-dev, p95-p5, prefill/decode correlation),
plus which of the paper's orderings hold. ``--plots DIR`` writes the load-over-time figure of the
main setup (``load_over_time.png``, a 300 s window).
"""
from __future__ import annotations

import argparse
import json
import time

import dataclasses

from scheduler.sim.cluster import ClusterConfig
from scheduler.sim.engine import SimOptions, SimResult, simulate
from scheduler.sim.metrics import format_table
from scheduler.sim.scenarios import (
    LIGHT_OVERLOAD_CLUSTER,
    OVERLOAD_CLUSTER,
    format_rejection_table,
    rejection_row,
    run_rejection_modes,
)
from scheduler.sim.trace import load_trace

PAPER_TTFT = {"random": 19.65, "load_balance": 5.27, "local_cache": 3.58, "global_cache": 3.07}
TARGET_WALL_S = 60.0
REJECTION_SETUPS = {
    "8P2D_200k_2x_ttft_timeout": (OVERLOAD_CLUSTER, True),
    "8P2D_200k_1x": (LIGHT_OVERLOAD_CLUSTER, False),
    "8P2D_200k_2x_ttft_timeout_decode_queue": (
        dataclasses.replace(OVERLOAD_CLUSTER, decode_admission="queue"),
        True,
    ),
}


def paper_trend(results: dict[str, SimResult]) -> dict[str, bool]:
    """Which of the paper's claims hold in one setup."""
    n, v, p = (results[m].summary for m in ("none", "naive", "predictive"))
    xn, xv, xp = (results[m].summary.extra for m in ("none", "naive", "predictive"))
    return {
        "rejected_predictive_le_naive_le_none": p.rejected <= v.rejected <= n.rejected,
        "rejected_naive_le_none": v.rejected <= n.rejected,
        "wasted_requests_predictive_lt_naive_lt_none": (
            p.wasted_prefill_requests < v.wasted_prefill_requests < n.wasted_prefill_requests
        ),
        "wasted_seconds_predictive_lt_naive_lt_none": (
            p.wasted_prefill_s < v.wasted_prefill_s < n.wasted_prefill_s
        ),
        "decode_load_std_predictive_lt_naive": xp["decode_load_std"] < xv["decode_load_std"],
        "anti_phase_naive_removed_by_predictive": (
            xv["prefill_decode_corr"] < xp["prefill_decode_corr"] - 0.1
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--trace", default="conversation")
    ap.add_argument("--plots", default=None, help="directory for load_over_time.png")
    args = ap.parse_args()
    trace = load_trace(args.trace)
    setups = {
        "6P10D_1x": ClusterConfig(n_prefill=6, n_decode=10, speed=1.0),
        "8P8D_1x": ClusterConfig(n_prefill=8, n_decode=8, speed=1.0),
    }
    policy_rows = []
    for name, cluster in setups.items():
        for policy in PAPER_TTFT:
            s = simulate(trace, cluster, SimOptions(policy=policy)).summary
            policy_rows.append((name, s))
    rej_runs = {
        name: run_rejection_modes(trace, cluster, ttft_timeout=timeout)
        for name, (cluster, timeout) in REJECTION_SETUPS.items()
    }
    plot = None
    if args.plots:
        from scheduler.sim.plots import plot_load_over_time

        main_setup = next(iter(rej_runs.values()))
        plot = str(
            plot_load_over_time(
                list(main_setup.values()),
                f"{args.plots}/load_over_time.png",
                OVERLOAD_CLUSTER.ttft_slo_s,
                window=(600.0, 900.0),
            )
        )
    rej_walls = [r.summary.wall_s for runs in rej_runs.values() for r in runs.values()]
    max_wall = max([s.wall_s for _, s in policy_rows] + rej_walls)
    if args.json:
        doc = {
            "trace": args.trace,
            "requests": len(trace),
            "target_wall_s": TARGET_WALL_S,
            "max_wall_s": max_wall,
            "met": max_wall < TARGET_WALL_S,
            "policies": [
                {"setup": n, "paper_ttft_mean": PAPER_TTFT[s.policy], **s.to_dict()}
                for n, s in policy_rows
            ],
            "rejection": [
                {
                    "setup": name,
                    "cluster": dataclasses.asdict(REJECTION_SETUPS[name][0]),
                    "ttft_timeout": REJECTION_SETUPS[name][1],
                    "rows": [rejection_row(r) for r in runs.values()],
                    "paper_trend": paper_trend(runs),
                }
                for name, runs in rej_runs.items()
            ],
            "load_plot": plot,
        }
        print(json.dumps(doc, indent=2))
        return
    for name in setups:
        rows = [s for n, s in policy_rows if n == name]
        print(f"== {name}: mean TTFT sim vs paper")
        for s in rows:
            print(f"  {s.policy:>13}: {s.ttft_mean:6.2f} s  (paper {PAPER_TTFT[s.policy]:.2f} s)")
        print(format_table(rows))
    for name, runs in rej_runs.items():
        print(f"== rejection modes, {name}")
        print(format_rejection_table([rejection_row(r) for r in runs.values()]))
        print("   paper trend:", paper_trend(runs))
    if plot:
        print(f"wrote {plot}")
    print(f"max wall per run {max_wall:.1f} s (target < {TARGET_WALL_S:.0f} s)")


if __name__ == "__main__":
    t = time.perf_counter()
    main()
