"""``NullConnector``: a vLLM v1 KV connector that does nothing at all.

Why: it isolates what *any* connector costs inside vLLM (the per-step connector plumbing, the
per-layer hooks, the changed engine configuration) from what our connector's own code costs.
``connector_bench`` runs it next to ours as the ``null`` configuration; the difference between
``null`` and ``plain`` is vLLM's, the difference between ``ours`` and ``null`` is ours.
Use it as ``{"kv_connector": "NullConnector", "kv_role": "kv_both",
"kv_connector_module_path": "mooncake_connector.testing.null_connector"}``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
)

if TYPE_CHECKING:
    import torch
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["NullConnector"]


class NullConnector(KVConnectorBase_V1):
    """Never loads, never saves; every hook returns at once."""

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor",
                      attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        return

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return KVConnectorMetadata()
