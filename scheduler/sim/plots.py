"""PNG plots of simulation results (matplotlib, imported only here, with the Agg backend).

TTFT CDF per policy; instance load over time (the paper's Fig. 9: the decode-load fluctuation
that prediction-based rejection removes); cache hit rate vs per-instance cache capacity.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .cluster import ClusterConfig
from .engine import SimOptions, SimResult, simulate
from .trace import TraceRequest


def write_plots(
    directory: str | os.PathLike[str],
    results: Sequence[SimResult],
    trace: Sequence[TraceRequest],
    cluster: ClusterConfig,
    capacities: Sequence[int],
    seed: int = 0,
) -> list[Path]:
    """Write the three figures into ``directory``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ttft = np.sort([x.ttft for x in r.records if x.outcome == "completed"])
        if ttft.size:
            ax.plot(ttft, np.arange(1, ttft.size + 1) / ttft.size, label=_label(r))
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("CDF")
    ax.axvline(cluster.ttft_slo_s, color="grey", ls=":", lw=1)
    ax.legend(fontsize=8)
    ax.set_title("TTFT CDF per policy")
    paths.append(_save(fig, out / "ttft_cdf.png"))

    sampled = [r for r in results if r.samples]
    if sampled:
        fig, axes = plt.subplots(len(sampled), 1, figsize=(8, 2.2 * len(sampled)), squeeze=False)
        for ax, r in zip(axes[:, 0], sampled):
            t = np.array([s.t for s in r.samples])
            dec = np.array([np.mean(s.decode_load) for s in r.samples])
            pre = np.array([np.mean(s.prefill_queue_s) for s in r.samples])
            ax.plot(t, dec, label="decode load (mean)")
            ax.plot(t, pre / max(cluster.ttft_slo_s, 1e-9), label="prefill queue / TTFT SLO")
            ax.set_ylabel(_label(r), fontsize=7)
            ax.legend(fontsize=7, loc="upper right")
        axes[-1, 0].set_xlabel("simulated time (s)")
        fig.suptitle("Instance load over time")
        paths.append(_save(fig, out / "load_over_time.png"))

    if capacities:
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in ("local_cache", "global_cache"):
            hits = []
            for cap in capacities:
                c = dataclasses.replace(cluster, cache_capacity_blocks=cap)
                res = simulate(trace, c, SimOptions(policy=policy, seed=seed))
                hits.append(res.summary.hit_rate_tokens)
            ax.plot(capacities, hits, marker="o", label=policy)
        ax.set_xscale("log")
        ax.set_xlabel("cache capacity per prefill instance (blocks)")
        ax.set_ylabel("hit rate (token-weighted)")
        ax.legend()
        ax.set_title("Hit rate vs cache capacity")
        paths.append(_save(fig, out / "hit_rate_vs_capacity.png"))
    return paths


def _label(r: SimResult) -> str:
    return f"{r.summary.policy}/{r.summary.rejection}"


def _save(fig: object, path: Path) -> Path:
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=110)  # type: ignore[attr-defined]
    import matplotlib.pyplot as plt

    plt.close(fig)  # type: ignore[arg-type]
    return path
