"""CUDA memory over tcp/shm, staged through host memory (needs a GPU; skipped without one)."""
from __future__ import annotations

import pytest
from _transfer_util import engines

from transfer.batch import TransferRequest
from transfer.transports.base import Opcode

pytestmark = [pytest.mark.timeout(60), pytest.mark.gpu]


@pytest.mark.parametrize("enable_shm", [True, False])
async def test_cuda_tensor_both_ways(enable_shm: bool) -> None:
    import torch

    async with engines(2, **{"transfer.enable_shm": enable_shm}) as (a, b):
        src = torch.randint(0, 255, (8 << 20,), dtype=torch.uint8, device="cuda")
        dst = torch.zeros_like(src)
        sa = await a.register(src)
        remote = await b.allocate_shared(src.numel()) if enable_shm else None
        host = torch.zeros(src.numel(), dtype=torch.uint8)
        db = remote.address if remote else await b.register(host)
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, src.numel())])
        da = await a.register(dst)
        await a.transfer([TransferRequest(Opcode.READ, da, b.name, db, src.numel())])
        assert torch.equal(src, dst)
        cuda_remote = torch.zeros_like(src)
        cr = await b.register(cuda_remote)  # remote side CUDA: the server stages
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, cr, src.numel())])
        assert torch.equal(src, cuda_remote)
