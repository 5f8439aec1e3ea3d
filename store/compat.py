"""Mooncake-compatible store API: ``MooncakeDistributedStore`` and ``ReplicateConfig``.

Why: existing Mooncake integrations (vLLM/SGLang connectors, scripts) should run on this store by
swapping ``from mooncake.store import ...`` for ``from store import ...``. Method names,
arguments and return conventions follow mooncake-transfer-engine 0.3.13, checked against the real
``mooncake.store`` with a real ``mooncake_master``: ints are 0 or a negative Mooncake error code
(``-600`` INVALID_PARAMS, ``-704`` OBJECT_NOT_FOUND, ``-706`` OBJECT_HAS_LEASE...); ``get`` returns
``b""`` when the object cannot be read; ``get_into`` returns the bytes read; putting a key that
already exists returns 0 and keeps the first value (as Mooncake does).

Deliberate differences: keys over 256 bytes are refused (-600) where Mooncake accepts them, and
``put_from`` from unregistered memory fails with -600 instead of silently copying. Only the
methods listed in ``__all__``'s class are provided; the many tensor-parallel variants are not.
"""
from __future__ import annotations

import ctypes
import enum
import logging
from collections.abc import Sequence
from typing import Any

from store.client import StoreClient, StoreError
from store.client import mooncake_code as _mooncake_code
from store.master import ReplicateConfig as _WireConfig
from store.master import MasterErrorCode
from transfer.config import load_config

__all__ = ["BufferHandle", "MooncakeDistributedStore", "ReplicateConfig", "SoftPinAction"]

logger = logging.getLogger(__name__)
_INVALID = -600
_EXISTS = int(MasterErrorCode.OBJECT_ALREADY_EXISTS)


class SoftPinAction(enum.IntEnum):
    """Mooncake's soft-pin actions: ENABLE soft-pins the object; the others do not pin it."""

    PRESERVE = 0
    ENABLE = 1
    DISABLE = 2


class ReplicateConfig:
    """Mooncake's ``ReplicateConfig``. Fields we do not act on are accepted and logged once."""

    _ACTED_ON = ("replica_num", "preferred_segment", "preferred_segments",
                 "prefer_alloc_in_same_node", "with_hard_pin", "soft_pin_action",
                 "soft_pin_ttl_ms")
    _warned: set[str] = set()

    def __init__(self) -> None:
        self.replica_num: int = 1
        self.preferred_segment: str = ""
        self.preferred_segments: list[str] = []
        self.prefer_alloc_in_same_node: bool = False
        self.with_hard_pin: bool = False
        self.soft_pin_action: SoftPinAction = SoftPinAction.PRESERVE
        self.soft_pin_ttl_ms: int | None = None
        self.group_ids: list[int] | None = None
        self.dfs_replica_num: int = 0
        self.nof_replica_num: int = 0
        self.preferred_nof_segments: list[str] = []

    def __repr__(self) -> str:
        return f"ReplicateConfig({vars(self)})"

    def to_wire(self) -> _WireConfig:
        """The master's placement request; logs fields that have no effect here."""
        for name in ("group_ids", "dfs_replica_num", "nof_replica_num", "preferred_nof_segments"):
            if getattr(self, name) and name not in self._warned:
                self._warned.add(name)
                logger.info("ReplicateConfig.%s is accepted but has no effect in this store", name)
        soft = SoftPinAction(int(self.soft_pin_action)) == SoftPinAction.ENABLE
        return _WireConfig(
            replica_num=int(self.replica_num), preferred_segment=str(self.preferred_segment),
            preferred_segments=[str(s) for s in self.preferred_segments],
            prefer_alloc_in_same_node=bool(self.prefer_alloc_in_same_node),
            with_hard_pin=bool(self.with_hard_pin), soft_pin=soft,
            soft_pin_ttl_ms=int(self.soft_pin_ttl_ms or 0),
            group_ids=[int(g) for g in (self.group_ids or [])])


