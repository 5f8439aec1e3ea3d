"""Mooncake transfer engine: registered memory segments moved between processes and hosts.

This is the bottom layer. It also holds the plumbing every other layer shares: typed
configuration (:mod:`transfer.config`) and the RPC layer (:mod:`transfer.rpc`). It knows nothing
about KV caches.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transfer.compat import TransferEngine
    from transfer.engine import Engine, get_engine

__all__ = ["Engine", "TransferEngine", "get_engine"]


def __getattr__(name: str) -> Any:
    # Lazy: ``import transfer`` (config, metadata) must stay light.
    if name == "TransferEngine":
        from transfer.compat import TransferEngine

        return TransferEngine
    if name in ("Engine", "get_engine"):
        from transfer import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
