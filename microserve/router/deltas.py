"""What `Router.generate` yields: `Delta`s (text and token ids as they come, the last one with its finish
reason and `Usage`), and the router's own `Progress` of a request (router/runtime.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from microserve.protocol import TokenLogprob


@dataclass
class Delta:
    """A piece of one request's output. The last one has `finish_reason` set."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.., on the first delta when asked
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's field)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Progress:
    """What the router has seen of one request's stream so far (metrics, the journal, the access log)."""

    tokens: list[int] = field(default_factory=list)
    cached: int = 0
    first_at: float | None = None
    last_at: float | None = None
    phases: list[float] | None = None  # the engine's seconds queued and prefilling (GenerateChunk.phases)
