"""Prefill-instance selection: the five policies compared in the paper, by their shared names.

Each policy sees the same candidates (queue time and local prefix per prefill instance, plus the
global best prefix and its holder) and returns one :class:`Choice`. Only ``global_cache`` moves KV
between instances; the others compute whatever the chosen instance does not already hold.
"""
from __future__ import annotations

import random as _random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .types import ConductorError, PolicyName


@dataclass(slots=True)
class Candidate:
    """One prefill instance as the policies see it."""

    id: str
    queue_time: float
    local_prefix: int  # blocks held in a row from the prompt's start


@dataclass(frozen=True, slots=True)
class Choice:
    prefill_id: str
    queue_time: float
    local_prefix: int
    reused_prefix: int  # blocks not recomputed: local plus transferred
    transfer_blocks: int
    transfer_time: float
    prefill_time: float

    @property
    def ttft(self) -> float:
        return self.queue_time + self.transfer_time + self.prefill_time


@dataclass(frozen=True, slots=True)
class SelectionContext:
    """What a policy may use besides the candidates."""

    input_len: int
    block_tokens: int
    best_prefix: int
    prefill_time: Callable[[int, int], float]  # (input_len, cached_tokens) -> seconds
    transfer_time: Callable[[int], float]  # blocks from the best holder -> seconds
    balancing_threshold: float
    rng: _random.Random
    rr_counter: int

    def cached_tokens(self, blocks: int) -> int:
        return min(blocks * self.block_tokens, self.input_len)


def _local_choice(c: Candidate, ctx: SelectionContext) -> Choice:
    t = ctx.prefill_time(ctx.input_len, ctx.cached_tokens(c.local_prefix))
    return Choice(c.id, c.queue_time, c.local_prefix, c.local_prefix, 0, 0.0, t)


def _random_policy(cands: Sequence[Candidate], ctx: SelectionContext) -> Choice:
    return _local_choice(cands[ctx.rng.randrange(len(cands))], ctx)


def _round_robin(cands: Sequence[Candidate], ctx: SelectionContext) -> Choice:
    return _local_choice(cands[ctx.rr_counter % len(cands)], ctx)


def _load_balance(cands: Sequence[Candidate], ctx: SelectionContext) -> Choice:
    return _local_choice(min(cands, key=lambda c: c.queue_time), ctx)


def _local_cache(cands: Sequence[Candidate], ctx: SelectionContext) -> Choice:
    return min((_local_choice(c, ctx) for c in cands), key=lambda ch: ch.ttft)


def should_transfer(local: int, best: int, threshold: float) -> bool:
    """Algorithm 1's balancing test: fetch the best holder's prefix when it is enough longer.

    With no local prefix the ratio is infinite: any remote prefix is worth fetching (a threshold
    cannot be met by dividing by zero, so the case is explicit).
    """
    if best <= local:
        return False
    if local == 0:
        return True
    return best / local >= threshold


def _global_cache(cands: Sequence[Candidate], ctx: SelectionContext) -> Choice:
    best = ctx.best_prefix
    choices = []
    remote_prefill = None
    for c in cands:
        if should_transfer(c.local_prefix, best, ctx.balancing_threshold):
            if remote_prefill is None:
                remote_prefill = ctx.prefill_time(ctx.input_len, ctx.cached_tokens(best))
            n = best - c.local_prefix
            choices.append(
                Choice(
                    c.id, c.queue_time, c.local_prefix, best, n, ctx.transfer_time(n), remote_prefill
                )
            )
        else:
            choices.append(_local_choice(c, ctx))
    return min(choices, key=lambda ch: ch.ttft)


POLICIES: dict[str, Callable[[Sequence[Candidate], SelectionContext], Choice]] = {
    "random": _random_policy,
    "round_robin": _round_robin,
    "load_balance": _load_balance,
    "local_cache": _local_cache,
    "global_cache": _global_cache,
}


def select_prefill(
    policy: PolicyName, cands: Sequence[Candidate], ctx: SelectionContext
) -> Choice:
    """Pick the prefill instance for one request under ``policy``."""
    if not cands:
        raise ConductorError("no prefill candidates")
    try:
        fn = POLICIES[policy]
    except KeyError:
        raise ConductorError(f"unknown policy {policy!r}; expected one of {sorted(POLICIES)}") from None
    return fn(cands, ctx)
