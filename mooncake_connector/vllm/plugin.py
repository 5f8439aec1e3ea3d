"""``vllm.general_plugins`` entry point: registers ``PyMooncakeConnector`` by name at start-up.

Why: with the plugin installed, ``--kv-transfer-config '{"kv_connector": "PyMooncakeConnector"}'``
works without ``kv_connector_module_path``. vLLM loads general plugins in every process (API
server, engine core, workers), so registration is guarded against running twice.
"""
from __future__ import annotations

__all__ = ["register"]

CONNECTOR_NAME = "PyMooncakeConnector"


def register() -> None:
    """Register the connector with vLLM's factory unless that name is already taken."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, "mooncake_connector.vllm.connector",
                                          CONNECTOR_NAME)
