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
from functools import partial

from aiohttp import web

from microserve.control import adapters
from microserve.control.admin import Admin
from microserve.gateway import completions, info, openai_protocol, responses
from microserve.gateway.bodies import MAX_BODY_BYTES, Bodies, BodyTooLarge, BodyTooSlow
from microserve.gateway.observe import observe, refused
from microserve.gateway.served import Served, ServedModels
from microserve.router.metrics import render_models
from microserve.router.runtime import RouterError
from microserve.serving.api import ErrorCode

log = logging.getLogger(__name__)

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

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's completions (gateway/completions.py)."""
        return await completions.completions(self, request)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's chat completions (gateway/completions.py)."""
        return await completions.chat_completions(self, request)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API (gateway/responses.py)."""
        return await responses.handle(self, request)

    @staticmethod
    def http_status(exc: RouterError) -> int:
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
