"""`TieredStore`: an engine's tiers in order, a bounded write queue and the books of each.

    step thread ── offer(hash, payload copy) ──> queue (bounded in bytes; full: dropped, counted)
                                                   └─ writer thread ─> put into every tier (write-through)
    a call that prefills ── lookup(chain) ──> [(tier, n), ...]   the longest stored continuation,
                         ── load(...) ──────> payloads into the caller's buffers; what came from a
                                              lower tier is queued for the tiers above it (promotion)

A tier that fails (`StoreError`) is counted, logged once, and left alone for `retry_s`; then it
is tried again (a Valkey that comes back is used again). A corrupt entry is a miss and an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from kvapi.store.base import CorruptEntry, KVStore, StoreError, TierStats

log = logging.getLogger(__name__)

EventHook = Callable[[str, list[int], str], None]  # (kind "stored"|"evicted", prefix hashes, tier)


class TieredStore:
    """Args:
        tiers: fastest first.
        queue_bytes: most payload bytes waiting to be written; writes past it are dropped.
        on_event: told which tier a block reached or left (the engine publishes it).
    """

    def __init__(self, tiers: list[KVStore], queue_bytes: int = 256 << 20, retry_s: float = 2.0,
                 on_event: EventHook | None = None) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        self.tiers, self.queue_bytes, self.retry_s, self.on_event = tiers, queue_bytes, retry_s, on_event
        self.size = tiers[0].size
        self.stats = {t.tier: TierStats() for t in tiers}
        self._down_until = [0.0] * len(tiers)
        self._queue: deque[tuple[int, bytes, int]] = deque()  # (hash, payload, tiers above this index)
        self._queued = 0
        self._known: OrderedDict[int, None] = OrderedDict()  # hashes written or loaded lately: not offered again
        self._cv = threading.Condition()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="kv-store-writer", daemon=True)
        self._writer.start()

    # -- failures ------------------------------------------------------------------------------
    def _usable(self, i: int) -> bool:
        return time.monotonic() >= self._down_until[i]

    def _failed(self, i: int, exc: StoreError) -> None:
        tier = self.tiers[i]
        self.stats[tier.tier].errors += 1
        if isinstance(exc, CorruptEntry):
            log.warning("KV store %s: %s (a miss)", tier.tier, exc)
            return
        if self._down_until[i] == 0.0:
            log.warning("KV store %s unavailable (%s); computing instead, retrying every %.0fs",
                        tier.describe(), exc, self.retry_s)
        self._down_until[i] = time.monotonic() + self.retry_s

    def _worked(self, i: int) -> None:
        if self._down_until[i]:
            log.info("KV store %s is back", self.tiers[i].describe())
            self._down_until[i] = 0.0

    # -- reads -----------------------------------------------------------------------------------
    def lookup(self, hashes: list[int]) -> list[tuple[int, int]]:
        """The longest stored run of `hashes` from the first: [(tier index, entries), ...] in chain order."""
        out, pos = [], 0
        for i, tier in enumerate(self.tiers):
            if pos == len(hashes):
                break
            if not self._usable(i):
                continue
            try:
                n = tier.contains(hashes[pos:])
            except StoreError as exc:
                self._failed(i, exc)
                continue
            self._worked(i)
            if n:
                out.append((i, n))
                pos += n
        return out

    def load(self, hashes: list[int], segments: list[tuple[int, int]], out: list[memoryview], block_size: int) -> int:
        """Copy the entries `lookup` found into `out` (one buffer per hash); how many leading ones arrived."""
        pos = 0
        for i, n in segments:
            tier = self.tiers[i]
            try:
                got = tier.get(hashes[pos:pos + n], out[pos:pos + n])
            except StoreError as exc:
                self._failed(i, exc)
                got = exc.loaded if isinstance(exc, CorruptEntry) else 0
            st = self.stats[tier.tier]
            st.hit_tokens += got * block_size
            st.bytes_read += got * self.size
            for k in range(pos, pos + got):
                self._remember(hashes[k])
                if i:  # promote what a lower tier had into the faster ones
                    self._enqueue(hashes[k], bytes(out[k]), i)
            pos += got
            if got < n:
                break
        return pos

    # -- writes ------------------------------------------------------------------------------------
    def wants(self, h: int) -> bool:
        """Whether a newly cached block is worth offering (not written or loaded lately)."""
        return h not in self._known

    def slots(self) -> int:
        """How many more blocks the write queue takes now."""
        return max(0, (self.queue_bytes - self._queued) // self.size)

    def offer(self, h: int, payload: bytes) -> None:
        """Queue a block for every tier (from the step thread: never blocks)."""
        self._remember(h)
        if not self._enqueue(h, payload, len(self.tiers)):
            for st in self.stats.values():
                st.dropped_writes += 1

    def drop(self) -> None:
        """Count a write skipped before its bytes were copied (no room)."""
        for st in self.stats.values():
            st.dropped_writes += 1

    def _enqueue(self, h: int, payload: bytes, upto: int) -> bool:
        with self._cv:
            if self._closed or self._queued + len(payload) > self.queue_bytes:
                return False
            self._queue.append((h, payload, upto))
            self._queued += len(payload)
            self._cv.notify()
        return True

    def _remember(self, h: int) -> None:
        known = self._known
        known[h] = None
        known.move_to_end(h)
        if len(known) > 1 << 20:
            known.popitem(last=False)

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed and not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 64))]
            for i, tier in enumerate(self.tiers):
                items = [(h, memoryview(p)) for h, p, upto in batch if i < upto]
                if not items or not self._usable(i):
                    continue
                try:
                    evicted = tier.put(items)
                except StoreError as exc:
                    self._failed(i, exc)
                    for h, _ in items:
                        self._known.pop(h, None)
                    continue
                self._worked(i)
                self.stats[tier.tier].bytes_written += len(items) * self.size
                if self.on_event is not None:
                    if evicted:
                        self.on_event("evicted", evicted, tier.tier)
                    self.on_event("stored", [h for h, _ in items], tier.tier)
            with self._cv:
                self._queued -= sum(len(p) for _, p, _ in batch)
                self._cv.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued write is done (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._queued and time.monotonic() < deadline:
                self._cv.wait(0.05)
            return not self._queued

    def close(self) -> None:
        self.flush(2.0)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._writer.join(2.0)
        for tier in self.tiers:
            tier.close()
