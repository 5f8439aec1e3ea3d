"""Byte sizes written the way Mooncake users write them: ``4GB``, ``512mb``, ``1.5GiB``, ``1024``.

Semantics follow Mooncake's own parser (``mooncake/mooncake_config.py``) and vLLM's
(``vllm/distributed/mooncake_store.py::_parse_size``) so an existing config file means the same
bytes here:

* Units are case-insensitive and **binary**: ``K``/``KB``/``KiB`` = 1024, ``M``/``MB``/``MiB`` =
  1024**2, ``G``/``GB``/``GiB`` = 1024**3, ``T``/``TB``/``TiB`` = 1024**4, ``B`` or no unit = 1.
  ``GB`` is *not* 10**9: Mooncake and vLLM both read ``"4GB"`` as 4 GiB.
* A fractional number is allowed (``"1.5GB"``) and the byte count is Mooncake's and vLLM's
  ``int(float(num) * multiplier)``, float rounding included: ``"262144.216gb"`` is
  281475208638890 bytes to them, one more than exact arithmetic gives, and a config must mean
  the same bytes to both. Whole numbers are multiplied exactly (the same result below 2**53
  bytes, 8 PiB).
* Plain integers are taken as bytes. Negative sizes, exponents (``1e9``), empty strings, unknown
  units (``"4XB"``) and booleans are rejected rather than guessed at.
"""

from __future__ import annotations

import re

__all__ = ["MAX_SIZE", "format_size", "parse_size"]

# Sizes travel in 64-bit fields (segment descriptors, frame headers); anything larger is a typo.
MAX_SIZE = (1 << 63) - 1

_KIB = 1024
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": _KIB,
    "kb": _KIB,
    "kib": _KIB,
    "m": _KIB**2,
    "mb": _KIB**2,
    "mib": _KIB**2,
    "g": _KIB**3,
    "gb": _KIB**3,
    "gib": _KIB**3,
    "t": _KIB**4,
    "tb": _KIB**4,
    "tib": _KIB**4,
}
_SIZE_RE = re.compile(r"^(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)$")
_ALLOWED = (
    "expected a non-negative byte count: an integer or a string like '4GB', '512MB', "
    "'1.5GiB' (units B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB; case-insensitive, powers of 1024)"
)


def parse_size(value: int | str) -> int:
    """Return ``value`` as a number of bytes; raise ``ValueError`` saying what is allowed.

    >>> parse_size("4GB"), parse_size("512mb"), parse_size("1.5GiB"), parse_size(1024)
    (4294967296, 536870912, 1610612736, 1024)
    """
    if isinstance(value, bool):
        raise ValueError(f"{_ALLOWED}; got a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float):
        # JSON writers sometimes emit 3355443200.0; accept whole numbers only.
        if not value.is_integer():
            raise ValueError(f"{_ALLOWED}; a number without a unit must be a whole byte count")
        size = int(value)
    elif isinstance(value, str):
        size = _parse_size_str(value)
    else:
        raise ValueError(f"{_ALLOWED}; got {type(value).__name__}")
    if size < 0:
        raise ValueError(f"{_ALLOWED}; sizes cannot be negative")
    if size > MAX_SIZE:
        raise ValueError(f"{_ALLOWED}; at most {MAX_SIZE} bytes")
    return size


def _parse_size_str(text: str) -> int:
    cleaned = text.strip().lower()
    if cleaned.startswith("-"):
        raise ValueError(f"{_ALLOWED}; sizes cannot be negative")
    match = _SIZE_RE.match(cleaned)
    if match is None or match.group("unit") not in _UNITS:
        raise ValueError(_ALLOWED)
    num, multiplier = match.group("num"), _UNITS[match.group("unit")]
    if num.isdigit():
        return int(num) * multiplier
    return int(float(num) * multiplier)


def format_size(size: int) -> str:
    """Render bytes with the largest binary unit that divides them exactly: ``4 GiB``, ``1536 MiB``.

    Used in help text and logs; ``parse_size(format_size(n)) == n`` for every valid ``n``.
    """
    for unit, factor in (("TiB", _KIB**4), ("GiB", _KIB**3), ("MiB", _KIB**2), ("KiB", _KIB)):
        if size and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"
