"""The two generation endpoints, `POST /v1/completions` and `POST /v1/chat/completions`.

Each request becomes one router stream per (prompt, choice) (`choices`), merged as they come
(gateway/fanout.py) into an SSE stream (gateway/streaming.py) or one JSON response. Tool calls
and their constraint: gateway/tools.py; per-model defaults: gateway/generation.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from microserve import __version__
from microserve.engine.model.structured import check as check_grammar
from microserve.gateway import fanout, openai_protocol, tools
from microserve.gateway.fanout import best, collect, sum_usage
from microserve.gateway.generation import apply_defaults
from microserve.gateway.served import Served
from microserve.gateway.streaming import sse
from microserve.router.choices import ChoiceGroup
from microserve.router.deltas import Delta
from microserve.router.runtime import Router, RouterError
from microserve.sampling_params import SamplingParams
from microserve.serving.api import ErrorCode
from microserve.text import InvalidRequestError

if TYPE_CHECKING:
    from microserve.gateway.app import Gateway

MAX_PROMPTS = 256  # prompts x choices in one request
FINGERPRINT = f"microserve-{__version__}"  # responses' `system_fingerprint`: the serving software's version


def check_ids_only(m: Served, sampling: SamplingParams) -> None:
    if m.ids_only and sampling.stop:
        raise RouterError(ErrorCode.BAD_REQUEST, "stop strings need the tokenizer, and this server runs without "
                          "one (--skip-tokenizer-init): use stop_token_ids", param="stop")


def choices(router: Router, rid: str, prompts: list[list[int]],
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


async def completions(gw: Gateway, request: web.Request) -> web.StreamResponse:
    body: openai_protocol.CompletionRequest = await gw.bodies.parse(request, openai_protocol.CompletionRequest)
    m, model, lora = await gw.models.target(body.model)
    body.check_unsupported()
    sampling, given = body.sampling(body.max_tokens, 16, body.logprobs)
    sampling.lora = lora
    apply_defaults(body, sampling, m.defaults)
    check_ids_only(m, sampling)
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
    streams = choices(m.router, rid, prompts, params)
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
                         [len(p) for p in prompts for _ in range(sampling.n)], sampling.n, gw.http_status)
    results = best(await collect(streams), len(prompts), sampling)
    return web.json_response(base | {
        "choices": [{"index": i, "text": echo[i] + r.text, "finish_reason": r.reason, "stop_reason": r.stop_reason,
                     "logprobs": fanout.result_logprobs(body, name, ids_of[i], r)}
                    | ({"prompt_logprobs": fanout.vllm_prompt_logprobs(name, ids_of[i], r.prompt_logprobs or [])}
                       if body.prompt_logprobs is not None else {})
                    | ({"token_ids": r.ids, "prompt_token_ids": ids_of[i]}
                       if body.return_token_ids or m.ids_only else {})
                    for i, r in enumerate(results)],
        "usage": openai_protocol.usage_json(sum_usage([r.usage for r in results], sampling.n))})


def _tool_constraint(mode: str, fname: str | None, tool_list: list, sampling: SamplingParams):
    """The output constraint of a named or required tool_choice (checked: it compiles)."""
    if sampling.structured is not None:
        raise RouterError(ErrorCode.BAD_REQUEST, "a named or required tool_choice already constrains the "
                          "output: drop the structured output", param="tool_choice")
    structured = tools.constraint(mode, fname, tool_list)
    try:
        check_grammar(structured)
    except InvalidRequestError as exc:
        raise RouterError(ErrorCode.BAD_REQUEST, f"the tools' schemas do not compile: {exc}", param="tools") from None
    return structured


async def chat_completions(gw: Gateway, request: web.Request) -> web.StreamResponse:
    body: openai_protocol.ChatCompletionRequest = await gw.bodies.parse(request, openai_protocol.ChatCompletionRequest)
    m, model, lora = await gw.models.target(body.model)
    body.check_unsupported()
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling, given = body.sampling(max_tokens, m.router.max_model_len, body.logprobs_k())
    sampling.lora = lora
    apply_defaults(body, sampling, m.defaults)
    check_ids_only(m, sampling)
    if sampling.n > MAX_PROMPTS:
        raise RouterError(ErrorCode.BAD_REQUEST, f"n may be at most {MAX_PROMPTS}", param="n")
    m.router.admit(sampling.n)
    messages = body.chat_messages()
    mode, fname = tools.plan(body.tools, body.tool_choice, m.router.tokenizer.chat_template, body.stream)
    options = body.template_options()
    if body.tools:
        options["kwargs"]["tools"] = body.tools
    if mode in ("named", "required"):
        sampling.structured = _tool_constraint(mode, fname, body.tools, sampling)
    prompt = body.truncate(await m.router.encode_chat(messages, options))
    sampling = m.router.check(prompt, sampling, given)
    rid = m.router.new_request_id("chatcmpl")
    streams = choices(m.router, rid, [prompt], [sampling])
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
                         body.stream_options, [len(prompt)] * sampling.n, sampling.n, gw.http_status)
    results = await collect(streams)
    finished = [tools.message(mode, fname, r.text, r.reason) if mode else
                ({"role": "assistant", "content": echo + r.text}, r.reason) for r in results]
    return web.json_response(base | {
        "choices": [{"index": i, "message": finished[i][0], "finish_reason": finished[i][1],
                     "stop_reason": r.stop_reason,
                     "logprobs": fanout.chat_logprobs(name, r.ids, r.logprobs) if body.logprobs else None}
                    | ({"token_ids": r.ids} if body.return_token_ids or m.ids_only else {})
                    for i, r in enumerate(results)],
        "usage": openai_protocol.usage_json(sum_usage([r.usage for r in results], sampling.n))}
        | ({"prompt_token_ids": prompt} if body.return_token_ids or m.ids_only else {})
        | ({"prompt_logprobs": fanout.vllm_prompt_logprobs(name, prompt, results[0].prompt_logprobs or [])}
           if body.prompt_logprobs is not None else {}))
