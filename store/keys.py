"""Block keys: how a sequence of token blocks becomes store keys, shared by connector and Conductor.

Why it lives here, owned by the store: the vLLM connector writes and reads KV blocks under these keys,
and the Conductor hashes prompts into the same keys to ask the store what is cached. If the two
disagreed, every lookup would miss. vLLM's own ``request.block_hashes`` cannot be used: they are
seeded per process unless sha256 is chosen, so another instance could never find them.

Scheme (version 1), one function computes it: :func:`block_keys`.

* A **namespace** (:class:`KeyNamespace`) names everything that makes two KV pages incompatible:
  scheme version, model name and revision, KV dtype, KV layout, block size, TP size and rank, PP rank,
  hash algorithm, and an optional tenant id. Its canonical JSON is hashed into a 16-hex-digit id.
* A **root digest** mixes the namespace with the request-wide extra keys that change every block's
  KV: LoRA adapter name, ``cache_salt`` and the prompt-embedding digest (vLLM mixes the same things
  into its own block hash, so two requests that must not share KV never do).
* Each **full block** ``i`` gets ``d_i = H(d_{i-1} || tokens_i as little-endian int32 || mm_i)``,
  where ``d_{-1}`` is the root digest and ``mm_i`` lists the multimodal inputs (hash, absolute
  start, length) that overlap the block. Chaining makes a key identify the whole prefix.
* The key is ``mc1/<tenant or _>/<namespace id>/<hex digest>``: at most 256 bytes, readable enough
  to see in store listings which tenant and namespace an object belongs to.

Partial trailing blocks get no key: only full blocks are stored.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

__all__ = [
    "KEY_SCHEME_VERSION",
    "MAX_KEY_BYTES",
    "KeyNamespace",
    "MultiModalSpan",
    "RequestExtras",
    "block_digests",
    "block_keys",
    "digest_to_key",
    "validate_key",
]

KEY_SCHEME_VERSION = 1
MAX_KEY_BYTES = 256
_TENANT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HASHES = ("sha256", "blake3")


def validate_key(key: str) -> bytes:
    """Return ``key`` as UTF-8 bytes, or raise ValueError if it is empty or over 256 bytes."""
    raw = key.encode("utf-8")
    if not raw:
        raise ValueError("store key must not be empty")
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError(f"store key is {len(raw)} bytes; the limit is {MAX_KEY_BYTES}: {key[:80]!r}...")
    return raw


@dataclass(frozen=True)
class KeyNamespace:
    """Everything that makes KV pages of two engines incompatible; part of every key."""

    model: str
    kv_dtype: str
    kv_layout: str
    block_size: int
    revision: str = ""
    tp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    tenant: str = ""
    hash_algo: str = "sha256"
    version: int = KEY_SCHEME_VERSION

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("KeyNamespace.model must not be empty")
        if self.block_size <= 0:
            raise ValueError(f"KeyNamespace.block_size must be positive, got {self.block_size}")
        if self.tp_size <= 0 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KeyNamespace: tp_rank {self.tp_rank} not in [0, tp_size={self.tp_size})")
        if self.pp_rank < 0:
            raise ValueError(f"KeyNamespace.pp_rank must be >= 0, got {self.pp_rank}")
        if self.tenant and not _TENANT_RE.match(self.tenant):
            raise ValueError(
                f"KeyNamespace.tenant {self.tenant!r}: use 1-64 characters of [A-Za-z0-9_.-]")
        if self.hash_algo not in _HASHES:
            raise ValueError(f"KeyNamespace.hash_algo {self.hash_algo!r}: allowed {_HASHES}")
        if self.version != KEY_SCHEME_VERSION:
            raise ValueError(f"unsupported key scheme version {self.version}")

    @cached_property
    def canonical(self) -> bytes:
        """Canonical JSON of all fields: the input to the namespace id and the root digest."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @cached_property
    def namespace_id(self) -> str:
        return hashlib.sha256(self.canonical).hexdigest()[:16]

    @cached_property
    def key_prefix(self) -> str:
        """``mc1/<tenant>/<namespace id>/``: every key of this namespace starts with it."""
        return f"mc{self.version}/{self.tenant or '_'}/{self.namespace_id}/"

    def for_rank(self, tp_rank: int, pp_rank: int | None = None) -> "KeyNamespace":
        """The same namespace seen by another TP/PP rank (each rank stores its own KV shard)."""
        from dataclasses import replace

        return replace(self, tp_rank=tp_rank, pp_rank=self.pp_rank if pp_rank is None else pp_rank)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KeyNamespace":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown KeyNamespace fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class MultiModalSpan:
    """A multimodal input occupying ``length`` placeholder tokens from absolute ``offset``."""

    hash: str
    offset: int
    length: int


