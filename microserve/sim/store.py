"""KV store tiers in `microserve sim` (`--kv-store`, as on `engine` / `launch`; docs/kv-store.md):
which prefixes each tier holds, and how long a load takes, in virtual time.

    host:SIZE              per engine, LRU by blocks, loaded over `pcie5` (host DRAM -> GPU)
    disk:PATH[:SIZE]       per engine (PATH is ignored), LRU, loaded over `nvme` (default size 1 TiB)
    valkey / valkey://...  one tier every engine shares, LRU (default size 1 TiB), loaded over `eth100`

`SimStoreLink` serves `CoreBackend` the same four calls as the real `StoreLink` (capture, lookup,
load, stats), so `_extend_from_store` runs unchanged before every prefill: the longest stored
continuation of a prompt's cached prefix is "loaded" (the engine waits `link.seconds(bytes)` of
virtual time per tier segment, off its step loop) and enters the prefix cache. Writes are free
(the real engine writes asynchronously) and always succeed; a hit is promoted into the faster tiers.
Each write and eviction is published as the real engine's tier events (`on_event`, the engine's
`KVEventLog`), so the router's prefix index, and `cache_aware`, see the tiers as in serving; the
shared tier, like a Valkey server, evicts without telling.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from kvapi.radix import prefix_hashes
from microserve import protocol
from microserve.sim.costs import Link, load_link

DEFAULT_SIZE = 1 << 40
LINKS = {"host": "pcie5", "disk": "nvme", "valkey": "eth100"}


@dataclass
class SimTier:
    """One tier: the prefix hashes it holds (LRU) and the link a load crosses."""

    tier: str
    capacity: int  # blocks
    link: Link
    held: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def add(self, h: int) -> list[int]:
        """Hold `h` (most recently used); returns the hashes that fell out."""
        self.held[h] = None
        self.held.move_to_end(h)
        evicted = []
        while len(self.held) > self.capacity:
            evicted.append(self.held.popitem(last=False)[0])
        return evicted

    def run(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.held:
                break
            self.held.move_to_end(h)
            n += 1
        return n


@dataclass
class TierBooks:
    hit_tokens: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


def parse(specs: list[str], block_bytes: int, shared: dict[str, SimTier]) -> list[SimTier]:
    """`--kv-store` specs -> tiers (a `valkey` tier is the one in `shared`, made on first use)."""
    from kvapi.store import parse_size

    out = []
    for spec in specs:
        kind, _, rest = spec.partition(":")
        if spec == "valkey" or kind in ("valkey", "redis", "rediss"):
            kind, size = "valkey", DEFAULT_SIZE
        elif kind == "host":
            size = parse_size(rest)
        elif kind == "disk":
            _, _, size_text = rest.partition(":")
            size = parse_size(size_text) if size_text else DEFAULT_SIZE
        else:
            raise ValueError(f"--kv-store {spec!r}: the simulator has host:SIZE, disk:PATH[:SIZE] and valkey")
        capacity = max(1, size // block_bytes)
        if kind == "valkey":
            tier = shared.setdefault("valkey", SimTier("valkey", capacity, load_link(LINKS["valkey"])))
        else:
            tier = SimTier(kind, capacity, load_link(LINKS[kind]))
        out.append(tier)
    return out


class SimStoreLink:
    """The store calls of one simulated engine (the real one: `microserve.serving.kv_store.StoreLink`).
    `on_event(kind, hashes, tier)`: where its tier events go (the engine's `KVEventLog`)."""

    def __init__(self, tiers: list[SimTier], block_size: int, block_bytes: int, on_event=None) -> None:
        self.tiers, self.block_size, self.block_bytes = tiers, block_size, block_bytes
        self.books = [TierBooks() for _ in tiers]
        self.on_event = on_event

    def _put(self, tier: SimTier, hashes: list[int]) -> int:
        """Store `hashes` in `tier`, publishing what it stored and evicted; returns the blocks new to it."""
        new, evicted = 0, []
        for h in hashes:
            new += h not in tier.held
            evicted += tier.add(h)
        if self.on_event is not None and hashes:
            if evicted and tier.tier != "valkey":  # NOTE: a Valkey server evicts without telling
                self.on_event("evicted", evicted, tier.tier)
            self.on_event("stored", list(hashes), tier.tier)
        return new

    def capture(self, hashes: list[int], blocks: list[int]) -> None:
        for tier, books in zip(self.tiers, self.books):
            books.bytes_written += self._put(tier, hashes) * self.block_bytes

    async def lookup(self, tokens: list[int], skip: int, seed: int = 0) -> tuple[list[int], list[tuple[int, int]]]:
        bs = self.block_size
        hashes = prefix_hashes(tokens[:len(tokens) // bs * bs], bs, seed)[skip:]
        out, pos = [], 0
        for i, tier in enumerate(self.tiers):
            n = tier.run(hashes[pos:])
            if n:
                out.append((i, n))
                pos += n
        return hashes, out

    async def load(self, hashes: list[int], segments: list[tuple[int, int]], blocks: list[int]) -> int:
        pos, seconds = 0, 0.0
        for i, n in segments:
            n = min(n, len(blocks) - pos)
            if n <= 0:
                break
            seconds += self.tiers[i].link.seconds(n * self.block_bytes)
            self.books[i].hit_tokens += n * self.block_size
            self.books[i].bytes_read += n * self.block_bytes
            for faster in self.tiers[:i]:  # promotion, as TieredStore does
                self._put(faster, hashes[pos:pos + n])
            pos += n
        await asyncio.sleep(seconds)
        return pos

    def stats(self) -> list[protocol.StoreTierStats]:
        return [protocol.StoreTierStats(t.tier, b.hit_tokens, b.bytes_read, b.bytes_written, 0, 0)
                for t, b in zip(self.tiers, self.books)]

    def describe(self) -> str:
        return ", ".join(f"{t.tier} ({t.capacity} blocks)" for t in self.tiers)

    def close(self) -> None:
        pass
