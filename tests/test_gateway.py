"""The gateway under load and abuse: one `launch --strategy strategies/pd.py` deployment
(with an API key) and a `microserve router` over its engines.

64 concurrent streams, every kind of bad request, client disconnects, /metrics, the SDK.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest
from deploy import start_launch, start_router
from prometheus_client.parser import text_string_to_metric_families
from test_launch import assert_no_leaks

import microserve
from kvapi.transfer.base import TRANSPORTS
from microserve import LLM, SamplingParams
from microserve.client import APIError
from microserve.router import EngineHandle

KEY = "sk-test-123"
MAX_LEN = 1024


@pytest.fixture(scope="module")
def pd(demo_path):
    dep = start_launch("--strategy", "strategies/pd.py", "--model", str(demo_path), "--api-key", KEY,
                       "--served-model-name", "demo", "--max-model-len", str(MAX_LEN), "--num-kv-blocks", "512",
                       "--metrics-names", "vllm", "--log-level", "error")
    yield dep
    assert dep.stop() == 0


@pytest.fixture(scope="module")
def llm(demo_path):
    return LLM(demo_path)


def client(dep, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=dep.base_url, api_key=KEY, max_retries=0, **kw)


async def metrics(dep) -> dict[str, float]:
    """Every sample of /metrics as {name{labels}: value} (parsed with prometheus_client's parser)."""
    async with aiohttp.ClientSession() as s, s.get(dep.url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            assert sample.labels.get("model_name") == "demo", sample  # every series, as vLLM's
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
            if labels:  # and the family's total over its labels, as `sum(name)` in PromQL
                out[f"sum({sample.name})"] = out.get(f"sum({sample.name})", 0.0) + sample.value
    return out


@pytest.mark.slow
async def test_64_concurrent_streams_pd(pd, llm):
    prompts = [f"request {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5) for i in range(64)]
    want = [o.text for o in llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))]
    c = client(pd)

    async def one(prompt: str) -> str:
        stream = await c.completions.create(model="demo", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    before = await metrics(pd)
    got = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 240)
    assert got == want
    after = await metrics(pd)
    assert after["microserve_requests_total{status=success}"] - before["microserve_requests_total{status=success}"] \
        == 64
    assert after["sum(microserve_kv_transfer_bytes_total)"] > before["sum(microserve_kv_transfer_bytes_total)"]
    await c.close()
    await assert_no_leaks(pd.engines)


async def test_metrics_pass_promtools_rules(pd):
    """`promtool check metrics`'s rules (promtool itself is a Go binary we do not ship): HELP and TYPE on
    every family, counters and only counters end in `_total`, histograms have buckets, `_sum`, `_count`
    and a `+Inf` bucket, names and label names are well formed, no duplicate series."""
    import re

    async with aiohttp.ClientSession() as s, s.get(pd.url + "/metrics") as r:
        text = await r.text()
    helps = set(re.findall(r"^# HELP (\S+) \S", text, re.M))
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)", text, re.M))
    assert helps == set(types), "every family has HELP and TYPE"
    seen = set()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? \S+$", line)
        assert m, line
        assert line.rsplit(" ", 1)[0] not in seen, f"duplicate series {line}"
        seen.add(line.rsplit(" ", 1)[0])
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)=", m.group(2) or ""):
            assert not label.startswith("__"), line
    for name, kind in types.items():
        assert name == name.lower() and re.fullmatch(r"[a-z_:][a-z0-9_:]*", name), name
        if kind == "counter":
            assert name.endswith("_total"), f"the counter {name} does not end in _total"
        else:
            assert not name.endswith("_total"), f"{name} is a {kind} named like a counter"
        if kind == "histogram" and re.search(rf"^{re.escape(name)}_", text, re.M):  # NOTE: a labelled one may be empty
            buckets = re.search(rf'^{re.escape(name)}_bucket{{[^}}]*le="\+Inf"', text, re.M)
            assert buckets and f"{name}_sum" in text and f"{name}_count" in text, name


