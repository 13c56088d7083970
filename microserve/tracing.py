"""OpenTelemetry traces (`--otlp-traces-endpoint URL`), one place for every process.

    gateway  POST /v1/...            (a client's W3C `traceparent` is the parent)
      strategy <Name>.generate
        prep_recv / remote_send / start_generate / lend / abort     (router side: engine, role, request)
          engine.<call>              (engine side: the context travels as a third RPC frame)

Spans go out over OTLP/HTTP (protobuf, `opentelemetry.proto.trace.v1`) in batches every 0.5 s. They
are made here rather than by the OpenTelemetry SDK: a span is one small object and ids from a seeded
generator, and the batch is encoded by hand on the exporter thread, which together cost a few
microseconds a span where the SDK's spans and encoder cost a traced request ~0.7 ms of the router's CPU
on a 2-core machine (docs/benchmarks.md). Sampling follows OpenTelemetry's variables
(`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`), headers `OTEL_EXPORTER_OTLP_TRACES_HEADERS` (or
`OTEL_EXPORTER_OTLP_HEADERS`). Without `--otlp-traces-endpoint` every helper is a constant-time no-op:
`span()` hands back one shared null context, `traceparent()` an empty string. The protobuf encoder and
the exporter thread are `microserve/otlp.py`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import random
import time
from collections.abc import Iterator
from typing import Any

from microserve.otlp import Exporter, encode_request, encode_span  # noqa: F401 (tests and tools use them here)

log = logging.getLogger(__name__)

NULL = contextlib.nullcontext()  # the one no-op block
_exporter: Exporter | None = None
_current: contextvars.ContextVar[Span | None] = contextvars.ContextVar("microserve_span", default=None)
_ids = random.Random(int.from_bytes(os.urandom(16), "big"))  # NOTE: unique ids, not secrets
os.register_at_fork(after_in_child=lambda: _ids.seed(int.from_bytes(os.urandom(16), "big")))  # no shared ids
_INTERNAL, _SERVER = 1, 2  # the protocol's SpanKind values


class Span:
    """One span: ids, name, times, attributes and (when it failed) an error message."""

    __slots__ = (
        "attrs",
        "end_ns",
        "error",
        "kind",
        "name",
        "parent_id",
        "sampled",
        "span_id",
        "start_ns",
        "trace_id",
    )

    def __init__(self, name: str, parent: Span | tuple[int, int, bool] | None, kind: int, attrs: dict[str, Any],
                 start_ns: int | None = None) -> None:
        if parent is None:
            self.trace_id = _ids.getrandbits(128) or 1
            self.parent_id, self.sampled = 0, _sampler(None, self.trace_id)
        elif isinstance(parent, Span):
            self.trace_id, self.parent_id = parent.trace_id, parent.span_id
            self.sampled = _sampler(parent.sampled, self.trace_id)
        else:
            self.trace_id, self.parent_id, sampled = parent
            self.sampled = _sampler(sampled, self.trace_id)
        self.span_id = _ids.getrandbits(64) or 1
        self.name, self.kind, self.attrs, self.error = name, kind, _clean(attrs), ""
        self.start_ns, self.end_ns = start_ns or time.time_ns(), 0

    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"

    def finish(self, end_ns: int | None = None) -> None:
        self.end_ns = end_ns or time.time_ns()
        if self.sampled and _exporter is not None:
            _exporter.add(self)


class _Block:
    """A span current inside a `with` block; an exception marks it failed."""

    __slots__ = ("span", "token")

    def __init__(self, s: Span) -> None:
        self.span = s

    def __enter__(self) -> Span:
        self.token = _current.set(self.span)
        return self.span

    def __exit__(self, kind, exc, tb) -> None:
        _current.reset(self.token)
        if exc is not None and not self.span.error:
            self.span.error = f"{kind.__name__}: {exc}"
        self.span.finish()


def setup(endpoint: str | None, service_name: str) -> None:
    """Export this process's spans to `endpoint` (`http://HOST:4318`, or a full `.../v1/traces` URL)."""
    global _exporter, _sampler
    if not endpoint:
        return
    url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
    _sampler = sampler_from_env(os.environ)
    _exporter = Exporter(url, service_name, _headers(os.environ))
    log.info("traces of %s go to %s", service_name, url)


def enabled() -> bool:
    return _exporter is not None


