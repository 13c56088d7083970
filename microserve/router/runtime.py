"""`Router`: runs a strategy for each request and turns engine chunks into text.

For one request the router
1. checks it (context limit, sampling values) before any engine sees it;
2. runs `strategy.generate(req, cluster)` and collects the `GenerateChunk`s;
3. detokenizes incrementally and applies stop strings (a hit ends the request and
   aborts it on every engine it touched);
4. counts usage and records metrics;
5. enforces the request's deadline;
6. restarts the request on other engines (the strategy runs again; the dead engine is
   marked down so `least_loaded` skips it) when an engine fails before the first token
   arrived; after that, the failure is reported to the client.

Whatever ends a request (finish, stop string, error, deadline, client gone), every
engine the request touched gets an `abort`, so no ticket, send or sequence outlives it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from microserve.protocol import GenerateChunk, Request
from microserve.router.cluster import Cluster
from microserve.router.handle import EngineCallError, EngineHandle, touched_engines
from microserve.router.metrics import RouterMetrics
from microserve.router.strategy import Strategy
from microserve.sampling_params import SamplingParams
from microserve.text import IncrementalDetokenizer, StopChecker

log = logging.getLogger(__name__)

# engine failures worth restarting the request elsewhere (before its first token)
RETRYABLE = frozenset({"unavailable", "timeout", "internal", "transfer_failed", "overloaded"})


class RouterError(Exception):
    """A request the router refuses or cannot finish; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry_after = status, message, code, param, retry_after


