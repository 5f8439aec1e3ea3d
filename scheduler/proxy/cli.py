"""``mooncake-proxy`` / ``python -m scheduler``: run the Conductor proxy in front of vLLM engines."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from typing import Any

from scheduler.policy import POLICY_NAMES, REJECTION_MODES, ConductorConfig
from scheduler.proxy.app import Proxy, ProxySettings, StoreLookup
from scheduler.proxy.instances import InstanceSpec, load_instances, parse_instance
from scheduler.proxy.prompt import PromptHasher
from scheduler.proxy.upstream import UpstreamTimeouts
from store.keys import KeyNamespace
from transfer.config import MooncakeConfig, load_config

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mooncake-proxy",
        description="OpenAI-compatible P/D proxy that routes by KV-cache hits and predicted "
                    "TTFT/TBT, rejecting early what cannot meet its SLO.")
    a = p.add_argument
    a("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    a("--port", type=int, default=8000, help="port to bind (default: 8000)")
    a("--prefill", action="append", default=[], metavar="URL", help="a prefill instance (repeat)")
    a("--decode", action="append", default=[], metavar="URL", help="a decode instance (repeat)")
    a("--instance", action="append", default=[], metavar="[ROLE=]URL",
      help="an instance with its role: prefill|decode|mixed (default mixed)")
    a("--instances-file", "--instances_file", metavar="PATH",
      help='JSON list of {"url", "role", "id", "namespace", "store_segment"}')
    a("--etcd-endpoints", "--etcd_endpoints", metavar="HOST:PORT[,HOST:PORT]",
      help="discover instances under mooncake/instances/<role>/<id> in etcd (written by the "
           "connector when its extra config names etcd_endpoints and advertise_url)")
    a("--policy", choices=POLICY_NAMES, default="global_cache", help="routing policy")
    a("--rejection", choices=REJECTION_MODES, default="predictive", help="early rejection mode")
    a("--ttft-slo", "--ttft_slo", type=float, default=30.0, help="TTFT SLO in seconds (0: none)")
    a("--tbt-slo", "--tbt_slo", type=float, default=0.1, help="TBT SLO in seconds (0: none)")
    a("--kvcache-balancing-threshold", "--kvcache_balancing_threshold", type=float, default=1.25,
      help="prefix ratio above which hot blocks are replicated next to the chosen instance")
    a("--tokenizer", help="local tokenizer path (the model's); enables cache-aware routing")
    a("--namespace", help="KV key namespace as JSON (store.keys.KeyNamespace fields), as the "
                          "engines' connector uses it; optional: learned from the instances "
                          "(config file, etcd, or the first P/D answer)")
    a("--master", help="store master host:port, for one batched existence lookup per request "
                       "and hot-spot replication to instances that name a store_segment")
    a("--api-key", "--api_key", default=os.environ.get("MOONCAKE_PROXY_API_KEY"),
      help="require 'Authorization: Bearer KEY' from clients (env MOONCAKE_PROXY_API_KEY)")
    a("--max-in-flight", "--max_in_flight", type=int, default=1024,
      help="requests in flight before answering 503")
    a("--max-body-bytes", "--max_body_bytes", type=int, default=16 << 20,
      help="largest request body accepted (413 beyond it)")
    a("--body-timeout", "--body_timeout", type=float, default=30.0,
      help="seconds a client may take to send its request body (408 after it); a request "
           "counts towards --max-in-flight only once its body is in")
    a("--index-capacity-blocks", "--index_capacity_blocks", type=int, default=1_000_000,
      help="blocks remembered per instance (LRU beyond it), so memory stays bounded")
    a("--request-timeout", "--request_timeout", type=float, default=600.0,
      help="upper bound of one whole upstream exchange, a stream included, in seconds")
    a("--connect-timeout", "--connect_timeout", type=float, default=5.0,
      help="upper bound of the TCP connect to an engine, in seconds")
    a("--first-byte-timeout", "--first_byte_timeout", type=float, default=600.0,
      help="upper bound from sending a request to an engine to its response headers (a "
           "prefill; a non-streamed answer's whole generation), in seconds; requests waiting "
           "on an engine the health probes take out end at once and go elsewhere")
    a("--idle-timeout", "--idle_timeout", type=float, default=60.0,
      help="longest silence of an engine mid-answer before the request fails (a stream then "
           "ends with an SSE error event), in seconds")
    a("--health-interval", "--health_interval", type=float, default=2.0,
      help="seconds between health probes of each engine")
    a("--health-timeout", "--health_timeout", type=float, default=2.0,
      help="upper bound of one health probe; 3 missed in a row (or a refused connection) take "
           "an engine out until a probe passes, in seconds")
    a("--log-level", "--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _instances(args: argparse.Namespace) -> list[InstanceSpec]:
    specs = [InstanceSpec(url, "prefill") for url in args.prefill]
    specs += [InstanceSpec(url, "decode") for url in args.decode]
    specs += [parse_instance(text) for text in args.instance]
    if args.instances_file:
        specs += load_instances(args.instances_file)
    if not specs and not args.etcd_endpoints:
        raise ValueError("no instances: give --prefill/--decode, --instance, --instances-file "
                         "or --etcd-endpoints")
    roles = {s.role for s in specs}
    if "mixed" in roles and len(roles) > 1:
        raise ValueError("mixed instances cannot be combined with prefill/decode instances")
    if roles & {"prefill", "decode"} and not {"prefill", "decode"} <= roles \
            and not args.etcd_endpoints:
        raise ValueError("P/D mode needs at least one prefill and one decode instance")
    return specs


def _store_lookup(address: str, config: MooncakeConfig) -> StoreLookup:
    """Existence lookups on the master, authenticated like any store client of this cluster
    (cluster secret or tenant, TLS: ``MOONCAKE_CONFIG_PATH`` and ``MOONCAKE_*`` variables)."""
    from store.master.client import MasterClient  # noqa: PLC0415 - only when a master is given
    from store.master.tenants import master_credentials  # noqa: PLC0415

    client = MasterClient(address, **master_credentials(config))

    async def lookup(keys: Any) -> list[bool]:
        return await client.batch_exists(list(keys))

    return lookup


async def _run(args: argparse.Namespace) -> None:
    namespace = KeyNamespace.from_dict(json.loads(args.namespace)) if args.namespace else None
    replicator = None
    store_config = load_config() if args.master else None
    if args.master:
        from scheduler.proxy.replication import StoreReplicator  # noqa: PLC0415

        replicator = await StoreReplicator.create(args.master, store_config)
    proxy = Proxy(
        _instances(args),
        settings=ProxySettings(host=args.host, port=args.port, api_key=args.api_key,
                               max_in_flight=args.max_in_flight,
                               max_body_bytes=args.max_body_bytes,
                               body_timeout=args.body_timeout,
                               index_capacity_blocks=args.index_capacity_blocks,
                               request_timeout=args.request_timeout,
                               connect_timeout=args.connect_timeout,
                               first_byte_timeout=args.first_byte_timeout,
                               idle_timeout=args.idle_timeout,
                               health_interval=args.health_interval,
                               health_timeout=args.health_timeout,
                               etcd_endpoints=args.etcd_endpoints),
        conductor=ConductorConfig(policy=args.policy, rejection=args.rejection,
                                  ttft_slo_s=args.ttft_slo, tbt_slo_s=args.tbt_slo,
                                  kvcache_balancing_threshold=args.kvcache_balancing_threshold),
        hasher=PromptHasher(namespace, args.tokenizer),
        store_lookup=(_store_lookup(args.master, store_config)
                      if store_config is not None else None),
        replicator=replicator,
    )
    await proxy.start()
    logging.getLogger("mooncake.proxy").warning("mooncake-proxy listening on %s", proxy.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await proxy.stop()
        if replicator is not None:
            await replicator.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _instances(args)
        if args.namespace:
            KeyNamespace.from_dict(json.loads(args.namespace))
        UpstreamTimeouts(connect=args.connect_timeout, first_byte=args.first_byte_timeout,
                         idle=args.idle_timeout, total=args.request_timeout)
        if not (args.health_interval > 0 and args.health_timeout > 0):
            raise ValueError("--health-interval and --health-timeout must be positive")
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    import uvloop  # noqa: PLC0415

    uvloop.run(_run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
