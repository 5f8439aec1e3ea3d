"""A real peer process for transfer-engine tests and the benchmark.

Starts an engine, registers one buffer (shared-memory backed with ``--shared``), prints one JSON
line ``{"name", "addr", "size"}`` and then answers line commands on stdin:
``sha`` (sha256 of the buffer), ``fill SEED`` (deterministic bytes), ``notes`` (notifications
received, JSON), ``quit``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np

from transfer.config import load_config
from transfer.engine import Engine
from transfer.memory import memory_at


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--metadata", default="P2PHANDSHAKE")
    p.add_argument("--hostname", default="127.0.0.1")
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--shared", action="store_true")
    p.add_argument("--no-shm", action="store_true")
    p.add_argument("--secret", default=None)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--io-timeout", type=float, default=10.0)
    args = p.parse_args()
    overrides = {"local_hostname": args.hostname, "metadata_server": args.metadata,
                 "transfer.enable_shm": not args.no_shm, "transfer.streams_per_peer": args.streams,
                 "transfer.io_timeout": args.io_timeout}
    if args.secret:
        overrides["auth_secret"] = args.secret
    engine = Engine(load_config(overrides=overrides)).start_in()
    if args.shared:
        buf = engine.run(engine.allocate_shared(args.size))
        addr = buf.address
    else:
        array = np.zeros(args.size, dtype=np.uint8)
        addr = engine.run(engine.register(array))
    print(json.dumps({"name": engine.name, "addr": addr, "size": args.size}), flush=True)
    view = memory_at(addr, args.size)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "sha":
            print(hashlib.sha256(view).hexdigest(), flush=True)
        elif cmd == "fill":
            rng = np.random.default_rng(int(rest[0]))
            view[:] = rng.integers(0, 256, args.size, dtype=np.uint8).tobytes()
            print("ok", flush=True)
        elif cmd == "notes":
            print(json.dumps([[n.sender, n.message.decode()] for n in engine.notifications()]),
                  flush=True)
        elif cmd == "quit":
            break
    engine.close_in()


if __name__ == "__main__":
    main()
