"""`StoreLink`: the engine's side of the KV store (`--kv-store`), block bytes out of and into its pool.

    the radix cache stores new blocks ── capture (step thread) ──> copy [L, 2, bs, H, D] per block
                                                                 ──> TieredStore's write queue
    a call that prefills ── CoreBackend._extend_from_store ── lookup / load (store threads)
                                                          ──> staged payloads ──> the blocks taken for them

A payload is one block of every layer, K then V: `[layers, 2, block_size, kv_heads, head_dim]`
of the `KVSpec` dtype, contiguous, whatever the pool's device.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from kvapi.radix import prefix_hashes
from kvapi.spec import KVSpec
from kvapi.store import TieredStore, entry_bytes, namespace, open_store
from microserve import protocol


class StoreLink:
    """Args:
        store: the engine's tiers.
        kv_cache: the page pool `[layers, 2, blocks, block_size, kv_heads, head_dim]`.
        spec: its layout (only the built-in "nhd" layout is stored).
    """

    def __init__(self, store: TieredStore, kv_cache: torch.Tensor, spec: KVSpec) -> None:
        if spec.layout != "nhd":
            raise ValueError(f"--kv-store does not support the {spec.layout!r} KV layout")
        self.store, self.kv_cache, self.spec = store, kv_cache, spec
        self.block_shape = (spec.num_layers, 2, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="kv-store")

    @classmethod
    def open(cls, specs: list[str], kv_cache: torch.Tensor, spec: KVSpec, fingerprint: str,
             secret: bytes = b"", password: str | None = None, on_event=None) -> StoreLink:
        ns = namespace(fingerprint + "|" + secret.hex(), spec)
        return cls(open_store(specs, ns, entry_bytes(spec), password, on_event, secret=secret), kv_cache, spec)

    # -- out of the pool: the radix cache's store hook ------------------------------------------------
    def capture(self, hashes: list[int], blocks: list[int]) -> None:
        """Queue newly cached blocks for the store (copies them; drops what the queue has no room for)."""
        store = self.store
        picked = [(h, b) for h, b in zip(hashes, blocks) if store.wants(h)]
        room = store.slots()
        for _ in picked[room:]:
            store.drop()
        picked = picked[:room]
        if not picked:
            return
        idx = torch.tensor([b for _, b in picked], device=self.kv_cache.device)
        data = self.kv_cache.index_select(2, idx).permute(2, 0, 1, 3, 4, 5).contiguous().cpu()
        raw = data.view(torch.uint8).reshape(len(picked), -1).numpy()
        for (h, _), row in zip(picked, raw):
            store.offer(h, memoryview(row))

    # -- into the pool --------------------------------------------------------------------------------
    async def lookup(self, tokens: list[int], skip: int, seed: int = 0) -> tuple[list[int], list[tuple[int, int]]]:
        """The prefix hashes of `tokens`' full blocks after the first `skip`, and where the longest
        stored run of them is (`TieredStore.lookup`), computed in a store thread."""
        def run() -> tuple[list[int], list[tuple[int, int]]]:
            bs = self.spec.block_size
            hashes = prefix_hashes(tokens[:len(tokens) // bs * bs], bs, seed)[skip:]
            return hashes, (self.store.lookup(hashes) if hashes else [])

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    async def load(self, hashes: list[int], segments: list[tuple[int, int]], blocks: list[int]) -> int:
        """Fill `blocks` (private to the caller) with the stored entries; how many leading ones arrived."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._load, hashes, segments, blocks)

    def _load(self, hashes: list[int], segments: list[tuple[int, int]], blocks: list[int]) -> int:
        staged = torch.empty((len(blocks), *self.block_shape), dtype=self.kv_cache.dtype)
        raw = staged.view(torch.uint8).reshape(len(blocks), -1).numpy()
        ok = self.store.load(hashes, segments, [memoryview(row) for row in raw], self.spec.block_size)
        if ok:
            idx = torch.tensor(blocks[:ok], device=self.kv_cache.device)
            self.kv_cache.index_copy_(2, idx, staged[:ok].to(self.kv_cache.device).permute(1, 2, 0, 3, 4, 5))
        return ok

    # -- books ------------------------------------------------------------------------------------------
    def stats(self) -> list[protocol.StoreTierStats]:
        return [protocol.StoreTierStats(t.tier, s.hit_tokens, s.bytes_read, s.bytes_written, s.errors, s.dropped_writes)
                for t, s in ((t, self.store.stats[t.tier]) for t in self.store.tiers)]

    def describe(self) -> str:
        return ", ".join(t.describe() for t in self.store.tiers)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()
