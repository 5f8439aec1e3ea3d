"""CUDA memory through the store and the vLLM worker's page copies (needs a GPU; skipped without).

vLLM's connectors register their KV caches by bare address (``register_buffer(data_ptr(),
nbytes)``), as Mooncake's API does, so the engine must recognise a device address on its own;
reading one as host memory crashes the process. These tests put and get CUDA memory by raw
pointer over tcp and the same-host shm path, with and without checksums (which read the bytes
on the host), and run the connector's worker against CUDA KV tensors in the GPU layout
``[2, num_blocks, block_size, kv_heads, head_size]``.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from _store_util import NodeProcess, master_process, new_client

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]
MIB = 1 << 20


async def test_a_raw_device_address_registers_as_cuda_memory() -> None:
    import torch

    from _transfer_util import engines
    from transfer.cuda import cuda_pointer_device

    dev = torch.ones(MIB, dtype=torch.uint8, device="cuda")
    pinned = torch.zeros(MIB, dtype=torch.uint8, pin_memory=True)
    host = torch.zeros(MIB, dtype=torch.uint8)
    assert cuda_pointer_device(dev.data_ptr()) == 0
    assert cuda_pointer_device(dev.data_ptr() + 4096) == 0
    assert cuda_pointer_device(pinned.data_ptr()) is None  # page-locked host: the CPU reads it
    assert cuda_pointer_device(host.data_ptr()) is None
    async with engines(1) as (engine,):
        for t, location in ((dev, "cuda:0"), (pinned, "cpu:0"), (host, "cpu:0")):
            address = await engine.register(t.data_ptr(), MIB)
            assert engine.registry.find(address, MIB).location == location
        assert bytes(engine.registry.host_bytes(dev.data_ptr() + 10, 5)) == b"\x01" * 5


@pytest.mark.parametrize("shm", ["1", "0"])
def test_compat_store_puts_and_gets_cuda_memory_by_address(shm: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The Mooncake-compatible API as vLLM's MooncakeStoreConnector calls it, data held by a
    store node in another process: whole tensors, pages at offsets, and bytes in between."""
    import torch

    from store import MooncakeDistributedStore

    monkeypatch.setenv("MOONCAKE_TRANSFER_ENABLE_SHM", shm)
    n = 3 * MIB + 4096  # more than one staging chunk
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros_like(src)
    with master_process() as master:
        node = NodeProcess(master, "--global-segment-size", "256MB")
        s = MooncakeDistributedStore()
        try:
            assert s.setup("127.0.0.1", "P2PHANDSHAKE", 0, 16 * MIB, "tcp", "", master) == 0
            assert s.register_buffer(src.data_ptr(), n) == 0
            assert s.register_buffer(dst.data_ptr(), n) == 0
            assert s.put_from("gpu/whole", src.data_ptr(), n) == 0
            assert s.get_into("gpu/whole", dst.data_ptr(), n) == n
            assert torch.equal(src, dst)
            base = src.data_ptr()
            pages = [(4096, 8192), (MIB, 65536), (2 * MIB + 17, 100_000)]
            assert s.batch_put_from([f"gpu/p{i}" for i in range(3)],
                                    [base + off for off, _ in pages],
                                    [size for _, size in pages]) == [0, 0, 0]
            dst.zero_()
            got = s.batch_get_into([f"gpu/p{i}" for i in range(3)],
                                   [dst.data_ptr() + off for off, _ in pages],
                                   [size for _, size in pages])
            assert got == [size for _, size in pages]
            expected = torch.zeros_like(src)
            for off, size in pages:
                expected[off:off + size] = src[off:off + size]
            assert torch.equal(dst, expected)  # those pages, and not a byte around them
            host = src[4096:4096 + 8192].cpu().numpy().tobytes()
            assert s.get("gpu/p0") == host  # device bytes, read back as host bytes
            assert s.put("gpu/host", host) == 0
            assert s.get_into("gpu/host", dst.data_ptr(), n) == len(host)
            assert dst[:8192].cpu().numpy().tobytes() == host
        finally:
            assert s.close() == 0
            node.stop()


