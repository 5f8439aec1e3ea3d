"""A stand-in for SGLang's host KV pool object, running SGLang's own page-layout code.

Why a stand-in: ``sglang.srt.mem_cache.pool_host`` imports torchvision (through SGLang's model
registry), which cannot be imported beside torch+cpu here, so ``MHATokenToKVPoolHost`` /
``MLATokenToKVPoolHost`` cannot be constructed. Everything a storage backend uses of the pool
(``init_kv_buffer``, ``get_page_buffer_meta``, ``get_data_page``, ``get_dummy_flat_data_page``,
``set_from_flat_data_page``, ``get_hybrid_pool_buffer``, ``k_buffer``/``v_buffer``) is *not*
re-implemented: the method bodies are read from the installed SGLang source with ``ast`` and
compiled onto this class, so the pointers and page layouts are SGLang's. Only the constructor
(which sizes the pool from a device pool and checks host RAM) is replaced by plain attributes.
"""
from __future__ import annotations

import ast
import functools
import os
from typing import Any

import torch

import sglang

POOL_DIR = os.path.join(os.path.dirname(sglang.__file__), "srt", "mem_cache", "pool_host")
MHA_METHODS = ("init_kv_buffer", "get_page_buffer_meta", "get_data_page",
               "get_dummy_flat_data_page", "set_from_flat_data_page", "get_hybrid_pool_buffer",
               "get_size_per_token", "get_ksize_per_token", "k_buffer", "v_buffer")
MLA_METHODS = ("init_kv_buffer", "get_page_buffer_meta", "get_data_page",
               "get_dummy_flat_data_page", "set_from_flat_data_page", "_storage_page_index")


def _cpu_alloc(dims: tuple, dtype: torch.dtype, device: str = "cpu", pin_memory: bool = False,
               allocator: Any = None, registration_granularity_bytes: Any = None) -> torch.Tensor:
    """SGLang's ``ALLOC_MEMORY_FUNCS['cpu']`` without pinning (no CUDA here)."""
    return torch.empty(dims, dtype=dtype, device=device)


@functools.cache
def _methods(filename: str, class_name: str, names: tuple[str, ...]) -> dict[str, Any]:
    path = os.path.join(POOL_DIR, filename)
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    found = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in names}
    missing = set(names) - set(found)
    assert not missing, f"SGLang's {class_name} no longer has {sorted(missing)}"
    module = ast.Module(body=list(found.values()), type_ignores=[])
    namespace: dict[str, Any] = {"torch": torch, "ALLOC_MEMORY_FUNCS": {"cpu": _cpu_alloc},
                                 "Optional": Any}
    exec(compile(module, path, "exec"), namespace)  # noqa: S102 - SGLang's own installed source
    return {name: namespace[name] for name in names}


class _PoolBase:
    pin_memory = False
    device = "cpu"
    allocator = None
    dcp_size = 1
    dcp_rank = 0
    _transfer_device = torch.device("cpu")

    def __init__(self, *, layout: str, page_size: int, pages: int, layer_num: int,
                 dtype: torch.dtype) -> None:
        self.layout = layout
        self.page_size = page_size
        self.page_num = pages
        self.size = pages * page_size
        self.layer_num = layer_num
        self.dtype = dtype

    @property
    def logical_page_size(self) -> int:
        return self.page_size * self.dcp_size

    @property
    def logical_size(self) -> int:
        return self.size * self.dcp_size

    def fill_random(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        raw = self.kv_buffer.view(-1).view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))

    def page_bytes(self, index: int) -> bytes:
        """The flat page at token ``index`` as bytes (SGLang's get_data_page, flattened)."""
        page = self.get_data_page(index, flat=True).contiguous()
        return page.view(torch.uint8).numpy().tobytes()

    def indices(self, pages: list[int]) -> torch.Tensor:
        """Host token indices of whole pages, as SGLang's controller passes them."""
        return torch.cat([torch.arange(p * self.page_size, (p + 1) * self.page_size)
                          for p in pages]).to(torch.int64)


class MHAHostPoolStandIn(_PoolBase):
    """``MHATokenToKVPoolHost`` with SGLang's methods; see the module docstring."""

    def __init__(self, *, head_num: int = 2, head_dim: int = 8, **kw: Any) -> None:
        super().__init__(**kw)
        self.head_num = head_num
        self.head_dim = head_dim
        self.v_head_dim = head_dim
        self.kv_buffer = self.init_kv_buffer()


class MLAHostPoolStandIn(_PoolBase):
    """``MLATokenToKVPoolHost`` with SGLang's methods; see the module docstring."""

    def __init__(self, *, kv_cache_dim: int = 24, **kw: Any) -> None:
        super().__init__(**kw)
        self.kv_cache_dim = kv_cache_dim
        self.kv_buffer = self.init_kv_buffer()


for _name, _fn in _methods("mha.py", "MHATokenToKVPoolHost", MHA_METHODS).items():
    setattr(MHAHostPoolStandIn, _name, _fn)  # k_buffer/v_buffer keep SGLang's @property
for _name, _fn in _methods("mla.py", "MLATokenToKVPoolHost", MLA_METHODS).items():
    setattr(MLAHostPoolStandIn, _name, _fn)
