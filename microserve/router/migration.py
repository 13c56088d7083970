"""Live migration of a running request, built from the three calls: its KV moves, it does not recompute.

    source streams req ... the strategy stops reading it (closing the stream aborts it there: the
    full blocks of prompt + generated stay in the source's prefix cache)
    target.prep_recv(moved, end)        moved = prompt + generated, the rest of max_tokens and min_tokens
    source.remote_send(moved, ticket)   finds those blocks in its cache, computes at most the last
                                        partial block, writes [matched, end) into the target
    target.start_generate(moved, end)   computes the last token, decodes on

A strategy yields the source's chunks, then `cluster.migrate(...)`'s: the client's stream has no gap
and no repeat, and greedy and seeded outputs equal an unmigrated run (the moved request's
`sampling.resumed` makes the target skip the seeded draws of the tokens already generated). If the
source evicted the blocks meanwhile, it recomputes them: slower, never wrong.

During its prefill (no token yet), a request moves with the part of its prompt the source has
computed so far (its prefix cache fills chunk by chunk; the router's prefix index says how far):
the target receives that and computes the rest.

Draining by migration (`cluster.remove_engine(h)`, the admin API's DELETE, `ctl scale` down, an
engine leaving on SIGTERM) uses the same three calls from the router: every stream on the draining
engine stops after its next chunk (`Evacuated`), and `attempts.run_request` continues it with `Moved`
on the least loaded other engine of the role.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from microserve.protocol import GenerateChunk, Request
from microserve.router.handle import EngineCallError, EngineHandle, Evacuated


def moved_request(req: Request, generated: list[int], target: EngineHandle) -> Request:
    """The request as the target continues it: prompt + generated tokens, the rest of its budget."""
    return req.continued(f"to-{target.name}", generated)


async def migrate(req: Request, generated: list[int], source: EngineHandle, target: EngineHandle,
                  cached: int | None = None) -> AsyncIterator[GenerateChunk]:
    """Continue `req` on `target` after `generated` tokens from `source` (whose stream the caller closed),
    moving its KV from `source`; yields the target's chunks. `cached`: during the prefill, how many
    prompt tokens the source has computed (the rest is computed on the target); None: all of them."""
    moved = moved_request(req, generated, target)
    end = len(moved.prompt_ids) - 1  # NOTE: the last token is computed by the target (it yields the next logits)
    if cached is not None:
        end = min(end, cached)
    if end > 0:
        ticket = await target.prep_recv(moved, end=end)
        if ticket.matched < end:
            await source.remote_send(moved, ticket.kv, begin=ticket.matched, end=end)
    async for chunk in target.start_generate(moved, begin=end):
        yield chunk


class Moved:
    """What `run_request` runs instead of the strategy for a request stopped on a draining engine."""

    def __init__(self, source: EngineHandle, target: EngineHandle) -> None:
        self.source, self.target, self._held = source, target, True  # holds one of source.moving

    def release(self) -> None:
        if self._held:
            self._held = False
            self.source.moving -= 1

    async def generate(self, req: Request, cluster) -> AsyncIterator[GenerateChunk]:
        try:
            async for chunk in migrate(req, [], self.source, self.target):
                self.release()  # the KV is on the target: the source may go
                yield chunk
        finally:
            self.release()


def evacuation(cluster, exc: EngineCallError, allowed: bool = True) -> Moved | None:
    """The move for a request whose stream an `Evacuated` stopped (None: not one, not `allowed`, or
    nowhere to go; the request then fails over through its strategy). Settles the source's `moving`
    count either way."""
    if not isinstance(exc, Evacuated):
        return None
    source, target = exc.handle, None
    try:
        if allowed and source.role in cluster.roles:
            target = cluster.least_loaded(source.role)
    except EngineCallError:  # NoEngineAvailable
        pass
    if target is None or target is source:
        source.moving -= 1
        return None
    return Moved(source, target)
