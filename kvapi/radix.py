"""`RadixCache`: a prefix tree over full token blocks, with LRU eviction.

Each node is one full KV block: the edge into it is the block's `block_size` token
ids, so a path from the root spells a token prefix whose KV lives in the path's
blocks. The tree owns one `BlockPool` reference per node. A block is *pinned* while
anyone else also holds a reference (a request using it, a transfer ticket); only
unpinned leaves are evicted, least recently used first.

    root ─ [t0..t15] ─ [t16..t31] ─ [t32..t47]      one node per full block
                     └ [u16..u31]                   prefixes share nodes

Every node also carries a 64-bit *prefix hash* (a chain over its ancestors' tokens),
the name under which engines publish "block stored / evicted" events.

A *seed* names a separate tree with its own hash chain (0: the base model's): KV computed under a
LoRA adapter lives under that adapter's seed (`namespace_seed`), so it is never matched, shared,
stored or announced as the base model's or another adapter's.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import struct
from collections.abc import Callable, Sequence

from kvapi.pool import BlockPool

EventHook = Callable[[str, list[int]], None]
StoreHook = Callable[[list[int], list[int]], None]  # (prefix hashes, block ids) of newly cached blocks


_PACKERS: dict[int, Callable[..., bytes]] = {}  # block length -> its struct's pack (a block size or two per process)


def chain_hash(parent: int, tokens: Sequence[int]) -> int:
    """Stable 64-bit hash of a block given its parent's hash (same in every process)."""
    h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    pack = _PACKERS.get(len(tokens))
    if pack is None:
        pack = _PACKERS[len(tokens)] = struct.Struct(f"<{len(tokens)}i").pack
    h.update(pack(*tokens))  # each token as 4 little-endian signed bytes
    return int.from_bytes(h.digest(), "little")


def namespace_seed(name: str | None) -> int:
    """The hash chain's start for KV computed under `name` (a LoRA adapter); 0 for None."""
    if not name:
        return 0
    return int.from_bytes(hashlib.blake2b(b"lora:" + name.encode(), digest_size=8).digest(), "little") or 1


