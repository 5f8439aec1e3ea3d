"""vLLM v1 KV connector and SGLang HiCache backend on top of :mod:`store`.

Importing this package must not import vLLM, torch or cupy: those are loaded only by the modules
that need them, when they are used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mooncake_connector.vllm import PyMooncakeConnector

__all__ = ["PyMooncakeConnector"]


def __getattr__(name: str) -> Any:
    # vLLM resolves kv_connector_module_path="mooncake_connector" with getattr on this module:
    # importing vLLM only then keeps "import mooncake_connector" light.
    if name == "PyMooncakeConnector":
        from mooncake_connector.vllm import PyMooncakeConnector

        return PyMooncakeConnector
    raise AttributeError(f"module 'mooncake_connector' has no attribute {name!r}")
