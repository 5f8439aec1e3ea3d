"""Real-component helpers for tests, benchmarks and examples: tiny local models and vLLM engines.

Nothing here mocks vLLM: engines are real processes (``python -m vllm.entrypoints.openai.api_server``
or an offline ``LLM`` in a subprocess). Importing this package imports neither vLLM nor torch.
"""
from mooncake_connector.testing.tiny_model import SIZES, ModelSpec, build_tiny_model
from mooncake_connector.testing.vllm_engines import (
    VllmServer,
    cpu_engine_env,
    run_offline,
)

__all__ = ["SIZES", "ModelSpec", "VllmServer", "build_tiny_model", "cpu_engine_env", "run_offline"]
