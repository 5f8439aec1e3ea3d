"""``mooncake-p2p``: the P2P store's verbs from a shell.

``register`` and ``get --serve`` keep the process alive, serving the object, until SIGINT or
SIGTERM (a process's memory is what it serves, so serving ends with it). ``unregister`` and
``delete-replica`` are administrative from another process: they delist the whole object, or
one holder (``--segment``), from the metadata store. ``get`` draws a progress bar on stderr
when it is a terminal (or with ``--progress``) and prints per-source counters with ``--json``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from store.p2p.fetch import NoSourceError
from store.p2p.records import RecordError
from store.p2p.store import GetResult, ObjectExistsError, ObjectNotFoundError, P2PStore
from transfer.config import ConfigError
from transfer.errors import TransferError
from transfer.metadata import MetadataError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mooncake-p2p", description=__doc__.splitlines()[0])
    p.add_argument("--metadata-server", required=True,
                   help="etcd://host:port or http://host:port/metadata")
    p.add_argument("--local-hostname", default="127.0.0.1", help="address peers reach us at")
    p.add_argument("-o", "--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="transfer-engine config override, e.g. transfer.enable_shm=false")
    p.add_argument("--lease-ttl", type=float, default=10.0,
                   help="seconds a dead holder stays listed")
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("register", help="publish files and serve them until interrupted")
    r.add_argument("name")
    r.add_argument("paths", nargs="+")
    r.add_argument("--chunk-size", type=int, default=None)
    g = sub.add_parser("get", help="fetch an object into a file")
    g.add_argument("name")
    g.add_argument("path")
    g.add_argument("--serve", action="store_true", help="keep serving it until interrupted")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    bar = g.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", default=None)
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    ls = sub.add_parser("list", help="objects with a live holder")
    ls.add_argument("prefix", nargs="?", default="")
    ls.add_argument("--json", action="store_true")
    u = sub.add_parser("unregister", help="delist an object (or, with --segment, one holder)")
    u.add_argument("name")
    u.add_argument("--segment", default=None)
    d = sub.add_parser("delete-replica", help="delist one holder of an object")
    d.add_argument("name")
    d.add_argument("--segment", required=True)
    return p


class ProgressBar:
    """A one-line progress bar: ``[#####.....] 512.0/1024.0 MiB 410.3 MiB/s``."""

    def __init__(self, total: int, stream: Any = sys.stderr, width: int = 30) -> None:
        self._total, self._stream, self._width = total, stream, width
        self._start = time.perf_counter()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        filled = self._width * done // max(total, 1)
        rate = done / max(now - self._start, 1e-9) / 2**20
        self._stream.write(f"\r[{'#' * filled}{'.' * (self._width - filled)}] "
                           f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB {rate:.1f} MiB/s")
        if done >= total:
            self._stream.write("\n")
        self._stream.flush()


def _result_json(result: GetResult, segment: str) -> dict[str, Any]:
    return {"name": result.name, "size": result.size, "seconds": result.seconds,
            "throughput_mib_s": result.throughput / 2**20, "refetches": result.refetches,
            "segment": segment,
            "sources": {k: {"bytes": v.bytes, "chunks": v.chunks, "failures": v.failures,
                            "corrupt": v.corrupt, "dropped": v.dropped}
                        for k, v in result.sources.items()}}


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _run(args: argparse.Namespace) -> int:
    options: dict[str, str] = {}
    for item in args.engine_option:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"engine option {item!r} is not KEY=VALUE")
        options[key] = value
    store = await P2PStore.open(args.metadata_server, local_hostname=args.local_hostname,
                                engine_options=options, lease_ttl=args.lease_ttl)
    try:
        if args.verb == "register":
            info = await store.register(args.name, args.paths, chunk_size=args.chunk_size)
            print(json.dumps({"serving": info.name, "size": info.size,
                              "segment": store.segment}), flush=True)
            await _wait_for_signal()
        elif args.verb == "get":
            record = await store.list(args.name)
            size = next((o.size for o in record if o.name == args.name), 0)
            show = args.progress if args.progress is not None else sys.stderr.isatty()
            result = await store.get(args.name, into=args.path,
                                     progress=ProgressBar(size) if show and size else None)
            if args.json:
                print(json.dumps(_result_json(result, store.segment)), flush=True)
            else:
                print(f"got {result.name}: {result.size} bytes in {result.seconds:.2f} s "
                      f"({result.throughput / 2**20:.1f} MiB/s) from "
                      f"{len([s for s in result.sources.values() if s.bytes])} sources",
                      flush=True)
            if args.serve:
                await _wait_for_signal()
        elif args.verb == "list":
            objects = await store.list(args.prefix)
            if args.json:
                print(json.dumps([{"name": o.name, "size": o.size, "chunk_size": o.chunk_size,
                                   "holders": list(o.holders)} for o in objects]))
            for o in objects if not args.json else ():
                print(f"{o.name}\t{o.size}\t{len(o.holders)} holders: {' '.join(o.holders)}")
        elif args.verb == "unregister" and args.segment is None:
            if not await store.delete_object(args.name):
                raise ObjectNotFoundError(f"no object named {args.name!r} is published")
        elif not await store.remove_holder(args.name, args.segment):
            raise ObjectNotFoundError(f"{args.segment} does not hold {args.name!r}")
    finally:
        await store.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mooncake-p2p``; returns the exit status (errors: a message and 1)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
    except (ObjectNotFoundError, ObjectExistsError, NoSourceError, RecordError, MetadataError,
            TransferError, ConfigError, OSError, ValueError) as e:
        print(f"mooncake-p2p: error: {e}", file=sys.stderr)
        return 1
