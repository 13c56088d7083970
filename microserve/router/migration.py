"""Live migration of a running request, built from the three calls: its KV moves, it does not recompute.

    source streams req ... the strategy stops reading it (closing the stream aborts it there: the
    full blocks of prompt + generated stay in the source's prefix cache)
    target.prep_recv(moved, end)        moved = prompt + generated, the rest of max_tokens and min_tokens
    source.remote_send(moved, ticket)   finds those blocks in its cache, computes at most the last
                                        partial block, writes [matched, end) into the target
    target.start_generate(moved, end)   computes the last token, decodes on

A strategy yields the source's chunks, then `cluster.migrate(...)`'s: the client's stream has no gap
and no repeat, and greedy output equals an unmigrated run. Seeded sampling continues with a fresh
generator on the target (not the source's state). If the source evicted the blocks meanwhile, it
recomputes them: slower, never wrong.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from microserve.protocol import GenerateChunk, Request
from microserve.router.handle import EngineHandle


def moved_request(req: Request, generated: list[int], target: EngineHandle) -> Request:
    """The request as the target continues it: prompt + generated tokens, the rest of its budget."""
    return Request(f"{req.request_id}@{target.name}", req.prompt_ids + list(generated), req.sampling.after(generated))


async def migrate(req: Request, generated: list[int], source: EngineHandle,
                  target: EngineHandle) -> AsyncIterator[GenerateChunk]:
    """Continue `req` on `target` after `generated` tokens from `source` (whose stream the caller closed),
    moving its KV from `source`; yields the target's chunks."""
    moved = moved_request(req, generated, target)
    end = len(moved.prompt_ids) - 1  # NOTE: the last token is computed by the target (it yields the next logits)
    ticket = await target.prep_recv(moved, end=end)
    if ticket.matched < end:
        await source.remote_send(moved, ticket.kv, begin=ticket.matched, end=end)
    async for chunk in target.start_generate(moved, begin=end):
        yield chunk
