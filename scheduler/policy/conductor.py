"""The Conductor: KV-cache-centric scheduling (arXiv 2407.00079 v3, Algorithm 1) as a library.

One :meth:`Conductor.decide` per request picks a prefill instance (by policy), a decode instance
(by predicted load) and accepts or rejects (by rejection mode). Drivers report what really
happened through the ``on_*`` calls: that feeds the online prefill-time model, the queue and
decode-load estimates, and the block index. The proxy calls these with real time; the simulator
with simulated time; the code path is the same.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .cost_model import DecodeModel, PrefillModel, TransferModel
from .index import GlobalPool
from .policies import Candidate, SelectionContext, select_prefill
from .rejection import (
    DecodeEntry,
    DecodeState,
    current_load,
    load_of,
    predicted_load,
    rejection_reason,
)
from .types import (
    EVICTION_POLICIES,
    POLICY_NAMES,
    REJECTION_MODES,
    BlockId,
    Clock,
    ConductorError,
    Decision,
    EvictionPolicy,
    InstanceInfo,
    PolicyName,
    RejectionMode,
    RequestInfo,
    Role,
    monotonic_clock,
)


@dataclass(frozen=True, slots=True)
class ConductorConfig:
    """Scheduling knobs; defaults are the paper's model and SLOs (TTFT 30 s, TBT 100 ms)."""

    policy: PolicyName = "global_cache"
    rejection: RejectionMode = "predictive"
    ttft_slo_s: float = 30.0
    tbt_slo_s: float = 0.1
    kvcache_balancing_threshold: float = 1.25
    block_tokens: int = 512
    eviction: EvictionPolicy = "lru"
    prefill_model: tuple[float, float] = (1.16e-4, 7.1e-10)
    prior_weight: float = 8.0
    forgetting: float = 1.0
    transfer: TransferModel = field(default_factory=TransferModel)
    decode: DecodeModel = field(default_factory=DecodeModel)
    default_output_len: int = 256
    max_tracked_requests: int = 1_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ConductorError(f"unknown policy {self.policy!r}; expected one of {POLICY_NAMES}")
        if self.rejection not in REJECTION_MODES:
            raise ConductorError(
                f"unknown rejection mode {self.rejection!r}; expected one of {REJECTION_MODES}"
            )
        if self.eviction not in EVICTION_POLICIES:
            raise ConductorError(f"unknown eviction {self.eviction!r}")
        if self.kvcache_balancing_threshold < 1.0:
            raise ConductorError("kvcache_balancing_threshold must be >= 1.0")
        if self.block_tokens <= 0 or self.max_tracked_requests <= 0:
            raise ConductorError("block_tokens and max_tracked_requests must be > 0")
        if self.ttft_slo_s < 0 or self.tbt_slo_s < 0:
            raise ConductorError("SLOs must be >= 0 (0 disables the check)")


@dataclass(slots=True)
class _Prefill:
    queued: dict[str, float] = field(default_factory=dict)  # request -> predicted service time
    queued_sum: float = 0.0
    running: dict[str, tuple[float, float]] = field(default_factory=dict)  # req -> (start, pred)
    sending: int = 0  # outgoing KV transfers in flight (sender congestion)

    def queue_time(self, now: float) -> float:
        rest = 0.0
        for start, pred in self.running.values():
            rest += max(0.0, pred - (now - start))
        return max(0.0, self.queued_sum) + rest


@dataclass(slots=True)
class _Tracked:
    request: RequestInfo
    decision: Decision
    output_len: int
    cached_tokens: int
    prefill_started: bool = False


