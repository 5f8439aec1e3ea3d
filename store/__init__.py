"""Mooncake Store: the pooled KV store (master, store nodes, clients) built on :mod:`transfer`.

``MooncakeDistributedStore`` and ``ReplicateConfig`` (the Mooncake-compatible API,
:mod:`store.compat`) are imported lazily so ``import store`` stays light.
"""
from __future__ import annotations

from typing import Any

__all__ = ["MooncakeDistributedStore", "ReplicateConfig"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from store import compat

        return getattr(compat, name)
    raise AttributeError(f"module 'store' has no attribute {name!r}")
