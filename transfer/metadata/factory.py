"""Pick a metadata backend from the ``metadata_server`` string, the way Mooncake does.

* ``P2PHANDSHAKE`` -> :class:`~transfer.metadata.p2p.P2PHandshakeMetadata` (needs ``fetch``);
* ``http://host:port/path`` or ``https://...`` -> :class:`~transfer.metadata.HttpMetadataClient`;
* ``etcd://host:port[,host:port...]`` -> :class:`~transfer.metadata.etcd.EtcdMetadataStore`;
* a bare ``host:port[,host:port...]`` is etcd too, as in Mooncake.

Anything else is a ``ValueError`` that names the accepted forms: a typo in a config file must
fail at startup, not as a timeout on the first transfer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import yarl

from transfer.metadata.base import DEFAULT_MAX_VALUE_SIZE, MetadataStore
from transfer.metadata.p2p import FetchFn

__all__ = [
    "P2P_HANDSHAKE",
    "MetadataServerSpec",
    "parse_metadata_server",
    "parse_endpoints",
    "open_metadata_store",
]

P2P_HANDSHAKE = "P2PHANDSHAKE"

_FORMS = (
    "expected 'P2PHANDSHAKE', 'http://host:port/metadata', 'etcd://host:port[,host:port]' "
    "or 'host:port[,host:port]' (etcd)"
)


def parse_endpoints(endpoints: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"a:1,b:2"`` (or a list of ``host:port``; IPv6 as ``[::1]:2379``) -> ``[(host, port)]``."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed: list[tuple[str, int]] = []
    for raw in items:
        item = raw.strip()
        if item.startswith("["):
            host, sep, port_text = item[1:].partition("]:")
        else:
            host, sep, port_text = item.rpartition(":")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"etcd endpoint must be host:port, got {raw!r} in {endpoints!r}")
        if any(c.isspace() or c in "/?#@" for c in host):
            raise ValueError(f"etcd endpoint has a malformed host: {raw!r}")
        parsed.append((host, int(port_text)))
    if not parsed:
        raise ValueError("at least one etcd endpoint is required")
    return parsed


@dataclass(frozen=True, slots=True)
class MetadataServerSpec:
    """A parsed ``metadata_server`` string."""

    kind: Literal["p2p", "http", "etcd"]
    url: str | None = None
    endpoints: tuple[tuple[str, int], ...] = ()


def parse_metadata_server(metadata_server: str) -> MetadataServerSpec:
    """Parse and validate ``metadata_server`` without connecting to anything."""
    if not isinstance(metadata_server, str) or not metadata_server.strip():
        raise ValueError(f"metadata_server must be a non-empty string; {_FORMS}")
    text = metadata_server.strip()
    if text.upper() == P2P_HANDSHAKE:
        return MetadataServerSpec("p2p")
    scheme, sep, rest = text.partition("://")
    if not sep:
        try:
            return MetadataServerSpec("etcd", endpoints=tuple(parse_endpoints(text)))
        except ValueError:
            raise ValueError(f"unrecognised metadata_server {text!r}; {_FORMS}") from None
    scheme = scheme.lower()
    if scheme == "etcd":
        try:
            return MetadataServerSpec("etcd", endpoints=tuple(parse_endpoints(rest.rstrip("/"))))
        except ValueError as e:
            raise ValueError(f"bad etcd metadata_server {text!r}: {e}") from None
    if scheme in ("http", "https"):
        try:
            url = yarl.URL(text)
            port = url.port  # raises on a non-numeric port
        except ValueError as e:
            raise ValueError(f"bad metadata server URL {text!r}: {e}") from None
        if not url.host or port is None or url.query_string or url.fragment:
            raise ValueError(f"bad metadata server URL {text!r}; {_FORMS}")
        if url.path in ("", "/"):
            raise ValueError(
                f"metadata server URL {text!r} has no path; "
                f"did you mean {text.rstrip('/')}/metadata?"
            )
        return MetadataServerSpec("http", url=str(url))
    raise ValueError(f"unsupported metadata_server scheme {scheme!r} in {text!r}; {_FORMS}")


def open_metadata_store(
    metadata_server: str,
    *,
    secret: str | bytes | None = None,
    fetch: FetchFn | None = None,
    timeout: float | None = None,
    max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
    etcd_username: str | None = None,
    etcd_password: str | None = None,
) -> MetadataStore:
    """Build the store ``metadata_server`` names. Nothing connects until the first request.

    ``secret`` is the HTTP server's bearer token; ``fetch`` is the engine's peer-fetch function,
    required for ``P2PHANDSHAKE``. Options that do not apply to the chosen backend are refused
    rather than ignored, so a secret is never silently not used.
    """
    spec = parse_metadata_server(metadata_server)
    # Backends are imported on demand: etcd's pulls in aetcd and gRPC, an optional extra.
    if spec.kind != "p2p" and fetch is not None:
        raise ValueError(f"fetch only applies to {P2P_HANDSHAKE}, not {metadata_server!r}")
    if spec.kind != "http" and secret is not None:
        raise ValueError(
            f"secret only applies to an http metadata server, not {metadata_server!r}"
        )
    if spec.kind != "etcd" and (etcd_username or etcd_password):
        raise ValueError(f"etcd credentials do not apply to {metadata_server!r}")
    if spec.kind == "p2p":
        if fetch is None:
            raise ValueError(f"{P2P_HANDSHAKE} needs fetch=<coroutine function(segment_name)>")
        from transfer.metadata.p2p import P2PHandshakeMetadata

        return P2PHandshakeMetadata(
            fetch, fetch_timeout=timeout or 5.0, max_value_size=max_value_size
        )
    if spec.kind == "http":
        from transfer.metadata.http_client import HttpMetadataClient

        assert spec.url is not None
        return HttpMetadataClient(
            spec.url, secret=secret, timeout=timeout or 3.0, max_value_size=max_value_size
        )
    from transfer.metadata.etcd import EtcdMetadataStore

    return EtcdMetadataStore(
        [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in spec.endpoints],
        timeout=timeout or 5.0,
        username=etcd_username,
        password=etcd_password,
        max_value_size=max_value_size,
    )
