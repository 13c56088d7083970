"""The gateway's informational endpoints: `/v1/models`, `/version`, `/tokenize`, `/detokenize`, `/health`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from microserve import __version__
from microserve.gateway import openai_protocol
from microserve.router.runtime import RouterError
from microserve.serving.api import ErrorCode

if TYPE_CHECKING:
    from microserve.gateway.app import Gateway


async def models(gw: Gateway, request: web.Request) -> web.Response:
    """As vLLM's, one entry per served name (`root`: the checkpoint its engines serve, `parent` None),
    then one per LoRA adapter those engines hold (`parent`: the base model's name); every model of the
    gateway in turn."""
    created = openai_protocol.now()
    entries = []
    for m in gw.models.all:
        health = next(iter(m.router.cluster.health.values()), None)
        root = health.model if health is not None else m.name
        entries += [(name, root, None, m.router.max_model_len) for name in m.names]
        entries += [(a, a, m.name, m.router.max_model_len) for a in sorted(m.adapters())]
    return web.json_response({"object": "list", "data": [{
        "id": name, "object": "model", "created": created, "owned_by": "microserve",
        "root": root, "parent": parent, "max_model_len": max_model_len,
        "permission": [{"id": f"modelperm-{name}", "object": "model_permission", "created": created,
                        "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                        "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                        "organization": "*", "group": None, "is_blocking": False}]}
        for name, root, parent, max_model_len in entries]})


async def version(gw: Gateway, request: web.Request) -> web.Response:
    """vLLM's `/version`."""
    return web.json_response({"version": __version__})


async def tokenize(gw: Gateway, request: web.Request) -> web.Response:
    """vLLM's `/tokenize`: `prompt` (text) or chat `messages` -> token ids."""
    body: openai_protocol.TokenizeRequest = await gw.bodies.parse(request, openai_protocol.TokenizeRequest)
    router = gw.models.by_name(body.model).router
    if (body.prompt is None) == (body.messages is None):
        raise RouterError(ErrorCode.BAD_REQUEST, "give exactly one of prompt and messages", param="prompt")
    if body.prompt is not None:
        tokens = await router.encode(body.prompt, body.add_special_tokens)
    else:
        tokens = await router.encode_chat(openai_protocol.ChatCompletionRequest(messages=body.messages).chat_messages())
    return web.json_response({"count": len(tokens), "max_model_len": router.max_model_len,
                              "tokens": tokens, "token_strs": None})


async def detokenize(gw: Gateway, request: web.Request) -> web.Response:
    """vLLM's `/detokenize`: token ids -> text."""
    body: openai_protocol.DetokenizeRequest = await gw.bodies.parse(request, openai_protocol.DetokenizeRequest)
    m = gw.models.by_name(body.model)
    if m.ids_only:
        raise RouterError(ErrorCode.BAD_REQUEST, "this server runs without a tokenizer (--skip-tokenizer-init)",
                          param="tokens")
    tokens = m.router.tokenize(body.tokens) if body.tokens else []
    return web.json_response({"prompt": m.router.tokenizer.decode(tokens, skip_special_tokens=False)})


async def health(gw: Gateway, request: web.Request) -> web.Response:
    """200 while every role of every model has a live engine, else 503 (`degraded`)."""
    clusters = [m.router.cluster for m in gw.models.all]
    engines = {h.name: "up" if h.alive else "down" for c in clusters for h in c.handles}
    ok = all(any(h.alive for h in hs) for c in clusters for hs in c.roles.values())
    return web.json_response({"status": "ok" if ok else "degraded", "engines": engines}, status=200 if ok else 503)