class Conductor:
    """Routes requests to prefill/decode instances; see the module docstring."""

    def __init__(self, config: ConductorConfig | None = None, clock: Clock = monotonic_clock):
        self.config = config or ConductorConfig()
        self.clock = clock
        self.prefill_model = PrefillModel(
            *self.config.prefill_model,
            prior_weight=self.config.prior_weight,
            forgetting=self.config.forgetting,
        )
        self.pool = GlobalPool()
        self._instances: dict[str, InstanceInfo] = {}
        self._prefill: dict[str, _Prefill] = {}
        self._decode: dict[str, DecodeState] = {}
        self._requests: dict[str, _Tracked] = {}
        self._rng = random.Random(self.config.seed)
        self._rr = 0
        self._out_sum = 0
        self._out_n = 0

    # ---- instances -------------------------------------------------------------------------

    def add_instance(self, info: InstanceInfo) -> None:
        """Register an engine or store node; it starts with an empty cache and no load."""
        if info.id in self._instances:
            raise ConductorError(f"instance {info.id!r} already registered")
        self._instances[info.id] = info
        if info.role.holds_cache:
            self.pool.add_holder(info.id, info.cache_capacity_blocks, self.config.eviction)
        if info.role.prefills or info.role is Role.STORE:
            self._prefill[info.id] = _Prefill()
        if info.role.decodes:
            self._decode[info.id] = DecodeState(info.kv_capacity_tokens)

    def remove_instance(self, instance_id: str) -> list[str]:
        """Forget an instance (dead or drained); returns the in-flight requests it had, which the
        driver must retry or fail. Their bookkeeping is dropped here."""
        info = self._instances.pop(instance_id, None)
        if info is None:
            raise ConductorError(f"unknown instance {instance_id!r}")
        if info.role.holds_cache:
            self.pool.remove_holder(instance_id)
        self._prefill.pop(instance_id, None)
        self._decode.pop(instance_id, None)
        lost = [
            rid
            for rid, t in self._requests.items()
            if instance_id in (t.decision.prefill_id, t.decision.decode_id)
        ]
        for rid in lost:
            self.on_request_dropped(rid)
        return lost

    @property
    def instances(self) -> dict[str, InstanceInfo]:
        return dict(self._instances)

    # ---- the decision ----------------------------------------------------------------------

    def decide(self, request: RequestInfo) -> Decision:
        """Choose prefill and decode instances for ``request``, or reject it at once.

        Accepted requests are tracked until :meth:`on_decode_finished` or
        :meth:`on_request_dropped`; rejected ones are forgotten immediately.
        """
        cfg = self.config
        if request.id in self._requests:
            raise ConductorError(f"request {request.id!r} is already in flight")
        if len(self._requests) >= cfg.max_tracked_requests:
            return Decision(request.id, False, "too many requests in flight")
        now = self.clock()
        prefill_ids = [i for i, inf in self._instances.items() if inf.role.prefills]
        if not prefill_ids:
            return Decision(request.id, False, "no prefill instance available")
        blocks = request.block_ids
        prefixes = self.pool.prefix_lengths(blocks) if blocks else {}
        best_holder, best = self._best_holder(prefixes)
        cands = [
            Candidate(i, self._prefill[i].queue_time(now), prefixes.get(i, 0)) for i in prefill_ids
        ]
        transfer = cfg.transfer
        holder_bw = self._instances[best_holder].bandwidth_bytes_per_s if best_holder else 1.0
        holder_sending = self._prefill[best_holder].sending if best_holder else 0
        ctx = SelectionContext(
            input_len=request.input_len,
            block_tokens=cfg.block_tokens,
            best_prefix=best,
            prefill_time=self.prefill_model.predict,
            transfer_time=lambda n: transfer.seconds(n, holder_bw, holder_sending),
            balancing_threshold=cfg.kvcache_balancing_threshold,
            rng=self._rng,
            rr_counter=self._rr,
        )
        choice = select_prefill(cfg.policy, cands, ctx)
        self._rr += 1
        ttft = choice.ttft
        output_len = (
            request.expected_output_len
            if request.expected_output_len is not None
            else self.expected_output_len
        )
        tokens = request.input_len + output_len
        decode_id, load, tbt = self._pick_decode(choice.prefill_id, now, ttft, tokens, output_len)
        if decode_id is None:
            return Decision(request.id, False, "no decode instance available")
        t_blocks = tuple(blocks[choice.local_prefix : choice.reused_prefix])
        decision = Decision(
            request_id=request.id,
            accepted=True,
            reason="accepted",
            prefill_id=choice.prefill_id,
            decode_id=decode_id,
            predicted_ttft=ttft,
            predicted_tbt=tbt,
            predicted_prefill_time=choice.prefill_time,
            predicted_queue_time=choice.queue_time,
            predicted_transfer_time=choice.transfer_time,
            predicted_decode_load=load,
            cached_blocks_local=choice.local_prefix,
            transfer_from=best_holder if t_blocks else None,
            transfer_blocks=t_blocks,
            replicate_blocks=t_blocks,
            prefix_blocks=choice.reused_prefix,
        )
        reason = rejection_reason(cfg.rejection, ttft, cfg.ttft_slo_s, load)
        if reason is not None:
            return _rejected(decision, reason)
        self._admit(request, decision, output_len, tokens, now)
        return decision

    def _best_holder(self, prefixes: dict[str, int]) -> tuple[str | None, int]:
        """The holder with the longest prefix; among equals, the least busy sender."""
        best, holder, sending = 0, None, 0
        for hid, n in prefixes.items():
            if n <= 0 or n < best:
                continue
            s = self._prefill[hid].sending if hid in self._prefill else 0
            if n > best or s < sending:
                best, holder, sending = n, hid, s
        return holder, best

    def _pick_decode(
        self, prefill_id: str, now: float, ttft: float, tokens: int, output_len: int
    ) -> tuple[str | None, float, float]:
        """The decode instance with the lowest predicted load when this request joins it.

        The load reported back is the one the rejection mode judges by: predicted for
        ``predictive``, current for ``naive`` and ``none``.
        """
        cfg = self.config
        if not self._decode:
            if self._instances[prefill_id].role is Role.MIXED:
                return prefill_id, 0.0, cfg.decode.step_seconds(1, tokens)
            return None, 0.0, 0.0
        best: tuple[float, str, float] | None = None
        for did, state in self._decode.items():
            join = now + ttft
            stay = output_len * cfg.decode.step_seconds(len(state.running) + 1, state.running_tokens)
            load, tbt = predicted_load(
                state, join, tokens, cfg.decode, cfg.tbt_slo_s, now=now, until=join + stay
            )
            if best is None or load < best[0]:
                best = (load, did, tbt)
        assert best is not None
        load, did, tbt = best
        if cfg.rejection != "predictive":
            load, tbt = current_load(self._decode[did], tokens, cfg.decode, cfg.tbt_slo_s)
        return did, load, tbt

    def _admit(
        self, request: RequestInfo, d: Decision, output_len: int, tokens: int, now: float
    ) -> None:
        assert d.prefill_id is not None and d.decode_id is not None
        service = d.predicted_transfer_time + d.predicted_prefill_time
        p = self._prefill[d.prefill_id]
        p.queued[request.id] = service
        p.queued_sum += service
        if d.transfer_from is not None and d.transfer_from in self._prefill:
            self._prefill[d.transfer_from].sending += 1
        state = self._decode.get(d.decode_id)
        if state is not None:
            start = now + d.predicted_ttft
            state.pending[request.id] = DecodeEntry(
                tokens, start, start + output_len * max(d.predicted_tbt, 1e-6)
            )
        cached = min(d.prefix_blocks * self.config.block_tokens, request.input_len)
        self._requests[request.id] = _Tracked(request, d, output_len, cached)

    # ---- feedback from the driver ------------------------------------------------------------

    def on_prefill_started(self, request_id: str, at: float | None = None) -> None:
        """The prefill instance began computing ``request_id`` (its KV transfer is done)."""
        t = self._tracked(request_id)
        now = self.clock() if at is None else at
        p = self._prefill.get(t.decision.prefill_id or "")
        if p is None or t.prefill_started:
            return
        t.prefill_started = True
        pred = p.queued.pop(request_id, 0.0)
        p.queued_sum -= pred
        p.running[request_id] = (now, t.decision.predicted_prefill_time)
        self._release_sender(t)

    def on_prefill_finished(
        self, request_id: str, compute_seconds: float | None = None, cached_tokens: int | None = None
    ) -> None:
        """Prefill done. ``compute_seconds`` (pure compute, no queueing or transfer) trains the
        prefill-time model; ``cached_tokens`` is what the engine really reused, if it says."""
        t = self._tracked(request_id)
        p = self._prefill.get(t.decision.prefill_id or "")
        if p is not None:
            if not t.prefill_started:
                pred = p.queued.pop(request_id, 0.0)
                p.queued_sum -= pred
                self._release_sender(t)
            p.running.pop(request_id, None)
            if not p.queued and not p.running:
                p.queued_sum = 0.0  # drop float drift when the queue empties
        if compute_seconds is not None:
            cached = t.cached_tokens if cached_tokens is None else cached_tokens
            self.prefill_model.observe(t.request.input_len, cached, compute_seconds)

    def on_decode_started(self, request_id: str, at: float | None = None) -> None:
        """The decode instance admitted the request into its running batch."""
        t = self._tracked(request_id)
        now = self.clock() if at is None else at
        state = self._decode.get(t.decision.decode_id or "")
        if state is None:
            return
        entry = state.pending.pop(request_id, None)
        if entry is None:
            return
        cfg = self.config
        _, tbt = current_load(state, entry.tokens, cfg.decode, cfg.tbt_slo_s)
        state.add_running(
            request_id, DecodeEntry(entry.tokens, now, now + t.output_len * max(tbt, 1e-6))
        )

    def on_decode_finished(self, request_id: str, output_len: int | None = None) -> None:
        """The request completed; ``output_len`` (tokens generated) refines the default guess."""
        if output_len is not None and output_len >= 0:
            self._out_sum += output_len
            self._out_n += 1
        self.on_request_dropped(request_id)

    def on_request_dropped(self, request_id: str) -> None:
        """Forget a request wherever it is (finished, rejected late, failed, cancelled)."""
        t = self._requests.pop(request_id, None)
        if t is None:
            return
        p = self._prefill.get(t.decision.prefill_id or "")
        if p is not None:
            if request_id in p.queued:
                p.queued_sum -= p.queued.pop(request_id)
                self._release_sender(t)
            p.running.pop(request_id, None)
        state = self._decode.get(t.decision.decode_id or "")
        if state is not None:
            state.pop(request_id)

    def on_blocks_cached(self, instance_id: str, block_ids: Sequence[BlockId]) -> list[BlockId]:
        """``instance_id`` now holds this prefix (computed, received or hit). Returns what the
        bounded index evicted to make room (the driver's real cache may differ; it reports its
        own evictions through :meth:`on_blocks_evicted`)."""
        return self.pool.add(instance_id, block_ids)

    def on_blocks_evicted(self, instance_id: str, block_ids: Sequence[BlockId]) -> None:
        self.pool.remove(instance_id, block_ids)

    # ---- views -----------------------------------------------------------------------------

    @property
    def expected_output_len(self) -> int:
        if self._out_n == 0:
            return self.config.default_output_len
        return max(1, round(self._out_sum / self._out_n))

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def queue_time(self, instance_id: str) -> float:
        """Predicted seconds before a new request could start on this prefill instance."""
        return self._prefill[instance_id].queue_time(self.clock())

    def decode_load(self, instance_id: str) -> float:
        """Current load of a decode instance (1.0 = full), as naive rejection sees it."""
        cfg = self.config
        state = self._decode[instance_id]
        if not state.running:
            return 0.0
        return load_of(
            len(state.running), state.running_tokens, state.kv_capacity_tokens, cfg.decode,
            cfg.tbt_slo_s,
        )[0]

    def _tracked(self, request_id: str) -> _Tracked:
        try:
            return self._requests[request_id]
        except KeyError:
            raise ConductorError(f"unknown request {request_id!r}") from None

    def _release_sender(self, t: _Tracked) -> None:
        src = t.decision.transfer_from
        if src is not None and src in self._prefill:
            self._prefill[src].sending = max(0, self._prefill[src].sending - 1)


def _rejected(d: Decision, reason: str) -> Decision:
    return dataclasses.replace(
        d, accepted=False, reason=reason, transfer_from=None, transfer_blocks=(), replicate_blocks=()
    )
