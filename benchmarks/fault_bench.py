"""Store faults across network-namespace hosts at full size (issue #10): the figures.

Runs :mod:`store.testing_netns.scenarios` - the code the netns fault tests run scaled down:

* ``kill`` / ``cut``: a store node killed with ``kill -9`` / cut off (link down, process alive)
  during a mixed put/get/overwrite workload (``--ops``, replica_num=2): failed gets of keys that
  still had a replica, corrupt bytes, reclaim time against the client TTL, the final check of
  every key and every replica (and for ``cut``, re-admission after the link comes back);
* ``master``: the master leader killed ``--trials`` times with standbys: kill -> first
  successful put+get (p50/max), kill -> every committed object readable, objects lost;
* ``relay``: the same workload direct and through relays adding ``--delay-ms`` each way and
  resetting ``--reset-fraction`` of connections (plus ``--reset-per-mib``: a transfer engine
  keeps a few long-lived connections, so a per-connection draw alone rarely fires): rates.

Needs root (network namespaces). ``python benchmarks/fault_bench.py [--json]``
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from store.testing_netns import scenarios
from transfer.netns import netns_available

ALL = ("kill", "cut", "master", "relay")


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _summary(name: str, f: dict[str, Any]) -> str:
    if name in ("kill", "cut"):
        extra = (f", re-admitted after {f['readmit_s']:.2f}s" if f.get("readmitted") else
                 ", not re-admitted" if name == "cut" else "")
        return (f"node {name}: {f['ops']} ops in {f['elapsed_s']:.1f}s, failed gets of surviving "
                f"keys {f['failed_gets_surviving']}, corrupt bytes {f['corrupt_bytes']}, "
                f"reclaimed in {f['reclaim_s']:.2f}s (TTL {f['ttl_s']}s), verified "
                f"{f['verified']} keys / {f['replica_copies']} copies: "
                f"{f['verify_failed_n'] + f['verify_missing_n']} failed, "
                f"{f['stale_copies_n']} stale{extra}")
    if name == "master":
        return (f"master failover x{f['trials']}: first op after p50 {f['recovery_p50_s']:.2f}s"
                f" / max {f['recovery_max_s']:.2f}s, all objects after max "
                f"{max(f['all_readable_s']):.2f}s, lost {f['objects_lost']} of "
                f"{f['objects_committed']}")
    c, r = f["clean"], f["relay"]
    return (f"relay ({f['delay_ms']:.0f} ms, {f['relays']['resets']} resets): "
            f"{r['ops_per_s']:.1f} ops/s, {r['mib_per_s']:.2f} MiB/s vs clean "
            f"{c['ops_per_s']:.0f} ops/s, {c['mib_per_s']:.1f} MiB/s; failures "
            f"{r['puts_failed'] + r['gets_failed']}, corrupt {r['corrupt_bytes']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default=",".join(ALL), help=f"subset of {','.join(ALL)}")
    ap.add_argument("--ops", type=int, default=10_000, help="ops of the node-fault workloads")
    ap.add_argument("--ttl", type=float, default=2.0, help="client TTL of the master (s)")
    ap.add_argument("--trials", type=int, default=5, help="master kills")
    ap.add_argument("--masters", type=int, default=3, help="leader + standbys")
    ap.add_argument("--objects", type=int, default=500, help="objects committed per kill")
    ap.add_argument("--relay-ops", type=int, default=1000)
    ap.add_argument("--delay-ms", type=float, default=50.0)
    ap.add_argument("--reset-fraction", type=float, default=0.01)
    ap.add_argument("--reset-per-mib", type=float, default=1.0)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    ok, why = netns_available()
    if not ok:
        print(f"fault_bench: {why}", file=sys.stderr)
        return 2
    chosen = [s for s in args.scenarios.split(",") if s]
    unknown = set(chosen) - set(ALL)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}")
    out: dict[str, Any] = {}
    for name in chosen:
        _log(f"{name}...")
        t0 = time.monotonic()
        if name in ("kill", "cut"):
            f = scenarios.node_fault(name, ops=args.ops, ttl=args.ttl, bait=100, log=_log)
        elif name == "master":
            f = scenarios.master_failover(trials=args.trials, masters=args.masters,
                                          objects=args.objects, ttl=args.ttl, log=_log)
        else:
            f = scenarios.slow_path(ops=args.relay_ops, delay_ms=args.delay_ms,
                                    reset_fraction=args.reset_fraction,
                                    reset_per_mib=args.reset_per_mib, log=_log)
        f["wall_s"] = time.monotonic() - t0
        out[name] = f
        _log(_summary(name, f))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name, f in out.items():
            print(_summary(name, f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
