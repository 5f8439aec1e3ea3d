"""``mooncake-master`` / ``python -m store.master``: run the store master.

With no flags it runs standalone: RPC on 127.0.0.1:50051, metrics and ``/health`` on :9003, and
the HTTP metadata server at ``http://127.0.0.1:8080/metadata``. Flags use the real
``mooncake_master``'s names where the meaning is the same (dashes or underscores both work);
anything not given comes from the config file / environment (see :mod:`transfer.config`).
Exits 0 on SIGTERM/SIGINT, 3 if it loses leadership under HA (restart it as a standby).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from transfer.config import ConfigError, MooncakeConfig, load_config
from transfer.config.values import to_addresses, to_bool, to_float, to_host, to_int, to_port

from .server import MasterServer

__all__ = ["build_parser", "config_from_argv", "main"]

EXIT_LOST_LEADERSHIP = 3

# (flag, config key, converter, metavar, help)
_FLAGS: list[tuple[str, str, Callable[[str], Any], str, str]] = [
    ("rpc_address", "master.rpc_address", str, "HOST:PORT",
     "address clients dial, published in etcd under HA (default: host:rpc_port)"),
    ("rpc_host", "master.host", to_host, "HOST", "address the RPC server binds (default 127.0.0.1)"),
    ("rpc_port", "master.port", partial(to_port, allow_zero=True), "PORT",
     "RPC port (default 50051; 0 = any free port)"),
    ("metrics_port", "master.metrics_port", partial(to_port, allow_zero=True), "PORT",
     "Prometheus /metrics and /health port (default 9003)"),
    ("enable_http_metadata_server", "master.enable_http_metadata_server", to_bool, "BOOL",
     "host the HTTP metadata server (default true)"),
    ("http_metadata_server_host", "metadata.host", to_host, "HOST",
     "HTTP metadata server bind address (default 127.0.0.1)"),
    ("http_metadata_server_port", "metadata.port", partial(to_port, allow_zero=True), "PORT",
     "HTTP metadata server port (default 8080)"),
    ("default_kv_lease_ttl", "master.default_kv_lease_ttl", partial(to_int, lo=1, hi=86_400_000),
     "MS", "lease a read grants, in ms (default 10000)"),
    ("default_kv_soft_pin_ttl", "master.default_kv_soft_pin_ttl",
     partial(to_int, lo=1, hi=30 * 86_400_000), "MS",
     "soft pin duration, in ms (default 1800000 = 30 min)"),
    ("eviction_high_watermark_ratio", "master.eviction_high_watermark_ratio",
     partial(to_float, lo=0.01, hi=1.0), "RATIO", "evict above this memory usage (default 0.90)"),
    ("eviction_ratio", "master.eviction_ratio", partial(to_float, lo=0.0, hi=1.0), "RATIO",
     "share of capacity one eviction pass frees (default 0.05)"),
    ("enable_offload", "master.enable_ssd_offload", to_bool, "BOOL",
     "demote evicted objects to a mounted file (SSD-tier) segment first (default true)"),
    ("ssd_offload_timeout", "master.ssd_offload_timeout", partial(to_float, lo=0.01, hi=3600.0),
     "SECONDS", "abandon a demotion not finished within this, evicting the object (default 10)"),
    ("client_ttl", "master.client_ttl", partial(to_float, lo=0.01, hi=3600.0), "SECONDS",
     "declare a client dead after this long without a heartbeat (default 10)"),
    ("put_start_timeout", "master.put_start_timeout", partial(to_float, lo=0.01, hi=3600.0),
     "SECONDS", "revoke puts not ended within this (default 30)"),
    ("tenants_file", "master.tenants_file", str, "PATH",
     "JSON/YAML file of tenants (id -> secret, quota); needs the cluster auth secret "
     "(docs/security.md; default: single tenant)"),
    ("etcd_endpoints", "etcd.endpoints", to_addresses, "HOST:PORT[,...]",
     "etcd endpoints; with --enable_ha, used for leader election and discovery"),
    ("enable_ha", "master.enable_ha", to_bool, "BOOL",
     "leader election through etcd; standbys take over a dead leader (default false)"),
    ("leader_lease_ttl", "master.leader_lease_ttl", partial(to_float, lo=0.0, hi=60.0), "SECONDS",
     "etcd lease of the leader key: how fast a dead leader is replaced (default 2)"),
]


def _converter(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return fn(text)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mooncake-master",
        description="Mooncake Store master: metadata of the pooled KV cache (segments, objects, "
                    "replicas, leases). Data never passes through it.")
    parser.add_argument("--config-file", "--config_file", dest="config_file", metavar="PATH",
                        help="JSON/YAML config file (default: $MOONCAKE_CONFIG_PATH)")
    for flag, key, conv, metavar, help_text in _FLAGS:
        names = ["--" + flag.replace("_", "-"), "--" + flag]
        if conv is to_bool:
            parser.add_argument(*names, dest=key, nargs="?", const="true", type=_converter(conv),
                                metavar=metavar, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(*names, dest=key, type=_converter(conv), metavar=metavar,
                                default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--log-level", "--log_level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
    return parser


def config_from_argv(argv: Sequence[str] | None = None) -> tuple[MooncakeConfig, argparse.Namespace]:
    """Parse flags over the file/env config (exits 2 on a bad flag, like argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    try:
        config = load_config(getattr(args, "config_file", None))
        config = config.replace(**overrides)
    except ConfigError as e:
        parser.error(str(e))
    return config, args


async def _serve(config: MooncakeConfig) -> int:
    master = MasterServer(config)
    await master.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lost = asyncio.ensure_future(master.lost_leadership.wait())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([lost, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
        stopped.cancel()
        await master.stop()
    return EXIT_LOST_LEADERSHIP if master.lost_leadership.is_set() and not stop.is_set() else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mooncake-master``; returns the exit status."""
    config, args = config_from_argv(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        runner: Callable[[Any], int] = uvloop.run  # type: ignore[assignment]
    except ImportError:
        runner = asyncio.run
    try:
        return runner(_serve(config))
    except OSError as e:
        logging.getLogger("store.master").error("cannot start: %s", e)
        return 1
    except ValueError as e:
        logging.getLogger("store.master").error("bad configuration: %s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
