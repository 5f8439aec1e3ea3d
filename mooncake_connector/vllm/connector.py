"""``PyMooncakeConnector``: vLLM v1 KV connector that shares KV blocks through the Mooncake store.

Why a thin class: vLLM builds one instance per role (scheduler process, each worker); each role
delegates to :class:`SchedulerSide` or :class:`WorkerSide`, so the two halves never share state
except through the connector metadata, exactly as vLLM runs them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mooncake_connector.vllm.compat import check_vllm_version

check_vllm_version()  # before anything else of vLLM: an unsupported one fails here, clearly

from vllm.logger import init_logger  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from mooncake_connector.registry import role_of_kv_role
from mooncake_connector.store_backend import StoreBackend, StoreError
from mooncake_connector.vllm.compat import cpu_core_reservation_warning
from mooncake_connector.vllm.config import ConnectorSettings
from mooncake_connector.vllm.layout import build_namespace
from mooncake_connector.vllm.metadata import PyMooncakeMetadata
from mooncake_connector.vllm.scheduler import SchedulerSide
from mooncake_connector.vllm.stats import PyMooncakePromMetrics, PyMooncakeStats
from mooncake_connector.vllm.worker import WorkerSide

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["PyMooncakeConnector"]

# Under "vllm." so vLLM's logging configuration (level, format) applies to these records.
logger = init_logger("vllm." + __name__)


class PyMooncakeConnector(KVConnectorBase_V1):
    """Loads hits from and saves computed blocks to the store; see the README for the config."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        self.settings = ConnectorSettings.from_extra_config(ktc.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        policy = getattr(ktc, "kv_load_failure_policy", "fail")
        if policy == "fail" and role == KVConnectorRole.SCHEDULER:
            logger.warning("PyMooncakeConnector: kv_load_failure_policy is 'fail', so a lost store "
                           "block fails the request; set \"recompute\" to recompute it instead")
        can_load = bool(ktc.is_kv_consumer)
        can_save = bool(ktc.is_kv_producer) or self.settings.save_policy == "always"
        self._num_blocks = kv_cache_config.num_blocks
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._registration: Any = None
        if role == KVConnectorRole.SCHEDULER:
            store: StoreBackend | None
            try:
                store = StoreBackend(self.settings.store_impl, self.settings.store_settings(),
                                     retry_interval_s=self.settings.store_retry_interval_s)
            except StoreError as exc:
                # The engine stays up and recomputes everything; lookups answer "miss".
                logger.error("PyMooncakeConnector: store unavailable, every lookup misses: %s", exc)
                store = None
            namespace = build_namespace(vllm_config, kv_cache_config,
                                        model_id=self.settings.model_id, tenant=self.settings.tenant,
                                        hash_algo=self.settings.hash_algo)
            self._scheduler = SchedulerSide(self.settings, namespace, block_size=self.block_size,
                                            can_load=can_load, can_save=can_save, store=store)
            self._registration = self._register(namespace.to_dict(), ktc.kv_role)
        else:
            store = StoreBackend(self.settings.store_impl, self.settings.store_settings(),
                                     retry_interval_s=self.settings.store_retry_interval_s)
            self._worker = WorkerSide(store, load_async=self.settings.load_async,
                                      save_mode=self.settings.save_mode,
                                      save_window_s=self.settings.save_window_s)

    def _register(self, namespace: dict[str, Any], kv_role: str | None) -> Any:
        """Announce this engine in etcd (``etcd_endpoints`` + ``advertise_url``) for proxies."""
        s = self.settings
        if not s.etcd_endpoints or not s.advertise_url:
            return None
        from mooncake_connector.registry import (  # noqa: PLC0415 - only when configured
            InstanceRecord,
            register_in_background,
        )

        record = InstanceRecord(s.advertise_url, s.instance_role or role_of_kv_role(kv_role),
                                namespace, s.instance_id, s.store_segment or "")
        try:
            return register_in_background(s.etcd_endpoints, record, ttl=s.registration_ttl_s)
        except Exception as exc:  # discovery is optional: the engine serves without it
            logger.error("PyMooncakeConnector: etcd registration of %s failed: %s",
                         s.advertise_url, exc)
            return None

    # -- worker side ---------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: "dict[str, torch.Tensor]") -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches, self._num_blocks)
        warning = cpu_core_reservation_warning()
        if warning is not None:
            logger.warning("PyMooncakeConnector: %s", warning)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # Bound before every forward pass (start_load_kv may run after it): the earliest
        # moment a layer-wise save can reserve its blocks.
        if self._worker is not None and isinstance(connector_metadata, PyMooncakeMetadata):
            self._worker.begin_step(connector_metadata)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, PyMooncakeMetadata)
        self._worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Synchronous loads complete in start_load_kv; asynchronous ones belong to requests that
        # are not in this forward pass (they wait in WAITING_FOR_REMOTE_KVS).
        return

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor",
                      attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        # save_mode "layer": queue this layer's pages into the step's staged put; "step": the
        # blocks are put whole once all layers are written, in wait_for_save.
        assert self._worker is not None
        self._worker.save_layer(layer_name)

    def wait_for_save(self) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, PyMooncakeMetadata)
        self._worker.submit_saves(meta)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._worker is not None and getattr(kv_connector_metadata, "preempted", False):
            self._worker.wait_for_inflight_saves()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        sent, recv, _ = self._worker.get_finished(finished_req_ids)
        return sent or None, recv or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sent, recv, failed = self._worker.get_finished(finished_req_ids)
        return KVConnectorTransferResults(finished_sending=sent, finished_recving=recv,
                                          failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_error_blocks() if self._worker is not None else set()

    def get_kv_connector_stats(self) -> PyMooncakeStats | None:
        # vLLM asks both roles: the worker reports transfers, the scheduler lookups and hits.
        if self._worker is not None:
            return self._worker.take_stats()
        return self._scheduler.take_stats() if self._scheduler is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> PyMooncakeStats:
        return PyMooncakeStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig",
                           metric_types: "dict[type[PromMetric], type[PromMetricT]]",
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> PyMooncakePromMetrics:
        return PyMooncakePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None and self._scheduler.store is not None:
            self._scheduler.store.close()
        if self._registration is not None:
            reg, loop = self._registration
            self._registration = None
            try:
                loop.run(reg.close(), timeout=5.0)
            except Exception as exc:  # the lease then expires by itself
                logger.warning("PyMooncakeConnector: etcd deregistration failed: %s", exc)
            loop.stop()

    # -- scheduler side ------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        assert self._scheduler is not None
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)
