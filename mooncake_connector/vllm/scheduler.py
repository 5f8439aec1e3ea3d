"""Scheduler side of :class:`PyMooncakeConnector`: what to load, what to save, when to free.

Why this shape: the scheduler owns the decisions (one ``batch_is_exist`` per lookup, which
blocks to fill from the store, which to save), and the worker only executes them. A request's
blocks stay allocated after it finishes until every save of them completed (the worker reports
that through ``finished_sending``), so a save never reads a block that vLLM reused.

P/D protocol: a request with ``kv_transfer_params={"do_remote_decode": true}`` (prefill side)
answers ``{"do_remote_prefill": true, "namespace": <id>, "num_tokens": N, "last_block_key": K,
"kv_namespace": {<KeyNamespace fields>}}`` (the full namespace, so a proxy can hash prompts into
the same keys without being told it);
on the decode side such a request waits (bounded by ``remote_prefill_wait_s``) until the
promised keys exist, then loads them and recomputes whatever is still missing.
"""
from __future__ import annotations

from vllm.logger import init_logger
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mooncake_connector.store_backend import StoreBackend, StoreError
from mooncake_connector.vllm.config import ConnectorSettings
from mooncake_connector.vllm.metadata import BlockTransfer, PyMooncakeMetadata
from mooncake_connector.vllm.stats import PyMooncakeStats
from store.keys import KeyNamespace, MultiModalSpan, RequestExtras, block_keys

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["SchedulerSide", "request_keys"]

# Under "vllm." so vLLM's logging configuration (level, format) applies to these records.
logger = init_logger("vllm." + __name__)


def request_keys(namespace: KeyNamespace, request: "Request") -> list[str] | None:
    """Store keys of the prompt's full blocks, or ``None`` when the request cannot be keyed."""
    if getattr(request, "prompt_embeds", None) is not None or not request.prompt_token_ids:
        return None  # prompt embeddings have no token ids to hash: never share their KV
    spans = []
    for feat in getattr(request, "mm_features", None) or ():
        pos = feat.mm_position
        spans.append(MultiModalSpan(str(feat.identifier), int(pos.offset), int(pos.length)))
    lora = getattr(request, "lora_request", None)
    extras = RequestExtras(lora_name=lora.lora_name if lora else None,
                           cache_salt=getattr(request, "cache_salt", None), mm_spans=tuple(spans))
    return block_keys(namespace, request.prompt_token_ids, extras)


@dataclass
class _ReqState:
    keys: list[str]
    block_ids: list[int] = field(default_factory=list)
    local_blocks: int = 0          # blocks vLLM's own prefix cache had when we were asked
    load_blocks: int = 0           # blocks to load from the store after those
    load_pending: bool = False     # loads decided, not yet sent to the worker
    next_save: int = 0             # first block index not yet sent to the worker for saving
    saves_sent: bool = False
    first_seen: float = field(default_factory=time.monotonic)
    last_check: float = 0.0
    remote_params: dict[str, Any] | None = None


