"""Key namespace from a vLLM config, and where block ``b`` of each layer lives in memory.

Why: pages of two engines may only share store keys if their bytes mean the same thing, so
everything that changes the meaning (model, dtype, layout, block size, TP/PP shard) goes into the
namespace. The worker then treats each block as opaque bytes located from the registered tensors'
strides, which works for the CPU layout ``[num_blocks, kv_heads, block_size, 2*head_size]`` and
for GPU layouts that put K and V in a leading dimension of 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from store.keys import KeyNamespace

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

__all__ = ["BlockLayout", "build_namespace", "kv_layout_name"]


def kv_layout_name(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> str:
    """A string naming the page format: device, attention spec shape and layer count."""
    from vllm.platforms import current_platform

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"PyMooncakeConnector supports one KV cache group, got {len(groups)} "
                         "(hybrid models need the hybrid KV cache manager, which it does not support)")
    spec: Any = groups[0].kv_cache_spec
    parts = [current_platform.device_type, type(spec).__name__,
             f"kvh{getattr(spec, 'num_kv_heads', 0)}", f"hd{getattr(spec, 'head_size', 0)}",
             f"l{len(groups[0].layer_names)}"]
    return "/".join(parts)


def build_namespace(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig", *,
                    model_id: str | None, tenant: str, hash_algo: str,
                    tp_rank: int = 0, pp_rank: int = 0) -> KeyNamespace:
    """The key namespace of this engine's KV shard (``tp_rank``/``pp_rank`` of this worker)."""
    mc = vllm_config.model_config
    cc = vllm_config.cache_config
    dtype = str(cc.cache_dtype)
    if dtype == "auto":
        dtype = str(mc.dtype)
    return KeyNamespace(
        model=model_id or str(mc.model), revision=str(mc.revision or ""), kv_dtype=dtype,
        kv_layout=kv_layout_name(vllm_config, kv_cache_config), block_size=cc.block_size,
        tp_size=vllm_config.parallel_config.tensor_parallel_size, tp_rank=tp_rank,
        pp_rank=pp_rank, tenant=tenant, hash_algo=hash_algo)


@dataclass(frozen=True)
class BlockLayout:
    """Per layer: base address, the stride between blocks, and the byte segments of one block."""

    bases: tuple[int, ...]
    block_stride: tuple[int, ...]
    segments: tuple[tuple[tuple[int, int], ...], ...]  # per layer: (offset, size) within a block

    @classmethod
    def from_tensors(cls, tensors: "list[torch.Tensor]", num_blocks: int) -> "BlockLayout":
        bases, strides, segs = [], [], []
        for t in tensors:
            item = t.element_size()
            if t.shape[0] == num_blocks:
                inner = 1
                for d in t.shape[1:]:
                    inner *= d
                if not t[0].is_contiguous() or t.stride(0) < inner:
                    raise ValueError(f"KV block of shape {tuple(t.shape)} is not contiguous")
                bases.append(t.data_ptr())
                strides.append(t.stride(0) * item)
                segs.append(((0, inner * item),))
            elif t.ndim >= 2 and t.shape[0] == 2 and t.shape[1] == num_blocks:
                inner = 1
                for d in t.shape[2:]:
                    inner *= d
                if not t[0, 0].is_contiguous():
                    raise ValueError(f"KV block of shape {tuple(t.shape)} is not contiguous")
                bases.append(t.data_ptr())
                strides.append(t.stride(1) * item)
                segs.append(((0, inner * item), (t.stride(0) * item, inner * item)))
            else:
                raise ValueError(f"unsupported KV cache tensor shape {tuple(t.shape)} "
                                 f"for {num_blocks} blocks")
        return cls(tuple(bases), tuple(strides), tuple(tuple(s) for s in segs))

    @property
    def block_bytes(self) -> int:
        """Size of one stored object: all layers of one block."""
        return sum(size for layer in self.segments for _, size in layer)

    @property
    def layer_offsets(self) -> tuple[int, ...]:
        """Where each layer's bytes start inside a stored object (layers are concatenated in
        order, so a layer-wise save writes exactly the bytes a whole-block save writes)."""
        out, pos = [], 0
        for layer in self.segments:
            out.append(pos)
            pos += sum(size for _, size in layer)
        return tuple(out)

    def layer_pieces(self, layer: int, block_id: int) -> list[tuple[int, int]]:
        """``(address, size)`` of block ``block_id`` in layer ``layer``, in object order."""
        start = self.bases[layer] + block_id * self.block_stride[layer]
        return [(start + off, size) for off, size in self.segments[layer]]

    def block_buffers(self, block_id: int) -> tuple[list[int], list[int]]:
        """Pointers and sizes of block ``block_id`` across all layers, in layer order."""
        ptrs, sizes = [], []
        for layer in range(len(self.segments)):
            for ptr, size in self.layer_pieces(layer, block_id):
                ptrs.append(ptr)
                sizes.append(size)
        return ptrs, sizes
