"""Drives the real Mooncake transfer engine (run with the .venv-mooncake python).

``serve SIZE``: register SIZE bytes, print ``{"name", "addr"}``, wait for stdin to close.
``bench NAME ADDR SIZE SHAPES SECONDS``: print one JSON list of results for each shape/op.
Only mooncake and the standard library are imported: that venv has nothing else.
"""
from __future__ import annotations

import json
import sys
import time

from mooncake.engine import TransferEngine


def _engine() -> TransferEngine:
    te = TransferEngine()
    if te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise SystemExit("mooncake initialize failed")
    return te


def serve(size: int) -> None:
    te = _engine()
    addr = te.allocate_managed_buffer(size)
    print(json.dumps({"name": f"127.0.0.1:{te.get_rpc_port()}", "addr": addr}), flush=True)
    sys.stdin.read()


def bench(name: str, peer: int, size: int, shapes: str, seconds: float) -> None:
    te = _engine()
    local = te.allocate_managed_buffer(size)
    out = []
    for shape in shapes.split(","):
        block, batch = (int(x) for x in shape.split("x"))
        for op in ("write", "read"):
            fn = te.batch_transfer_sync_write if op == "write" else te.batch_transfer_sync_read
            offs = [i * block for i in range(batch)]
            args = (name, [local + o for o in offs], [peer + o for o in offs], [block] * batch)
            if fn(*args) != 0:
                raise SystemExit(f"mooncake {op} failed")
            n, start = 0, time.perf_counter()
            while True:
                if fn(*args) != 0:
                    raise SystemExit(f"mooncake {op} failed")
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    break
            out.append({"block": block, "batch": batch, "op": op,
                        "gbps": n * block * batch / elapsed / 1e9})
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        bench(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], float(sys.argv[6]))
