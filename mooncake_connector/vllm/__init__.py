"""vLLM v1 integration: :class:`PyMooncakeConnector` (imports vLLM and torch)."""
from mooncake_connector.vllm.compat import check_vllm_version

check_vllm_version()

from mooncake_connector.vllm.connector import PyMooncakeConnector  # noqa: E402

__all__ = ["PyMooncakeConnector"]
