"""Tensors in and out of the store: a small self-describing header before the raw bytes.

Why our own header and not pickle or ``torch.save``: values come from the network and are never
unpickled. The header is ``b"MCT1"``, a little-endian u32 length, then msgpack
``{"dtype": "float16", "shape": [..]}``; the dtype must be one of a fixed list. torch is imported
lazily so ``import store`` stays light.
"""
from __future__ import annotations

import struct
from typing import Any

import msgspec

__all__ = ["tensor_parts", "tensor_from_bytes", "TensorHeader"]

_MAGIC = b"MCT1"
_LEN = struct.Struct("<I")
_MAX_HEADER = 4096
_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
           "uint8", "bool", "float8_e4m3fn", "float8_e5m2")


class TensorHeader(msgspec.Struct):
    dtype: str
    shape: list[int]


def tensor_parts(tensor: Any) -> list[Any]:
    """``[header, data]`` bytes-like parts of a CPU tensor (made contiguous)."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {tensor.dtype}")
    t = tensor.detach().to("cpu").contiguous()
    header = msgspec.msgpack.encode(TensorHeader(name, list(t.shape)))
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return [_MAGIC + _LEN.pack(len(header)) + header, data]


def tensor_from_bytes(value: bytes | bytearray | memoryview) -> Any:
    """Rebuild a tensor written by :func:`tensor_parts`; ValueError on anything malformed."""
    import torch

    raw = memoryview(value).cast("B")
    if len(raw) < 8 or bytes(raw[:4]) != _MAGIC:
        raise ValueError("value is not a stored tensor (bad magic)")
    (n,) = _LEN.unpack(raw[4:8])
    if n > _MAX_HEADER or 8 + n > len(raw):
        raise ValueError(f"tensor header length {n} is invalid")
    try:
        header = msgspec.msgpack.decode(raw[8:8 + n], type=TensorHeader)
    except msgspec.DecodeError as e:
        raise ValueError(f"bad tensor header: {e}") from None
    if header.dtype not in _DTYPES or any(d < 0 for d in header.shape):
        raise ValueError(f"bad tensor header {header}")
    dtype = getattr(torch, header.dtype)
    data = raw[8 + n:]
    count = 1
    for d in header.shape:
        count *= d
    if count * torch.empty((), dtype=dtype).element_size() != len(data):
        raise ValueError(f"tensor data is {len(data)} bytes; header says {header}")
    if count == 0:
        return torch.empty(header.shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(header.shape)
