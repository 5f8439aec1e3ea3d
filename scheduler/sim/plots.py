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

    if any(r.samples for r in results):
        paths.append(plot_load_over_time(results, out / "load_over_time.png", cluster.ttft_slo_s))

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


def plot_load_over_time(
    results: Sequence[SimResult],
    path: str | os.PathLike[str],
    ttft_slo: float,
    window: tuple[float, float] | None = None,
) -> Path:
    """The paper's Fig. 9: pool-mean decode load and prefill load (queue time / TTFT SLO) over
    time, one panel per run, with the decode load's std-dev and peak-to-trough in the title.

    ``window`` (simulated seconds) zooms in: over a whole trace the swings are too dense to see.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sampled = [r for r in results if r.samples]
    fig, axes = plt.subplots(len(sampled), 1, figsize=(9, 2.4 * len(sampled)), squeeze=False)
    for ax, r in zip(axes[:, 0], sampled):
        t = np.array([s.t for s in r.samples])
        keep = np.ones(t.size, bool) if window is None else (t >= window[0]) & (t <= window[1])
        dec = np.array([np.mean(s.decode_load) for s in r.samples])[keep]
        pre = np.array([np.mean(s.prefill_queue_s) for s in r.samples])[keep]
        ax.plot(t[keep], dec, lw=1, label="decode load (mean)")
        ax.plot(t[keep], pre / max(ttft_slo, 1e-9), lw=1, label="prefill load (queue / TTFT SLO)")
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        x = r.summary.extra
        title = _label(r)
        if "decode_load_std" in x:
            title += (
                f": rejected {r.summary.rejected}, decode load std {x['decode_load_std']:.3f},"
                f" p95-p5 {x['decode_load_p2t']:.3f}"
            )
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("simulated time (s)")
    fig.suptitle("Instance load over time")
    return _save(fig, Path(path))


def _label(r: SimResult) -> str:
    return f"{r.summary.policy}/{r.summary.rejection}"


def _save(fig: object, path: Path) -> Path:
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=110)  # type: ignore[attr-defined]
    import matplotlib.pyplot as plt

    plt.close(fig)  # type: ignore[arg-type]
    return path
