"""The discrete-event loop: trace arrivals in, the Conductor deciding, instances serving.

Events live in one heap ordered by (time, sequence number), so a run is a pure function of the
trace, the configs and the seed. The Conductor is the shipped library, driven with a
:class:`ManualClock` and told what happens through its feedback calls, exactly as the proxy will.
A ``bench`` driver replaying the trace against a real proxy would reuse :class:`SimRequest`
building (:func:`to_request_info`) and :mod:`.metrics`, swapping this loop for HTTP clients.
"""
from __future__ import annotations

import heapq
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..policy import (
    Conductor,
    ConductorConfig,
    InstanceInfo,
    ManualClock,
    PolicyName,
    RejectionMode,
    RequestInfo,
    Role,
)
from .cluster import ClusterConfig, DecodeInstance, PrefillInstance
from .metrics import LoadSample, RequestRecord, Summary, load_fluctuation, summarize
from .trace import TraceRequest

_ARRIVE, _XFER_DONE, _PREFILL_DONE, _DECODE_DONE, _SAMPLE, _DECODE_TIMEOUT = range(6)


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Per-run knobs that are not the cluster: policy, rejection, seed, hints, sampling."""

    policy: PolicyName = "global_cache"
    rejection: RejectionMode = "none"
    seed: int = 0
    output_hint: str = "mean"  # "mean": Conductor's running mean; "oracle": the trace's length
    kvcache_balancing_threshold: float = 1.25
    sample_every_s: float = 0.0  # >0: record instance loads for the Fig. 9 plot
    ttft_timeout: bool = False
    """Clients give up at the TTFT SLO: a request still queued for prefill when its SLO has
    passed is dropped unserved, and one whose prefill ends past the SLO is dropped with that
    prefill wasted; both count as late rejections. Off by default (the TTFT-by-policy figures
    measure the whole tail); on in the overload experiment, where a request that cannot get its
    first token in time is a failed request, as in the paper's Table 3 accounting."""


@dataclass(slots=True)
class SimResult:
    summary: Summary
    records: list[RequestRecord]
    samples: list[LoadSample]


def to_request_info(r: TraceRequest, output_hint: str) -> RequestInfo:
    return RequestInfo(
        id=str(r.index),
        block_ids=r.block_ids,
        input_len=r.input_len,
        expected_output_len=r.output_len if output_hint == "oracle" else None,
    )


