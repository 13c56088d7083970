"""kvapi: the engine-agnostic KV-cache interface (layout, block pool, prefix tree, transfer)."""

from kvapi.pool import BlockPool, OutOfBlocks
from kvapi.radix import RadixCache, chain_hash, prefix_hashes
from kvapi.spec import KVSpec, KVSpecMismatch

__all__ = ["BlockPool", "KVSpec", "KVSpecMismatch", "OutOfBlocks", "RadixCache", "chain_hash", "prefix_hashes"]
