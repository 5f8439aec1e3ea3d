"""Mooncake transfer engine: registered memory segments moved between processes and hosts.

This is the bottom layer. It also holds the plumbing every other layer shares: typed
configuration (:mod:`transfer.config`) and the RPC layer (:mod:`transfer.rpc`). It knows nothing
about KV caches.
"""
