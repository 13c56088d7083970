"""A stream's step outputs on their way to `start_generate`'s reader: `StreamQueue`, and
`StreamHold`, an engine's `--stream-interval` (SGLang's and vLLM's knob of the same name).

After a request's first token (which goes at once, for TTFT), its tokens reach the stream N at
a time; the chunk with the finish reason goes at once with whatever was held. Fewer messages
and wake-ups per token under high concurrency, at the cost of coarser inter-token timing as
the client sees it. With N = 1 every step's output goes through untouched.
"""

from __future__ import annotations

import asyncio
from collections import deque

from microserve.engine.core.engine_core import StepOutput


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
