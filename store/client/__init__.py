"""Store clients: put/get objects in the pooled store through the master and the transfer engine.

:class:`AsyncStoreClient` (:mod:`.core`) is the async core; :class:`StoreClient` (:mod:`.sync`)
the blocking facade for threads. Helpers, one concept each: :mod:`.transfers` (bytes to/from
replicas), :mod:`.locations` (nearest replica, lease-bounded location cache), :mod:`.holdings`
(what a contributed segment holds, for remount after failover), :mod:`.integrity` (checksums),
:mod:`.tensors`, :mod:`.errors`.
"""
from __future__ import annotations

from .core import AsyncStoreClient
from .errors import MasterErrorCode, StoreError, mooncake_code
from .sync import StoreClient

__all__ = ["AsyncStoreClient", "MasterErrorCode", "StoreClient", "StoreError", "mooncake_code"]