def shutdown() -> None:
    """Send what is buffered (at exit)."""
    global _exporter
    if _exporter is not None:
        _exporter.close()
    _exporter = None


def _parse(traceparent: str) -> tuple[int, int, bool] | None:
    """(trace id, span id, sampled) of a W3C traceparent; None when it is malformed."""
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    return (trace_id, span_id, bool(flags & 1)) if trace_id and span_id else None


def span(name: str, *, parent: str = "", server: bool = False, **attrs: Any) -> contextlib.AbstractContextManager:
    """A span, current inside the block (yields it, or None when tracing is off). `parent`: a W3C
    traceparent from another process (the client's header, the router's RPC frame)."""
    if _exporter is None:
        return NULL
    up = _parse(parent) if parent else _current.get()
    return _Block(Span(name, up, _SERVER if server else _INTERNAL, attrs))


def start(name: str, **attrs: Any) -> Span | None:
    """A span not made current (for an async generator: a stream), child of what is current now;
    None when tracing is off. End it with `end`."""
    return None if _exporter is None else Span(name, _current.get(), _INTERNAL, attrs)


def end(s: Span | None, error: str = "", **attrs: Any) -> None:
    if s is None:
        return
    s.attrs.update(_clean(attrs))
    s.error = error or s.error
    s.finish()


@contextlib.contextmanager
def detached(name: str, **attrs: Any) -> Iterator[Span | None]:
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


@contextlib.contextmanager
def _use(s: Span) -> Iterator[Span]:
    token = _current.set(s)
    try:
        yield s
    finally:
        _current.reset(token)


def current(s: Span | None = None) -> contextlib.AbstractContextManager:
    """Make `s` (from `detached`) the current span for a block that makes calls (their parent)."""
    return NULL if _exporter is None or s is None else _use(s)


def traceparent(s: Span | None = None) -> str:
    """The W3C traceparent of `s` (default: the current span); "" when tracing is off or nothing is current."""
    if _exporter is None:
        return ""
    s = s or _current.get()
    return s.traceparent() if s is not None else ""


def record(name: str, start_ns: int, end_ns: int, parent: str = "", **attrs: Any) -> None:
    """A finished span with its own times (an engine phase measured elsewhere), child of the current one
    (or of `parent`, a traceparent kept from an earlier call)."""
    if _exporter is not None and 0 < start_ns <= end_ns:
        Span(name, _parse(parent) if parent else _current.get(), _INTERNAL, attrs, start_ns).finish(end_ns)


def end_error(s: Span | None, error: str) -> None:
    """Mark a span (current, ended by its block) failed."""
    if s is not None:
        s.error = error


def set_attrs(s: Span | None, **attrs: Any) -> None:
    if s is not None:
        s.attrs.update(_clean(attrs))


def _clean(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v is not None and v != ""}


# -- sampling (OpenTelemetry's OTEL_TRACES_SAMPLER) ---------------------------------------------------
def sampler_from_env(env: dict[str, str] | os._Environ) -> Any:
    """`sampled(parent_sampled or None for a root, trace_id) -> bool` as OpenTelemetry's samplers decide:
    always_on, always_off, traceidratio and their parentbased_ forms (the default: parentbased_always_on)."""
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    base = name.removeprefix("parentbased_")
    if base == "always_on":
        root: Any = lambda trace_id: True
    elif base == "always_off":
        root = lambda trace_id: False
    elif base == "traceidratio":
        try:
            ratio = min(1.0, max(0.0, float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))))
        except ValueError:
            ratio = 1.0
        bound = round(ratio * (1 << 64))
        root = lambda trace_id: (trace_id & 0xFFFFFFFFFFFFFFFF) < bound
    else:
        log.warning("OTEL_TRACES_SAMPLER=%s is not one this process knows; sampling every trace", name)
        root = lambda trace_id: True
    if name.startswith("parentbased_"):
        return lambda parent, trace_id: root(trace_id) if parent is None else parent
    return lambda parent, trace_id: root(trace_id)


_sampler: Any = sampler_from_env({})


def _headers(env: dict[str, str] | os._Environ) -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_TRACES_HEADERS (or OTEL_EXPORTER_OTLP_HEADERS): `k=v,k2=v2`, values URL-encoded."""
    from urllib.parse import unquote

    text = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS") or ""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[unquote(key.strip())] = unquote(value.strip())
    return out
