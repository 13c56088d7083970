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
`span()` hands back one shared null context, `traceparent()` an empty string.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

NULL = contextlib.nullcontext()  # the one no-op block
_exporter: _Exporter | None = None
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
    _exporter = _Exporter(url, service_name, _headers(os.environ))
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


# -- OTLP/HTTP protobuf ------------------------------------------------------------------------------
_SMALL = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_KEYS: dict[str, bytes] = {}  # an attribute name's encoded field, kept (spans repeat few names)


def _key_value(key: str, value: Any) -> bytes:
    """`KeyValue{key, AnyValue}`: bool, int64, double or string."""
    name = _KEYS.get(key)
    if name is None:
        name = _field(1, key.encode())
        if len(_KEYS) < 1024:
            _KEYS[key] = name
    if isinstance(value, bool):
        any_value = b"\x10" + (b"\x01" if value else b"\x00")
    elif isinstance(value, int):
        any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    elif isinstance(value, float):
        any_value = b"\x21" + struct.pack("<d", value)
    else:
        any_value = _field(1, str(value).encode())
    return name + _field(2, any_value)


_TIMES = struct.Struct("<BBBQBQ")  # kind (a one-byte varint), start and end (fixed64), with their field keys


def encode_span(s: Span) -> bytes:
    """`opentelemetry.proto.trace.v1.Span`."""
    out = [b"\x0a\x10" + s.trace_id.to_bytes(16, "big"), b"\x12\x08" + s.span_id.to_bytes(8, "big")]
    if s.parent_id:
        out.append(b"\x22\x08" + s.parent_id.to_bytes(8, "big"))
    out += [_field(5, s.name.encode()), _TIMES.pack(0x30, s.kind, 0x39, s.start_ns, 0x41, s.end_ns)]
    out += [_field(9, _key_value(k, v)) for k, v in s.attrs.items()]
    if s.error:
        out.append(_field(15, _field(2, s.error.encode()) + b"\x18\x02"))  # Status{message, STATUS_CODE_ERROR}
    return b"".join(out)


def encode_request(spans: list[Span], service_name: str) -> bytes:
    """`ExportTraceServiceRequest` of one resource (`service.name`) and one scope (`microserve`)."""
    from microserve import __version__

    resource = _field(1, _field(1, _key_value("service.name", service_name)))
    scope = _field(1, _field(1, b"microserve") + _field(2, __version__.encode()))
    scope_spans = _field(2, scope + b"".join(_field(2, encode_span(s)) for s in spans))
    return _field(1, resource + scope_spans)


class _Exporter:
    """Batches finished spans and POSTs them every 0.5 s (sooner when 512 wait) from one daemon thread;
    at most 8,192 wait (more are dropped, counted, and logged at the next send)."""

    BATCH, LIMIT, DELAY = 512, 8192, 0.5

    def __init__(self, url: str, service_name: str, headers: dict[str, str]) -> None:
        from urllib.parse import urlsplit

        self.url, self.service_name = urlsplit(url), service_name
        self.headers = {"Content-Type": "application/x-protobuf", **headers}
        self.spans: list[Span] = []
        self.dropped = 0
        self.wake, self.stopping = threading.Event(), False
        self.conn: Any = None
        self.thread = threading.Thread(target=self._run, name="microserve-trace-export", daemon=True)
        self.thread.start()
        import atexit

        atexit.register(self.close)

    def add(self, s: Span) -> None:
        if len(self.spans) >= self.LIMIT:
            self.dropped += 1
            return
        self.spans.append(s)  # NOTE: list.append is atomic under the GIL; the thread swaps the list
        if len(self.spans) >= self.BATCH:
            self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait(self.DELAY)
            self.wake.clear()
            stopping = self.stopping
            while self.spans:
                batch, self.spans = self.spans, []
                self._send(batch)
            if stopping:
                return

    def _send(self, batch: list[Span]) -> None:
        import http.client

        if self.dropped:
            log.warning("dropped %d spans: more than %d waited to be sent", self.dropped, self.LIMIT)
            self.dropped = 0
        body = encode_request(batch, self.service_name)
        for attempt in range(2):  # NOTE: a kept-alive connection the collector closed: reconnect once
            try:
                if self.conn is None:
                    cls = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
                    self.conn = cls(self.url.hostname, self.url.port, timeout=10)
                self.conn.request("POST", self.url.path or "/v1/traces", body, self.headers)
                resp = self.conn.getresponse()
                resp.read()
                if resp.status >= 300:
                    log.warning("the trace collector answered %d to %d spans", resp.status, len(batch))
                return
            except (OSError, http.client.HTTPException) as exc:
                self.conn = None
                if attempt:
                    log.warning("could not send %d spans to %s: %s", len(batch), self.url.geturl(), exc)

    def close(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.wake.set()
            self.thread.join(10.0)
