"""vLLM v1 integration: :class:`PyMooncakeConnector` (imports vLLM and torch).

The class is resolved on first use (this module's ``__getattr__``, as in the package above), so
the parts that need no vLLM, such as :mod:`.layout`, import on a machine without it (the GPU
test host). :mod:`.connector` checks the vLLM version before it imports anything of vLLM.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mooncake_connector.vllm.connector import PyMooncakeConnector

__all__ = ["PyMooncakeConnector"]


def __getattr__(name: str) -> Any:
    if name == "PyMooncakeConnector":
        from mooncake_connector.vllm.connector import PyMooncakeConnector

        return PyMooncakeConnector
    raise AttributeError(f"module 'mooncake_connector.vllm' has no attribute {name!r}")
