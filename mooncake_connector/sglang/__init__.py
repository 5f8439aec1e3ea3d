"""SGLang HiCache L3 storage on our store: load ``MooncakeHiCacheStorage`` through SGLang's
``--hicache-storage-backend dynamic`` (see :mod:`.storage` for the flags).

Importing this package imports SGLang's ``hicache_storage`` module (the base class); the rest of
``mooncake_connector`` does not need SGLang installed.
"""
from __future__ import annotations

from .config import HiCacheStoreConfig
from .storage import MooncakeHiCacheStorage, StorageStats

__all__ = ["HiCacheStoreConfig", "MooncakeHiCacheStorage", "StorageStats"]
