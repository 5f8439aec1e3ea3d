"""Which vLLM versions the connector runs on, checked before anything else touches vLLM.

Why: vLLM's connector API changes between minor versions (constructor arguments, transfer
results, metadata fields). An unsupported version must fail at start-up with a clear message,
not with an AttributeError in the middle of a forward pass.
"""
from __future__ import annotations

import re

__all__ = ["SUPPORTED", "check_vllm_version"]

# Inclusive lower bound, exclusive upper bound of (major, minor).
SUPPORTED = ((0, 32), (0, 33))


def _parse(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise RuntimeError(f"cannot parse the vLLM version {version!r}")
    return int(m.group(1)), int(m.group(2))


def check_vllm_version(version: str | None = None) -> None:
    """Raise RuntimeError unless ``version`` (default: the installed vLLM) is supported."""
    if version is None:
        import vllm

        version = vllm.__version__
    lo, hi = SUPPORTED
    if not lo <= _parse(version) < hi:
        raise RuntimeError(
            f"PyMooncakeConnector supports vLLM >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}; "
            f"found {version}. vLLM's KV connector API changes between minor versions.")
