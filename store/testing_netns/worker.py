"""The processes of a :class:`~store.testing_netns.StoreLab` that run inside lab hosts.

``python -m store.testing_netns.worker --host A --metadata URL --etcd E`` is a store client
(checksums on, no contributed memory) that reads one JSON command per stdin line and answers one
JSON line (``{"error": ...}`` on failure): ``start`` a mixed put/get/overwrite workload in the
background, ``progress``, ``wait`` for its figures, ``verify`` every committed key, ``replicas``
(read each replica of each key on its own), ``put``, ``exists``, ``probe`` (until a put and a get
succeed), ``stats`` (the master's). Values are a function of (version, key, size), so any reader
can check them.

``--tcp-endpoint --metadata URL --segment S [--set HOST:PORT]`` prints (and rewrites) a
segment's TCP data endpoint in the metadata server: how a relay is put on a node's path.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import msgspec

from store.client import StoreClient, StoreError
from store.master import ReplicateConfig
from transfer.config import load_config
from transfer.memory import memory_at
from transfer.metadata import open_metadata_store
from transfer.metadata.keys import segment_key
from transfer.relay import parse_hostport

__all__ = ["main"]

MIB = 1 << 20


def _value(seed: int, key: str, size: int) -> bytes:
    """A key's bytes are a function of (seed, key, size): a reader can check them without the
    writer's memory, and two versions of one key differ."""
    return random.Random(f"{seed}/{key}/{size}").randbytes(size)


@dataclass
class _Workload:
    """A mixed put/get/overwrite run; the worker keeps ``stored`` for later verification."""

    client: Any
    stored: dict[str, tuple[int, int]]  # key -> (seed, size) of the committed version
    ops: int
    seed: int
    replica_num: int
    sizes: list[int]
    put_ratio: float = 0.4
    overwrite_ratio: float = 0.05
    prefix: str = "w/"
    done: int = 0
    result: dict[str, Any] = field(default_factory=dict)

    def run(self) -> None:
        rng = random.Random(self.seed)
        rc = ReplicateConfig(replica_num=self.replica_num)
        r: dict[str, Any] = {"ops": 0, "puts_ok": 0, "puts_failed": 0, "gets_ok": 0,
                             "gets_failed": [], "corrupt": 0, "corrupt_bytes": 0,
                             "overwrites": 0, "bytes_put": 0, "bytes_got": 0}
        keys: list[str] = list(self.stored)
        t0 = time.monotonic()
        n = 0
        for op in range(self.ops):
            roll = rng.random()
            if roll < self.put_ratio or not keys:
                key, version = f"{self.prefix}{self.seed}/{n}", self.seed
                n += 1
            elif roll < self.put_ratio + self.overwrite_ratio:
                # Remove and put again with other bytes: what a stale replica would betray.
                key, version = rng.choice(keys), self.seed * 1000 + op
                try:
                    self.client.remove(key, force=True)
                except StoreError:
                    pass
                self.stored.pop(key, None)
                keys.remove(key)
                r["overwrites"] += 1
            else:
                key = rng.choice(keys)
                version, size = self.stored[key]
                want = _value(version, key, size)
                try:
                    got = self.client.get(key)
                except StoreError as e:
                    r["gets_failed"].append([key, str(e)])
                else:
                    r["gets_ok"] += 1
                    r["bytes_got"] += len(got)
                    if got != want:
                        r["corrupt"] += 1
                        r["corrupt_bytes"] += sum(a != b for a, b in zip(got, want)) + abs(
                            len(got) - len(want))
                self.done = op + 1
                continue
            size = rng.choice(self.sizes)
            try:
                self.client.put(key, _value(version, key, size), rc)
            except StoreError:
                r["puts_failed"] += 1  # refused clearly; not stored, never read back
            else:
                r["puts_ok"] += 1
                r["bytes_put"] += size
                self.stored[key] = (version, size)
                keys.append(key)
            self.done = op + 1
        r["ops"] = self.ops
        r["elapsed"] = time.monotonic() - t0
        self.result = r


async def _each_replica(core: Any, key: str) -> list[tuple[str, bytes | str]]:
    found = (await core.replicas([key]))[0]
    if isinstance(found, StoreError):
        return []
    out: list[tuple[str, bytes | str]] = []
    for rep in found:
        size = core.value_size(rep)
        async with core.scratch((size + 63) & ~63) as base:
            got = (await core.get_pieces([key], [[(base, size)]], [[rep]]))[0]
            out.append((rep.segment, str(got) if isinstance(got, StoreError)
                        else bytes(memory_at(base, size))))
    return out