class SchedulerSide:
    """State the scheduler-side connector keeps per live request."""

    def __init__(self, settings: ConnectorSettings, namespace: KeyNamespace, *, block_size: int,
                 can_load: bool, can_save: bool, store: StoreBackend | None) -> None:
        self.settings = settings
        self.namespace = namespace
        self.block_size = block_size
        self.can_load = can_load
        self.can_save = can_save and settings.save_policy != "never"
        self.store = store
        self._reqs: dict[str, _ReqState] = {}
        self._unsent_loads: list[str] = []
        # Requests with prompt blocks not yet sent for saving: the only ones a step must look
        # at, so a batch of pure decodes costs build_connector_meta nothing per request.
        self._saving: set[str] = set()
        self._stats = PyMooncakeStats()

    # -- lookup --------------------------------------------------------------------------------
    def _state(self, request: "Request") -> _ReqState | None:
        st = self._reqs.get(request.request_id)
        if st is None:
            keys = request_keys(self.namespace, request)
            if keys is None:
                return None
            st = _ReqState(keys=keys, remote_params=request.kv_transfer_params or None)
            self._reqs[request.request_id] = st
            if self.can_save and keys:
                self._saving.add(request.request_id)
        return st

    def _leading_hits(self, keys: list[str]) -> int:
        if not keys or self.store is None:
            return 0
        try:
            present = self.store.exists(keys, timeout=self.settings.lookup_timeout_s)
        except (StoreError, RuntimeError) as exc:
            logger.warning("store lookup failed, treating as a miss: %s", exc)
            return 0
        n = 0
        while n < len(present) and present[n]:
            n += 1
        return n

    def _promised_blocks(self, st: _ReqState) -> int:
        """Blocks a prefill instance promised in ``kv_transfer_params`` (0 if none or foreign)."""
        p = st.remote_params or {}
        if not p.get("do_remote_prefill"):
            return 0
        if p.get("namespace") != self.namespace.namespace_id:
            logger.warning("remote prefill from namespace %r, this engine is %r: recomputing",
                           p.get("namespace"), self.namespace.namespace_id)
            return 0
        try:
            n = int(p.get("num_tokens", 0)) // self.block_size
        except (TypeError, ValueError):
            return 0
        n = min(n, len(st.keys))
        if n and p.get("last_block_key") != st.keys[n - 1]:
            logger.warning("remote prefill promised key %r, the prompt hashes to %r: recomputing",
                           p.get("last_block_key"), st.keys[n - 1])
            return 0
        return n

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._state(request)  # saving needs the keys too, whatever the role
        if st is None or not self.can_load:
            return 0, False
        # vLLM must compute at least one token itself: never report the whole prompt.
        usable = min(len(st.keys), (request.num_tokens - 1) // self.block_size)
        local = num_computed_tokens // self.block_size
        if usable <= local:
            return 0, False
        now = time.monotonic()
        promised = min(self._promised_blocks(st), usable)
        if promised and now - st.last_check < self.settings.exists_poll_interval_s:
            return None, False
        st.last_check = now
        hits = self._leading_hits(st.keys[:usable])
        self._stats.add(lookups=1)
        if promised and hits < promised and now - st.first_seen < self.settings.remote_prefill_wait_s:
            return None, False  # the prefill's save is still in flight: ask again next step
        if promised and hits < promised:
            logger.warning("request %s: remote prefill promised %d blocks, %d arrived in %.1fs; "
                           "recomputing the rest", request.request_id, promised, hits,
                           self.settings.remote_prefill_wait_s)
        logger.debug("PyMooncakeConnector lookup %s: %d usable, %d local, %d promised, %d hits",
                     request.request_id, usable, local, promised, hits)
        if hits <= local:
            return 0, False
        self._stats.add(lookup_hit_blocks=hits - local)
        st.local_blocks, st.load_blocks = local, hits - local
        # vLLM passes a block-aligned local hit, so the external part is whole blocks too.
        return (hits - local) * self.block_size, self.settings.load_async

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        st.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens > 0 and st.load_blocks:
            st.load_pending = True
            self._unsent_loads.append(request.request_id)

    # -- per step ------------------------------------------------------------------------------
    def build_connector_meta(self, out: "SchedulerOutput") -> PyMooncakeMetadata:
        meta = PyMooncakeMetadata(preempted=bool(getattr(out, "preempted_req_ids", None)))
        if not self._unsent_loads and not self._saving:
            return meta  # the steady decode step: nothing to load, nothing left to save
        for req_id in self._unsent_loads:
            st = self._reqs.get(req_id)
            if st is None or not st.load_pending:
                continue
            lo, hi = st.local_blocks, st.local_blocks + st.load_blocks
            meta.loads.append(BlockTransfer(req_id, st.keys[lo:hi], st.block_ids[lo:hi]))
            st.load_pending = False
            st.next_save = max(st.next_save, hi)  # loaded blocks are in the store already
        self._unsent_loads.clear()
        if not self._saving:
            return meta
        saving = self._saving
        progress: dict[str, int] = {}
        for new in out.scheduled_new_reqs:
            st = self._reqs.get(new.req_id) if new.req_id in saving else None
            if st is not None:
                st.block_ids = list(new.block_ids[0])
                progress[new.req_id] = new.num_computed_tokens
        cached = out.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set())
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id) if req_id in saving else None
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                st.block_ids = list(new_ids[0]) if req_id in resumed else st.block_ids + list(new_ids[0])
            progress[req_id] = cached.num_computed_tokens[i]
        for req_id, computed in progress.items():
            st = self._reqs[req_id]
            done = (computed + out.num_scheduled_tokens.get(req_id, 0)) // self.block_size
            done = min(done, len(st.keys), len(st.block_ids))
            if done > st.next_save:
                meta.saves.append(BlockTransfer(req_id, st.keys[st.next_save:done],
                                                st.block_ids[st.next_save:done]))
                st.next_save = done
                st.saves_sent = True
            if st.next_save >= len(st.keys):
                saving.discard(req_id)  # every prompt block is on its way: nothing more to do
        if meta.loads or meta.saves:
            logger.debug("PyMooncakeConnector step: %d loads, %d saves", len(meta.loads), len(meta.saves))
        return meta

    def update_connector_output(self, output: "KVConnectorOutput") -> None:
        for req_id in output.finished_sending or ():
            self._reqs.pop(req_id, None)
            self._saving.discard(req_id)

    def take_stats(self) -> PyMooncakeStats | None:
        """Lookup counters since the last call (``None`` when there were none)."""
        if self._stats.is_empty():
            return None
        out, self._stats = self._stats, PyMooncakeStats()
        return out

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.get(request.request_id)
        params = None
        wants_decode = bool((request.kv_transfer_params or {}).get("do_remote_decode"))
        if st is not None and wants_decode and self.can_save and st.next_save:
            params = {"do_remote_prefill": True, "namespace": self.namespace.namespace_id,
                      "num_tokens": st.next_save * self.block_size,
                      "last_block_key": st.keys[st.next_save - 1],
                      "kv_namespace": self.namespace.to_dict()}
        self._saving.discard(request.request_id)
        if st is not None and st.saves_sent:
            return True, params  # freed when the worker reports the saves done
        self._reqs.pop(request.request_id, None)
        return False, params
