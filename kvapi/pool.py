"""`BlockPool`: reference-counted bookkeeping of KV blocks.

The pool keeps books only; it owns no tensors and makes no policy. Every holder of a
block (a running request, the prefix cache, a receive ticket) owns one reference; a
block returns to the free list when its last reference is dropped. References a cache
holds (the radix tree's, a kept tail's) are taken with `cache=True`, so the pool knows
at any moment how many used blocks nothing but a cache holds (`num_cache_only`: free to
take): what a planner reads as KV in use is the rest (`StatsReply.kv_blocks_cached`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class OutOfBlocks(RuntimeError):
    """Raised by `allocate` when fewer blocks are free than asked for."""


class BlockPool:
    """Fixed set of block ids `0 .. num_blocks-1` with reference counts.

    Check/act pairs: call `can_allocate(n)` before `allocate(n)`; `free` drops one
    reference per id and recycles blocks whose count reaches zero.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._cache_refs = [0] * num_blocks  # of a block's references, those a cache holds
        self.num_cache_only = 0  # used blocks whose every reference is a cache's
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks, each with reference count 1."""
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        ids = [self._free.popleft() for _ in range(n)]
        for b in ids:
            self._refs[b] = 1
        return ids

    def incref(self, block_ids: Iterable[int], cache: bool = False) -> None:
        """Add one reference to each (already used) block; `cache`: a cache holds it."""
        refs, crefs = self._refs, self._cache_refs
        for b in block_ids:
            r, c = refs[b], crefs[b]
            assert r > 0, f"incref of free block {b}"
            refs[b] = r + 1
            if cache:
                crefs[b] = c + 1  # NOTE: cache-only stays as it was (both counts grow)
            elif r == c:
                self.num_cache_only -= 1  # a request takes a block only a cache held

    def free(self, block_ids: Iterable[int], cache: bool = False) -> None:
        """Drop one reference per id (`cache`: one a cache held); blocks reaching zero become free."""
        refs, crefs = self._refs, self._cache_refs
        for b in block_ids:
            r, c = refs[b], crefs[b]
            assert r > 0, f"double free of block {b}"
            before = r == c
            r -= 1
            refs[b] = r
            if cache:
                assert c > 0, f"block {b}: a cache reference dropped that no cache held"
                c -= 1
                crefs[b] = c
            after = r == c and r > 0
            self.num_cache_only += after - before
            if r == 0:
                self._free.append(b)

    def uncache(self, block_id: int) -> None:
        """A cache hands its reference on to a request (a kept tail taken up again): the count stays."""
        r, c = self._refs[block_id], self._cache_refs[block_id]
        assert c > 0, f"block {block_id}: no cache reference to hand on"
        self._cache_refs[block_id] = c - 1
        self.num_cache_only -= r == c

    def check_invariants(self) -> None:
        """Assert the books are consistent (for tests and debugging)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b, r in enumerate(self._refs):
            assert r >= 0, f"block {b} has negative refcount {r}"
            assert (r == 0) == (b in free), f"block {b}: refcount {r} but free={b in free}"
            assert 0 <= self._cache_refs[b] <= r, f"block {b}: {self._cache_refs[b]} cache references of {r}"
        only = sum(r > 0 and r == c for r, c in zip(self._refs, self._cache_refs))
        assert only == self.num_cache_only, f"{self.num_cache_only} blocks counted cache-only, {only} are"
