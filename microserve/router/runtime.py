"""`Router`: runs a strategy for each request and turns engine chunks into text.

For one request the router
1. checks it (context limit, sampling values) before any engine sees it;
2. runs `strategy.generate(req, cluster)` and collects the `GenerateChunk`s;
3. detokenizes incrementally and applies stop strings (a hit ends the request and
   aborts it on every engine it touched);
4. counts usage and records metrics;
5. enforces the request's deadline;
6. restarts the request on other engines (the strategy runs again; the engine at fault is
   marked down so `least_loaded` skips it) when an engine fails before the first token, and
   continues it on another engine (prompt + tokens so far) when its engine dies mid-stream.

Whatever ends a request (finish, stop string, error, deadline, client gone), every
engine the request touched gets an `abort`, so no ticket, send or sequence outlives it.

    Router.generate ─> run_request (retries, deadline) ─> run_attempt (one strategy run, aborts) ─> chunks
    sim.run._serve  ─> run_request ─┘           (the simulator runs the very same code, in virtual time)

`run_attempt` and `run_request` live in router/attempts.py (imported here too).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from microserve import tracing
from microserve.logs import access
from microserve.protocol import GenerateChunk, Request
from microserve.router.attempts import abort_everywhere, run_attempt, run_request  # noqa: F401 (re-exported)
from microserve.router.choices import ChoiceGroup, route
from microserve.router.cluster import Cluster
from microserve.router.deltas import Delta, Progress, Usage
from microserve.router.errors import NO_CAPACITY, RouterError
from microserve.router.handle import EngineCallError
from microserve.router.journal import Journal, Recorder
from microserve.router.metrics import RouterMetrics
from microserve.router.strategy import Strategy
from microserve.sampling_params import SamplingParams
from microserve.serving.api import ErrorCode
from microserve.text import InvalidRequestError, TextStream, check_token_ids

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 600.0  # a request's default deadline, arrival to last token (`--request-timeout`)


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
                 request_timeout: float = REQUEST_TIMEOUT_S, max_retries: int = 2, max_pending: int = 1024) -> None:
        self.cluster, self.strategy, self.tokenizer = cluster, strategy, tokenizer
        self.max_model_len = max_model_len or cluster.max_model_len
        self.request_timeout, self.max_retries, self.max_pending = request_timeout, max_retries, max_pending
        self.metrics, self.pending = RouterMetrics(cluster), 0
        self.log_requests = True  # one access-log line per request (microserve/logs.py; --disable-log-requests)
        self.journal = Journal()  # the last requests with their calls (GET /admin/requests)
        self.recorder = Recorder()  # what a planner's window is made of (control/planner.py)
        for h in cluster.handles:
            h.on_call = self.journal.call
        cluster.on_join.append(lambda h: setattr(h, "on_call", self.journal.call))
        self.engines = None  # the engines this deployment starts itself (control/provision.py), if any
        self.planning = None  # its planner's loop (control/planner.py: launch --planner, PUT /admin/planner)
        self.loras: dict[str, str] = {}  # adapters loaded at run time, name -> path: engines started later load them

    # -- input --------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            try:
                return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            except InvalidRequestError as exc:  # NOTE: no tokenizer (skip_tokenizer_init)
                raise RouterError(ErrorCode.BAD_REQUEST, str(exc), param="prompt") from None
        vocab = self.tokenizer.vocab_size
        try:
            check_token_ids(prompt, vocab)
        except InvalidRequestError as exc:
            raise RouterError(ErrorCode.BAD_REQUEST, f"prompt token ids must be integers in [0, {vocab}): {exc}",
                              param="prompt") from None
        return list(prompt)

    def apply_chat_template(self, messages: list[dict], options: dict | None = None) -> list[int]:
        """Token ids of the rendered chat; `options`: add_generation_prompt, continue_final_message,
        kwargs (the template's extra variables)."""
        opts = dict(options or {})
        kwargs = opts.pop("kwargs", {})
        try:
            text = self.tokenizer.apply_chat_template(messages, **opts, **kwargs)
        except Exception as exc:  # template errors (raise_exception in the template, bad roles...)
            raise RouterError(ErrorCode.BAD_REQUEST, f"cannot apply the chat template: {exc}",
                              param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _check_chars(self, text: str, param: str) -> None:
        """Refuse text that cannot fit the context whatever it encodes to, before encoding it."""
        per_token = getattr(self.tokenizer, "max_token_chars", 0)
        if per_token and len(text) > self.max_model_len * per_token:
            raise RouterError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"this model's maximum context length is "
                              f"{self.max_model_len} tokens; the prompt has {len(text)} characters, more than "
                              f"that many tokens can hold", param=param)

    async def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """`tokenize`, with text encoded off the event loop after a length pre-check (a huge
        prompt is refused at once and never stalls other requests)."""
        if not isinstance(prompt, str):
            return self.tokenize(prompt)
        self._check_chars(prompt, "prompt")
        return await asyncio.get_running_loop().run_in_executor(None, self.tokenize, prompt, add_special_tokens)

    async def encode_chat(self, messages: list[dict], options: dict | None = None) -> list[int]:
        """`apply_chat_template` off the event loop, after the same pre-check on the messages' text."""
        self._check_chars("".join(str(m.get("content") or "") for m in messages), "messages")
        return await asyncio.get_running_loop().run_in_executor(None, self.apply_chat_template, messages, options)

    def admit(self, n: int) -> None:
        """Refuse (429) a request of `n` prompts that would take the router past `max_pending`."""
        if self.pending + n > self.max_pending:
            self.metrics.requests.labels("rejected").inc(n)
            raise RouterError(ErrorCode.TOO_MANY_REQUESTS, f"the router has {self.pending} requests in flight; "
                              f"{n} more would pass its limit of {self.max_pending}", retry_after=1)

    def check(self, prompt_ids: list[int], sampling: SamplingParams, max_tokens_given: bool = True) -> SamplingParams:
        """Validate a request against the context limit; fill in max_tokens when not given."""
        n, limit = len(prompt_ids), self.max_model_len
        if n == 0:
            raise RouterError(ErrorCode.BAD_REQUEST, "the prompt is empty", param="prompt")
        if n >= limit:
            raise RouterError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"this model's maximum context length is {limit} "
                              f"tokens; the prompt has {n} tokens (no room left for output)", param="prompt")
        if not max_tokens_given:
            sampling.max_tokens = min(sampling.max_tokens, limit - n) if sampling.max_tokens else limit - n
        elif n + sampling.max_tokens > limit:
            raise RouterError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"this model's maximum context length is {limit} "
                              f"tokens; the prompt has {n} tokens and max_tokens is {sampling.max_tokens} "
                              f"({n + sampling.max_tokens} in total): shorten the prompt or lower max_tokens",
                              param="max_tokens")
        return sampling

    def new_request_id(self, kind: str = "cmpl") -> str:
        """A random 128-bit id: nobody can guess another client's request to abort it."""
        return f"{kind}-{uuid.uuid4().hex}"

    # -- running a request ----------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                       group: ChoiceGroup | None = None, lead: bool = False) -> AsyncIterator[Delta]:
        """Serve one request; yields text deltas, the last with `finish_reason` and `usage`. Raises `RouterError`
        (refused, failed, deadline). `group`: the choices of one prompt (router/choices.py), `lead` the first."""
        if self.pending >= self.max_pending:
            self.metrics.requests.labels("rejected").inc()
            raise RouterError(ErrorCode.TOO_MANY_REQUESTS, f"the router has {self.pending} requests in flight "
                              f"(limit {self.max_pending})", retry_after=1)
        if not self.cluster.engines():
            self.metrics.requests.labels("rejected").inc()
            raise RouterError(ErrorCode.UNAVAILABLE, "no engine is available", retry_after=5)
        self.pending += 1
        self.recorder.arrive(len(prompt_ids))
        t0 = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        status, streamed, code, finish = "aborted", False, "", None
        progress, touched = Progress(), set()
        self.journal.begin(request_id)
        with tracing.detached(f"{type(self.strategy).__name__}.generate", request=request_id,
                              prompt_tokens=len(prompt_ids)) as span, tracing.current(span):
            try:
                async for delta in self._generate(request_id, prompt_ids, sampling, t0, deadline, group, lead,
                                                  progress, touched):
                    streamed = True
                    if delta.finish_reason is not None:
                        status, finish = "success", delta.finish_reason
                    yield delta
            except RouterError as exc:
                # no capacity (no live engine, overloaded) before any output: refused, not failed
                status, code = "rejected" if not streamed and exc.code in NO_CAPACITY else "error", str(exc.code)
                raise
            finally:
                self.pending -= 1
                self._report(request_id, len(prompt_ids), status, code, finish, progress, touched, t0, span)

    def _report(self, rid: str, prompt_tokens: int, status: str, code: str, finish: str | None,
                progress: Progress, touched: set, t0: float, span) -> None:
        """A request ended: metrics, the journal, the access line, the strategy's span."""
        self.metrics.requests.labels(status).inc()
        e2e = time.perf_counter() - t0
        if status == "success":
            self.metrics.e2e.observe(e2e)
            self.metrics.finished.labels(finish or "stop").inc()
            if progress.phases is not None and progress.first_at is not None:  # vLLM's per-phase histograms
                (queue, prefill), decode = progress.phases, time.perf_counter() - progress.first_at
                self.metrics.queue_time.observe(queue)
                self.metrics.prefill_time.observe(prefill)
                self.metrics.decode_time.observe(decode)
                self.metrics.inference_time.observe(prefill + decode)
        ttft = None if progress.first_at is None else progress.first_at - t0
        strategy, engines, output = type(self.strategy).__name__, sorted(h.name for h in touched), len(progress.tokens)
        self.recorder.end(frozenset(h.role for h in touched), status == "success", prompt_tokens, output, ttft, e2e)
        self.journal.end(rid, {"status": status, "code": code or None, "finish_reason": finish, "strategy": strategy,
                               "prompt_tokens": prompt_tokens, "output_tokens": output, "e2e_ms": round(e2e * 1e3, 1),
                               "ttft_ms": None if ttft is None else round(ttft * 1e3, 1)})
        if self.log_requests:
            access(rid, status, code=code, strategy=strategy, engines=engines, prompt=prompt_tokens, output=output,
                   cached=progress.cached, ttft_s=ttft, e2e_s=e2e, finish=finish)
        tracing.set_attrs(span, status=status, code=code, finish_reason=finish, output_tokens=output,
                          cached_tokens=progress.cached, engines=",".join(engines))

    async def _generate(self, rid: str, prompt_ids: list[int], sampling: SamplingParams, t0: float,
                        deadline: float, group: ChoiceGroup | None, lead: bool, progress: Progress,
                        touched: set) -> AsyncIterator[Delta]:
        text = TextStream(self.tokenizer, sampling)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        strategy, generating = await route(group, lead, self.strategy, deadline)
        chunks = run_request(strategy, self.cluster, Request(rid, prompt_ids, sampling),
                             max_retries=self.max_retries, deadline=deadline,
                             on_retry=lambda exc: self.metrics.retries.inc(),
                             on_move=self.metrics.moves.inc, record=touched, generating=generating)
        try:
            async for chunk in chunks:
                if generating is not None:
                    group.led(generating[-1] if generating else None)
                for delta in self._on_chunk(chunk, progress, text, t0):
                    if delta.finish_reason is not None:
                        delta.usage = Usage(len(prompt_ids), len(progress.tokens), progress.cached)
                        self.metrics.generation_tokens.inc(len(progress.tokens))
                        yield delta
                        return  # a stop string: closing `chunks` aborts the request everywhere
                    yield delta
        except EngineCallError as exc:
            raise self._as_router_error(exc) from None
        except RouterError as exc:
            if exc.code == ErrorCode.TIMEOUT:
                exc.message = f"request {rid} did not finish within its deadline of {self.request_timeout:g}s"
            raise
        finally:
            if generating is not None:
                group.led(None)  # NOTE: no-op once led; a lead that failed first lets the others route freely
            await chunks.aclose()

    def _on_chunk(self, chunk: GenerateChunk, progress: Progress, stream: TextStream, t0: float) -> list[Delta]:
        """The chunk's deltas, one per token (an engine may coalesce tokens that piled up; a
        client sees one SSE event per token, as from vLLM, so per-event ITL is TPOT)."""
        now = time.perf_counter()
        if chunk.phases:
            progress.phases = chunk.phases  # NOTE: the engine that generates it (after a retry: the last one)
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
        pieces = [[t] for t in chunk.token_ids] or [[]]
        lps = chunk.logprobs or []
        deltas: list[Delta] = []
        for i, ids in enumerate(pieces):
            final = chunk.finish_reason is not None and i == len(pieces) - 1
            text = stream.push(ids, final, chunk.finish_reason if final else None)
            lp = lps[i:i + 1] if ids and i < len(lps) else None
            if stream.hit is not None:
                deltas.append(Delta(text, ids, "stop", logprobs=lp, stop_reason=stream.hit))
                break
            if final:
                reason = "stop" if chunk.finish_reason == "stop" else chunk.finish_reason
                if reason == "abort":
                    raise RouterError(ErrorCode.ABORTED, "the request was aborted on the engine")
                deltas.append(Delta(text, ids, reason, logprobs=lp,
                                    stop_reason=stream.stop_reason(ids, chunk.finish_reason)))
            elif text or ids:
                deltas.append(Delta(text, ids, logprobs=lp))
        if chunk.prompt_logprobs is not None and deltas:
            deltas[0].prompt_logprobs = chunk.prompt_logprobs
        return deltas

    @staticmethod
    def _as_router_error(exc: EngineCallError) -> RouterError:
        if exc.code == ErrorCode.BAD_REQUEST:
            return RouterError(ErrorCode.BAD_REQUEST, exc.message)
        if exc.code in (ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE):
            return RouterError(exc.code, str(exc), retry_after=2)
        return RouterError(exc.code, f"engine failure: {exc}")