def _handle(client: Any, state: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
    """One worker command; see :class:`Worker`."""
    cmd = msg.get("cmd")
    stored: dict[str, tuple[int, int]] = state["stored"]
    if cmd == "start":
        wl = _Workload(client, stored, int(msg["ops"]), int(msg.get("seed", 1)),
                       int(msg.get("replica_num", 2)), list(msg.get("sizes", [512, 4096, 32768])),
                       float(msg.get("put_ratio", 0.4)), float(msg.get("overwrite_ratio", 0.05)),
                       str(msg.get("prefix", "w/")))
        thread = threading.Thread(target=wl.run, daemon=True)
        state["workload"], state["thread"] = wl, thread
        thread.start()
        return {"ok": True}
    if cmd == "progress":
        return {"done": state["workload"].done}
    if cmd == "wait":
        state["thread"].join(float(msg.get("timeout", 300)))
        if state["thread"].is_alive():
            return {"error": "workload still running"}
        return dict(state["workload"].result)
    if cmd == "verify":
        # Every committed key: exact bytes, or tell whether the master still lists it.
        failed, corrupt, missing = [], 0, []
        client.core.locations.clear()
        for key, (version, size) in list(stored.items()):
            try:
                got = client.get(key)
            except StoreError as e:
                (failed if client.exists(key) else missing).append([key, str(e)])
                continue
            corrupt += got != _value(version, key, size)
        return {"checked": len(stored), "failed": failed, "missing": missing, "corrupt": corrupt}
    if cmd == "exists":
        return {"exists": [client.exists(k) for k in msg["keys"]]}
    if cmd == "put":
        # Keys prefix0..n-1 with version ``version``; ``overwrite`` removes each first.
        rc = ReplicateConfig(replica_num=int(msg.get("replica_num", 2)))
        version, size = int(msg.get("version", 0)), int(msg["size"])
        for i in range(int(msg["n"])):
            key = f"{msg['prefix']}{i}"
            if msg.get("overwrite"):
                with contextlib.suppress(StoreError):  # gone already: the put is new then
                    client.remove(key, force=True)
            client.put(key, _value(version, key, size), rc)
            stored[key] = (version, size)
        return {"ok": True}
    if cmd == "replicas":
        # Read every replica of every committed key on its own: a stale copy that the master
        # re-attached would hide behind a good first replica in a plain get.
        client.core.locations.clear()
        stale, unreadable, copies = [], [], 0
        for key, (version, size) in list(stored.items()):
            want = _value(version, key, size)
            for segment, got in client.engine.run(_each_replica(client.core, key), 30):
                copies += 1
                if isinstance(got, str):
                    unreadable.append([key, segment, got])
                elif got != want:
                    stale.append([key, segment])
        return {"copies": copies, "stale": stale, "unreadable": unreadable}
    if cmd == "probe":
        # Until one put and get succeed: when the cluster serves again (monotonic clock is
        # shared by every namespace of this machine, so the caller can subtract its own).
        deadline = time.monotonic() + float(msg.get("within", 30))
        attempts, i = 0, 0
        while time.monotonic() < deadline:
            attempts += 1
            key = f"probe/{os.getpid()}/{i}"
            i += 1
            try:
                client.put(key, b"p" * 1024, ReplicateConfig(replica_num=1))
                if client.get(key) == b"p" * 1024:
                    return {"ok_at": time.monotonic(), "attempts": attempts}
            except StoreError:
                time.sleep(0.02)
        return {"error": f"no successful put/get in {msg.get('within', 30)}s"}
    if cmd == "stats":
        s = client.engine.run(client.core.master.stats(), 15)
        return {f: getattr(s, f) for f in s.__struct_fields__}
    return {"error": f"unknown command {cmd!r}"}


def _worker(args: argparse.Namespace) -> int:
    config = load_config().replace(**{
        "local_hostname": args.host, "metadata_server": args.metadata,
        "global_segment_size": 0, "local_buffer_size": 32 * MIB,
        "master.enable_ha": True, "etcd.endpoints": [args.etcd]})
    client = StoreClient(config, own_engine=True, checksum=True, timeout=60.0)
    out: IO[str] = sys.stdout
    print(json.dumps({"segment": client.segment_name}), flush=True)
    state: dict[str, Any] = {"stored": {}}
    try:
        for line in sys.stdin:
            msg = json.loads(line)
            if msg.get("cmd") == "quit":
                break
            try:
                reply = _handle(client, state, msg)
            except Exception as e:  # reported to the driver, which fails the test with it
                reply = {"error": f"{type(e).__name__}: {e}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        client.close()
    return 0


def _tcp_endpoint(args: argparse.Namespace) -> int:
    """Print a segment's data endpoint; with ``--set``, point it elsewhere (at a relay)."""
    async def run() -> str:
        store = open_metadata_store(args.metadata, secret=load_config().auth_secret)
        try:
            raw = await store.get(segment_key(args.segment))
            if raw is None:
                raise SystemExit(f"no descriptor for {args.segment}")
            desc = msgspec.json.decode(raw)
            tcp = desc["transports"]["tcp"]
            if args.set:
                host, port = parse_hostport(args.set)
                desc["transports"] = {"tcp": {**tcp, "host": host, "port": port}}
                await store.put(segment_key(args.segment), msgspec.json.encode(desc))
            return f"{tcp['host']}:{tcp['port']}"
        finally:
            with contextlib.suppress(Exception):
                await store.close()

    print(asyncio.run(run()), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m store.testing_netns.worker")
    parser.add_argument("--tcp-endpoint", action="store_true",
                        help="print (or --set) --segment's tcp endpoint instead of working")
    parser.add_argument("--host", help="this host's lab address (worker)")
    parser.add_argument("--metadata", required=True, help="HTTP metadata server URL")
    parser.add_argument("--etcd", help="etcd endpoint (worker)")
    parser.add_argument("--segment", help="segment name (--tcp-endpoint)")
    parser.add_argument("--set", default="", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    if args.tcp_endpoint:
        if not args.segment:
            parser.error("--tcp-endpoint needs --segment")
        return _tcp_endpoint(args)
    if not (args.host and args.etcd):
        parser.error("a worker needs --host and --etcd")
    return _worker(args)


if __name__ == "__main__":
    sys.exit(main())