def test_checksummed_puts_and_gets_read_device_bytes_on_the_host() -> None:
    """A checksum is computed over the source and checked over the destination: both CUDA
    here, so both must be copied to the host first (a direct read would crash)."""
    import torch

    with master_process() as master:
        node = NodeProcess(master, "--global-segment-size", "64MB")
        client = new_client(master, checksum=True, global_segment_size=0)
        try:
            src = torch.randint(0, 256, (2 * MIB,), dtype=torch.uint8, device="cuda")
            dst = torch.zeros_like(src)
            client.register(src.data_ptr(), src.numel())
            client.register(dst.data_ptr(), dst.numel())
            client.put_from("gpu/sum", src.data_ptr(), src.numel())
            assert client.batch_put_from(["gpu/sum1", "gpu/sum2"],
                                         [src.data_ptr(), src.data_ptr() + 7],
                                         [4096, MIB]) == [None, None]
            assert client.get_into("gpu/sum", dst.data_ptr(), dst.numel()) == src.numel()
            assert torch.equal(src, dst)
            assert client.get_into("gpu/sum2", dst.data_ptr() + 1, MIB) == MIB
            assert torch.equal(src[7:7 + MIB], dst[1:1 + MIB])
        finally:
            client.close()
            node.stop()


@pytest.mark.parametrize("save_mode", ["step", "layer"])
def test_connector_pages_of_cuda_kv_caches_round_trip(tmp_path: Path, save_mode: str) -> None:
    """The vLLM worker's data path on CUDA KV caches in the GPU layout (K and V in a leading
    dimension of 2, so each block is two pieces per layer), without vLLM itself (the GPU machine
    has none): the connector's :class:`BlockLayout` locates the pages and its
    :class:`StoreBackend` puts them whole (``step``) or layer by layer into staged objects
    (``layer``), as ``WorkerSide`` does; another set of caches loads them bit for bit."""
    import torch

    from mooncake_connector.store_backend import StagedOutcome, StoreBackend, StoreSettings
    from mooncake_connector.testing.store_cluster import StoreCluster
    from mooncake_connector.vllm.layout import BlockLayout

    def kv(seed: int) -> list[torch.Tensor]:
        g = torch.Generator(device="cuda").manual_seed(seed)
        return [torch.randint(-100, 100, (2, 8, 32, 4, 64), generator=g,
                              device="cuda").to(torch.bfloat16) for _ in range(3)]

    with StoreCluster(segment_size=64 << 20, workdir=tmp_path) as cluster:
        store = StoreBackend("store", StoreSettings.from_sources(path=cluster.config_path))
        try:
            src, dst = kv(1), kv(2)
            layouts = []
            for caches in (src, dst):
                layout = BlockLayout.from_tensors(caches, 8)
                assert len(layout.segments[0]) == 2  # K and V pages of a block
                for t in caches:
                    store.register_buffer(t.data_ptr(), t.untyped_storage().nbytes())
                layouts.append(layout)
            saving, loading = layouts
            keys = [f"gpu-kv/{save_mode}/{i}" for i in range(3)]
            blocks = [1, 3, 6]
            if save_mode == "step":
                bufs = [saving.block_buffers(b) for b in blocks]
                assert store.put_multi(keys, [p for p, _ in bufs], [n for _, n in bufs]) \
                    == [0, 0, 0]
            else:
                assert store.enable_staged_puts(2.0)
                handle = store.stage_begin(keys, saving.block_bytes)
                for layer, base in enumerate(saving.layer_offsets):
                    store.stage_write(handle, [(k, base, saving.layer_pieces(layer, b))
                                               for k, b in zip(keys, blocks)])
                assert store.stage_commit(handle) == [StagedOutcome.SAVED] * 3
            bufs = [loading.block_buffers(b) for b in (0, 2, 5)]
            assert store.get_multi(keys, [p for p, _ in bufs], [n for _, n in bufs]) \
                == [saving.block_bytes] * 3
            untouched = kv(2)
            for s_layer, d_layer, u_layer in zip(src, dst, untouched):
                for s_block, d_block in ((1, 0), (3, 2), (6, 5)):
                    assert torch.equal(s_layer[:, s_block], d_layer[:, d_block])
                for block in (1, 3, 4, 6, 7):
                    assert torch.equal(d_layer[:, block], u_layer[:, block])
        finally:
            store.close()
