"""One script body run against ``mooncake.store`` and ``store`` (see test_store_compat.py).

``python store_compat_scenario.py mooncake|ours MASTER_ADDR`` prints one JSON object of results.
Only the import differs, which is the point: integrations switch by swapping it.
"""
from __future__ import annotations

import ctypes
import json
import sys


def scenario(MooncakeDistributedStore, ReplicateConfig, master: str) -> dict:  # noqa: N803
    out: dict = {}
    s = MooncakeDistributedStore()
    out["setup"] = s.setup("127.0.0.1", "P2PHANDSHAKE", 64 << 20, 16 << 20, "tcp", "", master)
    out["put"] = s.put("k1", b"hello")
    out["put_dup"] = s.put("k1", b"world")
    out["get_after_dup"] = s.get("k1").decode()
    out["put_empty_value"] = s.put("k2", b"")
    out["put_empty_key"] = s.put("", b"x")
    out["put_too_big"] = s.put("big", b"x" * (100 << 20))
    out["get_missing"] = s.get("nope").decode()
    out["get_size"] = s.get_size("k1")
    out["get_size_missing"] = s.get_size("nope")
    out["is_exist"] = [s.is_exist("k1"), s.is_exist("nope"), s.is_exist("")]
    out["batch_is_exist"] = s.batch_is_exist(["k1", "nope"])
    out["put_batch"] = s.put_batch(["a", "b"], [b"1", b"22"])
    out["put_batch_mismatch"] = s.put_batch(["d"], [b"1", b"22"])
    out["get_batch"] = [v.decode() for v in s.get_batch(["a", "b", "nope"])]
    buf = ctypes.create_string_buffer(1 << 20)
    addr = ctypes.addressof(buf)
    out["register"] = s.register_buffer(addr, 1 << 20)
    out["register_again"] = s.register_buffer(addr, 1 << 20)
    ctypes.memmove(addr, b"abcdefgh" * 16, 128)
    out["put_from"] = s.put_from("pf", addr, 128)
    out["get_into"] = s.get_into("pf", addr + 4096, 128)
    out["get_into_bytes"] = buf.raw[4096:4096 + 128].decode()
    out["get_into_small"] = s.get_into("pf", addr + 4096, 64)
    out["get_into_larger_buffer"] = s.get_into("pf", addr + 4096, 1000)
    out["get_into_missing"] = s.get_into("nope", addr + 4096, 64)
    out["batch_put_from"] = s.batch_put_from(["bp1", "bp2"], [addr, addr + 128], [128, 64])
    out["batch_get_into"] = s.batch_get_into(["bp1", "nope", "bp2"],
                                             [addr + 8192, addr + 9000, addr + 10000],
                                             [128, 128, 32])
    out["multi_put"] = s.batch_put_from_multi_buffers(["mb1", "mb2"], [[addr, addr + 64], [addr]],
                                                      [[64, 64], [32]])
    out["multi_get"] = s.batch_get_into_multi_buffers(
        ["mb1", "mb2", "nope"], [[addr + 8192, addr + 8256], [addr + 9000], [addr + 9500]],
        [[64, 64], [32], [10]])
    out["mb1"] = s.get("mb1").decode()
    handle = s.get_buffer("k1")
    out["get_buffer"] = handle.size()
    out["get_buffer_missing"] = s.get_buffer("nope") is None
    out["remove_leased"] = s.remove("k1")
    out["put_fresh"] = s.put("fresh", b"x")
    out["remove_unread"] = s.remove("fresh")
    out["remove_missing"] = s.remove("never-existed")
    rc = ReplicateConfig()
    rc.replica_num = 1
    rc.with_hard_pin = False
    rc.preferred_segment = ""
    out["put_with_config"] = s.put("cfg", b"x", rc)
    out["unregister"] = s.unregister_buffer(addr)
    out["unregister_again"] = s.unregister_buffer(addr)
    out["remove_all_force"] = s.remove_all(True) > 0
    out["after_remove_all"] = s.is_exist("a")
    out["close"] = s.close()
    return out


if __name__ == "__main__":
    which, master = sys.argv[1], sys.argv[2]
    if which == "mooncake":
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig
    else:
        from store import MooncakeDistributedStore, ReplicateConfig
    result = scenario(MooncakeDistributedStore, ReplicateConfig, master)
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
