"""What the gateway records of every HTTP request: the per-endpoint series, and each refusal logged
with its status and code and counted by reason.

    microserve_http_requests_total{handler, method, status}      every request (handler: the route's path)
    microserve_http_request_duration_seconds{handler}            to the last byte (a stream: its end)
    microserve_rejected_requests_total{reason}                   every error answered before any output

and, with `--otlp-traces-endpoint`, one server span per `/v1/*` request (a client's `traceparent`
is its parent; microserve/tracing.py).
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from microserve import tracing
from microserve.router.errors import RouterError

log = logging.getLogger("microserve.gateway.app")


def observe(metrics) -> web.middleware:
    """A middleware counting every request by endpoint and timing it (`metrics`: the router's)."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        resource = request.match_info.route.resource
        name = resource.canonical if resource is not None else "unmatched"
        status = 500
        traced = tracing.enabled() and name.startswith("/v1/")
        with (tracing.span(f"{request.method} {name}", parent=request.headers.get("traceparent", ""), server=True,
                           **{"http.method": request.method, "http.route": name}) if traced else tracing.NULL) as span:
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                metrics.http.labels(name, request.method, str(status)).inc()
                metrics.http_seconds.labels(name).observe(time.perf_counter() - t0)
                tracing.set_attrs(span, **{"http.status_code": status})
                if status >= 500:
                    tracing.end_error(span, f"HTTP {status}")

    return middleware


def refused(request: web.Request, status: int, exc: RouterError, metrics) -> None:
    """Log an error answer (4xx at INFO, 5xx at WARNING) and count it by its code."""
    metrics.refused.labels(str(exc.code)).inc()
    log.log(logging.WARNING if status >= 500 else logging.INFO, "%s %s -> %d %s: %s", request.method, request.path,
            status, exc.code, exc.message, extra={"fields": {
                "method": request.method, "path": request.path, "status": status, "code": str(exc.code),
                "client": request.remote}})
