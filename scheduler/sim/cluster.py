"""The simulated cluster: its description, and the physical prefill and decode instances.

These are the "real" instances of the simulation: their caches, queues and batches are the
ground truth the Conductor only predicts. The Conductor is told what happens through the same
feedback calls the proxy makes, never by reading this state.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from ..policy import BlockIndex, DecodeModel, EvictionPolicy, TransferModel


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """A cluster of P/D-split instances and the true cost model the simulation runs on.

    Defaults: the paper's 16 nodes of dummy LLaMA3-70B on 8xA800 split 8 prefill / 8 decode,
    TTFT SLO 30 s, TBT SLO 100 ms, 2x replay. Unstated in the paper and so assumptions here:
    the DRAM cache per prefill node (``cache_capacity_blocks``; 20,000 blocks of 160 MB = 3.2 TB
    would be unbounded in practice, the default 3,000 blocks is ~480 GB), the per-node
    bandwidth (25 GB/s, i.e. 200 Gbps), and the decode KV memory (500 GB = 1.6M tokens).
    """

    n_prefill: int = 8
    n_decode: int = 8
    cache_capacity_blocks: int | None = 3000
    eviction: EvictionPolicy = "lru"
    bandwidth_bytes_per_s: float = 25e9
    kv_capacity_tokens: int = 1_600_000
    ttft_slo_s: float = 30.0
    tbt_slo_s: float = 0.1
    speed: float = 2.0
    block_tokens: int = 512
    prefill_linear: float = 1.16e-4
    prefill_quadratic: float = 7.1e-10
    prefill_noise: float = 0.0  # relative std-dev of true prefill time around the model
    transfer: TransferModel = field(default_factory=TransferModel)
    decode: DecodeModel = field(default_factory=DecodeModel)
    decode_admission: Literal["reject", "queue"] = "reject"
    """What a decode instance does with a prefilled request that does not fit its KV memory or
    TBT SLO: ``reject`` it at once (the paper's late rejection, the default), or ``queue`` it
    first come first served until sequences finish, as vLLM's waiting queue does (a request
    larger than the whole KV memory is still rejected at once)."""

    def __post_init__(self) -> None:
        if self.n_prefill <= 0 or self.n_decode <= 0:
            raise ValueError("need at least one prefill and one decode instance")
        if not self.speed > 0:
            raise ValueError("speed must be > 0")
        if self.prefill_noise < 0:
            raise ValueError("prefill_noise must be >= 0")
        if self.decode_admission not in ("reject", "queue"):
            raise ValueError("decode_admission must be 'reject' or 'queue'")

    def prefill_seconds(self, n: int, p: int) -> float:
        p = min(max(p, 0), n)
        return self.prefill_linear * (n - p) + self.prefill_quadratic * (n * n - p * p)


class PrefillInstance:
    """One prefill node: a FIFO queue served one request at a time, and a bounded DRAM cache."""

    __slots__ = ("id", "cache", "queue", "busy", "sending", "busy_time")

    def __init__(self, id: str, capacity: int | None, eviction: EvictionPolicy) -> None:
        self.id = id
        self.cache = BlockIndex(capacity, eviction)
        self.queue: deque[int] = deque()
        self.busy = False
        self.sending = 0
        self.busy_time = 0.0

    def prefix(self, blocks: tuple[int, ...]) -> int:
        cache = self.cache
        k = 0
        for b in blocks:
            if b not in cache:
                break
            k += 1
        return k


@dataclass(slots=True)
class _Seq:
    join_progress: float
    target: float
    tokens: int
    epoch: int  # index in the instance's history when it joined
    steps: int


class DecodeInstance:
    """One decode node as a fluid model of continuous batching.

    All sequences in the batch advance one token per step; the step time is constant between
    batch changes, so the instance keeps a progress counter (steps done since start) and a
    history of (progress, step time) epochs. A sequence finishes when progress reaches its
    join point plus its output length; its TBT is read from the epochs it lived through.
    """

    def __init__(self, id: str, kv_capacity: int, model: DecodeModel) -> None:
        self.id = id
        self.kv_capacity = kv_capacity
        self.model = model
        self.seqs: dict[int, _Seq] = {}
        self.waiting: deque[int] = deque()  # prefilled, waiting for room (decode_admission=queue)
        self.tokens = 0
        self.progress = 0.0
        self.last_t = 0.0
        self.step = 0.0
        self.history: list[tuple[float, float]] = [(0.0, 0.0)]  # (progress at start, step time)
        self.version = 0
        self._targets: list[tuple[float, int]] = []

    def advance(self, t: float) -> None:
        if self.step > 0:
            self.progress += (t - self.last_t) / self.step
        self.last_t = t

    def would_fit(self, tokens: int, tbt_slo: float) -> bool:
        """The engine's own admission check: KV memory and the TBT SLO with this sequence added."""
        if self.tokens + tokens > self.kv_capacity:
            return False
        step = self.model.step_seconds(len(self.seqs) + 1, self.tokens + tokens)
        return tbt_slo <= 0 or step <= tbt_slo

    def join(self, t: float, rid: int, tokens: int, steps: int) -> None:
        self.advance(t)
        self.seqs[rid] = _Seq(self.progress, self.progress + steps, tokens, len(self.history), steps)
        heapq.heappush(self._targets, (self.progress + steps, rid))
        self.tokens += tokens
        self._restep()

    def leave(self, t: float, rid: int) -> _Seq:
        self.advance(t)
        seq = self.seqs.pop(rid)
        self.tokens -= seq.tokens
        self._restep()
        return seq

    def next_finish(self) -> tuple[float, int] | None:
        """(time, request) of the next sequence to finish at the current step time."""
        targets = self._targets
        while targets and targets[0][1] not in self.seqs:
            heapq.heappop(targets)
        if not targets:
            return None
        target, rid = targets[0]
        return self.last_t + max(0.0, target - self.progress) * self.step, rid

    def pop_finished(self, rid: int) -> None:
        targets = self._targets
        while targets and (targets[0][1] == rid or targets[0][1] not in self.seqs):
            heapq.heappop(targets)

    def tbt(self, seq: _Seq, slowest: float = 0.1) -> float:
        """Mean of the slowest ``slowest`` fraction of this sequence's token intervals."""
        if seq.steps <= 0:
            return 0.0
        hist = self.history
        segs = []
        lo = seq.join_progress
        for i in range(seq.epoch - 1, len(hist)):
            start, step = hist[i]
            end = hist[i + 1][0] if i + 1 < len(hist) else seq.target
            a, b = max(start, lo), min(end, seq.target)
            if b > a:
                segs.append((step, b - a))
        segs.sort(reverse=True)
        want = max(1.0, slowest * seq.steps)
        got = total = 0.0
        for step, n in segs:
            take = min(n, want - got)
            total += step * take
            got += take
            if got >= want:
                break
        return total / got if got else 0.0

    def _restep(self) -> None:
        self.step = self.model.step_seconds(len(self.seqs), self.tokens) if self.seqs else 0.0
        self.history.append((self.progress, self.step))
        self.version += 1

    def load(self, tbt_slo: float) -> float:
        if not self.seqs:
            return 0.0
        load = self.tokens / self.kv_capacity
        return max(load, self.step / tbt_slo) if tbt_slo > 0 else load
