"""Requests parked for want of KV blocks: every engine that could take one refused it (`overloaded`,
as a full decode engine's `prep_recv` in PD) before its first token, and its retries are spent.

A single engine queues such a request until blocks free up; a cluster parks it here, in arrival order,
and wakes it when something may have freed blocks, instead of retrying on a timer (each retry is a full
strategy attempt: a `prep_recv` that hashes the whole prompt, only to be refused again):

    run_request ── refused, retries spent ──> KVWaiters.wait ──┐  (the queue's head also wakes after 5 s)
                                                               │
    run_attempt ends after its first chunk ──> freed()  ───────┤  wakes the head
    Cluster.add_engine ──> joined() ───────────────────────────┘  wakes every waiter

A woken request that gets its first chunk wakes the next (there may be room for more); one refused again
goes back to the front. Waiting is bounded by the request's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

__all__ = ["KVWaiters"]

HEAD_POLL_S = 5.0  # the head of the queue tries again after this long without a wake (blocks freed unseen)


class KVWaiters:
    """The cluster's queue of requests waiting for KV blocks (one per `Cluster`)."""

    def __init__(self) -> None:
        self._queue: deque[asyncio.Future[None]] = deque()
        self._roles: dict[asyncio.Future[None], str | None] = {}  # each waiter: the role whose engines refused it

    def __len__(self) -> int:
        return len(self._roles)

    def parked(self, role: str | None = None) -> int:
        """Requests parked now (those that `role`'s engines refused; every one for None): what a planner
        reads as demand the role's engines could not hold (control/planning.py)."""
        return len(self._roles) if role is None else sum(1 for r in self._roles.values() if r == role)

    async def wait(self, deadline: float, front: bool = False, role: str | None = None) -> bool:
        """Park until woken (True) or until `deadline` on the loop's clock passes (False). `front`: a
        request woken before and refused again keeps its place at the head; `role`: whose engines
        refused it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._roles[fut] = role
        if front:
            self._queue.appendleft(fut)
        else:
            self._queue.append(fut)
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    async with asyncio.timeout(min(remaining, HEAD_POLL_S)):
                        await asyncio.shield(fut)
                    return True
                except TimeoutError:
                    if self._queue and self._queue[0] is fut and loop.time() < deadline:
                        return True  # NOTE: the head polls, in case blocks were freed by something we do not see
        finally:
            del self._roles[fut]
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                self._queue.remove(fut)

    def freed(self) -> None:
        """Blocks may have been freed (a request that had started ended, or one got its first chunk):
        wake the longest waiting request."""
        while self._queue:
            fut = self._queue.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def joined(self) -> None:
        """An engine joined: wake every waiting request."""
        while self._queue:
            fut = self._queue.popleft()
            if not fut.done():
                fut.set_result(None)
