"""The Mooncake-compatible ``TransferEngine``: names, arguments and return codes."""
from __future__ import annotations

import numpy as np
import pytest
from _transfer_util import Peer, pattern, sha

from transfer import TransferEngine
from transfer.compat import TransferNotify, TransferOpcode

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair():
    a, b = TransferEngine(), TransferEngine()
    assert a.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    assert b.initialize("127.0.0.1:12345", "P2PHANDSHAKE", "tcp", "") == 0
    yield a, b
    a.close()
    b.close()


def test_initialize_and_segment_name(pair) -> None:
    a, b = pair
    assert b.get_rpc_port() != 12345 and b.get_rpc_port() > 0
    assert b.get_engine().name == f"127.0.0.1:{b.get_rpc_port()}"
    bad = TransferEngine()
    assert bad.initialize("127.0.0.1", "gopher://x", "tcp", "") == -1
    assert bad.initialize("127.0.0.1", "P2PHANDSHAKE", "nvlink", "") == -1


def test_managed_buffers_and_sync_transfers(pair) -> None:
    a, b = pair
    name = f"127.0.0.1:{b.get_rpc_port()}"
    ba, bb = a.allocate_managed_buffer(1 << 20), b.allocate_managed_buffer(1 << 20)
    assert ba and bb
    assert a.write_bytes_to_buffer(ba, b"hello", 5) == 0
    assert b.get_first_buffer_address(name) == bb and a.get_first_buffer_address(name) == bb
    assert a.transfer_sync_write(name, ba, bb, 5) == 0
    assert b.read_bytes_from_buffer(bb, 5) == b"hello"
    assert b.write_bytes_to_buffer(bb + 100, b"world", 5) == 0
    assert a.transfer_sync_read(name, ba + 10, bb + 100, 5) == 0
    assert a.read_bytes_from_buffer(ba + 10, 5) == b"world"
    assert a.transfer_sync_write(name, ba, 12345, 5) == -1
    assert a.transfer_sync_write("127.0.0.1:1", ba, bb, 5) == -1
    assert a.write_bytes_to_buffer(777, b"x", 1) == -1
    assert a.read_bytes_from_buffer(777, 1) == b""
    assert a.free_managed_buffer(ba, 1 << 20) == 0
    assert a.free_managed_buffer(ba, 1 << 20) == -1


def test_register_batches_and_async(pair) -> None:
    a, b = pair
    name = f"127.0.0.1:{b.get_rpc_port()}"
    src = pattern(4 << 20, 41)
    dst = np.zeros_like(src)
    s_addr, d_addr = src.ctypes.data, dst.ctypes.data
    assert a.register_memory(s_addr, src.nbytes) == 0
    assert a.register_memory(s_addr, src.nbytes) == -7  # overlap / duplicate
    assert a.register_memory(s_addr + 10, 100) == -7
    assert b.batch_register_memory([d_addr], [dst.nbytes]) == 0
    assert b.batch_register_memory([d_addr], [1, 2]) == -1
    chunk = 1 << 20
    offs = [i * chunk for i in range(4)]
    assert a.batch_transfer_sync_write(name, [s_addr + o for o in offs],
                                       [d_addr + o for o in offs], [chunk] * 4) == 0
    assert np.array_equal(dst, src)
    dst[:] = 0
    bid = a.batch_transfer_async_write(name, [s_addr], [d_addr], [src.nbytes])
    assert bid > 0 and a.get_batch_transfer_status([bid]) == 0
    assert np.array_equal(dst, src)
    back = np.zeros_like(src)
    assert a.register_memory(back.ctypes.data, back.nbytes) == 0
    bid = a.batch_transfer_async_read(name, [back.ctypes.data], [d_addr], [src.nbytes])
    assert a.get_batch_transfer_status([bid]) == 0 and np.array_equal(back, src)
    bid = a.transfer_submit_write(name, s_addr, d_addr, 4096)
    while (st := a.transfer_check_status(bid)) == 0:
        pass
    assert st == 1 and a.transfer_check_status(bid) == -1  # id freed
    assert a.batch_transfer_async_write(name, [s_addr], [d_addr + dst.nbytes], [1]) == 0
    assert a.get_batch_transfer_status([999999]) == -1
    assert a.unregister_memory(s_addr) == 0 and a.unregister_memory(s_addr) == -3
    assert a.transfer_sync_write(name, s_addr, d_addr, 10) == -1


def test_notify_and_opcode_variants(pair) -> None:
    a, b = pair
    name = f"127.0.0.1:{b.get_rpc_port()}"
    ba, bb = a.allocate_managed_buffer(4096), b.allocate_managed_buffer(4096)
    assert a.transfer_sync(name, ba, bb, 16, TransferOpcode.Write,
                           TransferNotify(a.get_engine().name, "layer-3")) == 0
    assert [(n.name, n.msg) for n in b.get_notifies()] == [(a.get_engine().name, "layer-3")]
    assert a.batch_transfer_sync(name, [ba], [bb], [16], TransferOpcode.Read) == 0


def test_against_peer_process() -> None:
    with Peer("--no-shm", size=2 << 20) as peer:
        te = TransferEngine()
        assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        try:
            buf = te.allocate_managed_buffer(peer.size)
            data = pattern(peer.size, 42).tobytes()
            assert te.write_bytes_to_buffer(buf, data, len(data)) == 0
            assert te.transfer_sync_write(peer.name, buf, peer.addr, peer.size) == 0
            assert peer.sha() == sha(data)
        finally:
            te.close()
