"""`PrefixIndex`: the router's global prompt tree, fed by the engines' KV events.

Every engine publishes "blocks stored / evicted" events named by chained prefix
hashes (`kvapi.radix.prefix_hashes`): the hash of block i covers tokens
`[0, (i + 1) * block_size)`. The index keeps, per hash, which engines hold that block.
Because a hash covers its whole prefix, the tokens an engine has cached for a prompt
are found by walking the prompt's hashes until the engine is missing one, with no
token comparisons at all (as MemServe's global prompt tree and Dynamo's KV router).

With a KV store (`--kv-store`), events also say which tier a block reached or left: an
engine's own tiers (host, disk: it loads from them, others on the host may too) and the
shared tier (a Valkey every engine reads). `locate` answers, per engine, how far a prompt
reaches in its pool, then with its own tiers, then with the shared tier as well.

The index is a routing hint, not a lock: an engine may evict a block a moment after
the router looked. Strategies must stay correct when a match turns out smaller
(`prep_recv` and `start_generate` re-match on the engine itself).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, NamedTuple, TypeVar

from kvapi.radix import namespace_seed, prefix_hashes
from microserve.protocol import KVEvent, Request

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Hashable)

MAX_SHARED = 1 << 22  # shared-tier hashes remembered (the server evicts without telling: oldest forgotten first)


class Reach(NamedTuple):
    """How many leading prompt tokens an engine has without computing them, cumulatively: in its page
    pool; in its pool and its own store tiers; in those and the cluster's shared tier."""

    pool: int = 0
    local: int = 0
    shared: int = 0


