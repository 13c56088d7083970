"""`StreamHold`: an engine's `--stream-interval` (SGLang's and vLLM's knob of the same name).

After a request's first token (which goes at once, for TTFT), its tokens reach the stream N at
a time; the chunk with the finish reason goes at once with whatever was held. Fewer messages
and wake-ups per token under high concurrency, at the cost of coarser inter-token timing as
the client sees it. With N = 1 every step's output goes through untouched.
"""

from __future__ import annotations

from microserve.engine.core.engine_core import StepOutput


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
