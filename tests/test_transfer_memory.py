"""Registration, range checks and descriptor validation: every bad input gets a clear error."""
from __future__ import annotations

import mmap

import msgspec
import numpy as np
import pytest
from _transfer_util import engines

from transfer.descriptor import (
    BufferDesc,
    PeerSegment,
    SegmentDescriptor,
    decode_descriptor,
    encode_descriptor,
)
from transfer.errors import AddressError, DescriptorError, RegistrationError
from transfer.memory import MemoryRegistry, Region, address_of, memory_at


def test_registry_rejects_overlap_duplicates_and_bad_lengths() -> None:
    reg = MemoryRegistry()
    reg.add(Region(0x1000, 0x1000, "cpu:0"))
    reg.add(Region(0x3000, 0x1000, "cpu:0"))
    with pytest.raises(RegistrationError, match="already registered"):
        reg.add(Region(0x1000, 0x1000, "cpu:0"))
    for addr, n in [(0x1800, 0x100), (0x0800, 0x1000), (0x1fff, 2), (0x0, 0x10000)]:
        with pytest.raises(RegistrationError):
            reg.add(Region(addr, n, "cpu:0"))
    for n in (0, -1):
        with pytest.raises(RegistrationError, match="positive"):
            reg.add(Region(0x9000, n, "cpu:0"))
    reg.add(Region(0x2000, 0x1000, "cpu:0"))  # exactly fills the gap
    assert [r.address for r in reg.regions()] == [0x1000, 0x2000, 0x3000]
    assert reg.find(0x2ffe, 2).address == 0x2000
    with pytest.raises(AddressError, match="runs past"):
        reg.find(0x3fff, 2)
    with pytest.raises(AddressError, match="not in any"):
        reg.find(0x5000, 1)
    with pytest.raises(AddressError):
        reg.find(0x1000, 0)
    with pytest.raises(AddressError):
        reg.find(2**64 - 1, 10)
    reg.remove(0x2000)
    with pytest.raises(RegistrationError):
        reg.remove(0x2000)
    with pytest.raises(AddressError):
        reg.find(0x2000, 1)


def test_address_of_supported_buffer_types() -> None:
    arr = np.arange(16, dtype=np.uint32)
    assert address_of(arr)[:3] == (arr.ctypes.data, 64, "cpu:0")
    ba = bytearray(b"abc")
    addr, n, _, keep = address_of(ba)
    assert n == 3 and bytes(memory_at(addr, 3)) == b"abc"
    with pytest.raises(BufferError):  # pinned while registered: cannot move under us
        ba.extend(b"x")
    del keep
    m = mmap.mmap(-1, 8192)
    assert address_of(m)[1] == 8192
    with pytest.raises(RegistrationError, match="read-only"):
        address_of(b"bytes")
    with pytest.raises(RegistrationError, match="contiguous"):
        address_of(np.zeros((4, 4))[:, 1])
    with pytest.raises(RegistrationError, match="length"):
        address_of(1234)
    with pytest.raises(RegistrationError):
        address_of(object())
    with pytest.raises(RegistrationError):
        address_of(arr, length=1000)


def test_torch_cpu_tensor_registration() -> None:
    torch = pytest.importorskip("torch")
    t = torch.ones(1024, dtype=torch.float16)
    addr, n, loc, _ = address_of(t)
    assert (addr, n, loc) == (t.data_ptr(), 2048, "cpu:0")


def _desc(**kw: object) -> bytes:
    base = dict(name="h:1", engine_id="e", rpc_host="h", rpc_port=1,
                transports={"tcp": {"host": "h", "port": 2}},
                buffers=[dict(address=0x1000, length=0x1000, location="cpu:0")])
    base.update(kw)
    return msgspec.json.encode(base)