@dataclass
class Delta:
    """A piece of one request's output. The last one has `finish_reason` set."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class _Progress:
    tokens: list[int] = field(default_factory=list)
    cached: int = 0
    first_at: float | None = None
    last_at: float | None = None


class Router:
    """The router runtime over one cluster and one strategy.

    Args:
        cluster: started `Cluster`.
        strategy: the strategy instance.
        tokenizer: `microserve.engine.model.tokenizer.Tokenizer` of the served model.
        max_model_len: context limit (prompt + output); default: the engines' smallest.
        request_timeout: per-request deadline in seconds (arrival to last token).
        max_retries: restarts on another engine when one fails before the first token.
        max_pending: requests in the router at once; more are refused with 429.
    """

    def __init__(self, cluster: Cluster, strategy: Strategy, tokenizer, *, max_model_len: int | None = None,
                 request_timeout: float = 600.0, max_retries: int = 2, max_pending: int = 1024) -> None:
        self.cluster, self.strategy, self.tokenizer = cluster, strategy, tokenizer
        self.max_model_len = max_model_len or cluster.max_model_len
        self.request_timeout, self.max_retries, self.max_pending = request_timeout, max_retries, max_pending
        self.metrics = RouterMetrics(cluster)
        self.pending = 0
        self._ids = itertools.count()
        self._prefix = os.urandom(3).hex()
        self._cleanup: set[asyncio.Task] = set()

    # -- input --------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        vocab = self.tokenizer.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt):
            raise RouterError(400, f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        return list(prompt)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages)
        except Exception as exc:  # template errors (raise_exception in the template, bad roles...)
            raise RouterError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check(self, prompt_ids: list[int], sampling: SamplingParams, max_tokens_given: bool = True) -> SamplingParams:
        """Validate a request against the context limit; fill in max_tokens when not given."""
        n, limit = len(prompt_ids), self.max_model_len
        if n == 0:
            raise RouterError(400, "the prompt is empty", param="prompt")
        if n >= limit:
            raise RouterError(400, f"this model's maximum context length is {limit} tokens; the prompt has {n} "
                                   "tokens (no room left for output)", code="context_length_exceeded", param="prompt")
        if not max_tokens_given:
            sampling.max_tokens = min(sampling.max_tokens, limit - n) if sampling.max_tokens else limit - n
        elif n + sampling.max_tokens > limit:
            raise RouterError(400, f"this model's maximum context length is {limit} tokens; the prompt has {n} "
                                   f"tokens and max_tokens is {sampling.max_tokens} ({n + sampling.max_tokens} in "
                                   "total): shorten the prompt or lower max_tokens",
                              code="context_length_exceeded", param="max_tokens")
        return sampling

    def new_request_id(self, kind: str = "cmpl") -> str:
        return f"{kind}-{self._prefix}{next(self._ids):x}"

    # -- running a request ----------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams) -> AsyncIterator[Delta]:
        """Serve one request; yields text deltas, the last with `finish_reason` and `usage`.
        Raises `RouterError` (refused, failed, deadline)."""
        if self.pending >= self.max_pending:
            self.metrics.requests.labels("rejected").inc()
            raise RouterError(429, f"the router has {self.pending} requests in flight (limit {self.max_pending})",
                              code="too_many_requests", retry_after=1)
        if not self.cluster.engines():
            self.metrics.requests.labels("rejected").inc()
            raise RouterError(503, "no engine is available", code="unavailable", retry_after=5)
        self.pending += 1
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.request_timeout
        status = "aborted"
        try:
            async for delta in self._generate(request_id, prompt_ids, sampling, t0, deadline):
                if delta.finish_reason is not None:
                    status = "success"
                yield delta
        except RouterError:
            status = "error"
            raise
        finally:
            self.pending -= 1
            self.metrics.requests.labels(status).inc()
            if status == "success":
                self.metrics.e2e.observe(time.perf_counter() - t0)

    async def _generate(self, rid: str, prompt_ids: list[int], sampling: SamplingParams, t0: float,
                        deadline: float) -> AsyncIterator[Delta]:
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopChecker(sampling.stop)
        progress = _Progress()
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        for attempt in range(self.max_retries + 1):
            req = Request(rid if attempt == 0 else f"{rid}~{attempt}", prompt_ids, sampling)
            with touched_engines() as touched:
                chunks = self.strategy.generate(req, self.cluster)
                clean = False  # the engine itself finished the request: nothing left to abort
                try:
                    while True:
                        chunk = await self._next_chunk(chunks, deadline, rid)
                        if chunk is None:
                            raise RouterError(502, f"strategy {type(self.strategy).__name__} ended the stream "
                                                   "without a finish reason", code="strategy_error")
                        delta = self._on_chunk(chunk, progress, detok, stops, t0)
                        if delta is not None:
                            if delta.finish_reason is not None:
                                clean = stops.hit is None
                                delta.usage = Usage(len(prompt_ids), len(progress.tokens), progress.cached)
                                self.metrics.generation_tokens.inc(len(progress.tokens))
                                yield delta
                                return
                            yield delta
                except EngineCallError as exc:
                    if progress.first_at is None and exc.code in RETRYABLE and attempt < self.max_retries:
                        log.warning("request %s: %s; restarting it on another engine", rid, exc)
                        self.metrics.retries.inc()
                        self._mark_failed(exc)
                        continue
                    raise self._as_router_error(exc, streamed=progress.first_at is not None) from None
                finally:
                    await chunks.aclose()
                    if not clean:
                        self._abort_everywhere(req.request_id, touched)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _next_chunk(self, chunks: AsyncIterator[GenerateChunk], deadline: float,
                          rid: str) -> GenerateChunk | None:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(chunks.__anext__(), remaining)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise RouterError(504, f"request {rid} did not finish within its deadline of {self.request_timeout:g}s",
                              code="timeout") from None

    def _on_chunk(self, chunk: GenerateChunk, progress: _Progress, detok: IncrementalDetokenizer,
                  stops: StopChecker, t0: float) -> Delta | None:
        now = time.perf_counter()
        if chunk.token_ids:
            if progress.first_at is None:
                progress.first_at = now
                self.metrics.ttft.observe(now - t0)
            elif progress.last_at is not None:
                gap = (now - progress.last_at) / len(chunk.token_ids)
                for _ in chunk.token_ids:
                    self.metrics.itl.observe(gap)
            progress.last_at = now
        progress.tokens.extend(chunk.token_ids)
        progress.cached = max(progress.cached, chunk.num_cached_tokens)
        final = chunk.finish_reason is not None
        text = detok.push(chunk.token_ids) + (detok.flush() if final else "")
        text = stops.push(text, final=final)
        if stops.hit is not None:
            return Delta(text, chunk.token_ids, "stop")
        if final:
            reason = "stop" if chunk.finish_reason == "stop" else chunk.finish_reason
            if reason == "abort":
                raise RouterError(503, "the request was aborted on the engine", code="aborted")
            return Delta(text, chunk.token_ids, reason)
        return Delta(text, chunk.token_ids) if (text or chunk.token_ids) else None

    def _mark_failed(self, exc: EngineCallError) -> None:
        if exc.code in ("unavailable", "timeout"):
            for h in self.cluster.handles:
                if h.name == exc.engine:
                    h.mark_down(str(exc))

    def _abort_everywhere(self, request_id: str, engines: set[EngineHandle]) -> None:
        """Abort on every engine the attempt touched, in the background (also when we are cancelled)."""
        engines = {h for h in engines if h.alive}
        if not engines:
            return

        async def run() -> None:
            await asyncio.gather(*(h.abort(request_id, timeout=5.0) for h in engines), return_exceptions=True)

        task = asyncio.ensure_future(run())
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    @staticmethod
    def _as_router_error(exc: EngineCallError, streamed: bool) -> RouterError:
        if exc.code == "bad_request":
            return RouterError(400, exc.message, code="bad_request")
        if exc.code in ("overloaded", "unavailable") and not streamed:
            return RouterError(503, str(exc), code=exc.code, retry_after=2)
        return RouterError(502 if exc.code != "timeout" else 504, f"engine failure: {exc}", code=exc.code)
