"""Reading the FAST'25 Mooncake request traces (JSON lines) and their cache-hit ceiling.

Each line: ``timestamp`` (ms from trace start), ``input_length``, ``output_length``, ``hash_ids``
(chained prefix-block hashes over 512-token blocks). Lines are validated: a malformed line is an
error naming its line number, never a silently skewed simulation.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

TRACE_BLOCK_TOKENS = 512
TRACES_ENV = "MOONCAKE_TRACES_DIR"
TRACE_FILES = {
    "conversation": "conversation_trace.jsonl",
    "synthetic": "synthetic_trace.jsonl",
}
TRACES_HELP = (
    "the Mooncake FAST'25 traces (github.com/kvcache-ai/Mooncake, folder FAST25-release/traces/): "
    f"put them in ../shared/traces next to the repository or point ${TRACES_ENV} at their folder"
)
_MAX_LINE = 1 << 20


class TraceError(ValueError):
    """A trace file is missing or malformed."""


class _Line(msgspec.Struct, forbid_unknown_fields=False):
    timestamp: float
    input_length: int
    output_length: int
    hash_ids: list[int]


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace; ``arrival`` in seconds from the trace start."""

    index: int
    arrival: float
    input_len: int
    output_len: int
    block_ids: tuple[int, ...]


def default_traces_dir() -> Path:
    """``$MOONCAKE_TRACES_DIR``, else ``../shared/traces`` relative to the repository root."""
    env = os.environ.get(TRACES_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def resolve_trace(name_or_path: str | os.PathLike[str]) -> Path:
    """A trace by name (``conversation``/``synthetic``, looked up in the traces dir) or path."""
    s = os.fspath(name_or_path)
    path = default_traces_dir() / TRACE_FILES[s] if s in TRACE_FILES else Path(s)
    if not path.is_file():
        raise TraceError(f"trace not found: {path} ({TRACES_HELP})")
    return path


def load_trace(
    path: str | os.PathLike[str],
    limit: int | None = None,
    block_tokens: int = TRACE_BLOCK_TOKENS,
) -> list[TraceRequest]:
    """Parse and validate a trace, keeping its first ``limit`` requests."""
    decoder = msgspec.json.Decoder(_Line)
    out: list[TraceRequest] = []
    last = -math.inf
    with open(resolve_trace(path), "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if len(raw) > _MAX_LINE:
                raise TraceError(f"{path}:{lineno}: line longer than {_MAX_LINE} bytes")
            if not raw.strip():
                continue
            try:
                line = decoder.decode(raw)
            except msgspec.DecodeError as e:
                raise TraceError(f"{path}:{lineno}: {e}") from None
            if line.input_length <= 0 or line.output_length < 0 or line.timestamp < 0:
                raise TraceError(f"{path}:{lineno}: lengths and timestamp must be >= 0")
            if len(line.hash_ids) != math.ceil(line.input_length / block_tokens):
                raise TraceError(
                    f"{path}:{lineno}: {len(line.hash_ids)} hash_ids for "
                    f"{line.input_length} tokens of {block_tokens}-token blocks"
                )
            if line.timestamp < last:
                raise TraceError(f"{path}:{lineno}: timestamps go backwards")
            last = line.timestamp
            out.append(
                TraceRequest(
                    len(out),
                    line.timestamp / 1000.0,
                    line.input_length,
                    line.output_length,
                    tuple(line.hash_ids),
                )
            )
    if not out:
        raise TraceError(f"{path}: no requests")
    return out


@dataclass(frozen=True, slots=True)
class HitCeiling:
    """Prefix-cache hits with an unbounded global cache: the best any policy can do."""

    per_request_mean: float
    token_weighted: float


def hit_ceiling(
    requests: Sequence[TraceRequest], block_tokens: int = TRACE_BLOCK_TOKENS
) -> HitCeiling:
    """Replay prefix matching against every block seen before (nothing is ever evicted)."""
    seen: set[int] = set()
    ratio_sum = 0.0
    hit_tokens = 0
    total_tokens = 0
    for r in requests:
        k = 0
        for b in r.block_ids:
            if b not in seen:
                break
            k += 1
        hit = min(k * block_tokens, r.input_len)
        ratio_sum += hit / r.input_len
        hit_tokens += hit
        total_tokens += r.input_len
        seen.update(r.block_ids)
    return HitCeiling(ratio_sum / len(requests), hit_tokens / total_tokens)
