"""Decode load, now and predicted, and the early-rejection modes built on it.

A decode instance's load is the larger of its KV memory use and its step time against the TBT
SLO (1.0 = full). ``naive`` rejection looks at the load now; but a request reaches decode only
after its prefill, and by then the running batch has partly drained while the requests already
in prefill have arrived. Rejecting on today's load is what makes the paper's Fig. 9 load
oscillate: ``predictive`` evaluates the load at the moment this request's prefill is predicted
to end (paper section 7.3, system-level prediction with a uniform decode time per request).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .cost_model import DecodeModel
from .types import RejectionMode


@dataclass(slots=True)
class DecodeEntry:
    tokens: int  # KV reserved: prompt plus expected output
    start: float  # predicted (pending) or observed (running) decode start
    end: float  # predicted decode end


@dataclass(slots=True)
class DecodeState:
    """What the Conductor believes one decode instance holds and is about to receive."""

    kv_capacity_tokens: int
    running: dict[str, DecodeEntry] = field(default_factory=dict)
    pending: dict[str, DecodeEntry] = field(default_factory=dict)  # still in prefill
    running_tokens: int = 0

    def add_running(self, req: str, entry: DecodeEntry) -> None:
        self.running[req] = entry
        self.running_tokens += entry.tokens

    def pop(self, req: str) -> DecodeEntry | None:
        entry = self.running.pop(req, None)
        if entry is not None:
            self.running_tokens -= entry.tokens
            return entry
        return self.pending.pop(req, None)


def load_of(
    batch: int, tokens: int, capacity: int, model: DecodeModel, tbt_slo: float
) -> tuple[float, float]:
    """(load, predicted TBT) for a batch of ``batch`` sequences holding ``tokens`` of KV."""
    tbt = model.step_seconds(batch, tokens)
    load = tokens / capacity
    if tbt_slo > 0:
        load = max(load, tbt / tbt_slo)
    return load, tbt


def current_load(
    state: DecodeState, extra_tokens: int, model: DecodeModel, tbt_slo: float
) -> tuple[float, float]:
    """Load with one more request of ``extra_tokens`` joining the running batch now."""
    return load_of(
        len(state.running) + 1,
        state.running_tokens + extra_tokens,
        state.kv_capacity_tokens,
        model,
        tbt_slo,
    )


def _load_at(
    state: DecodeState, at: float, overdue: float, extra_tokens: int
) -> tuple[int, int]:
    batch = 1
    tokens = extra_tokens
    for e in state.running.values():
        if e.end > at or e.end <= overdue:
            batch += 1
            tokens += e.tokens
    for e in state.pending.values():
        if e.start <= at < e.end:
            batch += 1
            tokens += e.tokens
    return batch, tokens


def predicted_load(
    state: DecodeState,
    at: float,
    extra_tokens: int,
    model: DecodeModel,
    tbt_slo: float,
    now: float | None = None,
    until: float | None = None,
    max_points: int = 8,
) -> tuple[float, float]:
    """Peak load over this request's predicted stay ``[at, until]``, with it in the batch.

    At each point: running requests that have not finished, plus pending requests whose
    prefill has ended. Points are ``at`` and the predicted joins of pending requests inside the
    stay (the first ``max_points``): a request that fits at ``at`` but would push out one joining
    later only moves the late rejection to someone else.

    A running request already past its predicted end (``end <= now``) is a long answer whose
    remaining length is unknown: it is assumed to keep running, since predicting it gone is what
    lets a burst through.
    """
    overdue = -float("inf") if now is None else now
    points = [at]
    if until is not None and until > at:
        later = sorted(e.start for e in state.pending.values() if at < e.start < until)
        points.extend(later[:max_points])
    best_load, best_tbt = 0.0, 0.0
    for t in points:
        batch, tokens = _load_at(state, t, overdue, extra_tokens)
        load, tbt = load_of(batch, tokens, state.kv_capacity_tokens, model, tbt_slo)
        if load >= best_load:
            best_load, best_tbt = load, tbt
    return best_load, best_tbt


def rejection_reason(
    mode: RejectionMode, predicted_ttft: float, ttft_slo: float, decode_load: float
) -> str | None:
    """Why a request should be rejected at once, or None to accept it."""
    if mode == "none":
        return None
    if ttft_slo > 0 and predicted_ttft > ttft_slo:
        return f"predicted TTFT {predicted_ttft:.3f}s exceeds the SLO {ttft_slo:.3f}s"
    if decode_load > 1.0:
        when = "now" if mode == "naive" else "when its prefill ends"
        return f"decode instances overloaded {when} (load {decode_load:.2f})"
    return None
