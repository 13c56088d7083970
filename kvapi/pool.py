"""`BlockPool`: reference-counted bookkeeping of KV blocks.

The pool keeps books only; it owns no tensors and makes no policy. Every holder of a
block (a running request, the prefix cache, a receive ticket) owns one reference; a
block returns to the free list when its last reference is dropped.
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

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each (already used) block."""
        for b in block_ids:
            assert self._refs[b] > 0, f"incref of free block {b}"
            self._refs[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per id; blocks reaching zero become free."""
        for b in block_ids:
            assert self._refs[b] > 0, f"double free of block {b}"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def check_invariants(self) -> None:
        """Assert the books are consistent (for tests and debugging)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b, r in enumerate(self._refs):
            assert r >= 0, f"block {b} has negative refcount {r}"
            assert (r == 0) == (b in free), f"block {b}: refcount {r} but free={b in free}"
