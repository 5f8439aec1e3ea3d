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


@pytest.mark.parametrize("enable_shm", [True, False], ids=["shm", "tcp"])
async def test_a_batch_of_cuda_pieces_shares_pinned_chunks(enable_shm: bool) -> None:
    """The loop's path with 64 CUDA pieces of 32 KiB, every other one (one per layer, as the
    connector puts a block; nothing merges): the pieces share one pinned chunk each way, the
    bytes come back bit for bit and the gaps stay untouched. ``tests/test_transfer_staging.py``
    checks the threads and hops with a stand-in device; this runs the real copies."""
    import torch

    piece, count = 32 << 10, 64
    async with engines(2, **{"transfer.enable_shm": enable_shm}) as (a, b):
        src = torch.randint(0, 255, (2 * count * piece,), dtype=torch.uint8, device="cuda")
        back = torch.zeros_like(src)
        sa, ba = await a.register(src), await a.register(back)
        rb = (await b.allocate_shared(src.numel())).address if enable_shm \
            else await b.register(torch.zeros(src.numel(), dtype=torch.uint8))
        at = [2 * i * piece for i in range(count)]
        await a.transfer([TransferRequest(Opcode.WRITE, sa + o, b.name, rb + o, piece)
                          for o in at])
        await a.transfer([TransferRequest(Opcode.READ, ba + o, b.name, rb + o, piece)
                          for o in at])
        for o in at:
            assert torch.equal(back[o:o + piece], src[o:o + piece])
        assert not back[piece:2 * piece].any()
        pool = a._staging._pool
        assert pool is not None and pool.allocated == 1 and pool.in_use == 0
