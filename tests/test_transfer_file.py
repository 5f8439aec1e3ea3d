"""File segments: registered file ranges read and written with positional I/O."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _transfer_util import engines, pattern

from transfer.batch import TransferRequest
from transfer.errors import AddressError, RegistrationError
from transfer.memory import FILE_ADDRESS_BASE
from transfer.transports.base import Opcode

pytestmark = pytest.mark.timeout(30)


def _file(path: Path, size: int, seed: int) -> bytes:
    data = pattern(size, seed).tobytes()
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("enable_shm", [True, False], ids=["same-host-direct", "via-owner-tcp"])
async def test_remote_file_segment_read_and_write(tmp_path: Path, enable_shm: bool) -> None:
    async with engines(2, **{"transfer.enable_shm": enable_shm}) as (a, owner):
        # With the same-host shortcuts off, the owner offers no direct file path: tcp only.
        assert ("file" in owner.transports) == enable_shm
        data = _file(tmp_path / "ssd.bin", 3 << 20, 51)
        fa = await owner.register_file(tmp_path / "ssd.bin", offset=4096, length=2 << 20)
        assert fa >= FILE_ADDRESS_BASE
        desc = (await a.open_segment(owner.name)).desc
        assert desc.buffers[0].location == f"file:{tmp_path / 'ssd.bin'}"
        dst = np.zeros(1 << 20, np.uint8)
        da = await a.register(dst)
        await a.transfer([TransferRequest(Opcode.READ, da, owner.name, fa + 100, 1 << 20)])
        assert dst.tobytes() == data[4096 + 100:4096 + 100 + (1 << 20)]
        src = pattern(1 << 20, 52)
        sa = await a.register(src)
        await a.transfer([TransferRequest(Opcode.WRITE, sa, owner.name, fa + (1 << 20), 1 << 20)])
        on_disk = (tmp_path / "ssd.bin").read_bytes()
        assert on_disk[4096 + (1 << 20):4096 + (2 << 20)] == src.tobytes()
        assert on_disk[:4096] == data[:4096]  # outside the registered range: untouched
        with pytest.raises(AddressError):
            await a.submit([TransferRequest(Opcode.READ, da, owner.name, fa + (2 << 20) - 10, 100)])
        used_tcp = a.stats()["tcp_connects"] > 0
        assert used_tcp is (not enable_shm)


async def test_local_file_buffer_as_source_and_destination(tmp_path: Path) -> None:
    async with engines(2, **{"transfer.enable_shm": False}) as (a, b):
        data = _file(tmp_path / "local.bin", 1 << 20, 53)
        fa = await a.register_file(tmp_path / "local.bin")
        dst = np.zeros(1 << 20, np.uint8)
        db = await b.register(dst)
        await a.transfer([TransferRequest(Opcode.WRITE, fa, b.name, db, 1 << 20)])
        assert dst.tobytes() == data
        dst[:] = pattern(1 << 20, 54)
        await a.transfer([TransferRequest(Opcode.READ, fa, b.name, db, 1 << 20)])
        assert (tmp_path / "local.bin").read_bytes() == dst.tobytes()


async def test_file_registration_errors(tmp_path: Path) -> None:
    async with engines(1) as (a,):
        _file(tmp_path / "f.bin", 4096, 55)
        with pytest.raises(RegistrationError):
            await a.register_file(tmp_path / "f.bin", offset=4000, length=200)
        with pytest.raises(RegistrationError):
            await a.register_file(tmp_path / "f.bin", length=0)
        with pytest.raises(FileNotFoundError):
            await a.register_file(tmp_path / "missing.bin")
        fa = await a.register_file(tmp_path / "f.bin")
        fb = await a.register_file(tmp_path / "f.bin")  # a second range of the same file is fine
        assert fa != fb
        await a.unregister(fa)
        with pytest.raises(RegistrationError):
            await a.unregister(fa)
