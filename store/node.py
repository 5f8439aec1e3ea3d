"""``mooncake-store-node`` / ``python -m store.node``: a long-lived process that lends memory.

The role of Mooncake's ``mooncake_client``: it contributes ``global_segment_size`` bytes of
shared-memory-backed DRAM (and optionally a file on an SSD directory, the file tier) to the pool
and serves reads and writes of them through its transfer engine. Inference engines then run as
clients contributing zero memory (``global_segment_size=0``, only a staging buffer), so the cache
outlives engine restarts. (An engine may still contribute memory itself - embedded mode - but
those objects vanish with its process.)

The SSD file is a separate segment on a second transfer engine, because a segment is named by its
engine. Objects get there when the master evicts them from DRAM: with its SSD tier on (the
default, ``--enable_offload``) it asks this node to copy them to the file first and frees the DRAM
only after (:mod:`store.client.demote`); a writer may also name the file segment as its
``preferred_segment``. Gets read from whichever tier holds a replica, memory first.
Exits 0 on SIGTERM/SIGINT after unmounting (the objects it held disappear from the pool).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from store.client import AsyncStoreClient
from store.master import SegmentDesc
from transfer.config import MooncakeConfig, add_config_arguments, config_from_args
from transfer.config.sizes import parse_size
from transfer.engine import Engine

__all__ = ["StoreNode", "main"]

logger = logging.getLogger("store.node")


class StoreNode:
    """The node's engines, client and optional SSD file segment."""

    def __init__(self, config: MooncakeConfig, *, ssd_dir: str = "", ssd_size: int = 0) -> None:
        if config.global_segment_size <= 0 and not ssd_size:
            raise ValueError("a store node must contribute memory (--global-segment-size) "
                             "or an SSD file (--ssd-dir/--ssd-size)")
        if bool(ssd_dir) != bool(ssd_size):
            raise ValueError("--ssd-dir and --ssd-size go together")
        self.config = config
        self.ssd_dir = ssd_dir
        self.ssd_size = ssd_size
        self.engine = Engine(config)
        self.ssd_engine: Engine | None = None
        self.client: AsyncStoreClient | None = None
        self.ssd_path = ""

    async def start(self) -> None:
        await self.engine.start()
        self.client = AsyncStoreClient(self.engine, self.config,
                                       local_buffer_size=min(self.config.local_buffer_size,
                                                             1 << 20))
        await self.client.start()
        await self.client.prefaulted()
        if self.ssd_size:
            os.makedirs(self.ssd_dir, exist_ok=True)
            self.ssd_path = os.path.join(self.ssd_dir, f"mooncake-ssd-{os.getpid()}.seg")
            with open(self.ssd_path, "wb") as f:
                f.truncate(self.ssd_size)
            self.ssd_engine = Engine(self.config)
            await self.ssd_engine.start()
            base = await self.ssd_engine.register_file(self.ssd_path)
            await self.client.mount(SegmentDesc(
                name=self.ssd_engine.name, base=base, size=self.ssd_size,
                client_id=self.client.client_id, host_id=self.engine.name.rpartition(":")[0],
                tier="file"))
        logger.info("store node %s: %d bytes of DRAM%s", self.engine.name,
                    self.config.global_segment_size,
                    f", SSD segment {self.ssd_engine.name} ({self.ssd_size} bytes at "
                    f"{self.ssd_path})" if self.ssd_engine else "")

    @property
    def segments(self) -> list[str]:
        """Names of the contributed segments (DRAM first)."""
        return [d.name for d in self.client.segments] if self.client else []

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.ssd_engine is not None:
            await self.ssd_engine.close()
        await self.engine.close()
        if self.ssd_path:
            try:
                os.unlink(self.ssd_path)
            except OSError:
                pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mooncake-store-node",
        description="Mooncake Store node: contributes DRAM (and an SSD file) to the pool and "
                    "serves it, so cached objects outlive inference-engine restarts.")
    add_config_arguments(parser, ["local_hostname", "metadata_server", "global_segment_size",
                                  "local_buffer_size", "protocol", "device_name",
                                  "master_server_address", "master.client_ttl", "master.enable_ha",
                                  "etcd.endpoints"])
    parser.add_argument("--ssd-dir", "--ssd_dir", default="",
                        help="directory of the SSD-tier file segment (default: none)")
    parser.add_argument("--ssd-size", "--ssd_size", type=parse_size, default=0,
                        help="size of the SSD-tier file, e.g. 10GB (default: none)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a store node until SIGTERM/SIGINT; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        node = StoreNode(config, ssd_dir=args.ssd_dir, ssd_size=args.ssd_size)
    except (ValueError, OSError) as e:
        print(f"mooncake-store-node: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(node))


async def _serve(node: StoreNode) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
    except Exception as e:
        logger.error("store node failed to start: %s", e)
        await node.stop()
        return 1
    print(f"READY {' '.join(node.segments)}", flush=True)
    await stop.wait()
    await node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
