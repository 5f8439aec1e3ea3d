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
    finish: float = float("nan")


@dataclass(slots=True)
class LoadSample:
    t: float
    prefill_queue_s: list[float]
    decode_load: list[float]


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
    both SLOs."""
    done = [r for r in records if r.outcome == "completed"]
    prefilled = [r for r in records if r.outcome in ("completed", "rejected_late")]
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
        wasted_prefill_requests=len(late),
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
