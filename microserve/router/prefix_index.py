"""`PrefixIndex`: the router's global prompt tree, fed by the engines' KV events.

Every engine publishes "blocks stored / evicted" events named by chained prefix
hashes (`kvapi.radix.prefix_hashes`): the hash of block i covers tokens
`[0, (i + 1) * block_size)`. The index keeps, per hash, which engines hold that block.
Because a hash covers its whole prefix, the tokens an engine has cached for a prompt
are found by walking the prompt's hashes until the engine is missing one, with no
token comparisons at all (as MemServe's global prompt tree and Dynamo's KV router).

The index is a routing hint, not a lock: an engine may evict a block a moment after
the router looked. Strategies must stay correct when a match turns out smaller
(`prep_recv` and `start_generate` re-match on the engine itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from kvapi.radix import prefix_hashes
from microserve.protocol import KVEvent, Request

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Hashable)


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
        self.dropped_events = 0  # sequence gaps seen (events lost: the index may be stale)

    def add_engine(self, engine_id: str, block_size: int) -> None:
        self._block_size[engine_id] = block_size
        self._blocks.setdefault(engine_id, set())

    def drop_engine(self, engine_id: str) -> None:
        """Forget everything an engine held (it died or restarted)."""
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
        mine = self._blocks[eid]
        if event.kind == "stored":
            for h in event.hashes:
                self._holders.setdefault(h, set()).add(eid)
                mine.add(h)
        elif event.kind == "evicted":
            for h in event.hashes:
                mine.discard(h)
                holders = self._holders.get(h)
                if holders is not None:
                    holders.discard(eid)
                    if not holders:
                        del self._holders[h]

    def apply_snapshot(self, engine_id: str, hashes: list[int], seq: int) -> None:
        """Replace what an engine holds by a snapshot taken after its event `seq`."""
        if engine_id not in self._block_size:
            return
        self.drop_engine(engine_id)
        mine = self._blocks[engine_id]
        for h in hashes:
            self._holders.setdefault(h, set()).add(engine_id)
            mine.add(h)
        self._seq[engine_id] = seq

    def matches(self, req: Request | list[int]) -> dict[E, int]:
        """Prompt tokens each engine holds in its prefix cache (engines with none are left out)."""
        prompt = req.prompt_ids if isinstance(req, Request) else req
        out: dict[E, int] = {}
        for block_size in set(self._block_size.values()):
            alive = {e for e, bs in self._block_size.items() if bs == block_size}
            for i, h in enumerate(prefix_hashes(prompt, block_size)):
                alive &= self._holders.get(h, set())
                if not alive:
                    break
                for eid in alive:
                    engine = self._resolve(eid)
                    if engine is not None:
                        out[engine] = (i + 1) * block_size
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