class PrefixIndex(Generic[E]):
    """Which engine holds which prompt prefixes.

    Args:
        resolve: maps an event's engine id to the engine object returned by lookups
            (the cluster passes its handles); unknown ids are ignored.
    """

    def __init__(self, resolve: Callable[[str], E | None], on_gap: Callable[[str], None] | None = None) -> None:
        self._resolve, self._on_gap = resolve, on_gap
        self._holders: dict[int, set[str]] = {}  # prefix hash -> engine ids
        self._blocks: dict[str, set[int]] = {}  # engine id -> its hashes
        self._block_size: dict[str, int] = {}
        self._seq: dict[str, int] = {}
        self._tiers: dict[str, dict[str, set[int]]] = {}  # engine id -> its own tier -> hashes
        self._shared: OrderedDict[int, None] = OrderedDict()  # hashes in the shared tier
        self.dropped_events = 0  # sequence gaps seen (events lost: the index may be stale)

    def add_engine(self, engine_id: str, block_size: int) -> None:
        self._block_size[engine_id] = block_size
        self._blocks.setdefault(engine_id, set())

    def drop_engine(self, engine_id: str) -> None:
        """Forget everything an engine held (it died or restarted)."""
        self._tiers.pop(engine_id, None)
        self._drop_pool(engine_id)

    def _drop_pool(self, engine_id: str) -> None:
        for h in self._blocks.pop(engine_id, set()):
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(engine_id)
                if not holders:
                    del self._holders[h]
        self._seq.pop(engine_id, None)
        if engine_id in self._block_size:
            self._blocks[engine_id] = set()

    def apply(self, event: KVEvent) -> None:
        eid = event.engine_id
        if eid not in self._block_size:
            return
        last = self._seq.get(eid)
        if last is not None and event.seq != last + 1:
            if event.seq == 1:  # the engine restarted: its cache is new
                self.drop_engine(eid)
            elif event.seq <= last:  # already in a snapshot
                return
            else:
                self.dropped_events += event.seq - last - 1
                log.debug("engine %s: %d KV events lost", eid, event.seq - last - 1)
                if self._on_gap is not None:
                    self._on_gap(eid)  # NOTE: the cluster asks that engine for a snapshot
        self._seq[eid] = event.seq
        if event.tier:
            self._apply_tier(event)
            return
        mine = self._blocks[eid]
        if event.kind == "stored":
            holders = self._holders
            for h in event.hashes:
                if (held := holders.get(h)) is None:
                    holders[h] = {eid}
                else:
                    held.add(eid)
            mine.update(event.hashes)
        elif event.kind == "evicted":
            for h in event.hashes:
                mine.discard(h)
                holders = self._holders.get(h)
                if holders is not None:
                    holders.discard(eid)
                    if not holders:
                        del self._holders[h]

    def _apply_tier(self, event: KVEvent) -> None:
        if event.shared:
            shared = self._shared
            for h in event.hashes:
                if event.kind == "stored":
                    shared[h] = None
                    shared.move_to_end(h)
                else:
                    shared.pop(h, None)
            while len(shared) > MAX_SHARED:
                shared.popitem(last=False)
            return
        held = self._tiers.setdefault(event.engine_id, {}).setdefault(event.tier, set())
        if event.kind == "stored":
            held.update(event.hashes)
        else:
            held.difference_update(event.hashes)

    def apply_snapshot(self, engine_id: str, hashes: list[int], seq: int) -> None:
        """Replace what an engine holds in its pool by a snapshot taken after its event `seq`."""
        if engine_id not in self._block_size:
            return
        self._drop_pool(engine_id)
        mine = self._blocks[engine_id]
        for h in hashes:
            self._holders.setdefault(h, set()).add(engine_id)
            mine.add(h)
        self._seq[engine_id] = seq

    def matches(self, req: Request | list[int]) -> dict[E, int]:
        """Prompt tokens each engine holds in its prefix cache (engines with none are left out); a
        request under a LoRA adapter matches only KV computed under it."""
        prompt, seed = _prompt(req)
        out: dict[E, int] = {}
        for block_size in set(self._block_size.values()):
            alive = {e for e, bs in self._block_size.items() if bs == block_size}
            for i, h in enumerate(prefix_hashes(prompt, block_size, seed)):
                alive &= self._holders.get(h, set())
                if not alive:
                    break
                for eid in alive:
                    engine = self._resolve(eid)
                    if engine is not None:
                        out[engine] = (i + 1) * block_size
        return out

    def locate(self, req: Request | list[int]) -> dict[E, Reach]:
        """Per engine, how far the prompt reaches in its pool, its own tiers and the shared tier
        (`Reach`, cumulative tokens); engines that reach nothing are left out."""
        prompt, seed = _prompt(req)
        out: dict[E, Reach] = {}
        by_size: dict[int, list[int]] = {}
        for eid, bs in self._block_size.items():
            hashes = by_size.setdefault(bs, prefix_hashes(prompt, bs, seed))
            pool = local = shared = 0
            mine = self._blocks.get(eid, set())
            tiers = list(self._tiers.get(eid, {}).values())
            level = 0  # 0: in the pool, 1: in its own tiers, 2: in the shared tier, 3: nowhere (the run ends)
            for h in hashes:
                here = 0 if h in mine else 1 if any(h in t for t in tiers) else 2 if h in self._shared else 3
                level = max(level, here)  # NOTE: past the pool's run, a pool block is loaded as the rest is
                if level == 3:
                    break
                pool += bs * (level == 0)
                local += bs * (level <= 1)
                shared += bs
            engine = self._resolve(eid)
            if shared and engine is not None:
                out[engine] = Reach(pool, local, shared)
        return out

    def longest_match(self, req: Request | list[int]) -> tuple[E | None, int]:
        """The engine holding the longest cached prefix of the prompt, and its length in tokens
        (`(None, 0)` when no engine holds any of it)."""
        best: tuple[E | None, int] = (None, 0)
        for engine, n in self.matches(req).items():
            if n > best[1]:
                best = (engine, n)
        return best

    def cached_blocks(self, engine_id: str) -> int:
        return len(self._blocks.get(engine_id, ()))


def _prompt(req: Request | list[int]) -> tuple[list[int], int]:
    """A request's prompt and the hash chain's seed of its adapter (kvapi.radix.namespace_seed)."""
    if isinstance(req, Request):
        return req.prompt_ids, namespace_seed(req.sampling.lora)
    return req, 0