async def test_metrics_carry_process_http_refusals_and_vllm_names(pd):
    """`process_*`, per-endpoint HTTP series, every refusal by reason, and (`--metrics-names vllm`) vLLM's
    series with vLLM's types and its `model_name` label."""
    from prometheus_client.parser import text_string_to_metric_families

    code, _, _ = await raw(pd, "POST", "/v1/completions", {"model": "demo"})
    assert code == 400
    await client(pd).completions.create(model="demo", prompt="metrics", max_tokens=2)
    async with aiohttp.ClientSession() as s, s.get(pd.url + "/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    assert families["process_resident_memory_bytes"].type == "gauge"

    def value(name: str, **labels: str) -> float:
        return sum(x.value for x in families[name].samples if x.name.endswith("_total")
                   and all(x.labels.get(k) == v for k, v in labels.items()))

    assert value("microserve_http_requests", handler="/v1/completions", method="POST", status="200") >= 1
    assert value("microserve_http_requests", handler="/v1/completions", status="400") >= 1
    assert value("microserve_rejected_requests", reason="bad_request") >= 1
    assert families["microserve_http_request_duration_seconds"].type == "histogram"
    for name, kind in {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
                       "vllm:kv_cache_usage_perc": "gauge", "vllm:time_to_first_token_seconds": "histogram",
                       "vllm:e2e_request_latency_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
                       "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
                       "vllm:num_preemptions": "counter", "vllm:prefix_cache_hits": "counter",
                       "vllm:prefix_cache_queries": "counter", "vllm:request_success": "counter",
                       "vllm:request_queue_time_seconds": "histogram", "vllm:request_prefill_time_seconds": "histogram",
                       "vllm:request_decode_time_seconds": "histogram",
                       "vllm:request_inference_time_seconds": "histogram"}.items():
        assert families[name].type == kind, name
        assert all(x.labels.get("model_name") == "demo" for x in families[name].samples), name
    assert {x.labels["engine"] for x in families["vllm:num_requests_running"].samples} == {"prefill-0", "decode-0"}
    assert value("vllm:generation_tokens") >= 2
    assert value("vllm:request_success", finished_reason="length") >= 1
    assert value("vllm:prefix_cache_queries") >= value("vllm:prefix_cache_hits") and value("vllm:prefix_cache_queries")

    def count(name: str) -> float:
        return sum(x.value for x in families[name].samples if x.name.endswith("_count"))

    def total(name: str) -> float:
        return sum(x.value for x in families[name].samples if x.name.endswith("_sum"))

    # the engine's phases of every successful request: queue + prefill + decode within its e2e
    phases = count("vllm:request_prefill_time_seconds")
    assert phases >= 1 and phases <= count("vllm:e2e_request_latency_seconds")
    assert total("vllm:request_inference_time_seconds") <= total("vllm:e2e_request_latency_seconds")
    assert total("vllm:request_prefill_time_seconds") > 0


async def test_the_shipped_dashboard_queries_only_series_a_launch_exports(pd):
    """examples/observability/grafana-dashboard.json: every metric it queries is a family on /metrics."""
    import re

    from deploy import ROOT

    dash = json.loads((ROOT / "examples/observability/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b((?:microserve|process|vllm:)[a-z0-9_:]*)", e)}
    async with aiohttp.ClientSession() as s, s.get(pd.url + "/metrics") as r:
        families = set(re.findall(r"^# TYPE (\S+) ", await r.text(), re.M))
    def family(name: str) -> str:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        return base if base in families else re.sub(r"_total$", "", name) + "_total"
    missing = sorted(n for n in names if family(n) not in families and re.sub(r"_total$", "", n) not in families)
    assert len(exprs) >= 15 and not missing, missing


async def test_metrics_parse_and_move(pd):
    before = await metrics(pd)
    for name in ("microserve_time_to_first_token_seconds_count", "microserve_inter_token_latency_seconds_count",
                 "microserve_e2e_request_latency_seconds_count", "microserve_kv_transfer_seconds_count",
                 *(f"microserve_kv_transfer_bytes_total{{transport={t}}}" for t in TRANSPORTS)):
        assert name in before, name
    for engine in pd.engines:
        for name in ("microserve_engine_running_requests", "microserve_engine_kv_blocks_used",
                     "microserve_prefix_cache_hit_tokens_total", "microserve_kv_blocks_lent",
                     "microserve_kv_blocks_borrowed", "microserve_remote_attention_seconds_count",
                     "microserve_remote_attention_served_total"):
            assert f"{name}{{engine={engine}}}" in before, (name, engine)
        kernels = [k for k in before if k.startswith(f"microserve_engine_info{{engine={engine},")]
        assert kernels and "kernels=native" in kernels[0] and before[kernels[0]] == 1, kernels
    c = client(pd)
    await c.completions.create(model="demo", prompt="metrics move " * 4, max_tokens=4, temperature=0)
    after = await metrics(pd)
    assert after["microserve_time_to_first_token_seconds_count"] == \
        before["microserve_time_to_first_token_seconds_count"] + 1
    assert after["microserve_e2e_request_latency_seconds_count"] == \
        before["microserve_e2e_request_latency_seconds_count"] + 1
    used = [t for t in TRANSPORTS if after[f"microserve_kv_transfer_bytes_total{{transport={t}}}"]
            > before[f"microserve_kv_transfer_bytes_total{{transport={t}}}"]]
    assert used == ["shm"], used  # counted under the transport that moved them (auto on one host: shm)
    assert after["microserve_engine_computed_tokens_total{engine=prefill-0}"] > \
        before["microserve_engine_computed_tokens_total{engine=prefill-0}"]
    await c.close()


async def raw(dep, method: str, path: str, body=None, key: str | None = KEY, data: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s, s.request(method, dep.url + path, json=body, data=data,
                                                        headers=headers) as r:
        return r.status, await r.json(content_type=None), r.headers


@pytest.mark.parametrize("case,status,param", [
    ({"data": b"{not json"}, 400, None),
    ({"data": b""}, 400, None),
    ({"body": {"model": "demo"}}, 400, "prompt"),
    ({"body": {"model": "demo", "prompt": "x", "max_tokens": "many"}}, 400, "max_tokens"),
    ({"body": {"model": "demo", "prompt": "x", "temperature": -1}}, 400, "temperature"),
    ({"body": {"model": "demo", "prompt": "x", "top_p": 0}}, 400, "top_p"),
    ({"body": {"model": "demo", "prompt": "x", "max_tokens": 0}}, 400, "max_tokens"),
    ({"body": {"model": "demo", "prompt": "x", "n": 0}}, 400, "n"),
    ({"body": {"model": "demo", "prompt": "x", "n": 300}}, 400, "n"),
    ({"body": {"model": "demo", "prompt": "x", "logprobs": 21}}, 400, "logprobs"),
    ({"body": {"model": "demo", "prompt": "x", "prompt_logprobs": 21}}, 400, "prompt_logprobs"),
    ({"body": {"model": "demo", "prompt": "x", "best_of": 2, "stream": True}}, 400, "best_of"),
    ({"body": {"model": "demo", "prompt": "x", "n": 2, "best_of": 1}}, 400, "best_of"),
    ({"body": {"model": "demo", "prompt": "x", "presence_penalty": 3}}, 400, "presence_penalty"),
    ({"body": {"model": "demo", "prompt": "x", "repetition_penalty": 0}}, 400, "repetition_penalty"),
    ({"body": {"model": "demo", "prompt": "x", "min_tokens": 50, "max_tokens": 5}}, 400, "min_tokens"),
    ({"body": {"model": "demo", "prompt": "x", "logit_bias": {"a": 1}}}, 400, "logit_bias"),
    ({"body": {"model": "demo", "prompt": "x", "min_p": 2}}, 400, "min_p"),
    ({"body": {"model": "demo", "prompt": [1, "a"]}}, 400, "prompt"),
    ({"body": {"model": "demo", "prompt": [100000]}}, 400, "prompt"),
    ({"body": {"model": "demo", "prompt": ""}}, 400, "prompt"),
    ({"body": {"model": "demo", "prompt": "y" * (MAX_LEN + 10)}}, 400, "prompt"),
    ({"body": {"model": "demo", "prompt": "y" * 1000, "max_tokens": 100}}, 400, "max_tokens"),
    ({"body": {"model": "gpt-4", "prompt": "x"}}, 404, "model"),
])
async def test_bad_completion_requests(pd, case, status, param):
    code, body, _ = await raw(pd, "POST", "/v1/completions", case.get("body"), data=case.get("data"))
    assert code == status, body
    assert set(body["error"]) >= {"message", "type", "code", "param"} and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body


async def test_bad_chat_requests_and_auth(pd):
    code, body, _ = await raw(pd, "POST", "/v1/chat/completions", {"model": "demo", "messages": []})
    assert code == 400 and body["error"]["param"] == "messages"
    code, body, _ = await raw(pd, "POST", "/v1/chat/completions", {"model": "demo", "messages": [{"content": "x"}]})
    assert code == 400  # no role
    code, body, _ = await raw(pd, "POST", "/v1/chat/completions",
                              {"model": "demo", "messages": [{"role": "user", "content": "x"}], "tools": [{}]})
    assert code == 400 and body["error"]["param"] == "tools"
    for key in (None, "wrong"):
        code, body, _ = await raw(pd, "POST", "/v1/completions", {"model": "demo", "prompt": "x"}, key=key)
        assert code == 401 and body["error"]["type"] == "authentication_error"
    code, _, _ = await raw(pd, "GET", "/v1/models", key=None)
    assert code == 401
    code, body, _ = await raw(pd, "GET", "/v1/nope")
    assert code == 404 and "error" in body
    code, body, _ = await raw(pd, "GET", "/health", key=None)  # health and metrics need no key
    assert code == 200 and body["status"] == "ok"
    # only an API key: the admin API is off, and the API key does not open it
    code, body, _ = await raw(pd, "GET", "/admin/engines")
    assert code == 403 and "--admin-key" in body["error"]["message"]
    code, body, _ = await raw(pd, "PUT", "/admin/scale", {"decode": 2})
    assert code == 403
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=pd.base_url, api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        await client(pd).completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        await client(pd).chat.completions.create(model="demo", messages=[{"role": "user", "content": "z" * 1100}])


async def test_stop_strings_and_batch_prompts(pd, llm):
    base = llm.generate(["stop here"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].text
    stop = base[5:8]
    assert stop and stop in base
    want = base[:base.index(stop)]
    c = client(pd)
    out = await c.completions.create(model="demo", prompt="stop here", max_tokens=24, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    stream = await c.completions.create(model="demo", prompt="stop here", max_tokens=24, temperature=0, stop=stop,
                                        stream=True, extra_body={"ignore_eos": True})
    chunks = [ch async for ch in stream]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert out.choices[0].stop_reason == stop and chunks[-1].choices[0].stop_reason == stop  # vLLM's field
    assert out.system_fingerprint == f"microserve-{microserve.__version__}"
    ids = llm.generate(["stop here"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].token_ids
    by_id = await c.completions.create(model="demo", prompt="stop here", max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True, "stop_token_ids": [ids[6]]})
    assert by_id.choices[0].finish_reason == "stop" and by_id.choices[0].stop_reason == ids[6]
    long = await c.completions.create(model="demo", prompt="stop here", max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length" and long.choices[0].stop_reason is None
    batch = await c.completions.create(model="demo", prompt=["stop here", "other"], max_tokens=6, temperature=0)
    ref = llm.generate(["stop here", "other"], SamplingParams(max_tokens=6, temperature=0))
    assert [ch.text for ch in sorted(batch.choices, key=lambda ch: ch.index)] == [o.text for o in ref]
    assert batch.usage.completion_tokens == sum(len(o.token_ids) for o in ref)
    await c.close()
    await assert_no_leaks(pd.engines)


async def wait_running(engines: dict[str, str], timeout: float = 20.0) -> None:
    """Until some engine runs a request (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        for name, address in engines.items():
            async with EngineHandle(address, name=name, timeout=10) as h:
                if (await h.stats()).running:
                    return
        assert time.monotonic() < deadline, "no engine ever ran the request"
        await asyncio.sleep(0.02)


async def test_client_disconnect_aborts_on_engines(pd):
    payload = {"model": "demo", "prompt": "disconnect me " * 8, "max_tokens": 900, "temperature": 0,
               "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
        async with s.post(pd.url + "/v1/completions", json=payload) as r:
            assert r.status == 200
            got = 0
            async for line in r.content:
                got += line.startswith(b"data: {")
                if got >= 3:
                    break  # leave mid-stream: the connection closes here
        await assert_no_leaks(pd.engines)
        # non-streaming, too: cancel while an engine runs it (a fixed sleep could cancel it
        # before the gateway even read it, and such a request never counts)
        task = asyncio.ensure_future(s.post(pd.url + "/v1/completions", json=payload | {"stream": False}))
        await wait_running(pd.engines)
        assert not task.done()
        task.cancel()
    await assert_no_leaks(pd.engines)
    # NOTE: the router counts a request when its cleanup ends, just after the engines' aborts are
    # answered: the count may trail the engines by a moment, so wait for it (bounded)
    deadline = time.monotonic() + 10
    while (m := await metrics(pd)).get("microserve_requests_total{status=aborted}", 0) < 2:
        assert time.monotonic() < deadline, {k: v for k, v in m.items() if k.startswith("microserve_requests_total")}
        await asyncio.sleep(0.1)


async def test_router_over_running_engines_and_queue_limit(pd, llm):
    """`microserve router` over the launch's engines; --max-pending 2 turns the third request into a 429."""
    args = ["--strategy", "strategies/round_robin.py", "--max-pending", "2", "--log-level", "error"]
    for address in pd.engines.values():
        args += ["--engine", f"engine={address}"]
    dep = start_router(*args)
    try:
        async with microserve.AsyncClient(dep.url) as sdk:
            [name] = await sdk.models()  # the folder name the engines report
            assert name.startswith("demo")
            # NOTE: EOS may come before max_tokens: the offline engine says how many tokens to expect
            ref = llm.generate(["sdk"], SamplingParams(max_tokens=8, temperature=0))[0]
            want, n = ref.text, len(ref.token_ids)
            out = await sdk.completions("sdk", max_tokens=8, temperature=0)
            assert out.text == want and out.usage["completion_tokens"] == n
            pieces = [p async for p in sdk.stream_completions("sdk", max_tokens=8, temperature=0)]
            assert "".join(p.text for p in pieces) == want and pieces[-1].usage["completion_tokens"] == n
            chat = await sdk.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, ignore_eos=True)
            assert chat.finish_reason == "length"
            with pytest.raises(APIError) as err:
                await sdk.completions("x", max_tokens=10**6)
            assert err.value.status == 400

            long = {"max_tokens": 400, "temperature": 0, "ignore_eos": True}
            results = await asyncio.gather(*(sdk.completions(f"busy {i}", **long) for i in range(4)),
                                           return_exceptions=True)
            refused = [r for r in results if isinstance(r, APIError)]
            assert refused and all(r.status == 429 for r in refused), results
            assert any(not isinstance(r, Exception) for r in results)
        async with aiohttp.ClientSession() as s:
            async with s.post(dep.url + "/v1/completions", json={"prompt": "a"}) as r:
                assert r.status == 200
            tasks = [asyncio.ensure_future(s.post(dep.url + "/v1/completions", json={"prompt": f"b{i}", **long}))
                     for i in range(3)]
            statuses = []
            for t in tasks:
                r = await t
                statuses.append(r.status)
                if r.status == 429:
                    assert int(r.headers["Retry-After"]) >= 1
                    assert json.loads(await r.text())["error"]["type"] == "rate_limit_error"
            assert 429 in statuses
    finally:
        assert dep.stop() == 0
    await assert_no_leaks(pd.engines)


async def test_models_tokenize_and_detokenize_as_vllm(pd, llm):
    status, body, _ = await raw(pd, "GET", "/v1/models")
    (entry,) = body["data"]
    assert status == 200 and entry["root"] and entry["parent"] is None and entry["permission"][0]["allow_view"]
    status, body, _ = await raw(pd, "POST", "/tokenize", {"prompt": "Hello, tokens"})
    assert status == 200 and body["tokens"] == llm.tokenizer.encode("Hello, tokens") and body["count"] == len(
        body["tokens"]) and body["max_model_len"] > 0
    status, back, _ = await raw(pd, "POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"].endswith("Hello, tokens")
    status, chat, _ = await raw(pd, "POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and chat["count"] > 0
    for path, bad in (("/tokenize", {}), ("/detokenize", {"tokens": [10**9]}), ("/tokenize", {"prompt": 3})):
        assert (await raw(pd, "POST", path, bad))[0] == 400, (path, bad)
    assert (await raw(pd, "POST", "/tokenize", {"prompt": "x"}, key=None))[0] == 401  # guarded like /v1


async def test_a_closed_port_is_an_api_error_in_the_sdk():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with microserve.AsyncClient(f"http://127.0.0.1:{port}", model="demo") as c:
        with pytest.raises(APIError, match="cannot reach") as err:
            await c.completions("hi")
    assert err.value.status == 0


async def test_vllm_fields_stop_strings_kept_stop_tokens_dropped_temperature_range(pd, llm):
    c = client(pd)
    base = llm.generate(["stop here"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    stop = base.text[5:8]
    out = await c.completions.create(model="demo", prompt="stop here", max_tokens=24, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert out.choices[0].text == base.text[:base.text.index(stop) + len(stop)]
    # a stop token ends the request; its text is not in the output unless asked for
    target = base.token_ids[6]
    upto = base.token_ids[:base.token_ids.index(target) + 1]
    for include in (False, True):
        out = await c.completions.create(model="demo", prompt="stop here", max_tokens=24, temperature=0,
                                         extra_body={"stop_token_ids": [target], "ignore_eos": True,
                                                     "include_stop_str_in_output": include})
        want = llm.tokenizer.decode(upto if include else upto[:-1])
        assert out.choices[0].text == want and out.choices[0].finish_reason == "stop", include
    with pytest.raises(openai.BadRequestError, match="temperature"):
        await c.completions.create(model="demo", prompt="x", max_tokens=2, temperature=3)
    await c.close()


async def test_chat_template_options(pd, demo_path):
    from microserve.engine.model.tokenizer import Tokenizer

    tok = Tokenizer(demo_path)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    open_text = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert open_text.endswith("The answer is")
    status, body, _ = await raw(pd, "POST", "/v1/chat/completions", {
        "model": "demo", "messages": messages, "max_tokens": 2, "add_generation_prompt": False,
        "continue_final_message": True})
    assert status == 200 and body["usage"]["prompt_tokens"] == len(tok.encode(open_text, add_special_tokens=False))
    status, body, _ = await raw(pd, "POST", "/v1/chat/completions", {
        "model": "demo", "messages": messages, "max_tokens": 2, "continue_final_message": True})
    assert status == 400 and body["error"]["param"] == "continue_final_message"


async def test_one_stream_event_per_token_with_running_usage(pd, llm):
    """Byte-level tokens that do not complete a character still get their own event (empty text), as
    vLLM streams them, so per-event timings read one token per event; continuous_usage_stats counts
    them on every chunk."""
    tok = llm.tokenizer
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompts = [f"bytes {i}: " + "é ü ñ 漢字 " * (i % 3 + 1) for i in range(8)]
    outs = llm.generate(prompts, params)
    prompt, want = next((p, o) for p, o in zip(prompts, outs)
                        if any("\ufffd" in tok.decode([t]) for t in o.token_ids))  # a piece of a character
    c = client(pd)
    for kind in ("completion", "chat"):
        if kind == "completion":
            stream = await c.completions.create(
                model="demo", prompt=prompt, max_tokens=32, temperature=0, stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True})
        else:
            stream = await c.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": prompt}], max_tokens=32, temperature=0,
                stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
                extra_body={"ignore_eos": True})
        chunks = [ch async for ch in stream]
        events = [ch for ch in chunks if ch.choices]
        assert len(events) == 32, kind
        assert [ch.usage.completion_tokens for ch in events] == list(range(1, 33))
        assert chunks[-1].usage.completion_tokens == 32 and not chunks[-1].choices
        if kind == "completion":
            assert "".join(ch.choices[0].text for ch in events) == want.text
            assert any(ch.choices[0].text == "" for ch in events)
    await c.close()


async def test_responses_api_equals_chat(pd):
    """client.responses.create, plain and streamed, gives the chat completion's text for the same
    messages (instructions as the system message); unsupported fields are 400s that name them."""
    c = client(pd)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    chat = await c.chat.completions.create(model="demo", messages=messages, max_tokens=16, temperature=0)
    want = chat.choices[0].message.content
    resp = await c.responses.create(model="demo", instructions="Be brief.", input="Name three colours.",
                                    max_output_tokens=16, temperature=0, store=False)
    assert resp.output_text == want and resp.object == "response" and resp.model == "demo"
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    items = await c.responses.create(model="demo", input=[
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name three colours."}]}],
        max_output_tokens=16, temperature=0)
    assert items.output_text == want
    events = [e async for e in await c.responses.create(model="demo", instructions="Be brief.",
                                                        input="Name three colours.", max_output_tokens=16,
                                                        temperature=0, stream=True)]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == f"response.{resp.status}" and events[-1].response.output_text == want
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for extra, param in ((dict(tools=[{"type": "web_search"}]), "tools"), (dict(store=True), "store"),
                         (dict(previous_response_id="resp_1"), "previous_response_id"),
                         (dict(extra_body={"frobnicate": 1}), "frobnicate")):
        with pytest.raises(openai.BadRequestError) as err:
            await c.responses.create(model="demo", input="hi", max_output_tokens=4, **extra)
        assert param in err.value.message, (param, err.value.message)
    with pytest.raises(openai.NotFoundError):
        await c.responses.create(model="nope", input="hi", max_output_tokens=4)
    await c.close()
    await assert_no_leaks(pd.engines)
