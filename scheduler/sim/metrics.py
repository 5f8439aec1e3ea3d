"""Per-request outcomes of a simulation and their per-policy summary."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request (times in simulated seconds, after the replay speed-up)."""

    index: int
    arrival: float
    input_len: int
    output_len: int
    outcome: str = "pending"  # completed | rejected_early | rejected_late
    reason: str = ""
    prefill_id: str | None = None
    decode_id: str | None = None
    predicted_ttft: float = 0.0
    ttft: float = float("nan")
    tbt: float = float("nan")
    reused_tokens: int = 0
    transferred_blocks: int = 0
    prefill_seconds: float = 0.0  # busy time of the prefill instance (transfer + compute)
    unserved: bool = False  # rejected late before any prefill ran (a client that gave up queued)
    finish: float = float("nan")


@dataclass(slots=True)
class LoadSample:
    t: float
    prefill_queue_s: list[float]
    decode_load: list[float]


def load_fluctuation(
    samples: list[LoadSample], ttft_slo: float, start: float, end: float
) -> dict[str, float]:
    """How much the pool loads swing over ``[start, end]`` (the paper's Fig. 9 measure).

    Decode load is the mean over decode instances of max(KV use, step time / TBT SLO), the
    paper's section 7.1 load; prefill load is the mean predicted queue time over the TTFT SLO.
    Reported: decode mean, std-dev and peak-to-trough (95th minus 5th percentile, robust to a
    single spike), prefill std-dev, and the correlation of the two series (the paper's
    anti-phase fluctuation shows as a negative correlation). Empty when fewer than 3 samples
    fall in the window.
    """
    win = [s for s in samples if start <= s.t <= end]
    if len(win) < 3:
        return {}
    dec = np.array([float(np.mean(s.decode_load)) for s in win])
    pre = np.array([float(np.mean(s.prefill_queue_s)) for s in win]) / max(ttft_slo, 1e-9)
    corr = float(np.corrcoef(dec, pre)[0, 1]) if dec.std() > 0 and pre.std() > 0 else 0.0
    return {
        "decode_load_mean": float(dec.mean()),
        "decode_load_std": float(dec.std()),
        "decode_load_p2t": float(np.percentile(dec, 95) - np.percentile(dec, 5)),
        "prefill_load_std": float(pre.std()),
        "prefill_decode_corr": corr,
    }


@dataclass(slots=True)
class Summary:
    """One policy's figures, as printed in the table and written by ``--json``."""

    policy: str
    rejection: str
    requests: int
    completed: int
    rejected: int
    rejected_early: int
    rejected_late: int
    wasted_prefill_requests: int
    wasted_prefill_s: float
    ttft_mean: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    tbt_mean: float
    tbt_p50: float
    tbt_p90: float
    tbt_p99: float
    hit_rate_tokens: float
    hit_rate_mean: float
    transferred_blocks: int
    goodput: int
    goodput_rps: float
    duration_s: float
    wall_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else float("nan")


def summarize(
    records: list[RequestRecord],
    policy: str,
    rejection: str,
    ttft_slo: float,
    tbt_slo: float,
    wall_s: float = 0.0,
) -> Summary:
    """Aggregate outcomes. TTFT/TBT are over completed requests; hit rates over every request
    that was prefilled (completed or rejected late); goodput counts completed requests within
    both SLOs; wasted prefill is the prefill spent on requests rejected late (a request dropped
    before its prefill started wasted none)."""
    done = [r for r in records if r.outcome == "completed"]
    prefilled = [
        r for r in records if r.outcome in ("completed", "rejected_late") and not r.unserved
    ]
    ttft = np.array([r.ttft for r in done], dtype=float)
    tbt = np.array([r.tbt for r in done], dtype=float)
    late = [r for r in records if r.outcome == "rejected_late"]
    early = sum(1 for r in records if r.outcome == "rejected_early")
    good = sum(
        1
        for r in done
        if (ttft_slo <= 0 or r.ttft <= ttft_slo) and (tbt_slo <= 0 or r.tbt <= tbt_slo)
    )
    in_tok = sum(r.input_len for r in prefilled)
    start = min((r.arrival for r in records), default=0.0)
    end = max((r.finish for r in done), default=start)
    duration = max(end - start, 1e-9)
    return Summary(
        policy=policy,
        rejection=rejection,
        requests=len(records),
        completed=len(done),
        rejected=early + len(late),
        rejected_early=early,
        rejected_late=len(late),
        wasted_prefill_requests=sum(1 for r in late if not r.unserved),
        wasted_prefill_s=sum(r.prefill_seconds for r in late),
        ttft_mean=float(ttft.mean()) if ttft.size else float("nan"),
        ttft_p50=_pct(ttft, 50),
        ttft_p90=_pct(ttft, 90),
        ttft_p99=_pct(ttft, 99),
        tbt_mean=float(tbt.mean()) if tbt.size else float("nan"),
        tbt_p50=_pct(tbt, 50),
        tbt_p90=_pct(tbt, 90),
        tbt_p99=_pct(tbt, 99),
        hit_rate_tokens=(sum(r.reused_tokens for r in prefilled) / in_tok) if in_tok else 0.0,
        hit_rate_mean=(
            sum(r.reused_tokens / r.input_len for r in prefilled) / len(prefilled)
            if prefilled
            else 0.0
        ),
        transferred_blocks=sum(r.transferred_blocks for r in prefilled),
        goodput=good,
        goodput_rps=good / duration,
        duration_s=duration,
        wall_s=wall_s,
    )


_COLUMNS = (
    ("policy", "policy", "{}"),
    ("rejection", "reject", "{}"),
    ("ttft_mean", "TTFT mean", "{:.2f}"),
    ("ttft_p50", "p50", "{:.2f}"),
    ("ttft_p90", "p90", "{:.2f}"),
    ("ttft_p99", "p99", "{:.2f}"),
    ("tbt_mean", "TBT ms", "{:.1f}"),
    ("tbt_p99", "TBT p99", "{:.1f}"),
    ("hit_rate_tokens", "hit(tok)", "{:.3f}"),
    ("hit_rate_mean", "hit(req)", "{:.3f}"),
    ("completed", "done", "{}"),
    ("rejected", "rejected", "{}"),
    ("wasted_prefill_requests", "wasted", "{}"),
    ("goodput", "goodput", "{}"),
    ("wall_s", "wall s", "{:.1f}"),
)


def format_table(summaries: list[Summary]) -> str:
    """A fixed-width table; TTFT in seconds, TBT in milliseconds."""
    rows = [[title for _, title, _ in _COLUMNS]]
    for s in summaries:
        row = []
        for key, _, fmt in _COLUMNS:
            v = getattr(s, key)
            if key.startswith("tbt"):
                v = v * 1000
            row.append(fmt.format(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
