"""Segment-metadata stores: where transfer engines publish and look up segment descriptors.

Pick a backend with the ``metadata_server`` string, exactly as in Mooncake::

    store = open_metadata_store("http://10.0.0.1:8080/metadata")   # or "etcd://a:2379,b:2379",
    await store.put(segment_key("10.0.0.2:12345"), descriptor)      # or "P2PHANDSHAKE" + fetch=
    peer = await store.get(segment_key("10.0.0.3:12345"))

``python -m transfer.metadata`` runs the HTTP metadata server on its own.
The etcd backend (:class:`EtcdMetadataStore`) is imported lazily: it needs the optional ``aetcd``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transfer.metadata.base import (
    DEFAULT_MAX_VALUE_SIZE,
    MetadataAuthError,
    MetadataError,
    MetadataStore,
    MetadataUnavailableError,
)
from transfer.metadata.cache import DescriptorCache
from transfer.metadata.factory import (
    P2P_HANDSHAKE,
    MetadataServerSpec,
    open_metadata_store,
    parse_metadata_server,
)
from transfer.metadata.http_client import HttpMetadataClient
from transfer.metadata.http_server import HttpMetadataServer
from transfer.metadata.keys import (
    KEY_PREFIX,
    RPC_META_PREFIX,
    SEGMENT_PREFIX,
    parse_segment_key,
    rpc_meta_key,
    segment_key,
)
from transfer.metadata.p2p import P2PHandshakeMetadata

if TYPE_CHECKING:
    from transfer.metadata.etcd import EtcdMetadataStore

__all__ = [
    "DEFAULT_MAX_VALUE_SIZE",
    "KEY_PREFIX",
    "P2P_HANDSHAKE",
    "RPC_META_PREFIX",
    "SEGMENT_PREFIX",
    "DescriptorCache",
    "EtcdMetadataStore",
    "HttpMetadataClient",
    "HttpMetadataServer",
    "MetadataAuthError",
    "MetadataError",
    "MetadataServerSpec",
    "MetadataStore",
    "MetadataUnavailableError",
    "P2PHandshakeMetadata",
    "open_metadata_store",
    "parse_metadata_server",
    "parse_segment_key",
    "rpc_meta_key",
    "segment_key",
]


def __getattr__(name: str) -> Any:
    if name == "EtcdMetadataStore":
        from transfer.metadata.etcd import EtcdMetadataStore

        return EtcdMetadataStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
