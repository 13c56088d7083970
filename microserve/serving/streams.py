"""A stream's step outputs on their way to `start_generate`'s reader: `StreamQueue`, and
`StreamHold`, an engine's `--stream-interval` (SGLang's and vLLM's knob of the same name).

After a request's first token (which goes at once, for TTFT), its tokens reach the stream N at
a time; the chunk with the finish reason goes at once with whatever was held. Fewer messages
and wake-ups per token under high concurrency, at the cost of coarser inter-token timing as
the client sees it. With N = 1 every step's output goes through untouched. `chunks` turns a
request's held outputs into `start_generate`'s stream of `GenerateChunk`s.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from microserve import protocol, tracing
from microserve.engine.core.engine_core import StepOutput
from microserve.engine.core.sequence import Finish
from microserve.serving.api import EngineError, ErrorCode

if TYPE_CHECKING:
    from microserve.serving.base import EngineService


class StreamQueue:
    """One stream's outputs, for its one reader: `asyncio.Queue`'s `put_nowait`, `get`, `get_nowait`
    and `empty` without the rest of its bookkeeping (task counts, a join event, a list of getters),
    which the engine paid for every token of every stream."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[StepOutput] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: StepOutput) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> StepOutput:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> StepOutput:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()


class StreamHold:
    __slots__ = ("held", "interval")

    def __init__(self, interval: int = 1) -> None:
        self.interval = interval
        self.held: dict[str, StepOutput | None] = {}  # started streams -> the tokens held back

    def take(self, out: StepOutput) -> StepOutput | None:
        """What of a stream's step output to deliver now (None: held)."""
        if self.interval <= 1:
            return out
        first = out.request_id not in self.held
        out = out.after(self.held.pop(out.request_id, None))
        if out.finish_reason is None:
            hold = not first and len(out.new_token_ids) < self.interval
            self.held[out.request_id] = out if hold else None
            return None if hold else out
        return out

    def drop(self, request_id: str) -> None:
        """The stream ended (finished, closed early or aborted)."""
        self.held.pop(request_id, None)


async def chunks(service: EngineService, rid: str, queue: StreamQueue) -> AsyncIterator[protocol.GenerateChunk]:
    """`start_generate`'s stream: the request's step outputs (after the stream interval) as chunks,
    what piled up coalesced; the engine's phases as spans (queue, each prompt step, decode); leaving
    early aborts the request."""
    finished, first_token_ns, phases = False, 0, None
    try:
        while not finished:
            out = await queue.get()
            if out.phases is not None:  # queue wait and prefill, as the engine saw them
                arrived, scheduled, first_token_ns, steps = out.phases
                phases = [(scheduled - arrived) / 1e9, (first_token_ns - scheduled) / 1e9]
            if out.phases is not None and tracing.enabled():
                tracing.record("engine.queue", arrived, scheduled)
                tracing.record("engine.prefill", scheduled, first_token_ns, cached_tokens=out.num_cached_tokens)
                prompt_steps(steps)
            tokens, reason, cached = list(out.new_token_ids), out.finish_reason, out.num_cached_tokens
            logprobs = [protocol.TokenLogprob(lp, top) for lp, top in out.logprobs or ()]
            prompt_lps = out.prompt_logprobs
            while reason is None and not queue.empty():  # coalesce what piled up
                out = more = queue.get_nowait()
                tokens += more.new_token_ids
                logprobs += [protocol.TokenLogprob(lp, top) for lp, top in more.logprobs or ()]
                prompt_lps = prompt_lps or more.prompt_logprobs
                reason, cached = more.finish_reason, more.num_cached_tokens or cached
            finished = reason is not None
            if reason == Finish.ERROR:
                error = out.error  # NOTE: a lost lender (DistAttention) says so, and is named as the peer
                raise EngineError(ErrorCode.UNAVAILABLE if error else ErrorCode.INTERNAL,
                                  error or "the engine failed while running this request", out.error_peer)
            if tokens or finished:
                yield protocol.GenerateChunk(tokens, reason, cached, logprobs or None, None if prompt_lps is None
                                             else [protocol.TokenLogprob(*entry) for entry in prompt_lps], phases)
                phases = None  # NOTE: with the first chunk only
    finally:
        tracing.record("engine.decode", first_token_ns, time.time_ns())
        service._streams.pop(rid, None)
        service.hold.drop(rid)
        if not finished:
            await service.abort(rid)


def prompt_steps(steps) -> None:
    """One span per step that computed part of a prompt (`Sequence.chunks`), under the current span."""
    for begin, end, position, tokens in steps:
        tracing.record("engine.prefill_chunk", begin, end, position=position, tokens=tokens)
