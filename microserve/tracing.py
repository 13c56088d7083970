"""OpenTelemetry traces (`--otlp-traces-endpoint URL`, the `otel` extra), one place for every process.

    gateway  POST /v1/...            (a client's W3C `traceparent` is the parent)
      strategy <Name>.generate
        prep_recv / remote_send / start_generate / lend / abort     (router side: engine, role, request)
          engine.<call>              (engine side: the context travels as a third RPC frame)

Spans go out over OTLP/HTTP (protobuf) in batches. Without `--otlp-traces-endpoint` nothing is
imported and every helper here is a constant-time no-op: `span()` hands back one shared null
context, `traceparent()` an empty string.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

_tracer: Any = None
_provider: Any = None
NULL = contextlib.nullcontext()  # the one no-op block


def setup(endpoint: str | None, service_name: str) -> None:
    """Export this process's spans to `endpoint` (`http://HOST:4318`, or a full `.../v1/traces` URL)."""
    global _tracer, _provider
    if not endpoint:
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ValueError("--otlp-traces-endpoint needs OpenTelemetry: pip install 'microserve[otel]'") from None
    url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
    _provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url), schedule_delay_millis=500))
    _tracer = _provider.get_tracer("microserve")
    log.info("traces of %s go to %s", service_name, url)


def enabled() -> bool:
    return _tracer is not None


def shutdown() -> None:
    """Send what is buffered (at exit)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def _context(traceparent: str) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent}) if traceparent else None


def span(name: str, *, parent: str = "", server: bool = False, **attrs: Any) -> contextlib.AbstractContextManager:
    """A span, current inside the block (yields it, or None when tracing is off). `parent`: a W3C
    traceparent from another process (the client's header, the router's RPC frame)."""
    if _tracer is None:
        return NULL
    from opentelemetry.trace import SpanKind

    return _tracer.start_as_current_span(name, context=_context(parent), kind=SpanKind.SERVER if server
                                         else SpanKind.INTERNAL, attributes=_clean(attrs))


def start(name: str, **attrs: Any) -> Any:
    """A span not made current (for an async generator: a stream), child of what is current now;
    None when tracing is off. End it with `end`."""
    return None if _tracer is None else _tracer.start_span(name, attributes=_clean(attrs))


def end(s: Any, error: str = "", **attrs: Any) -> None:
    if s is None:
        return
    s.set_attributes(_clean(attrs))
    if error:
        from opentelemetry.trace import Status, StatusCode

        s.set_status(Status(StatusCode.ERROR, error))
    s.end()


@contextlib.contextmanager
def detached(name: str, **attrs: Any) -> Iterator[Any]:
    """`start` ... `end` as a block (yields the span, or None when off); an exception marks it failed."""
    s = start(name, **attrs)
    error = ""
    try:
        yield s
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        end(s, error)


def current(s: Any = None) -> contextlib.AbstractContextManager:
    """Make `s` (from `detached`) the current span for a block that makes calls (their parent)."""
    if _tracer is None or s is None:
        return NULL
    from opentelemetry import trace

    return trace.use_span(s, end_on_exit=False)


def traceparent(s: Any = None) -> str:
    """The W3C traceparent of `s` (default: the current span); "" when tracing is off or nothing is current."""
    if _tracer is None:
        return ""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(s) if s is not None else None
    TraceContextTextMapPropagator().inject(carrier, context=ctx)
    return carrier.get("traceparent", "")


def record(name: str, start_ns: int, end_ns: int, parent: str = "", **attrs: Any) -> None:
    """A finished span with its own times (an engine phase measured elsewhere), child of the current one
    (or of `parent`, a traceparent kept from an earlier call)."""
    if _tracer is not None and 0 < start_ns <= end_ns:
        ctx = _context(parent) if parent else None
        _tracer.start_span(name, context=ctx, start_time=start_ns, attributes=_clean(attrs)).end(end_time=end_ns)


def end_error(s: Any, error: str) -> None:
    """Mark a span (current, ended by its block) failed."""
    if s is not None:
        from opentelemetry.trace import Status, StatusCode

        s.set_status(Status(StatusCode.ERROR, error))


def set_attrs(s: Any, **attrs: Any) -> None:
    if s is not None:
        s.set_attributes(_clean(attrs))


def _clean(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v is not None and v != ""}
