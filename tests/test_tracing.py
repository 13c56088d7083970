"""Traces (`--otlp-traces-endpoint`, microserve/tracing.py) received by a real OTLP/HTTP endpoint in this
test: a 1P1D launch exports the gateway's span (child of the client's `traceparent`), the strategy's, every
call on the router side, the engine side of each call and the decode engine's phases (queue, prefill,
decode), all in the client's trace, parent to child; the output is the one of an untraced engine; a moved
request shows both engines and the move; without the flag no exporter exists; our OTLP encoding parses
with OpenTelemetry's own protobuf classes (the `otel` extra, for the test only)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from types import SimpleNamespace

import aiohttp
import openai
import pytest
from aiohttp import web
from deploy import start_launch
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # the otel extra

from microserve import LLM, SamplingParams

TRACE, CLIENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP traces endpoint: POST /v1/traces (protobuf), every span kept."""

    def __init__(self) -> None:
        self.spans: list[dict] = []

    async def receive(self, request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        for rs in msg.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in s.attributes}
                    self.spans.append({"service": service, "name": s.name, "trace": s.trace_id.hex(),
                                       "id": s.span_id.hex(), "parent": s.parent_span_id.hex(), "attrs": attrs})
        return web.Response(content_type="application/x-protobuf", body=b"")

    def named(self, name: str, service: str = "") -> list[dict]:
        return [s for s in self.spans if s["name"] == name and s["trace"] == TRACE and service in s["service"]]


async def serve(collector: Collector) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/traces", collector.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


async def wait_for(collector: Collector, wanted: list[tuple[str, str]]) -> None:
    for _ in range(200):  # spans leave each process in batches every 0.5 s
        if all(collector.named(n, s) for n, s in wanted):
            return
        await asyncio.sleep(0.05)


async def test_one_trace_from_the_client_through_the_strategy_to_both_engines(demo_path):
    collector = Collector()
    runner, url = await serve(collector)
    dep = start_launch("--strategy", "pd", "--roles", "prefill=1,decode=1", "--model", str(demo_path),
                       "--served-model-name", "demo", "--otlp-traces-endpoint", url,
                       "--log-level", "warning")
    try:
        client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
        out = await client.completions.create(model="demo", prompt="trace me " * 12, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True, "return_token_ids": True},
                                              extra_headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"})
        ref = LLM(str(demo_path)).generate(["trace me " * 12], SamplingParams(max_tokens=6, temperature=0,
                                                                              ignore_eos=True))[0]
        assert out.choices[0].model_extra["token_ids"] == ref.token_ids  # tracing changes nothing served
        await client.close()
        wanted = [("POST /v1/completions", "router"), ("PD.generate", "router"), ("prep_recv", "router"),
                  ("remote_send", "router"), ("start_generate", "router"), ("engine.prep_recv", "decode-0"),
                  ("engine.remote_send", "prefill-0"), ("engine.start_generate", "decode-0"),
                  ("engine.queue", "decode-0"), ("engine.prefill", "decode-0"), ("engine.decode", "decode-0")]
        await wait_for(collector, wanted)
        (gateway,), (strategy,) = collector.named("POST /v1/completions"), collector.named("PD.generate")
        assert gateway["parent"] == CLIENT_SPAN and gateway["attrs"]["http.status_code"] == 200
        assert strategy["parent"] == gateway["id"]
        for call, engine in (("prep_recv", "decode-0"), ("remote_send", "prefill-0"), ("start_generate", "decode-0")):
            (mine,) = collector.named(call, "router")
            assert mine["parent"] == strategy["id"] and mine["attrs"]["engine"] == engine, mine
            (theirs,) = collector.named(f"engine.{call}", engine)
            assert theirs["parent"] == mine["id"] and theirs["attrs"]["engine"] == engine, theirs
        (generate,) = collector.named("engine.start_generate", "decode-0")
        for phase in ("engine.queue", "engine.prefill", "engine.decode"):  # the engine's side of the stream
            (span,) = collector.named(phase, "decode-0")
            assert span["parent"] == generate["id"], phase
        (send,) = collector.named("engine.remote_send", "prefill-0")
        assert send["attrs"]["bytes"] > 0 and send["attrs"]["transport"] and send["attrs"]["seconds"] >= 0
        await wait_for(collector, [("engine.prefill_chunk", "prefill-0"), ("engine.kv_receive", "decode-0")])
        steps = collector.named("engine.prefill_chunk", "prefill-0")  # the prefill behind the send, step by step
        assert all(s["parent"] == send["id"] for s in steps)
        assert sum(s["attrs"]["tokens"] for s in steps) == send["attrs"]["computed_tokens"] > 0
        (recv,) = collector.named("engine.prep_recv", "decode-0")
        (arrived,) = collector.named("engine.kv_receive", "decode-0")  # the receiver's side of the transfer
        assert arrived["parent"] == recv["id"] and arrived["attrs"]["bytes"] == send["attrs"]["bytes"]
        assert arrived["attrs"]["ok"] is True
        (last,) = collector.named("engine.prefill_chunk", "decode-0")  # the decode engine's last prompt token
        assert last["parent"] == generate["id"] and last["attrs"]["tokens"] >= 1
        assert collector.named("start_generate", "router")[0]["attrs"]["tokens"] == 6
    finally:
        assert dep.stop() == 0
        await runner.cleanup()


