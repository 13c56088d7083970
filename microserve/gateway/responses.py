"""OpenAI's Responses API, `POST /v1/responses`, over the same path as chat completions.

    input (a string, or message items) + instructions ──> chat messages ──> the chat template
        ──> the strategy, as a chat request ──> a `response` object, or its event stream:
            response.created, .in_progress, .output_item.added, .content_part.added,
            .output_text.delta (one per piece of text), .output_text.done, .content_part.done,
            .output_item.done, then response.completed (or response.incomplete at
            max_output_tokens; an `error` event when the request fails mid-stream)

Supported: text input and message lists (content as a string or `input_text` / `output_text`
parts), `instructions`, `max_output_tokens`, `temperature`, `top_p`, `stream`, `text.format`
(text, json_object, json_schema), `metadata`, `user`, `store: false`. Nothing is stored, so
`store: true`, `previous_response_id` and `background` are refused; so are tools, reasoning and
any other field, each with a 400 that names it.
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from microserve.gateway import openai_protocol
from microserve.gateway.fanout import collect, merge
from microserve.gateway.generation import apply_defaults
from microserve.router.deltas import Usage
from microserve.router.runtime import RouterError
from microserve.serving.api import ErrorCode

if TYPE_CHECKING:
    from microserve.gateway.app import Gateway

BAD = ErrorCode.BAD_REQUEST
# fields OpenAI defines that this server does not serve: a non-null value is a 400 naming the field
REFUSED = ("previous_response_id", "tools", "reasoning", "include", "background", "conversation", "prompt",
           "top_logprobs", "truncation", "service_tier", "max_tool_calls", "prompt_cache_key", "safety_identifier")


class ResponsesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    input: str | list[dict[str, Any]]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: dict[str, Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    previous_response_id: Any = None
    tools: Any = None
    reasoning: Any = None
    include: Any = None
    background: Any = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: Any = None
    truncation: Any = None
    service_tier: Any = None
    max_tool_calls: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    stream_options: Any = None

    def check(self) -> None:
        for name in REFUSED:
            value = getattr(self, name)
            if value is not None and not (name in ("tools", "include") and value == []) \
                    and not (name == "truncation" and value == "disabled"):
                raise RouterError(BAD, f"{name} is not supported on /v1/responses", param=name)
        if self.store:
            raise RouterError(BAD, "this server stores no responses: send store=false", param="store")
        if self.tool_choice not in (None, "none", "auto"):
            raise RouterError(BAD, "tool_choice needs tools, which /v1/responses does not support",
                              param="tool_choice")
        if self.stream_options is not None and not self.stream:
            raise RouterError(BAD, "stream_options is only allowed with stream=true", param="stream_options")

    def messages(self) -> list[openai_protocol.ChatMessage]:
        """The chat messages: `instructions` as the system message, then the input."""
        out = [openai_protocol.ChatMessage("system", self.instructions)] if self.instructions else []
        if isinstance(self.input, str):
            return out + [openai_protocol.ChatMessage("user", self.input)]
        for item in self.input:
            kind = item.get("type", "message")
            if kind != "message" or not isinstance(item.get("role"), str):
                raise RouterError(BAD, f"unsupported input item type {kind!r}: only messages (a role and content)",
                                  param="input")
            content = item.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                            or not isinstance(part.get("text"), str):
                        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                        raise RouterError(BAD, f"unsupported content part {kind!r}: only input_text and output_text",
                                          param="input")
                    parts.append(part["text"])
                content = "".join(parts)
            elif not isinstance(content, str):
                raise RouterError(BAD, "a message's content must be a string or a list of text parts", param="input")
            role = "system" if item["role"] == "developer" else item["role"]
            out.append(openai_protocol.ChatMessage(role, content))
        if not out:
            raise RouterError(BAD, "input is empty", param="input")
        return out

    def chat(self) -> openai_protocol.ChatCompletionRequest:
        """The same request as a chat completion."""
        return openai_protocol.ChatCompletionRequest(
            messages=self.messages(), model=self.model, temperature=self.temperature, top_p=self.top_p,
            max_completion_tokens=self.max_output_tokens, stream=self.stream, response_format=self._format())

    def _format(self) -> dict[str, Any] | None:
        fmt = (self.text or {}).get("format")
        if fmt is None or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_object":
            return {"type": "json_object"}
        if fmt.get("type") == "json_schema":
            return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
        raise RouterError(BAD, f"unsupported text.format type {fmt.get('type')!r}", param="text")


async def handle(gw: Gateway, request: web.Request) -> web.StreamResponse:
    body: ResponsesRequest = await gw.bodies.parse(request, ResponsesRequest)
    m, model, lora = await gw.models.target(body.model)
    body.check()
    chat = body.chat()
    sampling, given = chat.sampling(chat.max_completion_tokens, m.router.max_model_len)
    sampling.lora = lora
    apply_defaults(body, sampling, m.defaults)
    m.router.admit(1)
    prompt = await m.router.encode_chat(chat.chat_messages(), chat.template_options())
    sampling = m.router.check(prompt, sampling, given)
    rid = m.router.new_request_id("resp")
    stream = m.router.generate(rid, prompt, sampling)
    response = {"id": rid, "object": "response", "created_at": openai_protocol.now(), "status": "in_progress",
                "model": model, "output": [], "instructions": body.instructions,
                "max_output_tokens": body.max_output_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "tools": [], "tool_choice": "auto",
                "parallel_tool_calls": True, "text": body.text or {"format": {"type": "text"}}, "store": False,
                "metadata": body.metadata or {}, "user": body.user, "error": None, "incomplete_details": None,
                "usage": None, "background": False, "previous_response_id": None, "reasoning": None}
    msg_id = "msg_" + secrets.token_hex(12)
    if not body.stream:
        (result,) = await collect([stream])
        return web.json_response(_finished(response, msg_id, result.text, result.reason, result.usage))
    return await _stream(request, response, msg_id, stream)


def _message(msg_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _finished(response: dict[str, Any], msg_id: str, text: str, reason: str | None, usage: Usage) -> dict[str, Any]:
    incomplete = reason == "length"
    return response | {
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": [_message(msg_id, text, "incomplete" if incomplete else "completed")],
        "usage": {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                  "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": usage.total_tokens}}


async def _stream(request: web.Request, response: dict[str, Any], msg_id: str, stream) -> web.StreamResponse:
    merged = merge([stream])
    resp: web.StreamResponse | None = None
    seq = 0

    async def event(kind: str, **fields: Any) -> None:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq} | fields
        seq += 1
        await resp.write(f"event: {kind}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode()
                         + b"\n\n")

    where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    text: list[str] = []
    try:
        async for _, item in merged:
            if isinstance(item, RouterError):
                if resp is None:
                    raise item
                await event("error", code=item.code, message=item.message, param=item.param)
                break
            if resp is None:
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                   "X-Request-Id": response["id"]})
                await resp.prepare(request)
                await event("response.created", response=response)
                await event("response.in_progress", response=response)
                await event("response.output_item.added", output_index=0, item=_message(msg_id, "", "in_progress")
                            | {"content": []})
                await event("response.content_part.added", **where,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            if item.text:
                text.append(item.text)
                await event("response.output_text.delta", **where, delta=item.text, logprobs=[])
            if item.finish_reason is not None:
                done = _finished(response, msg_id, "".join(text), item.finish_reason, item.usage)
                part = done["output"][0]["content"][0]
                await event("response.output_text.done", **where, text=part["text"], logprobs=[])
                await event("response.content_part.done", **where, part=part)
                await event("response.output_item.done", output_index=0, item=done["output"][0])
                await event(f"response.{done['status']}", response=done)
        if resp is None:
            raise RouterError(ErrorCode.INTERNAL, "the request ended without any output")
        await resp.write_eof()
        return resp
    finally:
        await merged.aclose()
