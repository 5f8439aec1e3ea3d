"""Run every fuzz target of ``tests/_fuzz.py`` with many examples: cases, crashes, hangs, memory.

    python benchmarks/fuzz_all.py --cases 100000 [--json] [--only NAME ...]

Why a separate runner: CI runs a few hundred cases per target (``tests/test_fuzz_*.py``); the
issue asks for 100k per target, which takes minutes per live server. Unlike the tests this keeps
going after a violation and counts it, so one run reports every target's figures. Crashes are
:class:`FuzzViolation` (an undocumented exception, a 5xx, a dead server), hangs are
:class:`FuzzHang` (a call past the bound); peak memory is the RSS of the process holding the
decoder (the server process for live targets, this process for pure decoders).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402

import _fuzz  # noqa: E402


def targets() -> dict[str, tuple[Any, Any]]:
    """name -> (harness context factory, strategy factory taking the harness)."""
    return {
        "descriptor": (_fuzz._descriptor_harness, lambda h: _fuzz.descriptor_cases),
        "p2p_records": (_fuzz._record_harness, lambda h: _fuzz.record_cases),
        "config_files": (_fuzz._config_harness, lambda h: _fuzz.config_cases),
        "metadata_http": (lambda: _fuzz.metadata_server(None), lambda h: _fuzz.metadata_cases),
        "metadata_http_token": (lambda: _fuzz.metadata_server("fuzz-token"),
                                lambda h: _fuzz.metadata_cases),
        "tcp_data": (lambda: _fuzz.tcp_engine(None),
                     lambda h: _fuzz.tcp_cases(h.addr, h.size, None)),
        "tcp_data_auth": (lambda: _fuzz.tcp_engine(b"fuzz-secret"),
                          lambda h: _fuzz.tcp_cases(h.addr, h.size, b"fuzz-secret")),
    }


def run_target(name: str, factory: Any, strategy_of: Any, cases: int,
               seconds: float | None) -> dict[str, Any]:
    stats: dict[str, Any] = {"target": name, "cases": 0, "crashes": 0, "hangs": 0,
                             "examples": []}
    with factory() as h:
        h.healthy()
        rss0 = peak = h.rss()
        t0 = time.monotonic()

        @settings(max_examples=cases, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy_of(h))
        def attack(case: Any) -> None:
            nonlocal peak
            if seconds is not None and time.monotonic() - t0 > seconds:
                return
            stats["cases"] += 1
            try:
                h.check(case)
            except _fuzz.FuzzHang as e:
                stats["hangs"] += 1
                if len(stats["examples"]) < 5:
                    stats["examples"].append(str(e)[:300])
            except Exception as e:  # count every violation, keep going
                stats["crashes"] += 1
                if len(stats["examples"]) < 5:
                    stats["examples"].append(f"{type(e).__name__}: {str(e)[:300]}")
            if stats["cases"] % 200 == 0:
                peak = max(peak, h.rss())

        attack()
        elapsed = time.monotonic() - t0
        try:
            h.healthy()
            stats["serves_after"] = True
        except Exception as e:
            stats["serves_after"] = False
            stats["examples"].append(f"after: {e}")
        peak = max(peak, h.rss())
    stats.update(seconds=round(elapsed, 1), rss_start_mb=round(rss0 / 2**20, 1),
                 rss_peak_mb=round(peak / 2**20, 1),
                 cases_per_s=round(stats["cases"] / max(elapsed, 1e-9), 1))
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", type=int, default=100_000, help="examples per target")
    p.add_argument("--seconds", type=float, default=None, help="time cap per target")
    p.add_argument("--only", nargs="*", default=None, help="run only these targets")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    args = p.parse_args()
    results = []
    for name, (factory, strategy_of) in targets().items():
        if args.only and name not in args.only:
            continue
        r = run_target(name, factory, strategy_of, args.cases, args.seconds)
        results.append(r)
        if not args.json:
            print(f"{name:22s} cases={r['cases']:>7} crashes={r['crashes']} hangs={r['hangs']} "
                  f"serves_after={r['serves_after']} rss {r['rss_start_mb']}->{r['rss_peak_mb']}"
                  f" MiB  {r['seconds']}s ({r['cases_per_s']}/s)", flush=True)
            for ex in r["examples"]:
                print(f"    {ex}")
    if args.json:
        print(json.dumps({"targets": results}, indent=2))
    sys.exit(1 if any(r["crashes"] or r["hangs"] or not r["serves_after"] for r in results) else 0)


if __name__ == "__main__":
    main()
