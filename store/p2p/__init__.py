"""P2P Store: share checkpoint-like objects between nodes without a data server.

Objects stay in the memory (or files) of the nodes that registered or fetched them; metadata -
size, per-chunk SHA-256, holders - lives in etcd or the HTTP metadata server; bytes move peer to
peer over the transfer engine, fetched in parallel from every holder::

    store = await P2PStore.open("http://10.0.0.1:8080/metadata", local_hostname="10.0.0.2")
    await store.register("ckpt/step-100", weights)          # served from `weights`, no copy
    result = await other.get("ckpt/step-100", into=buf)     # from every holder at once

The ``mooncake-p2p`` command (:mod:`store.p2p.cli`) offers the same verbs.
"""
from store.p2p.fetch import NoSourceError, SourceStats
from store.p2p.records import ObjectRecord, RecordError
from store.p2p.store import (
    GetResult,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    P2PStore,
)

__all__ = [
    "GetResult",
    "NoSourceError",
    "ObjectExistsError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectRecord",
    "P2PStore",
    "RecordError",
    "SourceStats",
]
