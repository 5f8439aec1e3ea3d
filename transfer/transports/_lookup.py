"""Finding the peer buffer entry that holds a slice (shared by the same-host transports)."""
from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

from transfer.errors import AddressError

__all__ = ["find_entry"]


def find_entry(entries: Sequence[Mapping[str, Any]], address: int,
               length: int) -> Mapping[str, Any]:
    """The entry (sorted by address) holding ``[address, address + length)``."""
    i = bisect.bisect_right(entries, address, key=lambda e: e["address"]) - 1
    if i >= 0:
        e = entries[i]
        if address + length <= e["address"] + e["length"]:
            return e
    raise AddressError(f"range 0x{address:x}+{length} is not inside one peer buffer")
