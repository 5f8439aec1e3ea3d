"""The Mooncake-compatible API: the same script against mooncake.store and ours, same results."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _store_util import REPO, master_process
from transfer.testing import free_port, stop_process, wait_for_port

pytestmark = pytest.mark.timeout(90)
SCRIPT = os.path.join(REPO, "tests", "store_compat_scenario.py")
MOONCAKE_MASTER = os.path.join(os.path.dirname(sys.executable), "mooncake_master")


def _run(which: str, master: str) -> dict:
    proc = subprocess.run([sys.executable, SCRIPT, which, master], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise AssertionError(f"{which} scenario failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def test_ours_follows_mooncake_conventions():
    with master_process() as master:
        ours = _run("ours", master)
    assert ours["setup"] == 0 and ours["put"] == 0 and ours["put_dup"] == 0
    assert ours["get_after_dup"] == "hello"
    assert ours["put_empty_value"] == -600 and ours["put_empty_key"] == -600
    assert ours["get_size_missing"] == -704 and ours["get_into_missing"] == -704
    assert ours["get_into_small"] == -600


def test_long_keys_are_refused_and_dict_setup_works():
    from store import MooncakeDistributedStore, ReplicateConfig

    with master_process() as master:
        s = MooncakeDistributedStore()
        assert s.setup({"local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE",
                        "global_segment_size": 8 << 20, "local_buffer_size": 8 << 20,
                        "protocol": "tcp", "master_server_addr": master}) == 0
        try:
            assert s.put("x" * 300, b"v") == -600
            rc = ReplicateConfig()
            rc.group_ids = [1]  # accepted, logged, no effect
            assert s.put("ok", b"v", rc) == 0 and s.get("ok") == b"v"
            assert s.put_from("unreg", 0x1000, 10) == -600
        finally:
            assert s.close() == 0
    assert MooncakeDistributedStore().setup({"local_hostname": "127.0.0.1"}) == -1


@pytest.mark.skipif(not os.path.exists(MOONCAKE_MASTER), reason="mooncake not installed")
def test_same_script_same_results_as_mooncake():
    port = free_port()
    proc = subprocess.Popen([MOONCAKE_MASTER, f"--rpc_port={port}",
                             f"--metrics_port={free_port()}",
                             "--enable_http_metadata_server=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 20)
        theirs = _run("mooncake", f"127.0.0.1:{port}")
    finally:
        stop_process(proc)
    with master_process() as master:
        ours = _run("ours", master)
    differences = {k: (theirs[k], ours.get(k)) for k in theirs if theirs[k] != ours.get(k)}
    assert differences == {}

