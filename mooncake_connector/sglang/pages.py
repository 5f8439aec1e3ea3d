"""Where a HiCache page lives in SGLang's host pool, and the one byte format it has in the store.

Why: SGLang's host pools (``sglang.srt.mem_cache.pool_host``) hand out a page either as a flat
tensor (``get_data_page(index, flat=True)``, the generic path) or as raw pointers
(``get_page_buffer_meta(indices)``, the zero-copy v1 path). We store one object per page whose
bytes are exactly the flat page, whichever path wrote it, so a page written zero-copy can be read
by the generic path and the other way round:

* MHA pools flatten a page as ``[K of the page, V of the page]``; their pointer list alternates
  K and V pieces per page (one pair for ``page_first``/``page_first_direct``/``page_head``, one
  pair per layer for ``layer_first``), so we order each page's pieces K first, then V.
* MLA pools have no V: the pieces (one per page, or one per layer for ``layer_first``) already
  follow the flat order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PageGeometry", "PagePieces", "page_pieces", "host_pool_buffers"]

#: Host pool layouts whose pages we can move (the ones SGLang's generic page methods support).
SUPPORTED_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")


@dataclass(frozen=True)
class PageGeometry:
    """What makes a stored page's bytes meaningful: part of the key namespace."""

    layout: str
    page_size: int
    dtype: str
    is_mla: bool
    page_bytes: int

    @classmethod
    def of(cls, pool: Any, is_mla: bool) -> PageGeometry:
        layout = str(pool.layout)
        if layout not in SUPPORTED_LAYOUTS:
            raise NotImplementedError(
                f"host pool layout {layout!r} is not supported by our HiCache backend; "
                f"use --hicache-mem-layout one of {SUPPORTED_LAYOUTS}")
        if is_mla and layout == "page_head":
            raise NotImplementedError("MLA host pools have no page_head layout")
        page = pool.get_dummy_flat_data_page()
        return cls(layout=layout, page_size=int(pool.page_size),
                   dtype=str(pool.dtype).removeprefix("torch."), is_mla=is_mla,
                   page_bytes=page.numel() * page.element_size())


@dataclass(frozen=True)
class PagePieces:
    """Per page: the host-memory pieces whose concatenation is the flat page."""

    ptrs: list[list[int]]
    sizes: list[list[int]]

    @property
    def single(self) -> bool:
        return all(len(p) == 1 for p in self.ptrs)


def page_pieces(pool: Any, host_indices: torch.Tensor, n_pages: int, is_mla: bool,
                page_bytes: int) -> PagePieces:
    """Group the pool's zero-copy pointers by page, in flat-page order.

    Raises ValueError when the pool's answer does not describe ``n_pages`` whole pages of
    ``page_bytes`` each: moving bytes on a wrong description would corrupt the cache.
    """
    if host_indices.numel() != n_pages * int(pool.page_size):
        raise ValueError(f"{n_pages} keys need {n_pages * int(pool.page_size)} host indices, "
                         f"got {host_indices.numel()}")
    ptrs, sizes = pool.get_page_buffer_meta(host_indices)
    ptrs, sizes = [int(p) for p in ptrs], [int(s) for s in sizes]
    if n_pages == 0 or len(ptrs) != len(sizes) or len(ptrs) % n_pages:
        raise ValueError(f"host pool described {len(ptrs)} pieces for {n_pages} pages")
    per_page = len(ptrs) // n_pages
    if not is_mla and per_page % 2:
        raise ValueError(f"MHA host pool gave {per_page} pieces per page; expected K/V pairs")
    out_ptrs: list[list[int]] = []
    out_sizes: list[list[int]] = []
    for i in range(n_pages):
        p = ptrs[i * per_page:(i + 1) * per_page]
        s = sizes[i * per_page:(i + 1) * per_page]
        if not is_mla:
            p, s = p[0::2] + p[1::2], s[0::2] + s[1::2]
        if sum(s) != page_bytes:
            raise ValueError(f"page pieces total {sum(s)} bytes; a page is {page_bytes}")
        out_ptrs.append(p)
        out_sizes.append(s)
    return PagePieces(out_ptrs, out_sizes)


def host_pool_buffers(pool: Any) -> list[torch.Tensor]:
    """The host tensors zero-copy I/O touches (the same ones SGLang's Mooncake backend registers)."""
    get = getattr(pool, "get_hybrid_pool_buffer", None)
    buffers = get() if get is not None else [getattr(pool, "kv_buffer", None)]
    return [b for b in buffers if b is not None and b.numel() > 0]
