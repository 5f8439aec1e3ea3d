"""A real SGLang server with HiCache L3 on our store (needs a CUDA GPU and a full SGLang install).

The command this runs (also the documented way to try it by hand)::

    python -m store.master --rpc-port 50051 &
    python -m store.node --master-server-address 127.0.0.1:50051 --global-segment-size 4GB &
    python -m sglang.launch_server --model-path $MOONCAKE_SGLANG_MODEL --page-size 64 \\
        --enable-hierarchical-cache --hicache-mem-layout page_first \\
        --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
        '{"backend_name": "mooncake_py", "module_path": "mooncake_connector.sglang",
          "class_name": "MooncakeHiCacheStorage", "interface_v1": 1,
          "master_server_address": "127.0.0.1:50051"}'

A long prompt is served, the GPU and host tiers are flushed (``/flush_cache``), and the same
prompt is served again: its prefix must come back from L3 (``cached_tokens`` > 0).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from _store_util import REPO, NodeProcess, master_process
from transfer.testing import free_port, stop_process, wait_for_port

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]
MODEL = os.environ.get("MOONCAKE_SGLANG_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")


def _post(url: str, body: dict) -> dict:
    import httpx

    r = httpx.post(url, json=body, timeout=120)
    r.raise_for_status()
    return r.json()


def test_sglang_server_reuses_kv_from_our_store():
    pytest.importorskip("sglang.launch_server")
    with master_process() as master:
        node = NodeProcess(master, "--global-segment-size", "2GB")
        port = free_port()
        extra = {"backend_name": "mooncake_py", "module_path": "mooncake_connector.sglang",
                 "class_name": "MooncakeHiCacheStorage", "interface_v1": 1,
                 "master_server_address": master}
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", MODEL,
               "--port", str(port), "--page-size", "64", "--mem-fraction-static", "0.5",
               "--enable-hierarchical-cache", "--hicache-mem-layout", "page_first",
               "--hicache-storage-backend", "dynamic",
               "--hicache-storage-backend-extra-config", json.dumps(extra)]
        server = subprocess.Popen(cmd, cwd=REPO)
        try:
            wait_for_port("127.0.0.1", port, 420)
            base = f"http://127.0.0.1:{port}"
            prompt = "The quick brown fox jumps over the lazy dog. " * 200
            body = {"text": prompt, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
            first = _post(f"{base}/generate", body)
            time.sleep(5)  # let the backup thread write the pages to L3
            import httpx

            assert httpx.post(f"{base}/flush_cache", timeout=60).status_code == 200
            second = _post(f"{base}/generate", body)
            assert second["text"] == first["text"]
            assert second["meta_info"]["cached_tokens"] >= 64, second["meta_info"]
        finally:
            stop_process(server)
            node.stop()
