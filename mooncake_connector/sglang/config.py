"""Our keys in SGLang's ``--hicache-storage-backend-extra-config`` JSON, parsed once, typed.

Why a separate parser: SGLang hands every backend the same free-form dict, mixing its own keys
(``backend_name``, ``module_path``, ``class_name``, ``interface_v1``...) with ours. We read ours
strictly (a bad value is a clear startup error, not a crash mid-serving), ignore SGLang's, and
warn about anything else so a misspelt key does not silently fall back to a default.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transfer.config.values import to_size

__all__ = ["HiCacheStoreConfig", "SGLANG_KEYS"]

logger = logging.getLogger(__name__)

#: Keys SGLang itself reads from the extra config; present in the dict, not ours to judge.
SGLANG_KEYS = frozenset({
    "backend_name", "module_path", "class_name", "interface_v1", "enable_metadata_cache",
    "metadata_ttl", "file_storage_path", "prefetch_threshold", "prefetch_timeout_base",
    "prefetch_timeout_per_ki_token", "hicache_storage_pass_prefix_keys",
})
_MAX_SEGMENT = 1 << 50


@dataclass(frozen=True)
class HiCacheStoreConfig:
    """How one SGLang rank reaches our store and names its pages there.

    ``global_segment_size`` is the memory the whole server contributes to the pool; like SGLang's
    Mooncake backend, each of the ``tp_size * pp_size`` ranks contributes its share. The default
    0 contributes nothing: pages then live in store nodes (``python -m store.node``), which keeps
    them alive across SGLang restarts.

    ``outage_backoff_s``: once a call finds the master unreachable (each such call blocks for
    the client's failover retry window, ~15 s), further calls answer "miss" at once for this
    long instead of stalling SGLang's prefetch and backup threads; then one call probes again.
    """

    master_server_address: str = "127.0.0.1:50051"
    metadata_server: str = "P2PHANDSHAKE"
    local_hostname: str = "127.0.0.1"
    protocol: str = "tcp"
    device_name: str = ""
    global_segment_size: int = 0
    local_buffer_size: int = 16 << 20
    replica_num: int = 1
    tenant: str = ""
    model_name: str = ""
    outage_backoff_s: float = 10.0

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> HiCacheStoreConfig:
        """Parse our keys out of SGLang's extra config; ``MOONCAKE_MASTER`` and
        ``MOONCAKE_LOCAL_HOSTNAME`` fill in what the JSON leaves out (one JSON for all nodes)."""
        extra = dict(extra or {})
        fields = cls.__dataclass_fields__
        aliases = {"master_server_addr": "master_server_address", "tenant_id": "tenant"}
        values: dict[str, Any] = {}
        for raw_key, value in extra.items():
            key = aliases.get(raw_key, raw_key)
            if key in fields:
                values[key] = value
            elif raw_key not in SGLANG_KEYS:
                logger.warning("hicache extra config key %r is not used by %s; known keys: %s",
                               raw_key, cls.__name__, sorted(fields))
        if "master_server_address" not in values and os.environ.get("MOONCAKE_MASTER"):
            values["master_server_address"] = os.environ["MOONCAKE_MASTER"]
        if "local_hostname" not in values and os.environ.get("MOONCAKE_LOCAL_HOSTNAME"):
            values["local_hostname"] = os.environ["MOONCAKE_LOCAL_HOSTNAME"]
        try:
            for key in ("master_server_address", "metadata_server", "local_hostname", "protocol",
                        "device_name", "tenant", "model_name"):
                if key in values and not isinstance(values[key], str):
                    raise ValueError(f"{key} must be a string, got {values[key]!r}")
            for key in ("global_segment_size", "local_buffer_size"):
                if key in values:
                    values[key] = to_size(values[key], 0, _MAX_SEGMENT)
            if "outage_backoff_s" in values:
                backoff = values["outage_backoff_s"]
                if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) \
                        or not 0 <= backoff <= 3600:
                    raise ValueError(f"outage_backoff_s must be in [0, 3600], got {backoff!r}")
                values["outage_backoff_s"] = float(backoff)
            if "replica_num" in values:
                replica = values["replica_num"]
                if isinstance(replica, bool) or not isinstance(replica, int) or replica < 1:
                    raise ValueError(f"replica_num must be an integer >= 1, got {replica!r}")
        except Exception as e:
            raise ValueError(f"invalid hicache extra config: {e}") from e
        if not values.get("master_server_address", cls.master_server_address):
            raise ValueError("invalid hicache extra config: master_server_address is empty")
        return cls(**values)
