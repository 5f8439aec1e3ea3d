"""``python -m scheduler.sim bench``: replay a trace as real HTTP load against a running proxy.

Why: the simulator is only worth what its cost and policy models are worth; replaying the same
trace, scaled down, against the real proxy and engines on this machine gives numbers in the same
:class:`~scheduler.sim.metrics.Summary` to hold the simulation against.

Prompts: every trace block (``hash_id``) becomes a deterministic run of words drawn from a seed
of that id, scaled to ``token_scale`` of 512 tokens, so requests that share trace blocks share
a real text (and so token) prefix, and the proxy's prefix hashing and the engines' caches see
the trace's reuse. Outputs are ``max_tokens = output_len * token_scale`` (at least 1), streamed,
so TTFT (first content chunk) and TBT (mean of the slowest 10 % of chunk gaps, as the
simulator measures it) are observed by the client. HTTP 429 is an early rejection, 503 a late
one (engine full), anything else an error. Load is bounded: ``limit`` requests, at most
``concurrency`` in flight, ``max_seconds`` overall, loopback addresses only.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import aiohttp

from .metrics import RequestRecord, Summary, summarize
from .trace import TRACE_BLOCK_TOKENS, TraceRequest

_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu red green "
    "blue amber river stone cloud field forest metal paper glass light night"
).split()
_MAX_LINE = 1 << 20


class BenchError(ValueError):
    """Bad bench arguments (a non-loopback URL, a non-positive scale)."""


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """How the trace is scaled and bounded; see the module docstring."""

    url: str
    model: str
    token_scale: float = 0.01
    time_scale: float = 0.01
    limit: int = 50
    concurrency: int = 64
    max_seconds: float = 120.0
    request_timeout: float = 60.0
    chat: bool = False

    def __post_init__(self) -> None:
        check_loopback(self.url)
        if not 0 < self.token_scale <= 1 or not self.time_scale >= 0:
            raise BenchError("token_scale must be in (0, 1] and time_scale >= 0")
        if self.limit <= 0 or self.concurrency <= 0 or not self.max_seconds > 0:
            raise BenchError("limit, concurrency and max_seconds must be > 0")


def check_loopback(url: str) -> None:
    """The bench generates load: refuse anything that is not this machine."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise BenchError(f"bench only targets loopback addresses, not {url!r}")


def block_text(hash_id: int, words: int) -> str:
    """The text standing for one trace block: same id, same words (a shared prefix)."""
    rng = random.Random(hash_id)
    return " ".join(rng.choice(_WORDS) for _ in range(words)) + " "


def prompt_for(r: TraceRequest, token_scale: float) -> str:
    """The prompt of a trace request, ``token_scale`` of its length, block by block."""
    per_block = max(1, round(TRACE_BLOCK_TOKENS * token_scale))
    total = max(1, round(r.input_len * token_scale))
    parts: list[str] = []
    left = total
    for h in r.block_ids:
        if left <= 0:
            break
        n = min(per_block, left)
        # a partial last block is a prefix of the full one, as in the trace
        parts.append(" ".join(block_text(h, per_block).split()[:n]) + " ")
        left -= n
    return "".join(parts)


def max_tokens_for(r: TraceRequest, token_scale: float) -> int:
    return max(1, round(r.output_len * token_scale))


async def _one(
    session: aiohttp.ClientSession,
    opts: BenchOptions,
    r: TraceRequest,
    rec: RequestRecord,
    t0: float,
) -> None:
    body: dict[str, object] = {
        "model": opts.model,
        "max_tokens": max_tokens_for(r, opts.token_scale),
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    prompt = prompt_for(r, opts.token_scale)
    if opts.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    start = time.monotonic()
    rec.arrival = start - t0
    stamps: list[float] = []
    try:
        async with session.post(
            opts.url.rstrip("/") + path, json=body, headers={"X-Request-Id": f"bench-{r.index}"}
        ) as resp:
            if resp.status == 429:
                rec.outcome, rec.reason = "rejected_early", await _reason(resp)
                return
            if resp.status == 503:
                rec.outcome, rec.reason = "rejected_late", await _reason(resp)
                return
            if resp.status != 200:
                rec.outcome, rec.reason = "error", f"HTTP {resp.status}: {await _reason(resp)}"
                return
            async for raw in resp.content:
                if len(raw) > _MAX_LINE:
                    raise ValueError("SSE line too long")
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.outcome, rec.reason = "error", str(chunk["error"])[:200]
                    return
                if _has_content(chunk):
                    stamps.append(time.monotonic())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        rec.outcome, rec.reason = "error", f"{type(e).__name__}: {e}"[:200]
        return
    if not stamps:
        rec.outcome, rec.reason = "error", "no tokens streamed"
        return
    rec.outcome = "completed"
    rec.ttft = stamps[0] - start
    rec.finish = stamps[-1] - t0
    gaps = sorted((b - a for a, b in zip(stamps, stamps[1:])), reverse=True)
    if gaps:
        k = max(1, round(0.1 * len(gaps)))
        rec.tbt = sum(gaps[:k]) / k
    else:
        rec.tbt = 0.0


def _has_content(chunk: dict[str, object]) -> bool:
    for c in chunk.get("choices") or ():  # type: ignore[union-attr]
        if not isinstance(c, dict):
            continue
        delta = c.get("delta") or {}
        if c.get("text") or (isinstance(delta, dict) and delta.get("content")):
            return True
    return False


async def _reason(resp: aiohttp.ClientResponse) -> str:
    text = (await resp.content.read(4096)).decode("utf-8", "replace")
    try:
        return str(json.loads(text)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return text[:200]


async def run_bench(trace: Sequence[TraceRequest], opts: BenchOptions) -> list[RequestRecord]:
    """Replay the first ``opts.limit`` requests at their (scaled) arrival times."""
    reqs = list(trace[: opts.limit])
    records = [RequestRecord(r.index, 0.0, r.input_len, r.output_len) for r in reqs]
    if not reqs:
        return records
    sem = asyncio.Semaphore(opts.concurrency)
    timeout = aiohttp.ClientTimeout(total=opts.request_timeout, sock_connect=5.0)
    base = reqs[0].arrival
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.monotonic()

        async def launch(r: TraceRequest, rec: RequestRecord) -> None:
            delay = (r.arrival - base) * opts.time_scale - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            async with sem:
                await _one(session, opts, r, rec, t0)

        tasks = [asyncio.ensure_future(launch(r, rec)) for r, rec in zip(reqs, records)]
        done, pending = await asyncio.wait(tasks, timeout=opts.max_seconds)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for rec in records:
        if rec.outcome == "pending":
            rec.outcome, rec.reason = "error", f"not finished within {opts.max_seconds}s"
    return records


def bench_summary(
    records: list[RequestRecord], ttft_slo: float, tbt_slo: float, label: str = "proxy",
    wall_s: float = 0.0,
) -> Summary:
    """The simulator's summary over the bench's records; errors go into ``extra``."""
    s = summarize(records, label, "real", ttft_slo, tbt_slo, wall_s)
    s.extra["errors"] = float(sum(1 for r in records if r.outcome == "error"))
    return s
