"""OTLP/HTTP for `microserve.tracing`: finished spans encoded by hand as `opentelemetry.proto.trace.v1`
protobuf (`ExportTraceServiceRequest`) and POSTed in batches from one daemon thread (`Exporter`).

    ExportTraceServiceRequest { resource_spans: ResourceSpans { resource { service.name },
                                scope_spans: ScopeSpans { scope { microserve, version }, spans: Span... } } }
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microserve.tracing import Span

log = logging.getLogger(__name__)

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


class Exporter:
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
