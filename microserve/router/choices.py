"""The choices of one request (`n`, `best_of`) share its prompt's KV: one prefill, not n.

    choice 0 ── the strategy (any: PD, round robin...) ── its first token ─┐ the engine that generated it
    choice 1..n-1 ── wait for that ─────────────────────────────────────────┴─> `Pinned`: start_generate there,
                                                                                 the prompt hits its prefix cache

Choice 0 is a normal request; the engine that streams its tokens is recorded in its attempt
(`generating`, router/attempt_scope.py: the handles append themselves). Once its first token is
out, the prompt's full blocks are in that engine's prefix cache, and the other choices go there
directly (the last partial block is recomputed, at most `block_size - 1` tokens each). If choice 0
fails before its first token, or that engine is down by then, the others run through the strategy as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from microserve.protocol import GenerateChunk, Request
from microserve.router.handle import EngineHandle
from microserve.router.strategy import Strategy

__all__ = ["ChoiceGroup", "Pinned", "route"]


class ChoiceGroup:
    """The choices of one prompt: choice 0 leads, the others follow it to its engine."""

    def __init__(self) -> None:
        self._engine: asyncio.Future[EngineHandle | None] = asyncio.get_running_loop().create_future()

    def led(self, engine: EngineHandle | None) -> None:
        if not self._engine.done():
            self._engine.set_result(engine)

    async def engine(self, deadline: float) -> EngineHandle | None:
        """The engine choice 0 generates on (None: it failed first); waits at most until `deadline`."""
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            async with asyncio.timeout(timeout):  # NOTE: not wait_for, which may swallow a cancel (attempts.py)
                return await asyncio.shield(self._engine)
        except TimeoutError:
            return None


class Pinned(Strategy):
    """Generate on one engine (where the prompt's KV is); through `fallback` when it is down."""

    def __init__(self, engine: EngineHandle, fallback: Strategy) -> None:
        self.engine, self.fallback = engine, fallback

    async def generate(self, req: Request, cluster) -> AsyncIterator[GenerateChunk]:
        if not self.engine.alive:
            async for chunk in self.fallback.generate(req, cluster):
                yield chunk
            return
        async for chunk in self.engine.start_generate(req):
            yield chunk


async def route(group: ChoiceGroup | None, lead: bool, strategy: Strategy,
                deadline: float) -> tuple[Strategy, list[EngineHandle] | None]:
    """The strategy one choice runs, and (for the lead) the list its engines are recorded in (pass it to
    `run_request`)."""
    if group is None:
        return strategy, None
    if lead:
        return strategy, []
    engine = await group.engine(deadline)
    return (Pinned(engine, strategy) if engine is not None else strategy), None