def prefix_hashes(tokens: Sequence[int], block_size: int, seed: int = 0) -> list[int]:
    """Prefix hashes of every full block of `tokens`, in order (under `seed`, see `namespace_seed`)."""
    out, parent = [], seed
    for i in range(len(tokens) // block_size):
        parent = chain_hash(parent, tokens[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class _Node:
    __slots__ = ("block", "children", "hash", "key", "last_access", "parent")

    def __init__(self, key: tuple[int, ...], block: int, hash_: int, parent: _Node | None) -> None:
        self.key = key
        self.block = block
        self.hash = hash_
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.last_access = 0


class RadixCursor:
    """Where one sequence's last `RadixCache.insert` ended (its deepest path node, and how many
    blocks deep that is), so a sequence offering its blocks as they fill walks only the new ones
    instead of its whole prefix again: O(new blocks) per insert, not O(all blocks)."""

    __slots__ = ("depth", "node")

    def __init__(self) -> None:
        self.node: _Node | None = None
        self.depth = 0

    def reset(self) -> None:
        self.node, self.depth = None, 0


class RadixCache:
    """Prefix cache of full KV blocks over a `BlockPool`.

    Args:
        pool: the pool whose blocks the tree references.
        block_size: tokens per block.
        on_event: optional hook called as `on_event("stored"|"evicted", prefix_hashes)`.
    """

    def __init__(self, pool: BlockPool, block_size: int, on_event: EventHook | None = None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.on_event = on_event
        self.on_store: StoreHook | None = None  # the KV store's writer (kvapi.store), told of new blocks
        self._roots = {0: _Node((), -1, 0, None)}  # one tree per seed (see the module docstring)
        self._clock = itertools.count(1)
        self._num_nodes = 0
        # Eviction candidates: a min-heap of (last_access, id, node) over leaves, checked lazily
        # when popped (a stale access time is re-queued, a node that gained children or left
        # the tree is dropped, a pinned leaf is put back), so one eviction costs O(log n)
        # instead of a walk over every cached block.
        self._heap: list[tuple[int, int, _Node]] = []

    @property
    def num_blocks(self) -> int:
        """Blocks the tree holds a reference on."""
        return self._num_nodes

    def _blocks_of(self, tokens: Sequence[int]) -> list[tuple[int, ...]]:
        bs = self.block_size
        return [tuple(tokens[i * bs:(i + 1) * bs]) for i in range(len(tokens) // bs)]

    def _root(self, seed: int) -> _Node:
        root = self._roots.get(seed)
        if root is None:
            root = self._roots[seed] = _Node((), -1, seed, None)
        return root

    def match(self, tokens: Sequence[int], seed: int = 0) -> list[int]:
        """Block ids of the longest cached full-block prefix of `tokens` under `seed` (not pinned)."""
        now, node, out = next(self._clock), self._roots.get(seed), []
        if node is None:
            return out
        for key in self._blocks_of(tokens):
            node = node.children.get(key)
            if node is None:
                break
            node.last_access = now
            out.append(node.block)
        return out

    def pin(self, block_ids: Sequence[int]) -> None:
        """Keep these cached blocks from eviction until `unpin` (one reference each)."""
        self.pool.incref(block_ids)

    def unpin(self, block_ids: Sequence[int]) -> None:
        self.pool.free(block_ids)

    def insert(self, tokens: Sequence[int], block_ids: Sequence[int], cursor: RadixCursor | None = None,
               seed: int = 0, hashes: Sequence[int] = ()) -> int:
        """Cache the full blocks of `tokens` whose KV sits in `block_ids` (in order).

        A block whose prefix is already cached keeps the cached copy; the caller's
        block stays the caller's. Returns the number of blocks newly adopted.

        `cursor` (one per sequence) resumes the walk where that sequence's last insert ended, when
        its node is still in the tree and still spells these tokens; the result is the same.
        `hashes`: the chain hashes of the first blocks under `seed` (`prefix_hashes`), when the caller
        has them (a sequence keeps its prompt's): those blocks are not hashed again.
        """
        now, node, start, bs = next(self._clock), self._root(seed), 0, self.block_size
        n = min(len(tokens) // bs, len(block_ids))
        if cursor is not None and (at := cursor.node) is not None and at.parent is not None \
                and cursor.depth <= n and at.key == tuple(tokens[(cursor.depth - 1) * bs:cursor.depth * bs]):
            node, start = at, cursor.depth
            while at.parent is not None:  # NOTE: the path is touched as a walk from the root touches it
                at.last_access = now
                at = at.parent
        stored, blocks, known = [], [], len(hashes)
        for i in range(start, n):
            key = tuple(tokens[i * bs:(i + 1) * bs])
            child = node.children.get(key)
            if child is None:
                block = block_ids[i]
                child = _Node(key, block, hashes[i] if i < known else chain_hash(node.hash, key), node)
                node.children[key] = child
                heapq.heappush(self._heap, (now, id(child), child))
                stored.append(child.hash)
                blocks.append(block)
            child.last_access = now
            node = child
        if blocks:
            self.pool.incref(blocks, cache=True)
            self._num_nodes += len(blocks)
        if cursor is not None and n > start:
            cursor.node, cursor.depth = node, n
        if stored and self.on_event:
            self.on_event("stored", stored)
        if stored and self.on_store:
            self.on_store(stored, blocks)
        return len(stored)

    def _evictable(self, node: _Node) -> bool:
        return not node.children and self.pool.ref_count(node.block) == 1

    def num_evictable(self) -> int:
        """Blocks `evict` could free right now (unpinned subtrees count whole)."""
        count = 0

        def walk(node: _Node) -> bool:  # True when the whole subtree is evictable
            nonlocal count
            ok = all([walk(c) for c in node.children.values()])
            if node.parent is None:  # a root
                return ok
            ok = ok and self.pool.ref_count(node.block) == 1
            count += ok
            return ok

        for root in self._roots.values():
            walk(root)
        return count

    def evict(self, n: int) -> int:
        """Free up to `n` unpinned blocks, least recently used leaves first."""
        evicted: list[int] = []
        pinned: list[tuple[int, int, _Node]] = []
        heap = self._heap
        while heap and len(evicted) < n:
            entry = heapq.heappop(heap)
            access, _, node = entry
            if node.parent is None or node.children:  # gone, or not a leaf (queued again when it is)
                continue
            if access != node.last_access:  # used since it was queued
                heapq.heappush(heap, (node.last_access, id(node), node))
                continue
            if self.pool.ref_count(node.block) != 1:
                pinned.append(entry)
                continue
            parent = node.parent
            del parent.children[node.key]
            node.parent = None
            self.pool.free([node.block], cache=True)
            self._num_nodes -= 1
            evicted.append(node.hash)
            if parent.parent is not None and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        for entry in pinned:
            heapq.heappush(heap, entry)
        if evicted and self.on_event:
            self.on_event("evicted", evicted)
        return len(evicted)

    def clear(self) -> int:
        """Evict every unpinned block; returns how many."""
        return self.evict(self._num_nodes)

    def _iter_nodes(self):
        stack = [child for root in self._roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def prefix_hashes(self) -> list[int]:
        """Prefix hashes of every cached block (what a snapshot of the "stored" events holds)."""
        return [node.hash for node in self._iter_nodes()]

    def cached_blocks(self) -> set[int]:
        return {node.block for node in self._iter_nodes()}
