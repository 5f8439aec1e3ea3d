"""Run every fuzz target with many examples: cases, crashes, hangs, memory.

Targets (defined in ``tests/_fuzz*.py``, shared with the CI tests): segment descriptors, P2P
records and progress entries, config files, the HTTP metadata server (open and with a token),
the TCP data port (open and authenticated), the proxy's HTTP front door (without and with the
model's tokenizer), the master's RPC requests, and the RPC clients against a hostile server.

    python benchmarks/fuzz_all.py --cases 100000 [--jobs 2] [--lanes N] [--seed N] [--json]
                                  [--seconds S] [--only NAME ...]

Why a separate runner: CI runs a few hundred cases per target (``tests/test_fuzz_*.py``); the
issue asks for 100k per target, which takes minutes per live server. Unlike the tests this keeps
going after a violation and counts it, so one run reports every target's figures. Crashes are
:class:`FuzzViolation` (an undocumented exception, a 5xx, a dead server), hangs are
:class:`FuzzHang` (a call past the bound). Memory is the RSS of the process holding the decoder:
the server's own process for live servers (the proxy included), this process for pure decoders
and for the RPC clients (whose hostile server runs in a process of its own), sampled every
``RSS_EVERY`` cases and reported at 10%, 50% and 100% of the cases with the growth over the
second half (about 0 when the decoder's memory is bounded; see ``rss_profile``). Targets run in
``--jobs`` worker processes at once; the hypothesis seed is random unless ``--seed`` is given
(CI derandomizes), and is reported so a run can be replayed. Within a target, live servers
check several cases at once (``--lanes``, each case on its own connection) because their
cases mostly wait: for a server to answer a request it cannot complete, or for a client to
time out on a stalled peer. ``--lanes 1`` replays a seed one case at a time.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import _fuzz  # noqa: E402
import _fuzz_master  # noqa: E402
import _fuzz_proxy  # noqa: E402
import _fuzz_rpc_replies  # noqa: E402


def _tiny_tokenizer() -> Any:
    from mooncake_connector.testing import build_tiny_model

    return build_tiny_model("tiny")


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
        "proxy_http": (lambda: _fuzz_proxy.proxy_harness(None), lambda h: _fuzz_proxy.proxy_cases),
        "proxy_http_tokenizer": (lambda: _fuzz_proxy.proxy_harness(_tiny_tokenizer()),
                                 lambda h: _fuzz_proxy.proxy_cases),
        "master_rpc": (_fuzz_master.master_harness, lambda h: _fuzz_master.master_cases),
        "rpc_client_replies": (_fuzz_rpc_replies.reply_harness,
                               lambda h: _fuzz_rpc_replies.reply_cases),
    }


BATCH = 500
"""Examples per hypothesis run inside one target (see ``run_target``)."""
RSS_EVERY = 200
"""Cases between two samples of the decoder process's RSS."""
SERIES_POINTS = 20
"""Windows of the RSS figures: the RSS "at" a point is over the 5% of the cases before it."""


def rss_profile(samples: list[tuple[int, int]]) -> dict[str, Any]:
    """The figures that tell a bounded decoder from one that keeps something per case.

    ``samples`` are (cases checked so far, RSS bytes), in order, the last taken at the end.
    A peak says little (the first cases may allocate everything the decoder will ever need);
    RSS after 10%, 50% and 100% of the cases does: one that keeps something per case grows
    linearly, so its growth over the second half is about that over the first 40%; a bounded
    one plateaus, and its second-half growth is about 0. The RSS "at" a point is the median of
    the samples over the 5% of the cases up to it: a single sample may catch a transient (one
    case's buffers, 16 lanes of 256 KiB bodies being tokenized, or a heap trim just done),
    which swings a process's RSS by tens of MiB either way and says nothing about what it
    keeps; the median ignores those and still moves with anything kept per case.
    """
    mib = 2.0**20
    final_cases = samples[-1][0]
    width = final_cases / SERIES_POINTS

    def at(cases: float) -> float:
        window = [rss for n, rss in samples if cases - width <= n <= cases]
        if not window:  # fewer samples than windows: the first one at or after the point
            window = [next(rss for n, rss in samples if n >= cases)]
        return statistics.median(window)

    at_10, at_50, at_100 = at(0.1 * final_cases), at(0.5 * final_cases), at(final_cases)
    series = [[0, round(samples[0][1] / mib, 1)]] + [
        [round(k * width), round(at(k * width) / mib, 1)] for k in range(1, SERIES_POINTS + 1)]
    peak_at, peak = max(samples, key=lambda s: s[1])
    return {"rss_peak_mb": round(peak / mib, 1), "rss_peak_at_cases": peak_at,
            "rss_mb_at": {"10%": round(at_10 / mib, 1), "50%": round(at_50 / mib, 1),
                          "100%": round(at_100 / mib, 1)},
            "rss_growth_second_half_mb": round((at_100 - at_50) / mib, 1),
            "rss_mb_series": series}


