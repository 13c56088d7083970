"""`KVEventLog`: an engine's prefix-cache events, numbered, carried from the step thread to a sink.

    EngineCore (any thread) ─ record("stored"|"evicted", hashes[, tier]) ─> loop: flush ─> KVEvent(seq=n) ─> sink
                                                                  (the ZeroMQ PUB socket, or the simulator's index)

Numbers count every event, delivered or not, so a subscriber notices a gap and asks for a
snapshot (`kv_snapshot` flushes first, so its sequence number and the events agree).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from microserve import protocol


class KVEventLog:
    def __init__(self, engine_id: str) -> None:
        self.engine_id = engine_id
        self.sink: Callable[[protocol.KVEvent], Any] | None = None  # where events go (set by the transport)
        self.seq = 0  # number of the last event flushed
        self._pending: list[tuple[str, list[int], str, bool]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush on `loop` (called from it): events recorded in other threads are handed over."""
        self._loop, self._loop_thread = loop, threading.get_ident()

    def record(self, kind: str, hashes: list[int], tier: str = "", shared: bool = False) -> None:  # any thread
        self._pending.append((kind, list(hashes), tier, shared))
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self.flush()
        else:
            self._loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        events, self._pending = self._pending, []
        for kind, hashes, tier, shared in events:
            self.seq += 1
            if self.sink is not None:
                self.sink(protocol.KVEvent(self.engine_id, kind, hashes, self.seq, tier, shared))
