"""Python SDK.

`AsyncClient` talks to a microserve gateway (or any OpenAI-compatible server):

    async with microserve.AsyncClient("http://127.0.0.1:8000") as client:
        out = await client.completions("Hello", max_tokens=16, temperature=0)
        print(out.text, out.finish_reason, out.usage)
        async for piece in client.stream_chat([{"role": "user", "content": "Hi"}], max_tokens=16):
            print(piece.text, end="")

`connect` builds a started `Cluster` over running engines, to script the
microserving calls directly (a notebook, a test, a custom driver):

    cluster = await microserve.connect({"prefill": ["tcp://127.0.0.1:5601"], "decode": ["tcp://127.0.0.1:5602"]})
    d = cluster.least_loaded("decode")
    ticket = await d.prep_recv(req, end=-1)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from microserve.router.cluster import Cluster
from microserve.router.handle import EngineHandle


class APIError(RuntimeError):
    """The server answered with an error (`status` is the HTTP status; 0 for a mid-stream error)."""

    def __init__(self, status: int, message: str, type_: str | None = None, code: str | None = None) -> None:
        super().__init__(f"{status} {type_ or 'error'}: {message}")
        self.status, self.message, self.type, self.code = status, message, type_, code


@dataclass
class Completion:
    """One finished completion (or, from `stream_*`, one piece of it)."""

    id: str
    text: str
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


class AsyncClient:
    """Client of an OpenAI-compatible gateway.

    Args:
        base_url: e.g. "http://127.0.0.1:8000" (a trailing "/v1" is accepted).
        api_key: sent as `Authorization: Bearer ...` when set.
        model: default `model` field (default: the first model the server lists).
        timeout: total seconds per request.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, model: str | None = None,
                 timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key, self.model = api_key, model
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._session = aiohttp.ClientSession(headers=headers, timeout=self._timeout)
        return self._session

    @contextlib.asynccontextmanager
    async def _call(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        """One HTTP call; a server that cannot be reached is an `APIError` too (status 0)."""
        try:
            async with self._http().request(method, self.base_url + path, **kwargs) as resp:
                yield resp
        except aiohttp.ClientConnectionError as exc:
            raise APIError(0, f"cannot reach {self.base_url}: {exc}", "connection_error", None) from None

    async def models(self) -> list[str]:
        async with self._call("GET", "/v1/models") as resp:
            body = await _json_or_raise(resp)
        return [m["id"] for m in body["data"]]

    async def _model(self) -> str:
        if self.model is None:
            self.model = (await self.models())[0]
        return self.model

    async def completions(self, prompt: str | list[int], **params: Any) -> Completion:
        """POST /v1/completions; `params` are OpenAI fields (max_tokens, temperature, stop, seed...)."""
        body = await self._post("/v1/completions", {"prompt": prompt, **params})
        choice = body["choices"][0]
        return Completion(body["id"], choice["text"], choice["finish_reason"], body.get("usage"), body)

    async def chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> Completion:
        """POST /v1/chat/completions; returns the assistant message as `text`."""
        body = await self._post("/v1/chat/completions", {"messages": list(messages), **params})
        choice = body["choices"][0]
        return Completion(body["id"], choice["message"]["content"] or "", choice["finish_reason"], body.get("usage"),
                          body)

    def stream_completions(self, prompt: str | list[int], **params: Any) -> AsyncIterator[Completion]:
        """Stream a completion: pieces of text; the last has `finish_reason` (and `usage`)."""
        return self._stream("/v1/completions", {"prompt": prompt, **params}, chat=False)

    def stream_chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> AsyncIterator[Completion]:
        return self._stream("/v1/chat/completions", {"messages": list(messages), **params}, chat=True)

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        payload = {"model": await self._model(), **payload}
        async with self._call("POST", path, json=payload) as resp:
            return await _json_or_raise(resp)

    async def _stream(self, path: str, payload: dict[str, Any], chat: bool) -> AsyncIterator[Completion]:
        payload = {"model": await self._model(), **payload, "stream": True,
                   "stream_options": {"include_usage": True}}
        last: Completion | None = None
        async with self._call("POST", path, json=payload) as resp:
            if resp.status != 200:
                await _json_or_raise(resp)
            async for obj in sse_events(resp):
                if "error" in obj:
                    err = obj["error"]
                    raise APIError(0, err.get("message", ""), err.get("type"), err.get("code"))
                if not obj.get("choices"):  # the usage chunk
                    if last is not None:
                        last.usage = obj.get("usage")
                    continue
                choice = obj["choices"][0]
                text = (choice.get("delta", {}).get("content") or "") if chat else choice.get("text", "")
                if last is not None:
                    yield last
                last = Completion(obj["id"], text, choice.get("finish_reason"), None, obj)
        if last is not None:
            yield last


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an OpenAI-style server-sent event stream, up to `data: [DONE]`."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def _json_or_raise(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await resp.json(content_type=None)
    except (json.JSONDecodeError, aiohttp.ContentTypeError):
        body = {"error": {"message": (await resp.text())[:500]}}
    if resp.status != 200:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        raise APIError(resp.status, err.get("message", str(body)), err.get("type"), err.get("code"))
    return body


async def connect(engines: Mapping[str, Sequence[str] | str] | Sequence[str], *, timeout: float = 60.0,
                  ready_timeout: float = 120.0, cluster_key=None) -> Cluster:
    """A started `Cluster` over running engines: `{"prefill": ["tcp://..."], "decode": [...]}`
    (or a list of addresses, role "engine"). `cluster_key`: the deployment's key file (default:
    `$MICROSERVE_CLUSTER_KEY`). Close it with `await cluster.close()`."""
    from microserve.security import resolve

    key = resolve(cluster_key)
    if isinstance(engines, Mapping):
        spec = {role: [EngineHandle(a, role=role, timeout=timeout, cluster_key=key)
                       for a in ([v] if isinstance(v, str) else v)] for role, v in engines.items()}
        cluster = Cluster(spec)
    else:
        cluster = Cluster([EngineHandle(a, role="engine", timeout=timeout, cluster_key=key) for a in engines])
    try:
        return await cluster.start(ready_timeout)
    except BaseException:
        await cluster.close()
        raise