@pytest.mark.parametrize("data, match", [
    (b"not json", "malformed"),
    (b"[]", "malformed"),
    (_desc(rpc_port=0), "rpc address"),
    (_desc(rpc_port="1"), "malformed"),
    (_desc(buffers=[dict(address=0, length=1, location="cpu:0")]), "valid range"),
    (_desc(buffers=[dict(address=2**64 - 1, length=2, location="cpu:0")]), "valid range"),
    (_desc(buffers=[dict(address=1, length=-1, location="cpu:0")]), "valid range"),
    (_desc(buffers=[dict(address=0x1000, length=0x100, location="cpu:0"),
                    dict(address=0x1080, length=0x100, location="cpu:0")]), "overlap"),
    (_desc(buffers=[dict(address=0x1000, length=1, location="gpu:0")]), "location"),
    (_desc(buffers=[dict(address=0x1000, length=1, location="cpu:0",
                         shm_name="../../etc/passwd")]), "shared-memory name"),
    (_desc(transports={"tcp": {"host": "h", "port": 70000}}), "tcp entry"),
    (_desc(name="other:1"), "asked for"),
    (b" " * (17 << 20), "limit"),
])
def test_malformed_descriptors_are_rejected(data: bytes, match: str) -> None:
    with pytest.raises(DescriptorError, match=match):
        decode_descriptor(data, expected_name="h:1")


def test_descriptor_roundtrip_and_peer_lookup() -> None:
    desc = SegmentDescriptor("h:1", "e", "h", 1, {"tcp": {"host": "h", "port": 2}},
                             [BufferDesc(0x3000, 0x100, "cuda:0"),
                              BufferDesc(0x1000, 0x100, "cpu:0", "mooncake-x", 64)])
    back = decode_descriptor(encode_descriptor(desc))
    assert back == desc
    peer = PeerSegment(back)
    assert peer.first_address() == 0x1000
    assert peer.find(0x30f0, 0x10).location == "cuda:0"
    with pytest.raises(AddressError):
        peer.find(0x30f0, 0x11)
    with pytest.raises(AddressError):
        peer.find(0x2000, 1)


async def test_engine_registration_errors_and_descriptor() -> None:
    async with engines(1) as (e,):
        arr = np.zeros(4096, np.uint8)
        addr = await e.register(arr)
        with pytest.raises(RegistrationError, match="already registered"):
            await e.register(arr)
        with pytest.raises(RegistrationError, match="overlaps"):
            await e.register(addr + 10, 10)
        with pytest.raises(RegistrationError):
            await e.register(addr + 8192, 0)
        with pytest.raises(RegistrationError):
            await e.register(addr + 8192, -4)
        with pytest.raises(RegistrationError, match="location"):
            await e.register(bytearray(10), location="tpu:0")
        with pytest.raises(RegistrationError):
            await e.unregister(addr + 1)
        (buf,) = e.descriptor().buffers
        assert (buf.address, buf.length, buf.location) == (addr, 4096, "cpu:0")
        assert set(e.descriptor().transports) >= {"tcp", "shm", "file"}
        # batch registration is all-or-nothing
        a1, a2 = np.zeros(64, np.uint8), np.zeros(64, np.uint8)
        with pytest.raises(RegistrationError):
            await e.register_many([(a1, None), (a2, None), (a1, None)])
        assert len(e.registry) == 1
        await e.unregister(addr)
        assert e.descriptor().buffers == []


def test_import_transfer_is_light() -> None:
    import subprocess
    import sys

    code = ("import sys, transfer, transfer.engine; from transfer import TransferEngine; "
            "print(sorted(m for m in ('torch','cupy','vllm','pyverbs') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.stdout.strip() == "[]", out.stderr


async def test_failed_start_releases_everything(tmp_path) -> None:
    """protocol=rdma on a host without NICs: start fails, and leaves no listener or file."""
    import os

    from transfer.engine import Engine
    from transfer.shm import SHM_DIR

    from _transfer_util import config

    before = set(os.listdir(SHM_DIR))
    engine = Engine(config(protocol="rdma"), rdma_options={"sysfs_root": tmp_path})
    with pytest.raises(Exception) as info:
        await engine.start()
    assert "rdma" in str(info.value).lower() or "nic" in str(info.value).lower()
    assert not {n for n in set(os.listdir(SHM_DIR)) - before if n.startswith("mooncake-")}
    with pytest.raises(RuntimeError, match="not running"):
        await engine.register(bytearray(10))


def test_get_engine_is_process_wide() -> None:
    import subprocess
    import sys

    code = ("from transfer import get_engine\n"
            "a = get_engine(); b = get_engine()\n"
            "assert a is b and a.name.startswith('127.0.0.1:')\n"
            "a.close_in(); c = get_engine(); assert c is not a\n"
            "c.close_in(); print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