class Simulator:
    """One run of one policy over one trace on one cluster."""

    def __init__(
        self, trace: Sequence[TraceRequest], cluster: ClusterConfig, options: SimOptions
    ) -> None:
        if options.output_hint not in ("mean", "oracle"):
            raise ValueError("output_hint must be 'mean' or 'oracle'")
        self.trace = trace
        self.cluster = cluster
        self.options = options
        self.clock = ManualClock()
        self.conductor = Conductor(
            ConductorConfig(
                policy=options.policy,
                rejection=options.rejection,
                ttft_slo_s=cluster.ttft_slo_s,
                tbt_slo_s=cluster.tbt_slo_s,
                kvcache_balancing_threshold=options.kvcache_balancing_threshold,
                block_tokens=cluster.block_tokens,
                eviction=cluster.eviction,
                prefill_model=(cluster.prefill_linear, cluster.prefill_quadratic),
                transfer=cluster.transfer,
                decode=cluster.decode,
                seed=options.seed,
            ),
            self.clock,
        )
        self.prefill: dict[str, PrefillInstance] = {}
        self.decode: dict[str, DecodeInstance] = {}
        for i in range(cluster.n_prefill):
            pid = f"P{i}"
            self.prefill[pid] = PrefillInstance(pid, cluster.cache_capacity_blocks, cluster.eviction)
            self.conductor.add_instance(
                InstanceInfo(
                    pid,
                    Role.PREFILL,
                    cluster.cache_capacity_blocks,
                    cluster.bandwidth_bytes_per_s,
                )
            )
        for i in range(cluster.n_decode):
            did = f"D{i}"
            self.decode[did] = DecodeInstance(did, cluster.kv_capacity_tokens, cluster.decode)
            self.conductor.add_instance(
                InstanceInfo(
                    did,
                    Role.DECODE,
                    bandwidth_bytes_per_s=cluster.bandwidth_bytes_per_s,
                    kv_capacity_tokens=cluster.kv_capacity_tokens,
                )
            )
        self.records = [
            RequestRecord(r.index, r.arrival / cluster.speed, r.input_len, r.output_len)
            for r in trace
        ]
        self._xfer: dict[int, tuple[str, int]] = {}
        self._decisions: dict[int, object] = {}
        self._rng = random.Random(options.seed ^ 0x5EED)
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self.samples: list[LoadSample] = []

    def _push(self, t: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, payload))

    def run(self) -> SimResult:
        wall = time.perf_counter()
        for r in self.records:
            self._push(r.arrival, _ARRIVE, r.index)
        if self.options.sample_every_s > 0 and self.records:
            self._push(self.records[0].arrival, _SAMPLE, None)
        handlers = {
            _ARRIVE: self._on_arrive,
            _XFER_DONE: self._on_xfer_done,
            _PREFILL_DONE: self._on_prefill_done,
            _DECODE_DONE: self._on_decode_done,
            _SAMPLE: self._on_sample,
            _DECODE_TIMEOUT: self._on_decode_timeout,
        }
        events = self._events
        pending = len(self.records)
        self._pending = pending
        while events:
            t, _, kind, payload = heapq.heappop(events)
            self.clock.advance_to(t)
            handlers[kind](t, payload)
        summary = summarize(
            self.records,
            self.options.policy,
            self.options.rejection,
            self.cluster.ttft_slo_s,
            self.cluster.tbt_slo_s,
            time.perf_counter() - wall,
        )
        if self.samples and self.records:
            # Fluctuation while load arrives: skip the first 10 % (the cluster filling up) and
            # the drain after the last arrival.
            first, last = self.records[0].arrival, self.records[-1].arrival
            summary.extra.update(
                load_fluctuation(
                    self.samples, self.cluster.ttft_slo_s, first + 0.1 * (last - first), last
                )
            )
        return SimResult(summary, self.records, self.samples)

    # ---- prefill side --------------------------------------------------------------------------

    def _on_arrive(self, t: float, idx: int) -> None:
        req = self.trace[idx]
        rec = self.records[idx]
        d = self.conductor.decide(to_request_info(req, self.options.output_hint))
        rec.predicted_ttft = d.predicted_ttft
        if not d.accepted:
            rec.outcome, rec.reason = "rejected_early", d.reason
            self._pending -= 1
            return
        assert d.prefill_id is not None and d.decode_id is not None
        rec.prefill_id, rec.decode_id = d.prefill_id, d.decode_id
        self._decisions[idx] = d
        inst = self.prefill[d.prefill_id]
        inst.queue.append(idx)
        if not inst.busy:
            self._start_next(t, inst)

    def _start_next(self, t: float, inst: PrefillInstance) -> None:
        idx = self._pop_live(t, inst)
        if idx is None:
            inst.busy = False
            return
        inst.busy = True
        req = self.trace[idx]
        rec = self.records[idx]
        d = self._decisions.pop(idx)
        cl = self.cluster
        local = inst.prefix(req.block_ids)
        reuse = local
        xfer_time = 0.0
        src_id = d.transfer_from  # type: ignore[attr-defined]
        if src_id is not None and src_id in self.prefill:
            src = self.prefill[src_id]
            remote = src.prefix(req.block_ids)  # what the holder still has, now
            if remote > local:
                n = remote - local
                xfer_time = cl.transfer.seconds(n, cl.bandwidth_bytes_per_s, src.sending)
                src.sending += 1
                src.cache.touch(req.block_ids[:remote])
                self._push(t + xfer_time, _XFER_DONE, src_id)
                rec.transferred_blocks = n
                reuse = remote
        cached = min(reuse * cl.block_tokens, req.input_len)
        compute = cl.prefill_seconds(req.input_len, cached)
        if cl.prefill_noise > 0:
            compute *= max(0.05, self._rng.gauss(1.0, cl.prefill_noise))
        rec.reused_tokens = cached
        rec.prefill_seconds = xfer_time + compute
        inst.busy_time += xfer_time + compute
        self.conductor.on_prefill_started(str(idx), at=t + xfer_time)
        self._push(t + xfer_time + compute, _PREFILL_DONE, (inst.id, idx, compute, cached))

    def _pop_live(self, t: float, inst: PrefillInstance) -> int | None:
        """The next queued request whose client is still waiting (see ``ttft_timeout``)."""
        slo = self.cluster.ttft_slo_s
        while inst.queue:
            idx = inst.queue.popleft()
            rec = self.records[idx]
            if not (self.options.ttft_timeout and slo > 0 and t - rec.arrival >= slo):
                return idx
            self._decisions.pop(idx, None)
            rec.outcome, rec.reason = "rejected_late", "TTFT SLO passed while queued for prefill"
            rec.unserved = True
            self.conductor.on_request_dropped(str(idx))
            self._pending -= 1
        return None

    def _on_xfer_done(self, t: float, src_id: str) -> None:
        self.prefill[src_id].sending -= 1

    def _on_prefill_done(self, t: float, payload: tuple[str, int, float, int]) -> None:
        pid, idx, compute, cached = payload
        inst = self.prefill[pid]
        req = self.trace[idx]
        rec = self.records[idx]
        rid = str(idx)
        _, evicted = inst.cache.add(req.block_ids)
        self.conductor.on_blocks_cached(pid, req.block_ids)
        if evicted:
            self.conductor.on_blocks_evicted(pid, evicted)
        self.conductor.on_prefill_finished(rid, compute_seconds=compute, cached_tokens=cached)
        rec.ttft = t - rec.arrival
        self._start_next(t, inst)
        slo = self.cluster.ttft_slo_s
        if self.options.ttft_timeout and slo > 0 and rec.ttft > slo:
            rec.outcome, rec.reason = "rejected_late", "TTFT SLO passed during prefill"
            self.conductor.on_request_dropped(rid)
            self._pending -= 1
            return
        assert rec.decode_id is not None
        dec = self.decode[rec.decode_id]
        tokens = req.input_len + req.output_len
        if self.cluster.decode_admission == "queue" and tokens <= dec.kv_capacity:
            # vLLM-like: a request that does not fit waits, first come first served, until
            # enough sequences finish (or its client gives up, see ``ttft_timeout``).
            dec.waiting.append(idx)
            self._admit_waiting(t, dec)
            if idx in dec.waiting and self.options.ttft_timeout and slo > 0:
                self._push(rec.arrival + slo, _DECODE_TIMEOUT, (dec.id, idx))
            return
        # The decode engine's own admission check: a full instance rejects late, and the
        # prefill already spent is wasted.
        if not dec.would_fit(tokens, self.cluster.tbt_slo_s):
            rec.outcome, rec.reason = "rejected_late", "decode instance full at admission"
            self.conductor.on_request_dropped(rid)
            self._pending -= 1
            return
        self._join(t, dec, idx)

    def _join(self, t: float, dec: DecodeInstance, idx: int) -> None:
        req = self.trace[idx]
        self.records[idx].ttft = t - self.records[idx].arrival
        self.conductor.on_decode_started(str(idx), at=t)
        dec.join(t, idx, req.input_len + req.output_len, max(0, req.output_len - 1))
        self._schedule_decode(dec)

    def _admit_waiting(self, t: float, dec: DecodeInstance) -> None:
        """Admit waiting requests in arrival order while the head fits (no overtaking)."""
        slo = self.cluster.tbt_slo_s
        while dec.waiting:
            idx = dec.waiting[0]
            req = self.trace[idx]
            if dec.seqs and not dec.would_fit(req.input_len + req.output_len, slo):
                return
            dec.waiting.popleft()
            self._join(t, dec, idx)

    def _on_decode_timeout(self, t: float, payload: tuple[str, int]) -> None:
        did, idx = payload
        dec = self.decode[did]
        if idx not in dec.waiting:
            return
        dec.waiting.remove(idx)
        rec = self.records[idx]
        rec.outcome, rec.reason = "rejected_late", "TTFT SLO passed waiting for a decode slot"
        self.conductor.on_request_dropped(str(idx))
        self._pending -= 1
        self._admit_waiting(t, dec)

    # ---- decode side ---------------------------------------------------------------------------

    def _schedule_decode(self, dec: DecodeInstance) -> None:
        nxt = dec.next_finish()
        if nxt is not None:
            self._push(nxt[0], _DECODE_DONE, (dec.id, dec.version, nxt[1]))

    def _on_decode_done(self, t: float, payload: tuple[str, int, int]) -> None:
        did, version, idx = payload
        dec = self.decode[did]
        if version != dec.version or idx not in dec.seqs:
            return  # the batch changed since this was scheduled; a newer event exists
        dec.pop_finished(idx)
        seq = dec.leave(t, idx)
        rec = self.records[idx]
        rec.tbt = dec.tbt(seq)
        rec.finish = t
        rec.outcome = "completed"
        self.conductor.on_decode_finished(str(idx), output_len=rec.output_len)
        self._pending -= 1
        self._admit_waiting(t, dec)
        self._schedule_decode(dec)

    def _on_sample(self, t: float, _: object) -> None:
        slo = self.cluster.tbt_slo_s
        self.samples.append(
            LoadSample(
                t,
                [self.conductor.queue_time(p) for p in self.prefill],
                [d.load(slo) for d in self.decode.values()],
            )
        )
        if self._pending > 0:
            self._push(t + self.options.sample_every_s, _SAMPLE, None)


def simulate(
    trace: Sequence[TraceRequest],
    cluster: ClusterConfig | None = None,
    options: SimOptions | None = None,
) -> SimResult:
    """Run one simulation; deterministic for a given trace, configs and seed."""
    return Simulator(trace, cluster or ClusterConfig(), options or SimOptions()).run()
