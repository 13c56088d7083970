"""Property tests for kvapi: the block pool and the radix prefix cache."""

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvapi import BlockPool, KVSpec, KVSpecMismatch, OutOfBlocks, RadixCache, chain_hash, prefix_hashes
from kvapi.radix import RadixCursor

BS = 4


class CacheMachine(RuleBasedStateMachine):
    """Requests come and go over a small pool: match+pin, allocate, insert, free, evict."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(24)
        self.events: list[tuple[str, list[int]]] = []
        self.radix = RadixCache(self.pool, BS, on_event=lambda kind, hashes: self.events.append((kind, hashes)))
        self.requests: dict[int, tuple[list[int], list[int]]] = {}  # id -> (tokens, blocks held)
        self.next_id = 0

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=24))
    def start_request(self, tokens):
        matched = self.radix.match(tokens)
        self.radix.pin(matched)
        need = -(-len(tokens) // BS) - len(matched)
        if not self.pool.can_allocate(need):
            self.radix.evict(need - self.pool.num_free)
        if not self.pool.can_allocate(need):
            self.radix.unpin(matched)
            with pytest.raises(OutOfBlocks):
                self.pool.allocate(self.pool.num_free + 1)
            return
        blocks = matched + self.pool.allocate(need)
        self.requests[self.next_id] = (tokens, blocks)
        self.next_id += 1

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def cache_request(self, data):
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        tokens, blocks = self.requests[rid]
        self.radix.insert(tokens, blocks)
        # after insert, the cache has the full-block prefix
        assert len(self.radix.match(tokens)) == len(tokens) // BS

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish_request(self, data):
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        tokens, blocks = self.requests.pop(rid)
        self.radix.insert(tokens, blocks)
        self.pool.free(blocks)

    @rule(n=st.integers(0, 30))
    def evict(self, n):
        before = self.radix.num_blocks
        evicted = self.radix.evict(n)
        assert evicted <= n and self.radix.num_blocks == before - evicted

    @invariant()
    def books_are_consistent(self):
        self.pool.check_invariants()  # refcounts >= 0, free <=> refcount 0, no duplicates
        held = [b for _, blocks in self.requests.values() for b in blocks]
        for b in held:
            assert self.pool.ref_count(b) >= 1, "a request's block was freed under it"
        for b in self.radix.cached_blocks():
            assert self.pool.ref_count(b) >= 1
        expected_used = set(held) | self.radix.cached_blocks()
        assert self.pool.num_used == len(expected_used)

    def teardown(self):
        for tokens, blocks in list(self.requests.values()):
            self.radix.insert(tokens, blocks)
            self.pool.free(blocks)
        self.requests.clear()
        assert self.pool.num_used == self.radix.num_blocks, "only prefix-cache blocks may stay used"
        assert self.radix.num_evictable() == self.radix.num_blocks
        self.radix.clear()
        assert self.pool.num_used == 0 and self.radix.num_blocks == 0
        stored = sum(len(h) for kind, h in self.events if kind == "stored")
        evicted = sum(len(h) for kind, h in self.events if kind == "evicted")
        assert stored == evicted, "every stored block is eventually reported evicted"


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.lists(st.integers(1, 5), max_size=40))
def test_pool_refcounts(ops):
    pool = BlockPool(8)
    held: list[int] = []
    for op in ops:
        if op <= 3 and pool.can_allocate(op):
            held += pool.allocate(op)
        elif held:
            pool.free([held.pop()])
        pool.check_invariants()
        assert pool.num_used == len(held)


def test_double_free_is_caught():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(AssertionError):
        pool.free([b])


def test_lru_eviction_order():
    pool = BlockPool(8)
    radix = RadixCache(pool, BS)
    a, b = [1] * 8, [2] * 8
    for tokens in (a, b):
        blocks = pool.allocate(2)
        radix.insert(tokens, blocks)
        pool.free(blocks)
    radix.match(a)  # a is now the most recently used
    assert radix.evict(2) == 2
    assert len(radix.match(a)) == 2 and radix.match(b) == []


def test_pinned_blocks_survive_eviction():
    pool = BlockPool(4)
    radix = RadixCache(pool, BS)
    blocks = pool.allocate(2)
    radix.insert([3] * 8, blocks)
    pool.free(blocks)
    radix.pin(radix.match([3] * 8))
    assert radix.evict(10) == 0
    radix.unpin(blocks)
    assert radix.evict(10) == 2 and pool.num_used == 0


def test_prefix_hashes_are_chained():
    h1 = prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    h2 = prefix_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert len(h1) == 2 and h1[1] != h2[1]  # same block tokens, different prefix
    assert prefix_hashes([1, 2, 3, 4, 5], 4) == h1[:1]


def test_chain_hash_is_blake2b_over_little_endian_int32_tokens():
    """The prefix hash is a wire name (KV events, the store's keys): its definition must not drift."""
    for parent, tokens in ((0, [1, 2, 3, 4]), (2**64 - 1, [-5, 2**31 - 1, 0, 7]), (12345, [])):
        h = hashlib.blake2b(digest_size=8)
        h.update(parent.to_bytes(8, "little"))
        h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens))
        assert chain_hash(parent, tokens) == int.from_bytes(h.digest(), "little")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32))
