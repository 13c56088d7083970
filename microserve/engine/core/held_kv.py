"""`HeldKV`: an engine's KV held outside its scheduler, the base of `EngineCore` (engine_core.py).

    receive tickets   reserve (cached prefix pinned, the rest allocated) ─> mark_received / drop_received
                      ─> adopt: the ticket's sequence becomes the generating one
    lent ranges       lend_blocks / return_blocks (DistAttention: outside the prefix cache)
    the prefix cache  match_cached, cached_prefix_hashes, the KV event and store hooks

The call layer (serving/core.py) holds these for tickets and sends; the scheduler never sees them
until `adopt` hands a sequence over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvapi.radix import EventHook, StoreHook
from microserve.engine.core.sequence import Sequence, SequenceStatus
from microserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from microserve.engine.core.kv_manager import KVCacheManager


class HeldKV:
    """KV blocks an engine holds for the call layer: receive tickets, lent ranges, the prefix cache's
    view. Uses the engine's `kv`, `block_size` and its requests by id (`_seqs`)."""

    kv: KVCacheManager
    block_size: int
    _seqs: dict[str, Sequence]

    def release(self, seq: Sequence) -> None:
        """Free the blocks of a sequence the caller holds outside the scheduler (a
        finished prefill-only sequence, a receive ticket); computed full blocks stay cached."""
        self._seqs.pop(seq.request_id, None)
        self.kv.free(seq)

    def match_cached(self, seq: Sequence, limit: int) -> int:
        """Pin `seq`'s longest cached prefix within `prompt[:limit]`; returns its tokens."""
        return self.kv.match_prefix(seq, limit=limit) if limit and self.kv.enable_prefix_caching else 0

    def reserve(self, seq: Sequence, end: int) -> bool:
        """Pin the cached prefix of `seq[:end]` and allocate blocks for the rest, outside the
        scheduler (a receive ticket). False, with nothing held, when the blocks are not there."""
        self.match_cached(seq, end)
        if self.kv.allocate(seq, end):
            return True
        self.kv.free(seq)
        return False

    def lend_blocks(self, n: int) -> list[int] | None:
        """`n` blocks held for another engine's request (`lend`), outside the prefix cache; None
        when they are not there (after evicting unpinned cache)."""
        return self.kv.take_blocks(n)

    def return_blocks(self, blocks: list[int]) -> None:
        """Lent blocks come back: straight to the free pool, never into the prefix cache."""
        self.kv.pool.free(blocks)

    def mark_received(self, seq: Sequence, end: int) -> None:
        """KV of `seq[:end]` arrived from another engine: it enters the prefix cache."""
        seq.num_computed_tokens = end
        self.kv.cache_computed(seq)

    def drop_received(self, seq: Sequence, valid: int) -> None:
        """Give back a ticket's blocks; only KV of `[0, valid)` is trustworthy (the rest may be
        a partial write), so only those blocks stay in the prefix cache."""
        seq.num_computed_tokens = valid
        self.release(seq)

    def adopt(self, held: Sequence, prompt: list[int], begin: int, sampling: SamplingParams) -> Sequence | None:
        """Turn a sequence holding received KV into the generating one, using its KV for
        `prompt[:begin]` (at most all but the last prompt token). Returns None, with its
        blocks released, when it cannot serve this prompt.

            held.block_table:  | received / cached [0, computed) | recomputed here ...
                                 ^ restarts at a block boundary when the resume block is shared
        """
        seq, bs = held, self.block_size
        computed = min(begin, seq.num_computed_tokens, len(prompt) - 1)
        if seq.token_ids != prompt[:seq.num_tokens] or computed <= 0:
            self.kv.free(seq)  # received full blocks stay in the prefix cache for the normal path
            return None
        keep = computed // bs
        if keep < seq.num_cached_blocks:
            # NOTE: the block where computing resumes is shared with the prefix cache: never
            # write into it; restart at its first token in a private block instead.
            self.kv.pool.free(seq.block_table[keep:])
            del seq.block_table[keep:]
            seq.num_cached_blocks = keep
            computed = keep * bs
        seq.set_prompt(prompt)
        seq.sampling = sampling
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = computed
        seq.num_cached_tokens = computed
        return seq

    def cached_prefix_hashes(self) -> list[int]:
        """Every prefix hash in the prefix cache (a KV snapshot)."""
        return self.kv.radix.prefix_hashes()

    def set_kv_event_hook(self, hook: EventHook | None) -> None:
        """Where ("stored" | "evicted", prefix hashes) events of the prefix cache go."""
        self.kv.radix.on_event = hook

    def set_store_hook(self, hook: StoreHook | None) -> None:
        """Who is told (prefix hashes, block ids) of every block newly cached (the KV store's writer)."""
        self.kv.radix.on_store = hook
