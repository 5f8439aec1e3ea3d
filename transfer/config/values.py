"""Converters from raw config values (JSON/YAML scalars, env/CLI strings) to typed values.

Each converter accepts either the target type or a string (env vars and flags are always
strings; Mooncake's own parser also accepts strings in files), returns the normalized value and
raises ``ValueError`` whose message says *what is allowed*. The schema wraps that into a
:class:`~transfer.config.errors.ConfigError` naming the key and where the value came from.

Converters are idempotent (``conv(conv(x)) == conv(x)``): the CLI converts at parse time for
early errors and the config object converts again when it is built.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from transfer.config.errors import REDACTED
from transfer.config.sizes import parse_size

__all__ = [
    "Converter",
    "split_address",
    "to_address",
    "to_addresses",
    "to_bool",
    "to_choice",
    "to_float",
    "to_host",
    "to_http_path",
    "to_int",
    "to_local_hostname",
    "to_metadata_server",
    "to_port",
    "to_secret",
    "to_size",
    "to_str",
    "to_str_or_empty",
]

Converter = Callable[[Any], Any]

# Bounds on free-form strings: config values are short; a megabyte "hostname" is a mistake.
MAX_STR_LEN = 4096
MAX_SECRET_LEN = 4096
MAX_ADDRESSES = 64

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_INT_RE = re.compile(r"^[+-]?\d+$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?$"
)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def to_str(value: Any) -> str:
    """A string of at most 4096 characters; numbers are not converted (``device_name: 0``)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    if len(value) > MAX_STR_LEN:
        raise ValueError(f"expected a string of at most {MAX_STR_LEN} characters")
    return value


def to_str_or_empty(value: Any) -> str:
    """Like :func:`to_str`, with null read as ``""``: Mooncake types ``device_name`` as
    ``Optional[str]``, so its users' files may say ``"device_name": null``."""
    return "" if value is None else to_str(value)


def to_bool(value: Any) -> bool:
    """A boolean, or true/false, yes/no, on/off, 1/0 (any case), as Mooncake accepts."""
    allowed = "expected a boolean: true/false, yes/no, on/off or 1/0"
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise ValueError(allowed)


def to_int(value: Any, lo: int, hi: int) -> int:
    """An integer in ``[lo, hi]``; booleans and fractional numbers are rejected."""
    allowed = f"expected an integer from {lo} to {hi}"
    if isinstance(value, bool):
        raise ValueError(f"{allowed}, got a boolean")
    if isinstance(value, str) and _INT_RE.match(value.strip()):
        number = int(value.strip())
    elif isinstance(value, int):
        number = value
    else:
        raise ValueError(f"{allowed}, got {_type_name(value)}")
    if not lo <= number <= hi:
        raise ValueError(allowed)
    return number


def to_float(value: Any, lo: float, hi: float) -> float:
    """A finite number in ``(lo, hi]`` (lower bound exclusive: used for timeouts, where 0 hangs or
    fails everything)."""
    allowed = f"expected a number greater than {lo:g} and at most {hi:g}"
    if isinstance(value, bool):
        raise ValueError(f"{allowed}, got a boolean")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(allowed) from None
    else:
        raise ValueError(f"{allowed}, got {_type_name(value)}")
    if not math.isfinite(number) or not lo < number <= hi:
        raise ValueError(allowed)
    return number


def to_port(value: Any, *, allow_zero: bool) -> int:
    """A TCP port. Bind ports may be 0 (the OS picks one: what tests and benchmarks want)."""
    return to_int(value, 0 if allow_zero else 1, 65535)


def to_size(value: Any, lo: int, hi: int) -> int:
    """A byte size (see :mod:`transfer.config.sizes`) in ``[lo, hi]``."""
    size = parse_size(value)
    if not lo <= size <= hi:
        raise ValueError(f"expected a size from {lo} to {hi} bytes")
    return size


