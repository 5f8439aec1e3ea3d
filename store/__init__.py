"""Mooncake Store: the pooled KV store (master, store nodes, clients) built on :mod:`transfer`."""
