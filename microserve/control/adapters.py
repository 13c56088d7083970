"""vLLM's runtime LoRA endpoints, on the gateway and behind the admin key (an API client is not an
operator; vLLM gates them behind VLLM_ALLOW_RUNTIME_LORA_UPDATING):

    POST /v1/load_lora_adapter     {"lora_name", "lora_path"}: every live engine loads the PEFT folder
                                   (a path on the engines' hosts); any refusal unloads it from the
                                   engines that took it, and the answer is that refusal (400)
    POST /v1/unload_lora_adapter   {"lora_name"}: every engine holding it unloads it; refused (400) while
                                   requests run under it

Requests under other adapters and the base model go on meanwhile. Engines the deployment starts later
(`ctl scale`, a planner) load the adapters loaded this way before they take traffic. The gateway lists and accepts the
adapter as soon as the engines report it (their stats are polled right after the change).
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import TYPE_CHECKING

from aiohttp import web

from microserve.router.handle import EngineCallError

if TYPE_CHECKING:
    from microserve.control.admin import Admin


def add_routes(admin: Admin, app: web.Application) -> None:
    """The endpoints, each on the model `?model=NAME` names (default: the first; admin.py's `pick`)."""
    async def on_model(call, request: web.Request) -> web.Response:
        if (refused := admin._refused(request)) is not None:  # NOTE: before ?model= is looked at
            return refused
        return await call(admin.pick(request), request)

    app.router.add_post("/v1/load_lora_adapter", partial(on_model, load))
    app.router.add_post("/v1/unload_lora_adapter", partial(on_model, unload))


PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")  # the admin key's, not the API key's


def _text(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                             status=status) if status >= 400 else web.Response(text=message)


async def _name(admin: Admin, request: web.Request, *fields: str) -> list[str] | web.Response:
    if (refused := admin._refused(request)) is not None:
        return refused
    body = await admin._body(request)
    values = [body.get(f) for f in fields]
    for field, value in zip(fields, values):
        if not isinstance(value, str) or not value.strip():
            return _text(400, f"{field} must be a non-empty string")
    return [v.strip() for v in values]


async def load(admin: Admin, request: web.Request) -> web.Response:
    got = await _name(admin, request, "lora_name", "lora_path")
    if isinstance(got, web.Response):
        return got
    name, path = got
    cluster = admin.router.cluster
    engines = [h for h in cluster.handles if h.alive]
    if not engines:
        return _text(503, "no live engine to load the adapter on")
    results = await asyncio.gather(*(h.lora("load", name, path) for h in engines), return_exceptions=True)
    failed = [(h, r) for h, r in zip(engines, results) if isinstance(r, BaseException)]
    if failed:
        took = [h for h, r in zip(engines, results) if not isinstance(r, BaseException)]
        await asyncio.gather(*(h.lora("unload", name) for h in took), return_exceptions=True)
        h, exc = failed[0]
        return _text(400, f"{h.name}: {exc.message if isinstance(exc, EngineCallError) else exc}")
    admin.router.loras[name] = path  # NOTE: engines that `ctl scale` or a planner starts later load it too
    await _refresh(admin)
    admin._done("load_lora", f"LoRA adapter {name!r} loaded from {path} on {len(engines)} engine(s)")
    return _text(200, f"Success: LoRA adapter '{name}' added successfully.")


async def unload(admin: Admin, request: web.Request) -> web.Response:
    got = await _name(admin, request, "lora_name")
    if isinstance(got, web.Response):
        return got
    (name,) = got
    cluster = admin.router.cluster
    holding = [h for h in cluster.handles if h.alive and (st := cluster.load(h).stats) is not None and name in st.loras]
    if not holding:
        return _text(404, f"no engine holds a LoRA adapter {name!r}")
    results = await asyncio.gather(*(h.lora("unload", name) for h in holding), return_exceptions=True)
    admin.router.loras.pop(name, None)
    await _refresh(admin)
    failed = [(h, r) for h, r in zip(holding, results) if isinstance(r, BaseException)]
    if failed:
        h, exc = failed[0]
        return _text(400, f"{h.name}: {exc.message if isinstance(exc, EngineCallError) else exc}")
    admin._done("unload_lora", f"LoRA adapter {name!r} unloaded from {len(holding)} engine(s)")
    return _text(200, f"Success: LoRA adapter '{name}' removed successfully.")


async def _refresh(admin: Admin) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(admin.router.cluster.poll(), 5.0)
