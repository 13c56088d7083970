"""`KVCacheManager`: gives sequences KV blocks, with prefix-cache reuse.

It keeps books for the scheduler (which blocks a sequence holds, what is cached) and
decides nothing: the scheduler chooses who runs and who is preempted.

Besides the radix cache of full blocks, it keeps the *tails* of stopped sequences (aborted or
preempted): the partly filled last block, with the KV exactly as it was computed (decode steps one
token at a time), and the last full block before it. The next sequence whose prefix matches up to
one of them and whose next tokens agree takes it (`match_prefix`): the partial block over, once; a
copy of the full block, which the prefix cache keeps (it writes its own tokens into the copy). So a
request migrated off this engine is sent the KV its stream really used instead of a recompute of
its last block (a prefill chunk rounds differently from decode steps, and a near tie in a sampled
row would then pick another token), also when the engine ran a few tokens past what the router saw
and crossed a block boundary; a preempted request resumes the same way. Tails are the first blocks
reclaimed when memory is short.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvapi import BlockPool, RadixCache
from kvapi.radix import EventHook, chain_hash
from microserve.engine.core.sequence import REMOTE, Sequence

MAX_TAILS = 64  # tails kept at most (fewer on a small pool: one in 16 blocks)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 on_event: EventHook | None = None) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.radix = RadixCache(self.pool, block_size, on_event)
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_hit_tokens = 0  # total prompt tokens served from the cache
        self.prefix_query_tokens = 0  # total prompt tokens looked up in it (vLLM's prefix_cache_queries)
        # (seed, tokens before the block, their chain hash) -> (the block's tokens, block), oldest first
        self.tails: OrderedDict[tuple[int, int, int], tuple[list[int], int]] = OrderedDict()
        self.max_tails = min(MAX_TAILS, num_blocks // 16)
        self.copy_block: Callable[[int, int], None] | None = None  # (src, dst): set by the engine holding the KV

    @property
    def num_cached(self) -> int:
        """Blocks held only as cache (full blocks in the radix cache, kept tails) that no request, ticket or
        lender holds: free to take. Blocks a running request shares with the cache are in use, not cached."""
        return self.pool.num_cache_only

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def match_prefix(self, seq: Sequence, limit: int | None = None) -> int:
        """Pin the cached blocks of `seq`'s longest cached prefix; returns matched tokens.

        At most `limit` tokens (default: all but the last known token, which must be
        computed to yield logits) are matched.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0, "match_prefix on a sequence with KV"
        if not self.enable_prefix_caching or seq.sampling.prompt_logprobs is not None:
            return 0  # NOTE: prompt logprobs need every prompt position computed
        limit = min(seq.num_tokens - 1 if limit is None else limit, seq.local_limit)
        self.prefix_query_tokens += limit
        blocks = self.radix.match(seq.token_ids[:limit], seq.cache_seed)
        self.radix.pin(blocks)
        seq.block_table = blocks
        seq.num_cached_blocks = len(blocks)
        matched = len(blocks) * self.block_size
        if self.tails and matched < limit:
            matched += self._take_tail(seq, matched, limit)
        seq.num_computed_tokens = matched
        seq.num_cached_tokens = max(seq.num_cached_tokens, matched)
        self.prefix_hit_tokens += matched
        return matched

    def _take_tail(self, seq: Sequence, full: int, limit: int) -> int:
        """Append the kept tail that continues `seq`'s `full` matched tokens, if there is one, to its
        block table; returns how many of its tokens `seq` uses. A block only the tail holds becomes
        `seq`'s own; one the prefix cache holds too is copied into a new block."""
        if not any(k[0] == seq.cache_seed and k[1] == full for k in self.tails):  # NOTE: before any hashing
            return 0
        key = (seq.cache_seed, full, _chain(seq, full // self.block_size, self.block_size)[-1])
        if key not in self.tails:
            return 0
        tokens, block = self.tails.pop(key)
        wanted, used = seq.token_ids[full:limit], 0
        while used < min(len(tokens), len(wanted)) and tokens[used] == wanted[used]:
            used += 1
        if used and self.pool.ref_count(block) > 1:  # NOTE: shared: never written into, copied
            copy = self.take_blocks(1) if self.copy_block is not None else None
            if copy is not None:
                self.copy_block(block, copy[0])
            self.pool.free([block], cache=True)
            if copy is None:
                return 0
            block = copy[0]
        elif not used:
            self.pool.free([block], cache=True)
            return 0
        else:
            self.pool.uncache(block)  # NOTE: the tail's reference is the sequence's now
        seq.block_table.append(block)
        return used

    def keep_tail(self, seq: Sequence) -> None:
        """Keep the last blocks of a sequence that stops, with their KV as computed: the partly
        filled one, and (when the engine can copy blocks) the last full one before it."""
        bs, computed = self.block_size, min(seq.num_computed_tokens, seq.local_limit)
        if not self.enable_prefix_caching or not self.max_tails or seq.lent:
            return
        last = computed // bs * bs
        first = max(0, last - bs) if self.copy_block is not None else last
        chain = _chain(seq, last // bs, bs)  # chain[i]: the hash of the first i blocks
        for start in range(first, computed, bs):
            if start // bs >= len(seq.block_table):
                break
            key = (seq.cache_seed, start, chain[start // bs])
            block = seq.block_table[start // bs]
            self.pool.incref([block], cache=True)
            old = self.tails.pop(key, None)
            if old is not None:
                self.pool.free([old[1]], cache=True)
            self.tails[key] = (seq.token_ids[start:min(start + bs, computed)], block)
        while len(self.tails) > self.max_tails:
            self.pool.free([self.tails.popitem(last=False)[1][1]], cache=True)

    def _reclaim(self, need: int) -> None:
        """Free blocks until `need` are free, if the cache allows: tails first, then the radix cache."""
        while self.tails and need > self.pool.num_free:
            self.pool.free([self.tails.popitem(last=False)[1][1]], cache=True)
        if need > self.pool.num_free:
            self.radix.evict(need - self.pool.num_free)

    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """Extend `seq`'s table with `blocks` that another sequence computes in this very step
        (same tokens, checked by the caller): counted as prefix-cache hits, as `match_prefix` does."""
        self.pool.incref(blocks)
        seq.block_table.extend(blocks)
        seq.num_computed_tokens += len(blocks) * self.block_size
        seq.num_cached_tokens = max(seq.num_cached_tokens, seq.num_computed_tokens)
        self.prefix_hit_tokens += len(blocks) * self.block_size

    def unmatch(self, seq: Sequence) -> None:
        """Undo `match_prefix` (and `share`) for a sequence that goes back to waiting: unpin, uncount."""
        self.prefix_hit_tokens -= seq.num_computed_tokens
        self.pool.free(local(seq.block_table))
        seq.block_table = []
        seq.num_cached_blocks = seq.num_computed_tokens = 0
        seq.radix_cursor.reset()

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Make `seq` hold blocks for its first `num_tokens` tokens; False if memory is short."""
        need = self.blocks_needed(seq, num_tokens)
        if need == 0:  # most decode steps
            return True
        if need > self.pool.num_free:
            self._reclaim(need)
            if need > self.pool.num_free:
                return False
        seq.block_table.extend(self.pool.allocate(need))
        return True

    # -- blocks loaded from the KV store (kvapi.store) -------------------------------------------
    def pin_prefix(self, tokens: list[int], seed: int = 0) -> list[int]:
        """Pin and return the cached blocks of the longest cached full-block prefix of `tokens`."""
        blocks = self.radix.match(tokens, seed)
        self.radix.pin(blocks)
        return blocks

    def take_blocks(self, n: int) -> list[int] | None:
        """`n` private blocks (evicting unpinned cache if needed), or None when they are not there."""
        if n > self.pool.num_free:
            self._reclaim(n)
            if n > self.pool.num_free:
                return None
        return self.pool.allocate(n)

    def insert_loaded(self, tokens: list[int], prefix: list[int], loaded: list[int], ok: int, seed: int = 0) -> None:
        """The first `ok` of `loaded` now hold the KV of the blocks after the pinned `prefix`:
        they enter the prefix cache; every block `pin_prefix` / `take_blocks` gave is let go."""
        if ok and self.enable_prefix_caching:
            blocks = prefix + loaded[:ok]
            self.radix.insert(tokens[:len(blocks) * self.block_size], blocks, seed=seed)
        self.pool.free(prefix + loaded)

    def cache_computed(self, seq: Sequence) -> None:
        """Offer the newly computed full blocks of `seq` to the prefix cache."""
        full = min(seq.num_computed_tokens, seq.local_limit) // self.block_size
        if not self.enable_prefix_caching or full <= seq.num_cached_blocks:
            return
        self.radix.insert(seq.token_ids, seq.block_table[:full], seq.radix_cursor, seq.cache_seed,
                          seq.prompt_block_hashes(self.block_size))
        seq.num_cached_blocks = full

    def offload(self, seq: Sequence, begin: int, end: int) -> None:
        """The KV of positions `[begin, end)` (block aligned) moved to a lender: free their blocks here."""
        first, last = begin // self.block_size, end // self.block_size
        self.pool.free(local(seq.block_table[first:last]))
        seq.block_table[first:last] = [REMOTE] * (last - first)

    def free(self, seq: Sequence, keep_tail: bool = False) -> None:
        """Release `seq`'s blocks (computed full blocks stay in the prefix cache; with `keep_tail`, a
        stopped sequence's partly filled last block is kept too)."""
        self.cache_computed(seq)
        if keep_tail:
            self.keep_tail(seq)
        self.pool.free(local(seq.block_table))
        seq.block_table = []
        seq.num_cached_blocks = 0
        seq.radix_cursor.reset()


def _chain(seq: Sequence, n: int, block_size: int) -> list[int]:
    """The prefix cache's chain hashes of `seq`'s first 0..n blocks (entry i: i blocks; entry 0 the seed),
    from the prompt's hashes the sequence keeps, hashing only blocks past its prompt."""
    chain = [seq.cache_seed, *seq.prompt_block_hashes(block_size)[:n]]
    for i in range(len(chain) - 1, n):
        chain.append(chain_hash(chain[-1], seq.token_ids[i * block_size:(i + 1) * block_size]))
    return chain


def local(blocks: list[int]) -> list[int]:
    """The blocks of a table that this pool holds (a borrower's table has REMOTE entries)."""
    return [b for b in blocks if b != REMOTE]
