"""Server-sent events of the gateway's streamed responses (completions and chat).

One event per generated token, as vLLM streams: a token that does not complete a character yet (a
byte-level piece of a multi-byte character) or text held back under a stop string goes out with
empty text, so per-event timings (`vllm bench serve`, guidellm) read one token per event. The
response starts only with the first event, so a request that fails before any token gets a real
HTTP status; a failure after that ends the stream with an `error` event.
`stream_options.include_usage` adds the final usage chunk; `continuous_usage_stats` puts each
choice's running usage on every chunk (vLLM's field).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from microserve.gateway import openai_protocol
from microserve.gateway.fanout import merge, sum_usage
from microserve.router.deltas import Delta
from microserve.router.runtime import RouterError
from microserve.serving.api import ErrorCode

log = logging.getLogger(__name__)


async def sse(request: web.Request, streams: list[AsyncIterator[Delta]], base: dict[str, Any],
              choice: Callable[[int, Delta], dict[str, Any]], options: openai_protocol.StreamOptions | None,
              prompt_tokens: list[int], n: int, status: Callable[[RouterError], int]) -> web.StreamResponse:
    """Stream `streams` (choice i from stream i) as OpenAI chunks of `base` with `choice(i, delta)`;
    `prompt_tokens[i]` is stream i's prompt length (for running usage)."""
    merged = merge(streams)
    include = bool(options and options.include_usage)
    running = include and bool(options and options.continuous_usage_stats)
    usages, produced = [], [0] * len(streams)
    resp: web.StreamResponse | None = None
    try:
        async for i, item in merged:
            if isinstance(item, RouterError):
                if resp is None:
                    raise item  # nothing sent yet: a real HTTP error status
                await send(resp, openai_protocol.error_body(status(item), item.message, item.code))
                break
            if not (item.text or item.token_ids or item.finish_reason is not None or item.logprobs):
                continue
            if resp is None:
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache", "X-Request-Id": base["id"]})
                await resp.prepare(request)
            if item.usage is not None:
                usages.append(item.usage)
            produced[i] += len(item.token_ids)
            usage = None
            if running:
                usage = {"prompt_tokens": prompt_tokens[i], "completion_tokens": produced[i],
                         "total_tokens": prompt_tokens[i] + produced[i]}
            await send(resp, base | {"choices": [choice(i, item)]} | ({"usage": usage} if include else {}))
        else:
            if include and resp is not None:
                await send(resp, base | {"choices": [], "usage": openai_protocol.usage_json(sum_usage(usages, n))})
        if resp is None:
            raise RouterError(ErrorCode.INTERNAL, "the request ended without any output")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    except (ConnectionResetError, asyncio.CancelledError):
        log.info("client of %s went away; request aborted", base["id"])
        raise
    finally:
        await merged.aclose()


async def send(resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")
