"""Topology discovery on fixture sysfs trees (real files, symlinks and the real parser)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from transfer.transports.rdma.topology import (
    discover_topology,
    nic_tiers,
    parse_cpulist,
    parse_device_names,
)

HOST0, HOST1 = "pci0000:00", "pci0000:80"


def add_pci(root: Path, chain: list[str], *, numa: int | None, vendor: int = 0x15B3,
            klass: int = 0x020700) -> Path:
    """Create /sys/devices/<host bridge>/<bridges...>/<device> and its /sys/bus/pci link."""
    device = root / "sys/devices" / Path(*chain)
    device.mkdir(parents=True, exist_ok=True)
    (device / "numa_node").write_text(f"{-1 if numa is None else numa}\n")
    (device / "vendor").write_text(f"{vendor:#06x}\n")
    (device / "class").write_text(f"{klass:#08x}\n")
    bus = root / "sys/bus/pci/devices"
    bus.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(device, bus), bus / chain[-1])
    return device


def add_nic(root: Path, name: str, chain: list[str], numa: int | None) -> None:
    device = add_pci(root, chain, numa=numa)
    ib = root / "sys/class/infiniband" / name
    ib.mkdir(parents=True)
    os.symlink(os.path.relpath(device, ib), ib / "device")


def add_gpu(root: Path, chain: list[str], numa: int | None, klass: int = 0x030200) -> None:
    add_pci(root, chain, numa=numa, vendor=0x10DE, klass=klass)


def add_node(root: Path, node: int, cpulist: str) -> None:
    d = root / f"sys/devices/system/node/node{node}"
    d.mkdir(parents=True)
    (d / "cpulist").write_text(cpulist + "\n")


@pytest.fixture
def dgx(tmp_path: Path) -> Path:
    """Two sockets; on each, two PCIe switches each holding one GPU and one NIC, plus a NIC
    directly on a root port of socket 1 (no GPU beside it)."""
    add_node(tmp_path, 0, "0-3,8-11")
    add_node(tmp_path, 1, "4-7,12-15")
    sw = lambda host, port, up: [host, port, up]  # noqa: E731
    add_gpu(tmp_path, sw(HOST0, "0000:00:01.0", "0000:01:00.0") + ["0000:02:00.0", "0000:03:00.0"], 0)
    add_nic(tmp_path, "mlx5_0", sw(HOST0, "0000:00:01.0", "0000:01:00.0") + ["0000:02:01.0", "0000:04:00.0"], 0)
    add_gpu(tmp_path, sw(HOST0, "0000:00:02.0", "0000:11:00.0") + ["0000:12:00.0", "0000:13:00.0"], 0)
    add_nic(tmp_path, "mlx5_1", sw(HOST0, "0000:00:02.0", "0000:11:00.0") + ["0000:12:01.0", "0000:14:00.0"], 0)
    add_gpu(tmp_path, sw(HOST1, "0000:80:01.0", "0000:81:00.0") + ["0000:82:00.0", "0000:83:00.0"], 1)
    add_nic(tmp_path, "mlx5_2", sw(HOST1, "0000:80:01.0", "0000:81:00.0") + ["0000:82:01.0", "0000:84:00.0"], 1)
    add_nic(tmp_path, "mlx5_3", [HOST1, "0000:80:03.0", "0000:90:00.0"], 1)
    # Not GPUs: an Intel VGA and an NVIDIA audio function.
    add_pci(tmp_path, [HOST0, "0000:00:1f.0"], numa=0, vendor=0x8086, klass=0x030000)
    add_pci(tmp_path, [HOST0, "0000:00:02.0", "0000:11:00.0", "0000:12:00.0", "0000:13:00.1"],
            numa=0, vendor=0x10DE, klass=0x040300)
    return tmp_path


def test_discovers_nics_gpus_and_nodes(dgx: Path) -> None:
    topo = discover_topology(dgx)
    assert topo.nic_names == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    nic0 = topo.nics[0]
    assert nic0.pci_address == "0000:04:00.0" and nic0.numa_node == 0
    assert nic0.pci_path[0] == HOST0 and nic0.root_complex == HOST0
    assert [g.pci_address for g in topo.gpus] == ["0000:03:00.0", "0000:13:00.0", "0000:83:00.0"]
    assert [g.name for g in topo.gpus] == ["cuda:0", "cuda:1", "cuda:2"]
    assert topo.cpu_nodes == {0: (0, 1, 2, 3, 8, 9, 10, 11), 1: (4, 5, 6, 7, 12, 13, 14, 15)}
    assert topo.locations() == ["cpu:0", "cpu:1", "cuda:0", "cuda:1", "cuda:2"]


def test_gpu_prefers_nic_on_same_switch_then_root_complex_then_numa(dgx: Path) -> None:
    topo = discover_topology(dgx)
    assert nic_tiers(topo, "cuda:0") == [["mlx5_0"], ["mlx5_1"], ["mlx5_2", "mlx5_3"]]
    assert nic_tiers(topo, "cuda:1") == [["mlx5_1"], ["mlx5_0"], ["mlx5_2", "mlx5_3"]]
    # Same switch beats same root complex; mlx5_3 shares only the host bridge.
    assert nic_tiers(topo, "cuda:2") == [["mlx5_2"], ["mlx5_3"], ["mlx5_0", "mlx5_1"]]
    assert topo.preferred_nics("cuda:2") == ["mlx5_2"]
    assert topo.ordered_nics("cuda:2") == ["mlx5_2", "mlx5_3", "mlx5_0", "mlx5_1"]


def test_cpu_prefers_same_numa_node(dgx: Path) -> None:
    topo = discover_topology(dgx)
    assert topo.preferred_nics("cpu:0") == ["mlx5_0", "mlx5_1"]
    assert topo.preferred_nics("cpu:1") == ["mlx5_2", "mlx5_3"]
    assert topo.matrix()["cpu:1"] == [["mlx5_2", "mlx5_3"], ["mlx5_0", "mlx5_1"]]


def test_same_numa_without_shared_root_complex(tmp_path: Path) -> None:
    add_gpu(tmp_path, ["pci0000:00", "0000:00:01.0", "0000:01:00.0"], 0)
    add_nic(tmp_path, "far", ["pci0000:40", "0000:40:01.0", "0000:41:00.0"], 1)
    add_nic(tmp_path, "near", ["pci0000:20", "0000:20:01.0", "0000:21:00.0"], 0)
    topo = discover_topology(tmp_path)
    assert nic_tiers(topo, "cuda:0") == [["near"], ["far"]]


def test_device_name_restricts_and_orders(dgx: Path, caplog: pytest.LogCaptureFixture) -> None:
    topo = discover_topology(dgx, "mlx5_2, mlx5_0,,mlx5_9")
    assert topo.nic_names == ["mlx5_2", "mlx5_0"]
    assert "mlx5_9" in caplog.text
    assert topo.preferred_nics("cpu:1") == ["mlx5_2"]
    assert topo.preferred_nics("cuda:1") == ["mlx5_0"]  # same root complex, its own NIC filtered


def test_unknown_numa_and_missing_tree(tmp_path: Path) -> None:
    assert discover_topology(tmp_path).nics == ()
    add_nic(tmp_path, "a", ["pci0000:00", "0000:00:01.0", "0000:01:00.0"], None)
    add_nic(tmp_path, "b", ["pci0000:00", "0000:00:02.0", "0000:02:00.0"], 1)
    topo = discover_topology(tmp_path)
    assert topo.nics[0].numa_node is None
    assert nic_tiers(topo, "cpu:1") == [["b"], ["a"]]
    assert nic_tiers(topo, "cpu:0") == [["a"], ["b"]]  # unknown NUMA before known-remote
    assert topo.locations() == ["cpu:0"]
    # Unknown locations or GPU indexes still get every NIC.
    assert nic_tiers(topo, "cuda:7") == [["a", "b"]]
    assert nic_tiers(topo, "file:/x") == [["a", "b"]]


def test_dangling_device_link(tmp_path: Path) -> None:
    ib = tmp_path / "sys/class/infiniband/rxe0"
    ib.mkdir(parents=True)
    os.symlink("../../../devices/virtual/nowhere", ib / "device")
    topo = discover_topology(tmp_path)
    assert topo.nics[0].name == "rxe0" and topo.nics[0].pci_address is None
    assert topo.preferred_nics("cpu:0") == ["rxe0"]


def test_garbage_files_are_tolerated(tmp_path: Path) -> None:
    add_node(tmp_path, 0, "zero-three")
    add_node(tmp_path, 1, "0-1")
    device = add_pci(tmp_path, ["pci0000:00", "0000:00:01.0"], numa=0, vendor=0x10DE)
    (device / "numa_node").write_text("banana\n")
    (device / "class").write_text("not hex\n")
    topo = discover_topology(tmp_path)
    assert topo.cpu_nodes == {1: (0, 1)} and topo.gpus == ()


def test_parse_cpulist() -> None:
    assert parse_cpulist("0-2,5,7-8\n") == (0, 1, 2, 5, 7, 8)
    assert parse_cpulist("") == ()
    for bad in ("3-1", "x", "-1", "0-99999999"):
        with pytest.raises(ValueError):
            parse_cpulist(bad)


def test_parse_device_names() -> None:
    assert parse_device_names("") == [] and parse_device_names(None) == []
    assert parse_device_names(" mlx5_0 ,mlx5_1,mlx5_0") == ["mlx5_0", "mlx5_1"]
    for bad in ("../etc", "a,..", "x" * 65):
        with pytest.raises(ValueError):
            parse_device_names(bad)