def to_choice(value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``, case-insensitive, normalized to lower case."""
    allowed = f"expected one of {', '.join(choices)}"
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise ValueError(allowed)


def _check_host(host: str) -> str:
    """``host`` is a DNS name or an IPv4/IPv6 literal (unbracketed); return it unchanged."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
        raise ValueError(f"{host!r} is not a hostname or IP address")
    return host


def to_host(value: Any) -> str:
    """A host to bind or connect to: DNS name, IPv4 or IPv6 literal (``0.0.0.0`` = all)."""
    allowed = "expected a hostname or IP address, e.g. 127.0.0.1, 0.0.0.0, ::1 or node1.example"
    if not isinstance(value, str):
        raise ValueError(f"{allowed}, got {_type_name(value)}")
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return _check_host(host)
    except ValueError:
        raise ValueError(allowed) from None


def split_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[::1]:port``) into ``(host, port)``; raise ``ValueError``.

    Public because every client that dials a configured address needs exactly this.
    """
    allowed = "expected host:port with a port from 1 to 65535, e.g. 127.0.0.1:50051 or [::1]:50051"
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(allowed)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(allowed)
    elif ":" in host:
        raise ValueError(f"{allowed} (write IPv6 addresses in brackets)")
    try:
        _check_host(host)
        port = to_port(port_text, allow_zero=False)
    except ValueError:
        raise ValueError(allowed) from None
    return host, port


def to_address(value: Any) -> str:
    """A ``host:port`` address, returned stripped; validated by :func:`split_address`."""
    if not isinstance(value, str):
        raise ValueError(f"expected host:port as a string, got {_type_name(value)}")
    split_address(value)
    return value.strip()


def to_local_hostname(value: Any) -> str:
    """Mooncake's ``local_hostname``: a host, optionally with ``:port`` (Mooncake allows both)."""
    allowed = (
        "expected a hostname or IP address, optionally with :port, e.g. 10.0.0.5 or node1:17000"
    )
    if not isinstance(value, str):
        raise ValueError(f"{allowed}, got {_type_name(value)}")
    text = value.strip()
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    try:
        if ":" in text:
            split_address(text)
        else:
            _check_host(text)
    except ValueError:
        raise ValueError(allowed) from None
    return text


P2P_HANDSHAKE = "P2PHANDSHAKE"
_METADATA_ALLOWED = (
    "expected P2PHANDSHAKE, etcd://host:port[,host:port...], http(s)://host[:port]/path, "
    "or a bare host:port (Mooncake's legacy etcd form)"
)


def to_metadata_server(value: Any) -> str:
    """Mooncake's ``metadata_server``: where transfer engines find each other's segment metadata.

    Accepted forms are the ones Mooncake accepts and this implementation serves; ``redis://`` is
    Mooncake-only and rejected here rather than failing later at connect time.
    """
    if not isinstance(value, str):
        raise ValueError(f"{_METADATA_ALLOWED}, got {_type_name(value)}")
    text = value.strip()
    if text.upper() == P2P_HANDSHAKE:
        return P2P_HANDSHAKE
    scheme, sep, rest = text.partition("://")
    try:
        if not sep:
            split_address(text)
        elif scheme.lower() == "etcd":
            for endpoint in re.split(r"[,;]", rest):
                split_address(endpoint)
        elif scheme.lower() in ("http", "https"):
            url = urlsplit(text)
            if not url.hostname:
                raise ValueError(_METADATA_ALLOWED)
            _ = url.port  # raises ValueError for a non-numeric or out-of-range port
        else:
            raise ValueError(_METADATA_ALLOWED)
    except ValueError:
        raise ValueError(_METADATA_ALLOWED) from None
    return text


def to_http_path(value: Any) -> str:
    """A URL path such as ``/metadata``: leading slash, no whitespace, query or fragment."""
    allowed = "expected a URL path starting with '/', e.g. /metadata"
    if not isinstance(value, str):
        raise ValueError(f"{allowed}, got {_type_name(value)}")
    if not value.startswith("/") or any(c.isspace() or c in "?#" for c in value):
        raise ValueError(allowed)
    return to_str(value)


def to_secret(value: Any) -> bytes | None:
    """A shared secret: ``None`` (auth off) or a non-empty string/bytes (strings are UTF-8 encoded).

    An empty string is an error rather than "off": ``MOONCAKE_AUTH_SECRET=`` silently disabling
    authentication is the wrong way to fail.
    """
    allowed = (
        f"expected a non-empty string of at most {MAX_SECRET_LEN} bytes, or null to disable auth"
    )
    if value is None:
        return None
    if value == REDACTED:
        # A dump from MooncakeConfig.to_dict() read back: refuse rather than use the placeholder.
        raise ValueError(
            f"{allowed}; {REDACTED!r} is the placeholder to_dict() writes, not a secret"
        )
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, (bytes, bytearray)) or not 0 < len(value) <= MAX_SECRET_LEN:
        raise ValueError(allowed)
    return bytes(value)


def to_addresses(value: Any) -> tuple[str, ...]:
    """A list of ``host:port`` addresses; a string is split on commas (how env vars and flags
    carry lists)."""
    allowed = "expected a list of host:port addresses (or one comma-separated string)"
    if isinstance(value, str):
        items: Sequence[Any] = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise ValueError(f"{allowed}, got {_type_name(value)}")
    if len(items) > MAX_ADDRESSES:
        raise ValueError(f"{allowed}; at most {MAX_ADDRESSES}")
    try:
        return tuple(to_address(item) for item in items)
    except ValueError:
        raise ValueError(allowed) from None
