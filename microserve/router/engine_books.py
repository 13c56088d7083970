"""`EngineBooks`: what a router keeps about one engine besides the calls themselves, the base of
`EngineHandle` (router/handle.py).

    load      inflight, reserved (prep_recv'd, not generating yet), pending_tokens, changed_at
              ─> requests_here(), what `Cluster.least_loaded` ranks by
    liveness  alive, set_alive / mark_down, aborts deferred until a down engine answers again
    moves     evacuating (drained: streams stop after their next chunk), moving (stopped, not moved yet)
    lending   request ids this engine lent ranges to (DistAttention): freed when the attempt ends
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from microserve.router.errors import EngineCallError

log = logging.getLogger(__name__)

MAX_DEFERRED_ABORTS = 10_000
MAX_RESERVATION_S = 600.0  # a reservation (prep_recv) not taken up for this long no longer counts as load


class EngineBooks:
    """One engine's load, liveness and moves, as this router sees them. The handle's calls keep them;
    `abort` and `channel` are the handle's (a down engine's deferred aborts are sent through them)."""

    name: str  # the handle's
    channel: Any  # the handle's RPC channel (`mark_down` fails its pending calls)
    abort: Callable[..., Awaitable[bool]]  # the handle's call (deferred aborts go through it)

    def __init__(self) -> None:
        self.alive = True  # False from a lost connection or failed health poll until a call succeeds again
        self.joined = False  # it registered itself (engine --join): evicted when it stays down, re-joins
        self.evacuating = False  # drained by migration: streams stop after their next chunk (`Evacuated`)
        self.moving = 0  # requests stopped here whose move (remote_send from here) has not started yet
        self.inflight = 0  # start_generate / remote_send calls this process has in flight on the engine
        self.reserved: dict[str, float] = {}  # request id -> when: prep_recv'd here, not generating here yet
        self.lending: set[str] = set()  # request ids this engine lent ranges to (the attempt frees them)
        self.changed_at = 0.0  # monotonic time this router's count of work here last went down
        self.pending_tokens = 0  # prompt tokens this process asked the engine to prefill, not yet done
        self.on_state: Callable[[Any, bool], None] | None = None  # observer of alive changes
        self._deferred_aborts: dict[str, None] = {}  # aborts for when the engine is back (insertion order)
        self._cleanup: asyncio.Future | None = None

    def set_alive(self, alive: bool) -> None:
        if alive != self.alive:
            self.alive = alive
            log.warning("engine %s is %s", self.name, "up" if alive else "DOWN")
            if alive and self._deferred_aborts:
                self._send_deferred_aborts()
            if self.on_state is not None:
                self.on_state(self, alive)

    def abort_when_back(self, request_id: str) -> None:
        """Abort `request_id` once this (down) engine answers again: a stalled engine that comes
        back must not run requests nobody waits for. Bounded: the oldest are dropped first."""
        self._deferred_aborts[request_id] = None
        while len(self._deferred_aborts) > MAX_DEFERRED_ABORTS:
            self._deferred_aborts.pop(next(iter(self._deferred_aborts)))

    def _send_deferred_aborts(self) -> None:
        rids, self._deferred_aborts = list(self._deferred_aborts), {}

        async def run() -> None:
            for rid in rids:
                with contextlib.suppress(EngineCallError):
                    await self.abort(rid, timeout=5.0)

        self._cleanup = asyncio.ensure_future(run())

    def mark_down(self, why: str) -> None:
        """Mark the engine down and fail every call waiting on it with code "unavailable"."""
        self.set_alive(False)
        self.channel.fail_pending(why)

    def release(self, request_id: str) -> bool:
        """The request no longer holds a reservation here (it generates here now, or it ended).
        Whether the engine lent it ranges (`lend`): they end with the request (`run_attempt` aborts)."""
        if self.reserved.pop(request_id, None) is not None:
            self.changed_at = time.monotonic()
        if request_id in self.lending:
            self.lending.discard(request_id)
            return True
        return False

    def requests_here(self) -> int:
        """Requests this router has on the engine: calls in flight plus reservations (`prep_recv`)
        not yet generating here. Exact, no delay; a reservation older than the longest lease is
        forgotten (its ticket has expired on the engine)."""
        if self.reserved:
            stale = time.monotonic() - MAX_RESERVATION_S
            for rid in [rid for rid, at in self.reserved.items() if at < stale]:
                self.release(rid)
        return self.inflight + len(self.reserved)
