"""`Journal`: the last requests a router served, each with the calls its strategy made (engine, call,
start, duration, bytes, error): `GET /admin/requests?limit=N`, `microserve ctl requests`, a
strategy author's debugger. Bounded: the newest `limit` requests, at most `MAX_CALLS` calls each.

    Router.generate ─ begin(rid) ─> handles report each call (EngineHandle.on_call) ─> end(rid, fields)

A retry (`rid~n`) and a move (`rid@target`) are the same request: their calls land in its entry. A
call may report after its request ended (a finished stream's generator is closed by the loop a moment
later): it still lands in the entry while the entry is among the kept ones.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from microserve.protocol import base_id

MAX_CALLS = 64


@dataclass
class CallRecord:
    engine: str
    call: str  # prep_recv, remote_send, start_generate, abort
    start: float  # unix seconds
    seconds: float
    bytes: int = 0  # KV bytes (remote_send)
    error: str = ""  # the error code, when it failed
    request_id: str = ""  # the id it was made with (a retry's or a move's own id)


@dataclass
class Entry:
    request_id: str
    start: float
    calls: list[CallRecord] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)


class Journal:
    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._open: dict[str, Entry] = {}
        self._done: OrderedDict[str, Entry] = OrderedDict()  # oldest first

    def begin(self, request_id: str) -> None:
        self._open[request_id] = Entry(request_id, time.time())

    def call(self, record: CallRecord) -> None:
        rid = base_id(record.request_id)
        entry = self._open.get(rid) or self._done.get(rid)
        if entry is not None and len(entry.calls) < MAX_CALLS:
            entry.calls.append(record)

    def end(self, request_id: str, fields: dict[str, Any]) -> None:
        entry = self._open.pop(request_id, None)
        if entry is not None:
            entry.fields = fields
            self._done[request_id] = entry
            while len(self._done) > self.limit:
                self._done.popitem(last=False)

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` finished requests, newest first, as JSON-ready dicts."""
        out = []
        for entry in list(self._done.values())[::-1][:max(0, limit)]:
            calls = [asdict(c) | {"start_ms": round((c.start - entry.start) * 1e3, 1),
                                  "ms": round(c.seconds * 1e3, 1)} for c in sorted(entry.calls, key=lambda c: c.start)]
            for c in calls:
                del c["start"], c["seconds"]
            out.append({"request_id": entry.request_id, "start": round(entry.start, 3), **entry.fields,
                        "calls": calls})
        return out


class Recorder:
    """What the router saw of each request since a planner last asked (control/planner.py: its window):
    arrivals, and per ended request the roles it used, success, prompt and output tokens, TTFT and
    end-to-end seconds. Bounded: the newest `limit` ended requests."""

    def __init__(self, limit: int = 100_000) -> None:
        self.arrivals = self.arrived_tokens = 0
        self.ended: deque[tuple[frozenset[str], bool, int, int, float | None, float]] = deque(maxlen=limit)

    def arrive(self, prompt_tokens: int) -> None:
        self.arrivals += 1
        self.arrived_tokens += prompt_tokens

    def end(self, roles: frozenset[str], ok: bool, prompt: int, output: int, ttft: float | None, e2e: float) -> None:
        self.ended.append((roles, ok, prompt, output, ttft, e2e))

    def take(self) -> tuple[tuple[int, int], list]:
        """((requests, prompt tokens) arrived, the ended requests), since the last take."""
        arrivals, ended = (self.arrivals, self.arrived_tokens), list(self.ended)
        self.arrivals = self.arrived_tokens = 0
        self.ended.clear()
        return arrivals, ended
