"""The OpenAI-compatible gateway: aiohttp in front of a `Router`.

    POST /v1/completions        POST /v1/chat/completions     (stream: SSE, `data: [DONE]`)
    POST /v1/responses          (OpenAI's Responses API: gateway/responses.py)
    GET  /v1/models             GET  /health                  GET /metrics (Prometheus text)
    POST /tokenize              POST /detokenize              (vLLM's token endpoints)

Errors use OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`): 400 bad
input, 401 missing/wrong API key, 404 unknown model or path, 429 router full
(Retry-After), 503 no engine / engines overloaded (Retry-After), 504 deadline.
Streams: gateway/streaming.py (one event per token; a failure before the first token is a
real HTTP status, after it an `error` event). A client that disconnects cancels its handler
(aiohttp `handler_cancellation`), which aborts the request on every engine it touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import msgspec
from aiohttp import web

from microserve import __version__
from microserve.control import adapters
from microserve.control.admin import Admin
from microserve.engine.model.structured import check as check_grammar
from microserve.gateway import fanout, info, openai_protocol, responses, tools
from microserve.gateway.bodies import MAX_BODY_BYTES, Bodies, BodyTooLarge, BodyTooSlow
from microserve.gateway.fanout import best as _best
from microserve.gateway.fanout import collect as _collect
from microserve.gateway.fanout import sum_usage as _sum_usage
from microserve.gateway.generation import apply_defaults
from microserve.gateway.observe import observe, refused
from microserve.gateway.served import Served, ServedModels
from microserve.gateway.streaming import sse
from microserve.router.choices import ChoiceGroup
from microserve.router.deltas import Delta
from microserve.router.metrics import render_models
from microserve.router.runtime import Router, RouterError
from microserve.sampling_params import SamplingParams
from microserve.serving.api import ErrorCode
from microserve.text import InvalidRequestError

log = logging.getLogger(__name__)

MAX_PROMPTS = 256  # prompts in one /v1/completions request
FINGERPRINT = f"microserve-{__version__}"  # responses' `system_fingerprint`: the serving software's version
# the one code -> HTTP status table (engine failures after the first token still end the stream
# with an `error` event carrying the code)
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400, ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400, ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_API_KEY: 401, ErrorCode.FORBIDDEN: 403, ErrorCode.NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404, ErrorCode.TOO_MANY_REQUESTS: 429,
    ErrorCode.INTERNAL: 502, ErrorCode.TRANSFER_FAILED: 502, ErrorCode.KV_SPEC_MISMATCH: 502,
    ErrorCode.STRATEGY_ERROR: 502, ErrorCode.OVERLOADED: 503, ErrorCode.UNAVAILABLE: 503, ErrorCode.ABORTED: 503,
    ErrorCode.TIMEOUT: 504,
}


class Gateway:
    """HTTP front of one router per model (gateway/served.py).

    Args:
        models: the models served (a `Served` or several: `launch --config`); a request that names no
            model goes to the first.
        api_key: when set, /v1/* requires `Authorization: Bearer <api_key>`.
        admin_key: the key of /admin/* (never `api_key`; None: the admin API is off).
        allow_code_upload: `PUT /admin/strategy` may carry Python source.
        metrics_key: when set, /metrics requires `Authorization: Bearer <metrics_key>`.
    """

    def __init__(self, models: Served | list[Served], api_key: str | None = None,
                 admin_key: str | None = None, *, allow_code_upload: bool = False,
                 metrics_key: str | None = None) -> None:
        models = [models] if isinstance(models, Served) else list(models)
        self.models = ServedModels(models[0])
        for m in models[1:]:
            self.models.add(m)
        # the first model's router also counts the gateway's own series (HTTP requests, refusals)
        self.router, self.model_name = models[0].router, models[0].name
        self.api_key, self.metrics_key = api_key, metrics_key
        self.admin = Admin({m.name: m.router for m in models}, admin_key, allow_code_upload)  # control/admin.py
        if not admin_key:
            log.log(logging.WARNING if api_key else logging.INFO, "the admin API is off (no --admin-key; the API "
                    "key never opens it); engines with the cluster's join token may still join")
        self.bodies = Bodies()  # request bodies: size and rate limits, upload slots (gateway/bodies.py)

    async def _read(self, request: web.Request) -> bytes:
        return await self.bodies.read(request)

    async def _decode(self, body: bytes, kind):
        return await self.bodies.decode(body, kind)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[observe(self.router.metrics), self._errors], client_max_size=MAX_BODY_BYTES)
        app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/responses", self.responses),
            web.get("/v1/models", partial(info.models, self)),
            web.post("/tokenize", partial(info.tokenize, self)),
            web.post("/detokenize", partial(info.detokenize, self)),
            web.get("/health", partial(info.health, self)),
            web.get("/metrics", self.metrics),
            web.get("/version", partial(info.version, self)),
        ])
        self.admin.add_routes(app)
        return app

    # -- middleware ---------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Keys, then the handler; every refusal or failure becomes OpenAI's error JSON and one log line
        with its status and code (INFO for 4xx, WARNING for 5xx)."""
        key = self.metrics_key if request.path == "/metrics" else self.api_key if (
            (request.path.startswith("/v1/") and request.path not in adapters.PATHS)
            or request.path in ("/tokenize", "/detokenize")) else None
        if key:
            auth = request.headers.get("Authorization", "")
            # NOTE: bytes compare (a non-ASCII header is a 401, not a 500)
            if not hmac.compare_digest(auth.encode("utf-8", "surrogateescape"), f"Bearer {key}".encode()):
                return self._refuse(request, RouterError(ErrorCode.INVALID_API_KEY,
                                                    "missing or wrong API key (send 'Authorization: Bearer KEY')"))
        try:
            return await handler(request)
        except RouterError as exc:
            return self._refuse(request, exc)
        except BodyTooLarge as exc:
            return self._refuse(request, RouterError(ErrorCode.BAD_REQUEST, str(exc)), 413)
        except BodyTooSlow as exc:
            return self._refuse(request, RouterError(ErrorCode.BAD_REQUEST, str(exc)), 408)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = ErrorCode.NOT_FOUND if exc.status == 404 else ErrorCode.INVALID_REQUEST
            message = f"{exc.reason}: {request.method} {request.path}"
            return self._refuse(request, RouterError(code, message), exc.status)

    def _refuse(self, request: web.Request, exc: RouterError, status: int | None = None) -> web.Response:
        """The error response, logged (gateway/observe.py) and counted by reason."""
        resp = _error(exc, status)
        refused(request, resp.status, exc, self.router.metrics)
        return resp

    # -- endpoints ----------------------------------------------------------------------
    async def metrics(self, request: web.Request) -> web.Response:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(m.router.cluster.poll() for m in self.models.all)), 2.0)
        return web.Response(body=render_models([(m.router.metrics, m.name) for m in self.models.all]),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def _check_ids_only(self, m: Served, sampling: SamplingParams) -> None:
        if m.ids_only and sampling.stop:
            raise RouterError(ErrorCode.BAD_REQUEST, "stop strings need the tokenizer, and this server runs without "
                              "one (--skip-tokenizer-init): use stop_token_ids", param="stop")

    async def _target(self, model: str | None) -> tuple[Served, str, str | None]:
        """The model a request runs on, the name its response carries, and its LoRA adapter (or None)."""
        return await self.models.target(model)

    def _choices(self, router: Router, rid: str, prompts: list[list[int]],
                 params: list[SamplingParams]) -> list[AsyncIterator[Delta]]:
        """One stream per (prompt, choice): n (or best_of) requests per prompt sharing its KV through
        the prefix cache; choice j of a seeded request uses seed + j (as vLLM)."""
        streams = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            count = max(sp.n, sp.best_of or 1)
            group = ChoiceGroup() if count > 1 else None  # NOTE: one prefill for all of them (router/choices.py)
            for j in range(count):
                one = msgspec.structs.replace(sp, n=1, best_of=None,
                                              seed=None if sp.seed is None else sp.seed + j)
                if count > sp.n and one.logprobs is None:
                    one.logprobs = 0  # best_of ranks the choices by their cumulative logprob
                k = i * count + j
                streams.append(router.generate(f"{rid}-{k}" if len(prompts) * count > 1 else rid, prompt, one,
                                               group, j == 0))
        return streams

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body: openai_protocol.CompletionRequest = await self._decode(await self._read(request),
                                                                     openai_protocol.CompletionRequest)
        m, model, lora = await self._target(body.model)
        body.check_unsupported()
        sampling, given = body.sampling(body.max_tokens, 16, body.logprobs)
        sampling.lora = lora
        apply_defaults(body, sampling, m.defaults)
        self._check_ids_only(m, sampling)
        texts = body.prompts(m.router.max_model_len)
        count = len(texts) * max(sampling.n, sampling.best_of or 1)
        if count > MAX_PROMPTS:
            raise RouterError(ErrorCode.BAD_REQUEST, f"at most {MAX_PROMPTS} prompts x choices per request, got "
                              f"{count}", param="prompt" if len(texts) > 1 else "n")
        m.router.admit(count)  # --max-pending counts choices, not HTTP requests
        special = body.add_special_tokens is not False
        prompts = [body.truncate(await m.router.encode(p, special)) for p in texts]
        params = [m.router.check(p, msgspec.structs.replace(sampling), given) for p in prompts]
        rid = m.router.new_request_id("cmpl")
        streams = self._choices(m.router, rid, prompts, params)
        base = {"id": body.request_id or rid, "object": "text_completion", "created": openai_protocol.now(),
                "model": model, "system_fingerprint": FINGERPRINT}
        tok = m.router.tokenizer
        name = fanout.token_namer(tok, body.return_tokens_as_token_ids or m.ids_only)
        echo = [tok.decode(p) if body.echo else "" for p in prompts for _ in range(sampling.n)]
        offsets = [0] * len(streams)
        ids_of = [p for p in prompts for _ in range(sampling.n)]

        def choice(i: int, d: Delta) -> dict[str, Any]:
            lp, extra = None, {}
            if body.logprobs is not None and d.prompt_logprobs is not None and body.echo:
                lp = fanout.echo_logprobs(name, ids_of[i], d.prompt_logprobs, d.token_ids, d.logprobs or [])
            elif body.logprobs is not None and d.logprobs:
                lp = fanout.completion_logprobs(name, d.token_ids, d.logprobs, offsets[i] + len(echo[i]))
            if body.prompt_logprobs is not None and d.prompt_logprobs is not None:
                extra["prompt_logprobs"] = fanout.vllm_prompt_logprobs(name, ids_of[i], d.prompt_logprobs)
            offsets[i] += len(echo[i]) + len(d.text)
            text, echo[i] = echo[i] + d.text, ""
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": d.finish_reason,
                    "stop_reason": d.stop_reason} | extra | (
                {"token_ids": d.token_ids} if body.return_token_ids or m.ids_only else {})

        if body.stream:
            return await sse(request, streams, base, choice, body.stream_options,
                             [len(p) for p in prompts for _ in range(sampling.n)], sampling.n, _status)
        results = _best(await _collect(streams), len(prompts), sampling)
        return web.json_response(base | {
            "choices": [{"index": i, "text": echo[i] + r.text, "finish_reason": r.reason, "stop_reason": r.stop_reason,
                         "logprobs": fanout.result_logprobs(body, name, ids_of[i], r)}
                        | ({"prompt_logprobs": fanout.vllm_prompt_logprobs(name, ids_of[i], r.prompt_logprobs or [])}
                           if body.prompt_logprobs is not None else {})
                        | ({"token_ids": r.ids, "prompt_token_ids": ids_of[i]}
                           if body.return_token_ids or m.ids_only else {})
                        for i, r in enumerate(results)],
            "usage": openai_protocol.usage_json(_sum_usage([r.usage for r in results], sampling.n))})

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API (gateway/responses.py)."""
        return await responses.handle(self, request)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body: openai_protocol.ChatCompletionRequest = await self._decode(await self._read(request),
                                                                         openai_protocol.ChatCompletionRequest)
        m, model, lora = await self._target(body.model)
        body.check_unsupported()
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sampling, given = body.sampling(max_tokens, m.router.max_model_len, body.logprobs_k())
        sampling.lora = lora
        apply_defaults(body, sampling, m.defaults)
        self._check_ids_only(m, sampling)
        if sampling.n > MAX_PROMPTS:
            raise RouterError(ErrorCode.BAD_REQUEST, f"n may be at most {MAX_PROMPTS}", param="n")
        m.router.admit(sampling.n)
        messages = body.chat_messages()
        mode, fname = tools.plan(body.tools, body.tool_choice, m.router.tokenizer.chat_template, body.stream)
        options = body.template_options()
        if body.tools:
            options["kwargs"]["tools"] = body.tools
        if mode in ("named", "required"):
            if sampling.structured is not None:
                raise RouterError(ErrorCode.BAD_REQUEST, "a named or required tool_choice already constrains the "
                                  "output: drop the structured output", param="tool_choice")
            sampling.structured = tools.constraint(mode, fname, body.tools)
            try:
                check_grammar(sampling.structured)
            except InvalidRequestError as exc:
                raise RouterError(ErrorCode.BAD_REQUEST, f"the tools' schemas do not compile: {exc}",
                                  param="tools") from None
        prompt = body.truncate(await m.router.encode_chat(messages, options))
        sampling = m.router.check(prompt, sampling, given)
        rid = m.router.new_request_id("chatcmpl")
        streams = self._choices(m.router, rid, [prompt], [sampling])
        base = {"id": body.request_id or rid, "object": "chat.completion", "created": openai_protocol.now(),
                "model": model, "system_fingerprint": FINGERPRINT}
        name = fanout.token_namer(m.router.tokenizer, body.return_tokens_as_token_ids or m.ids_only)
        # vLLM's chat echo: the reply starts with the last message when it is the assistant's
        echo = messages[-1]["content"] if body.echo and messages[-1]["role"] == "assistant" else ""
        if body.stream:
            first = [True] * len(streams)
            parsers = [tools.ToolStream(mode, fname) for _ in streams] if mode else None  # tool calls as they close

            def choice(i: int, d: Delta) -> dict[str, Any]:
                if parsers is not None:
                    delta, reason = parsers[i].push(d.text, d.finish_reason)
                else:
                    delta, reason = {"content": d.text} if d.text or d.finish_reason is None else {}, d.finish_reason
                if first[i]:
                    delta, first[i] = {"role": "assistant", "content": echo + delta.pop("content", "")} | delta, False
                lp = fanout.chat_logprobs(name, d.token_ids, d.logprobs) if body.logprobs and d.logprobs else None
                return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason,
                        "stop_reason": d.stop_reason} | (
                    {"token_ids": d.token_ids} if body.return_token_ids or m.ids_only else {})

            return await sse(request, streams, base | {"object": "chat.completion.chunk"}, choice,
                             body.stream_options, [len(prompt)] * sampling.n, sampling.n, _status)
        results = await _collect(streams)
        finished = [tools.message(mode, fname, r.text, r.reason) if mode else
                    ({"role": "assistant", "content": echo + r.text}, r.reason) for r in results]
        return web.json_response(base | {
            "choices": [{"index": i, "message": finished[i][0], "finish_reason": finished[i][1],
                         "stop_reason": r.stop_reason,
                         "logprobs": fanout.chat_logprobs(name, r.ids, r.logprobs) if body.logprobs else None}
                        | ({"token_ids": r.ids} if body.return_token_ids or m.ids_only else {})
                        for i, r in enumerate(results)],
            "usage": openai_protocol.usage_json(_sum_usage([r.usage for r in results], sampling.n))}
            | ({"prompt_token_ids": prompt} if body.return_token_ids or m.ids_only else {})
            | ({"prompt_logprobs": fanout.vllm_prompt_logprobs(name, prompt, results[0].prompt_logprobs or [])}
               if body.prompt_logprobs is not None else {}))


def _status(exc: RouterError) -> int:
    return HTTP_STATUS[exc.code]


def _error(exc: RouterError, status: int | None = None) -> web.Response:
    status = status or HTTP_STATUS[exc.code]
    headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after is not None else None
    return web.json_response(openai_protocol.error_body(status, exc.message, exc.code, exc.param), status=status,
                             headers=headers)


async def serve(gateway: Gateway, host: str = "127.0.0.1", port: int = 8000) -> tuple[web.AppRunner, int]:
    """Start the gateway; returns the runner (call `cleanup()` to stop) and the bound port."""
    runner = web.AppRunner(gateway.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound
