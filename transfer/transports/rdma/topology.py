"""Which RDMA NIC should move bytes for a buffer at a given location.

Why: a NIC reading GPU memory across the CPU interconnect (or a NIC on the other NUMA node
reading host memory) loses a large share of its bandwidth. Mooncake therefore discovers, from
sysfs, where every NIC and GPU sits in the PCIe tree and prefers, per location (``cpu:N`` or
``cuda:N``), the NICs behind the same PCIe switch, then the same root complex, then the same
NUMA node, then anything. We do the same from plain files so that the parsing is tested on
fixture trees (``root`` is the directory that plays ``/``).

Everything here is a pure function of the files under ``root``; nothing imports pyverbs.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "PciDevice",
    "Topology",
    "discover_topology",
    "parse_cpulist",
    "parse_device_names",
    "nic_tiers",
]

logger = logging.getLogger(__name__)

NVIDIA_VENDOR = 0x10DE
# PCI base class 0x03 (display): 0x0300 VGA-compatible, 0x0302 3D controller (data-centre GPUs).
GPU_CLASSES = (0x0300, 0x0302)
MAX_CPUS = 1 << 16  # a cpulist naming more CPUs than this is corrupt, not a machine


@dataclass(frozen=True, slots=True)
class PciDevice:
    """A device's place in the PCIe tree.

    ``pci_path`` is the chain of sysfs directory names from the host bridge (``pci0000:3a``)
    down to the device itself (``0000:3d:00.0``); two devices sharing a prefix longer than the
    host bridge hang off the same root port or switch.
    """

    name: str
    pci_address: str | None
    numa_node: int | None
    pci_path: tuple[str, ...] = ()

    @property
    def root_complex(self) -> str | None:
        return self.pci_path[0] if self.pci_path else None


@dataclass(frozen=True, slots=True)
class Topology:
    """NICs, GPUs (indexed in PCI bus order, like ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) and the CPUs
    of each NUMA node, plus the resulting NIC preference per location."""

    nics: tuple[PciDevice, ...]
    gpus: tuple[PciDevice, ...]
    cpu_nodes: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def nic_names(self) -> list[str]:
        return [nic.name for nic in self.nics]

    def locations(self) -> list[str]:
        """Every location a buffer can have on this host (``cpu:0`` even without NUMA info)."""
        nodes = sorted(self.cpu_nodes) or [0]
        return [f"cpu:{n}" for n in nodes] + [f"cuda:{i}" for i in range(len(self.gpus))]

    def ordered_nics(self, location: str) -> list[str]:
        """All NICs, best first, for a buffer at ``location``; unknown locations get every NIC
        in name order (a buffer is never left without a NIC)."""
        return [name for tier in nic_tiers(self, location) for name in tier]

    def preferred_nics(self, location: str) -> list[str]:
        """The best tier only: the NICs a transfer at ``location`` stripes across."""
        tiers = nic_tiers(self, location)
        return list(tiers[0]) if tiers else []

    def matrix(self) -> dict[str, list[list[str]]]:
        """Mooncake's topology matrix shape: ``{location: [preferred, others]}``, JSON-ready, so
        peers can pick the remote NIC nearest to a remote buffer."""
        out: dict[str, list[list[str]]] = {}
        for location in self.locations():
            tiers = nic_tiers(self, location)
            preferred = list(tiers[0]) if tiers else []
            others = [name for tier in tiers[1:] for name in tier]
            out[location] = [preferred, others]
        return out


def parse_device_names(spec: str | None) -> list[str]:
    """Mooncake's ``device_name``: comma-separated NIC names, blanks ignored, order kept,
    duplicates dropped. Empty means "all NICs"."""
    if not spec:
        return []
    names: list[str] = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        if "/" in name or name in (".", "..") or len(name) > 64:
            raise ValueError(f"invalid RDMA device name {name!r} in device_name {spec!r}")
        if name not in names:
            names.append(name)
    return names


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse the kernel's cpulist format (``0-3,8,10-11``); raises ValueError on garbage."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo_text, sep, hi_text = part.partition("-")
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
        if lo < 0 or hi < lo or hi >= MAX_CPUS:
            raise ValueError(f"bad cpulist range {part!r}")
        cpus.extend(range(lo, hi + 1))
    return tuple(sorted(set(cpus)))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _read_numa(device_dir: Path) -> int | None:
    text = _read(device_dir / "numa_node")
    if text is None:
        return None
    try:
        node = int(text)
    except ValueError:
        logger.warning("ignoring unparsable numa_node %r in %s", text, device_dir)
        return None
    return node if node >= 0 else None  # -1: the platform does not say


def _read_hex(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


def _is_pci_address(name: str) -> bool:
    # 0000:3b:00.0 = domain:bus:device.function
    parts = name.split(":")
    if len(parts) != 3 or "." not in parts[2]:
        return False
    dev, _, fn = parts[2].partition(".")
    try:
        int(parts[0], 16), int(parts[1], 16), int(dev, 16), int(fn, 16)
    except ValueError:
        return False
    return True


def _pci_path(resolved: Path) -> tuple[str, ...]:
    """The host-bridge-to-device chain of a resolved ``/sys/devices/...`` path."""
    parts = resolved.parts
    for i, part in enumerate(parts):
        if part.startswith("pci") and ":" in part:
            chain = [part] + [p for p in parts[i + 1:] if _is_pci_address(p)]
            return tuple(chain)
    return ()


def _pci_device(name: str, device_link: Path) -> PciDevice:
    try:
        resolved = device_link.resolve(strict=True)
    except (OSError, RuntimeError):
        return PciDevice(name, None, None, ())
    path = _pci_path(resolved)
    address = path[-1] if len(path) > 1 else None
    return PciDevice(name, address, _read_numa(resolved), path)


def _discover_nics(root: Path, wanted: Iterable[str]) -> list[PciDevice]:
    base = root / "sys/class/infiniband"
    try:
        present = sorted(entry.name for entry in base.iterdir())
    except OSError:
        present = []
    wanted = list(wanted)
    if wanted:
        missing = [name for name in wanted if name not in present]
        if missing:
            logger.warning("device_name lists RDMA devices not present: %s (present: %s)",
                           ", ".join(missing), ", ".join(present) or "none")
        names = [name for name in wanted if name in present]
    else:
        names = present
    return [_pci_device(name, base / name / "device") for name in names]


def _discover_gpus(root: Path) -> list[PciDevice]:
    base = root / "sys/bus/pci/devices"
    try:
        entries = sorted(base.iterdir(), key=lambda p: p.name)
    except OSError:
        return []
    gpus: list[PciDevice] = []
    for entry in entries:
        vendor = _read_hex(entry / "vendor")
        klass = _read_hex(entry / "class")
        if vendor != NVIDIA_VENDOR or klass is None or (klass >> 8) not in GPU_CLASSES:
            continue
        device = _pci_device(entry.name, entry)
        gpus.append(PciDevice(f"cuda:{len(gpus)}", device.pci_address or entry.name,
                              device.numa_node, device.pci_path))
    return gpus


def _discover_cpu_nodes(root: Path) -> dict[int, tuple[int, ...]]:
    base = root / "sys/devices/system/node"
    nodes: dict[int, tuple[int, ...]] = {}
    try:
        entries = list(base.iterdir())
    except OSError:
        return nodes
    for entry in entries:
        suffix = entry.name[4:]
        if not entry.name.startswith("node") or not suffix.isdigit():
            continue
        text = _read(entry / "cpulist")
        if text is None:
            continue
        try:
            nodes[int(suffix)] = parse_cpulist(text)
        except ValueError as exc:
            logger.warning("ignoring %s/cpulist: %s", entry, exc)
    return dict(sorted(nodes.items()))


def discover_topology(root: str | os.PathLike[str] = "/",
                      device_name: str | None = None) -> Topology:
    """Read NICs, NVIDIA GPUs and NUMA nodes from the sysfs tree under ``root``.

    ``device_name`` restricts (and orders) the NICs, Mooncake style; missing names are logged
    and skipped so that one typo does not take the node down when other NICs remain.
    """
    base = Path(root)
    return Topology(
        nics=tuple(_discover_nics(base, parse_device_names(device_name))),
        gpus=tuple(_discover_gpus(base)),
        cpu_nodes=_discover_cpu_nodes(base),
    )


def _shared_bridges(a: PciDevice, b: PciDevice) -> int:
    """How many PCIe bridges below the host bridge two devices share (0 = only the root)."""
    if not a.pci_path or not b.pci_path or a.pci_path[0] != b.pci_path[0]:
        return -1
    # Exclude the devices themselves: a shared prefix may only contain bridges.
    left, right = a.pci_path[:-1], b.pci_path[:-1]
    shared = 0
    for x, y in zip(left, right):
        if x != y:
            break
        shared += 1
    return shared - 1  # the host bridge itself does not count


def _parse_location(location: str) -> tuple[str, int] | None:
    kind, sep, index = location.partition(":")
    if not sep or kind not in ("cpu", "cuda") or not index.isdigit():
        return None
    return kind, int(index)


def nic_tiers(topology: Topology, location: str) -> list[list[str]]:
    """NIC names grouped into preference tiers for ``location``, best tier first.

    ``cuda:N``: same PCIe switch/root port > same root complex > same NUMA node > others.
    ``cpu:N``: same NUMA node > NUMA unknown > others. Empty tiers are dropped; an unknown
    location (or GPU index) yields one tier with every NIC.
    """
    nics = list(topology.nics)
    if not nics:
        return []
    parsed = _parse_location(location)
    if parsed is None:
        return [[nic.name for nic in nics]]
    kind, index = parsed
    if kind == "cpu":
        ranks = [0 if nic.numa_node == index else 1 if nic.numa_node is None else 2
                 for nic in nics]
    else:
        if index >= len(topology.gpus):
            return [[nic.name for nic in nics]]
        gpu = topology.gpus[index]
        ranks = []
        for nic in nics:
            shared = _shared_bridges(gpu, nic)
            if shared >= 1:
                ranks.append(0)
            elif shared == 0:
                ranks.append(1)
            elif gpu.numa_node is not None and nic.numa_node == gpu.numa_node:
                ranks.append(2)
            else:
                ranks.append(3)
    tiers: list[list[str]] = []
    for rank in sorted(set(ranks)):
        tiers.append([nic.name for nic, r in zip(nics, ranks) if r == rank])
    return tiers