@dataclass(frozen=True)
class RequestExtras:
    """Request-level inputs besides token ids that change the KV (as in vLLM's extra keys)."""

    lora_name: str | None = None
    cache_salt: str | None = None
    prompt_embeds_digest: str | None = None
    mm_spans: Sequence[MultiModalSpan] = field(default_factory=tuple)


def _hasher(algo: str):  # type: ignore[no-untyped-def]
    if algo == "sha256":
        return hashlib.sha256
    try:
        import blake3  # type: ignore[import-not-found]  # noqa: PLC0415 - optional
    except ImportError as exc:
        raise ValueError("hash_algo 'blake3' needs the blake3 package (pip install blake3)") from exc
    return blake3.blake3


def _field(data: bytes) -> bytes:
    """Length-prefix a variable field so concatenations can never collide."""
    return len(data).to_bytes(4, "little") + data


def _root_digest(namespace: KeyNamespace, extras: RequestExtras) -> bytes:
    h = _hasher(namespace.hash_algo)()
    h.update(b"mooncake-block-root\0")
    h.update(_field(namespace.canonical))
    for value in (extras.lora_name, extras.cache_salt, extras.prompt_embeds_digest):
        h.update(b"\0" if value is None else b"\1" + _field(value.encode()))
    return h.digest()


def block_digests(namespace: KeyNamespace, token_ids: Sequence[int] | np.ndarray,
                  extras: RequestExtras | None = None, *, start_block: int = 0,
                  prev_digest: bytes | None = None) -> list[bytes]:
    """Chained digests of the full blocks of ``token_ids`` (a partial tail block gets none).

    To extend a chain (e.g. blocks completed during decode), pass the full ``token_ids`` with
    ``start_block`` and the digest of block ``start_block - 1`` as ``prev_digest``.
    """
    extras = extras or RequestExtras()
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1:
        raise ValueError("token_ids must be one-dimensional")
    if tokens.size and (tokens.min() < 0 or tokens.max() > 0x7FFFFFFF):
        raise ValueError("token ids must be in [0, 2**31)")
    tokens = tokens.astype("<i4", copy=False)
    bs = namespace.block_size
    n_full = tokens.size // bs
    if start_block < 0 or start_block > n_full:
        raise ValueError(f"start_block {start_block} outside [0, {n_full}]")
    if start_block > 0 and prev_digest is None:
        raise ValueError("extending a chain (start_block > 0) needs prev_digest")
    prev = prev_digest if start_block > 0 else _root_digest(namespace, extras)
    new = _hasher(namespace.hash_algo)
    spans = sorted(extras.mm_spans, key=lambda s: s.offset)
    out: list[bytes] = []
    for i in range(start_block, n_full):
        lo, hi = i * bs, (i + 1) * bs
        h = new()
        h.update(prev)
        h.update(tokens[lo:hi].tobytes())
        for span in spans:
            if span.offset < hi and span.offset + span.length > lo:
                h.update(b"mm" + _field(span.hash.encode()) + span.offset.to_bytes(8, "little")
                         + span.length.to_bytes(8, "little"))
        prev = h.digest()
        out.append(prev)
    return out


def digest_to_key(namespace: KeyNamespace, digest: bytes) -> str:
    return namespace.key_prefix + digest.hex()


def block_keys(namespace: KeyNamespace, token_ids: Sequence[int] | np.ndarray,
               extras: RequestExtras | None = None) -> list[str]:
    """Store keys of the full blocks of a request's tokens: the one function both sides use."""
    return [digest_to_key(namespace, d) for d in block_digests(namespace, token_ids, extras)]