def test_insert_with_a_cursor_is_insert_from_the_root(seed):
    """Sequences that grow a token at a time offer their blocks with a cursor (the engine's path): the
    tree, its events and its eviction order are those of inserts that walk from the root, through
    evictions under the cursor, shared prefixes and a cursor that went stale."""
    rng = random.Random(seed)
    logs: tuple[list, list] = ([], [])
    pools = (BlockPool(40), BlockPool(40))
    trees = tuple(RadixCache(pool, BS, on_event=lambda kind, h, log=log: log.append((kind, h)))
                  for pool, log in zip(pools, logs))
    seqs = []  # (tokens, blocks, cursor)
    for _ in range(120):
        op = rng.random()
        if op < 0.15 or not seqs:
            seqs.append(([rng.randrange(3) for _ in range(rng.randrange(1, 6))], [], RadixCursor()))
        elif op < 0.85:
            tokens, blocks, cursor = rng.choice(seqs)
            tokens.append(rng.randrange(3))
            if len(tokens) // BS > len(blocks):
                if not pools[0].can_allocate(1):
                    for tree in trees:
                        tree.evict(1)
                if not pools[0].can_allocate(1):
                    continue
                new = [pool.allocate(1)[0] for pool in pools]
                assert new[0] == new[1]
                blocks.append(new[0])
            full = len(tokens) // BS
            assert trees[0].insert(tokens, blocks[:full], cursor) == trees[1].insert(tokens[:full * BS], blocks[:full])
        elif op < 0.95:
            n = rng.randrange(1, 4)
            for tree in trees:
                tree.evict(n)
        else:
            tokens, blocks, cursor = seqs.pop(rng.randrange(len(seqs)))
            for pool in pools:
                pool.free(blocks)
        assert logs[0] == logs[1]
        assert sorted(trees[0].prefix_hashes()) == sorted(trees[1].prefix_hashes())
    for tree in trees:
        tree.clear()
    assert logs[0] == logs[1]


def test_kvspec_mismatch_names_field():
    a = KVSpec(num_layers=2, num_kv_heads=4, head_dim=64, dtype="float32", block_size=16)
    a.check_compatible(KVSpec(2, 4, 64, "float32", 16))
    with pytest.raises(KVSpecMismatch, match="head_dim"):
        a.check_compatible(KVSpec(2, 4, 128, "float32", 16))
    with pytest.raises(KVSpecMismatch, match="dtype"):
        a.check_compatible(KVSpec(2, 4, 64, "bfloat16", 16))
    with pytest.raises(ValueError):
        KVSpec(0, 4, 64)
    assert a.bytes_per_token == 2 * 2 * 4 * 64 * 4