class BufferHandle:
    """What ``get_buffer`` returns: the value in memory owned by the handle."""

    def __init__(self, data: bytes) -> None:
        self._buf = (ctypes.c_char * max(len(data), 1)).from_buffer_copy(data or b"\0")
        self._size = len(data)

    def ptr(self) -> int:
        return ctypes.addressof(self._buf)

    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        return bytes(memoryview(self._buf)[:self._size])


_DEFAULT_RC = ReplicateConfig()


class MooncakeDistributedStore:
    """Mooncake's store client class; see the module docstring for conventions."""

    def __init__(self) -> None:
        self._client: StoreClient | None = None
        self._registered: set[int] = set()

    # -- setup --------------------------------------------------------------------------------

    def setup(self, local_hostname: Any, metadata_server: str = "P2PHANDSHAKE",
              global_segment_size: int = 16 << 20, local_buffer_size: int = 16 << 20,
              protocol: str = "tcp", rdma_devices: str = "",
              master_server_addr: str = "127.0.0.1:50051", engine: Any = None,
              enable_ssd_offload: bool = False, ssd_offload_path: str = "",
              tenant_id: str = "default", enable_client_http_server: bool = False,
              client_http_port: int = 9300) -> int:
        """Positional form, or ``setup(config_dict)`` with the same keys. Returns 0 or -1."""
        if isinstance(local_hostname, dict):
            cfg = dict(local_hostname)
            if "local_hostname" not in cfg or "metadata_server" not in cfg:
                logger.error("setup(dict) needs local_hostname and metadata_server")
                return -1
            return self._setup(cfg)
        return self._setup({
            "local_hostname": local_hostname, "metadata_server": metadata_server,
            "global_segment_size": global_segment_size, "local_buffer_size": local_buffer_size,
            "protocol": protocol, "rdma_devices": rdma_devices,
            "master_server_addr": master_server_addr, "enable_ssd_offload": enable_ssd_offload,
            "ssd_offload_path": ssd_offload_path})

    def _setup(self, cfg: dict[str, Any]) -> int:
        if self._client is not None:
            logger.error("store is already set up")
            return -1
        for unused in ("ipc_socket_path", "enable_ssd_offload", "tenant_id",
                       "enable_client_http_server"):
            if cfg.get(unused):
                logger.info("setup option %s is accepted but has no effect here", unused)
        try:
            overrides: dict[str, Any] = {
                "local_hostname": str(cfg["local_hostname"]),
                "metadata_server": str(cfg.get("metadata_server") or "P2PHANDSHAKE"),
                "global_segment_size": int(cfg.get("global_segment_size", 16 << 20)),
                "local_buffer_size": int(cfg.get("local_buffer_size", 16 << 20)),
                "protocol": str(cfg.get("protocol") or "tcp"),
                "device_name": str(cfg.get("rdma_devices") or ""),
            }
            if cfg.get("retry_timeout") is not None:  # ours: how long master calls retry
                overrides["rpc.retry_timeout"] = float(cfg["retry_timeout"])
            master = str(cfg.get("master_server_addr") or "127.0.0.1:50051")
            etcd = None
            if master.startswith("etcd://"):
                etcd = [e for e in master.removeprefix("etcd://").split(",") if e]
            else:
                overrides["master_server_address"] = master
            config = load_config(overrides=overrides)
            self._client = StoreClient(config, own_engine=True, etcd_endpoints=etcd)
        except Exception as e:
            logger.error("store setup failed: %s", e)
            return -1
        return 0

    def init_all(self, protocol: str, device_name: str,
                 mount_segment_size: int = 16 << 20) -> int:
        """Set up from the environment/config file (Mooncake's ``init_all``)."""
        base = load_config()
        return self._setup({"local_hostname": base.local_hostname,
                            "metadata_server": base.metadata_server,
                            "global_segment_size": mount_segment_size,
                            "local_buffer_size": base.local_buffer_size, "protocol": protocol,
                            "rdma_devices": device_name,
                            "master_server_addr": base.master_server_address})

    def close(self) -> int:
        if self._client is None:
            return 0
        client, self._client = self._client, None
        try:
            client.close()
        except Exception as e:
            logger.error("store close failed: %s", e)
            return -1
        return 0

    def get_hostname(self) -> str:
        return self._c().segment_name

    def health_check(self) -> int:
        if self._client is None:
            return 1
        try:
            self._client.batch_exists(["__health__"])
        except StoreError:
            return 2
        return 0

    def _c(self) -> StoreClient:
        if self._client is None:
            raise RuntimeError("MooncakeDistributedStore is not set up; call setup() first")
        return self._client

    # -- bytes --------------------------------------------------------------------------------

    def put(self, key: str, value: Any, config: ReplicateConfig = _DEFAULT_RC) -> int:
        return _put_code(self._guard(lambda: self._c().put_batch([key], [value],
                                                                 config.to_wire())[0]))

    def put_batch(self, keys: Sequence[str], values: Sequence[Any],
                  config: ReplicateConfig = _DEFAULT_RC) -> int:
        if len(keys) != len(values):
            return _INVALID
        results = self._guard(lambda: self._c().put_batch(list(keys), list(values),
                                                          config.to_wire()))
        if isinstance(results, int):
            return results
        for r in results:
            code = _put_code(r)
            if code:
                return code
        return 0

    def put_parts(self, key: str, *parts: Any, config: ReplicateConfig = _DEFAULT_RC) -> int:
        return _put_code(self._guard(lambda: self._c().put_parts(key, *parts,
                                                                 config=config.to_wire())))

    def get(self, key: str) -> bytes:
        try:
            return self._c().get(key)
        except StoreError as e:
            if not e.not_found:
                logger.warning("get %r failed: %s", key, e)
            return b""

    def get_batch(self, keys: Sequence[str]) -> list[bytes]:
        return [b"" if isinstance(v, StoreError) else v for v in self._c().get_batch(list(keys))]

    def get_buffer(self, key: str) -> BufferHandle | None:
        try:
            return BufferHandle(self._c().get(key))
        except StoreError:
            return None

    def get_size(self, key: str) -> int:
        return _int(self._guard(lambda: self._c().get_size(key)))

    # -- zero copy ----------------------------------------------------------------------------

    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        if buffer_ptr in self._registered:
            return _INVALID
        code = self._guard(lambda: self._c().register(int(buffer_ptr), int(size)))
        if code < 0:
            return code
        self._registered.add(buffer_ptr)
        return 0

    def unregister_buffer(self, buffer_ptr: int) -> int:
        if buffer_ptr not in self._registered:
            return _INVALID
        self._registered.discard(buffer_ptr)
        return _int(self._guard(lambda: self._c().unregister(int(buffer_ptr))))

    def put_from(self, key: str, buffer_ptr: int, size: int,
                 config: ReplicateConfig = _DEFAULT_RC) -> int:
        return self.batch_put_from([key], [buffer_ptr], [size], config)[0]

    def batch_put_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int],
                       sizes: Sequence[int], config: ReplicateConfig = _DEFAULT_RC) -> list[int]:
        if not len(keys) == len(buffer_ptrs) == len(sizes):
            return [_INVALID] * len(keys)
        out = self._guard(lambda: self._c().batch_put_from(keys, buffer_ptrs, sizes,
                                                           config.to_wire()))
        return [out] * len(keys) if isinstance(out, int) else [_put_code(r) for r in out]

    def batch_put_from_multi_buffers(self, keys: Sequence[str],
                                     all_buffer_ptrs: Sequence[Sequence[int]],
                                     all_sizes: Sequence[Sequence[int]],
                                     config: ReplicateConfig = _DEFAULT_RC) -> list[int]:
        if not len(keys) == len(all_buffer_ptrs) == len(all_sizes):
            return [_INVALID] * len(keys)
        out = self._guard(lambda: self._c().batch_put_from_multi_buffers(
            keys, all_buffer_ptrs, all_sizes, config.to_wire()))
        return [out] * len(keys) if isinstance(out, int) else [_put_code(r) for r in out]

    def get_into(self, key: str, buffer_ptr: int, size: int) -> int:
        return self.batch_get_into([key], [buffer_ptr], [size])[0]

    def batch_get_into(self, keys: Sequence[str], buffer_ptrs: Sequence[int],
                       sizes: Sequence[int]) -> list[int]:
        if not len(keys) == len(buffer_ptrs) == len(sizes):
            return [_INVALID] * len(keys)
        out = self._guard(lambda: self._c().batch_get_into(keys, buffer_ptrs, sizes))
        return [out] * len(keys) if isinstance(out, int) else [_int(r) for r in out]

    def batch_get_into_multi_buffers(self, keys: Sequence[str],
                                     all_buffer_ptrs: Sequence[Sequence[int]],
                                     all_sizes: Sequence[Sequence[int]],
                                     prefer_alloc_in_same_node: bool = False) -> list[int]:
        if not len(keys) == len(all_buffer_ptrs) == len(all_sizes):
            return [_INVALID] * len(keys)
        out = self._guard(lambda: self._c().batch_get_into_multi_buffers(
            keys, all_buffer_ptrs, all_sizes))
        return [out] * len(keys) if isinstance(out, int) else [_int(r) for r in out]

    # -- tensors ------------------------------------------------------------------------------

    def put_tensor(self, key: str, tensor: Any) -> int:
        return _put_code(self._guard(lambda: self._c().put_tensor(key, tensor)))

    def get_tensor(self, key: str) -> Any:
        try:
            return self._c().get_tensor(key)
        except (StoreError, ValueError):
            return None

    # -- metadata -----------------------------------------------------------------------------

    def is_exist(self, key: str) -> int:
        return self.batch_is_exist([key])[0]

    def batch_is_exist(self, keys: Sequence[str]) -> list[int]:
        valid = [k for k in keys if _key_ok(k)]
        try:
            found = iter(self._c().batch_exists(valid) if valid else [])
        except StoreError:
            return [-1] * len(keys)
        return [int(next(found)) if _key_ok(k) else 0 for k in keys]

    def remove(self, key: str, force: bool = False) -> int:
        return _int(self._guard(lambda: self._c().remove(key, force)))

    def batch_remove(self, keys: Sequence[str], force: bool = False) -> list[int]:
        out = self._guard(lambda: self._c().batch_remove(keys, force))
        return [out] * len(keys) if isinstance(out, int) else [mooncake_code(c) for c in out]

    def remove_all(self, force: bool = False) -> int:
        return _int(self._guard(lambda: self._c().remove_all(force)))

    @staticmethod
    def _guard(fn: Any) -> Any:
        """Run ``fn``; a StoreError becomes Mooncake's negative code."""
        try:
            return fn()
        except StoreError as e:
            return mooncake_code(e.code)
        except (ValueError, TypeError, OSError, RuntimeError) as e:  # bad buffers, bad args
            logger.warning("store call failed: %s", e)
            return _INVALID


def mooncake_code(code: int) -> int:
    """Mooncake's number for ``code``; a bad key is -600 there (INVALID_PARAMS), not -400."""
    if code == MasterErrorCode.INVALID_KEY:
        return _INVALID
    return _mooncake_code(code)


def _key_ok(key: str) -> bool:
    return isinstance(key, str) and 0 < len(key.encode("utf-8")) <= 256


def _put_code(result: Any) -> int:
    """0 for success and for "already exists" (Mooncake keeps the first value and says 0)."""
    if result is None:
        return 0
    if isinstance(result, StoreError):
        return 0 if result.code == _EXISTS else mooncake_code(result.code)
    if isinstance(result, int):
        return 0 if result == mooncake_code(_EXISTS) else result
    return 0


def _int(result: Any) -> int:
    if result is None:
        return 0
    if isinstance(result, StoreError):
        return mooncake_code(result.code)
    return int(result)