@contextlib.contextmanager
def steady_recursion_limit(extra: int = 2000) -> Iterator[None]:
    """Hold one recursion limit for a whole run, whatever hypothesis asks for.

    Why: hypothesis sets the (process-wide) limit around every example and restores the
    original after each batch. A check running in another thread (a lane) may then be decoding
    deep JSON right at the higher limit; pulled 1000 frames under it, the thread dies with
    "Fatal Python error: Cannot recover from stack overflow" (seen in a proxy run, when the
    proxy still ran in this process). The limit held is the one hypothesis gives a serial run's
    checks (about +2000).
    """
    real = sys.setrecursionlimit
    old = sys.getrecursionlimit()
    real(old + extra)
    sys.setrecursionlimit = lambda limit: None  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.setrecursionlimit = real
        real(old)


def one_malloc_arena() -> None:
    """Make every thread of this process allocate from one glibc arena.

    Why: glibc gives threads that contend for malloc arenas of their own (up to 8 per core)
    and seldom returns their memory, so with 16-32 lanes the RSS of an in-process target (the
    RPC clients) grows with the lanes rather than with what the decoder keeps: three
    rounds of 2,000 RPC-reply cases ended at 84/144/166 MiB with the default and 80/92/92 MiB
    with one arena. The GIL already serialises most of the threads' work, so sharing one arena
    costs little.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX


def run_named(name: str, cases: int, seconds: float | None, run_seed: int,
              lanes: int | None = None) -> dict[str, Any]:
    """One target, in a worker process (only names cross the process boundary)."""
    one_malloc_arena()
    # aiohttp logs every refused request with a traceback: millions of lines, no information
    # the counters do not have (a 5xx or a hang is counted and its case kept).
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
    logging.getLogger("scheduler").setLevel(logging.ERROR)
    factory, strategy_of = targets()[name]
    return run_target(name, factory, strategy_of, cases, seconds, run_seed, lanes)


def run_target(name: str, factory: Any, strategy_of: Any, cases: int,
               seconds: float | None, run_seed: int = 0,
               lanes: int | None = None) -> dict[str, Any]:
    """Generate ``cases`` examples and check each against the harness, counting violations.

    Cases are generated in this thread and checked by ``lanes`` worker threads (the harness's
    own number unless given; 1 checks each case before the next is drawn). Hypothesis never
    sees a failure here (each is counted, not raised), so generation does not depend on
    results: a (seed, batch) piece yields the same cases whatever the lanes.
    """
    stats: dict[str, Any] = {"target": name, "cases": 0, "crashes": 0, "hangs": 0,
                             "seed": run_seed, "examples": []}
    lock = threading.Lock()
    with steady_recursion_limit(), factory() as h:
        h.healthy()
        rss0 = h.rss()
        samples = [(0, rss0)]  # (cases checked, RSS of the decoder's process)
        t0 = time.monotonic()
        n_lanes = max(1, lanes if lanes is not None else getattr(h, "lanes", 1))
        stats["lanes"] = n_lanes
        pool = concurrent.futures.ThreadPoolExecutor(n_lanes, thread_name_prefix="fuzz-lane")
        # Cases drawn but not yet checked: a small queue per lane, so generation runs ahead
        # of the lanes without holding thousands of cases.
        slots = threading.BoundedSemaphore(2 * n_lanes)
        strategy = strategy_of(h)
        submitted = 0

        def check(case: Any) -> None:
            outcome: str | None = None
            text = ""
            try:
                h.check(case)
            except _fuzz.FuzzHang as e:
                outcome, text = "hangs", str(e)[:300]
            except Exception as e:  # count every violation, keep going
                outcome, text = "crashes", f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                slots.release()
            with lock:
                stats["cases"] += 1
                if outcome is not None:
                    stats[outcome] += 1
                    if len(stats["examples"]) < 5:
                        stats["examples"].append(text)

        def submit(case: Any) -> None:
            nonlocal submitted
            slots.acquire()
            if n_lanes == 1:
                check(case)
            else:
                pool.submit(check, case)
            submitted += 1
            if submitted % RSS_EVERY == 0:
                with lock:
                    checked = stats["cases"]
                samples.append((checked, h.rss()))

        # Batches of examples, each with its own seed: the time cap then stops generation too
        # (one @given of 100k examples keeps generating after the cap), and a long run is a
        # sequence of replayable (seed, batch) pieces.
        batch = 0
        try:
            while submitted < cases:
                if seconds is not None and time.monotonic() - t0 > seconds:
                    break

                @seed(run_seed + batch)
                @settings(max_examples=min(BATCH, cases - submitted), deadline=None,
                          database=None, derandomize=False,
                          suppress_health_check=list(HealthCheck))
                @given(case=strategy)
                def attack(case: Any) -> None:
                    if seconds is None or time.monotonic() - t0 <= seconds:
                        submit(case)

                before = submitted
                attack()
                batch += 1
                if submitted == before:
                    break
        finally:
            pool.shutdown(wait=True)
        elapsed = time.monotonic() - t0
        samples.append((stats["cases"], h.rss()))
        try:
            h.healthy()
            stats["serves_after"] = True
        except Exception as e:
            stats["serves_after"] = False
            stats["examples"].append(f"after: {e}")
    stats.update(seconds=round(elapsed, 1), rss_start_mb=round(rss0 / 2**20, 1),
                 cases_per_s=round(stats["cases"] / max(elapsed, 1e-9), 1),
                 **rss_profile(samples))
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", type=int, default=100_000, help="examples per target")
    p.add_argument("--seconds", type=float, default=None, help="time cap per target")
    p.add_argument("--only", nargs="*", default=None, help="run only these targets")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--jobs", type=int, default=1, help="targets run at once (processes)")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    p.add_argument("--lanes", type=int, default=None,
                   help="cases checked at once per target (default: the target's own; 1 = "
                        "one at a time, as in CI)")
    args = p.parse_args()
    run_seed = args.seed if args.seed is not None else random.getrandbits(32)
    names = [n for n in targets() if not args.only or n in args.only]
    results = []

    def report(r: dict[str, Any]) -> None:
        results.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)  # survives an interrupted run
        if not args.json:
            at = r["rss_mb_at"]
            print(f"{r['target']:22s} cases={r['cases']:>7} crashes={r['crashes']} "
                  f"hangs={r['hangs']} serves_after={r['serves_after']} rss MiB "
                  f"start={r['rss_start_mb']} 10%={at['10%']} 50%={at['50%']} "
                  f"100%={at['100%']} peak={r['rss_peak_mb']} "
                  f"growth(2nd half)={r['rss_growth_second_half_mb']}  {r['seconds']}s "
                  f"({r['cases_per_s']}/s, {r['lanes']} lanes) seed={r['seed']}", flush=True)
            for ex in r["examples"]:
                print(f"    {ex}")

    if args.jobs <= 1:
        for name in names:
            report(run_named(name, args.cases, args.seconds, run_seed, args.lanes))
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(run_named, n, args.cases, args.seconds, run_seed,
                                   args.lanes)
                       for n in names]
            for fut in concurrent.futures.as_completed(futures):
                report(fut.result())
    if args.json:
        print(json.dumps({"targets": results}, indent=2))
    sys.exit(1 if any(r["crashes"] or r["hangs"] or not r["serves_after"] for r in results) else 0)


if __name__ == "__main__":
    main()