async def test_a_moved_request_shows_both_engines_and_the_move(demo_path):
    """A decode engine drained while it streams: the request's trace holds start_generate on both decode
    engines and the move's remote_send from the drained one, all under the one strategy span."""
    collector = Collector()
    runner, url = await serve(collector)
    dep = start_launch("--strategy", "pd", "--roles", "prefill=1,decode=2", "--model", str(demo_path),
                       "--served-model-name", "demo", "--admin-key", "adm", "--otlp-traces-endpoint", url,
                       "--log-level", "warning")
    try:
        client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
        stream = await client.completions.create(
            model="demo", prompt="move me along " * 20, max_tokens=1000, temperature=0, stream=True,
            extra_body={"ignore_eos": True}, extra_headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"})
        await stream.__anext__()
        busy = await _running(dep, ["decode-0", "decode-1"])
        async with aiohttp.ClientSession() as s, s.delete(dep.url + f"/admin/engines/{busy}",
                                                           headers={"Authorization": "Bearer adm"}) as r:
            assert r.status == 200, await r.text()
        async for _ in stream:
            pass
        await client.close()
        other = "decode-1" if busy == "decode-0" else "decode-0"
        await wait_for(collector, [("PD.generate", "router"), ("engine.start_generate", other),
                                   ("engine.remote_send", busy)])
        (strategy,) = collector.named("PD.generate")
        generates = collector.named("start_generate", "router")
        assert {g["attrs"]["engine"] for g in generates} == {busy, other}
        assert all(g["parent"] == strategy["id"] for g in generates)
        moves = [c for c in collector.named("remote_send", "router") if c["attrs"]["engine"] == busy]
        assert len(moves) == 1 and moves[0]["parent"] == strategy["id"] and moves[0]["attrs"]["bytes"] > 0
    finally:
        assert dep.stop() == 0
        await runner.cleanup()


async def _running(dep, names: list[str]) -> str:
    """The engine among `names` running a request (once one does)."""
    from microserve.router import EngineHandle

    for _ in range(200):
        for name in names:
            async with EngineHandle(dep.engines[name], timeout=10) as h:
                if (await h.stats()).running:
                    return name
        await asyncio.sleep(0.02)
    raise AssertionError("no stream started")


def test_without_the_flag_nothing_of_opentelemetry_is_imported():
    """Tracing off costs nothing: no exporter thread exists, every hook is a no-op, and nothing of
    OpenTelemetry is imported (spans are ours; the protocol is OTLP)."""
    code = ("import sys, threading; import microserve.router.runtime, microserve.gateway.app, "
            "microserve.serving.zmq_server; from microserve import tracing; "
            "assert not tracing.enabled() and tracing.traceparent() == '' and tracing.start('x') is None; "
            "assert not [t for t in threading.enumerate() if 'trace' in t.name]; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


def test_spans_encode_as_otlp_and_sampling_follows_opentelemetry_s_variables(monkeypatch):
    """Our encoder's bytes parse with OpenTelemetry's own protobuf classes, every attribute type and a
    failure's status intact; the samplers decide as OpenTelemetry's do (a parent's flag is followed)."""
    from microserve import tracing

    monkeypatch.setattr(tracing, "_exporter", SimpleNamespace(add=lambda s: kept.append(s)))
    kept: list = []
    with tracing.span("root", parent=f"00-{TRACE}-{CLIENT_SPAN}-01", server=True, route="/v1/x") as root:
        call = tracing.start("call", n=-5, ratio=0.25, ok=True, empty="", none=None)
        assert tracing.traceparent(call).startswith(f"00-{TRACE}-") and tracing.traceparent(call).endswith("-01")
        tracing.end(call, "timeout: no answer", tokens=3)
        with pytest.raises(ValueError), tracing.span("inner"):
            raise ValueError("bad")
    tracing.record("phase", 5, 9, parent=tracing.traceparent(root))
    msg = ExportTraceServiceRequest()
    msg.ParseFromString(tracing.encode_request(kept, "svc"))
    (rs,) = msg.resource_spans
    assert rs.resource.attributes[0].value.string_value == "svc" and rs.scope_spans[0].scope.name == "microserve"
    spans = {s.name: s for s in rs.scope_spans[0].spans}
    assert set(spans) == {"root", "call", "inner", "phase"}
    assert spans["root"].trace_id.hex() == TRACE and spans["root"].parent_span_id.hex() == CLIENT_SPAN
    assert spans["root"].kind == 2 and spans["call"].kind == 1  # SERVER, INTERNAL
    assert spans["call"].parent_span_id == spans["root"].span_id == spans["phase"].parent_span_id
    attrs = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in spans["call"].attributes}
    assert attrs == {"n": -5, "ratio": 0.25, "ok": True, "tokens": 3}
    assert spans["call"].status.code == 2 and spans["call"].status.message == "timeout: no answer"
    assert spans["inner"].status.code == 2 and "ValueError: bad" in spans["inner"].status.message
    assert (spans["phase"].start_time_unix_nano, spans["phase"].end_time_unix_nano) == (5, 9)
    assert spans["root"].end_time_unix_nano >= spans["root"].start_time_unix_nano > 0

    kept.clear()  # a client's unsampled traceparent: nothing recorded, the flag carried on
    with tracing.span("root", parent=f"00-{TRACE}-{CLIENT_SPAN}-00") as root:
        assert tracing.traceparent().endswith("-00")
    assert kept == []
    ratio = tracing.sampler_from_env({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                      "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    share = sum(ratio(None, random.getrandbits(128)) for _ in range(4000)) / 4000
    assert 0.2 < share < 0.3 and ratio(True, 2**64 - 1) and not ratio(False, 0)
    assert not tracing.sampler_from_env({"OTEL_TRACES_SAMPLER": "always_off"})(True, 0)
    assert tracing.sampler_from_env({"OTEL_TRACES_SAMPLER": "always_on"})(False, 0)
