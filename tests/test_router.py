"""The router over engines started separately: failures, cache-aware routing, context
migration, deadlines, `microserve.connect`, and strategy files (loader, CLI errors)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import openai
import pytest
from deploy import start_router
from engines import start_engine, wait_engine
from test_gateway import metrics
from test_launch import assert_no_leaks

import microserve
from microserve import LLM, SamplingParams
from microserve.protocol import KVEvent, Request
from microserve.router.prefix_index import PrefixIndex
from microserve.router.strategy import StrategyError, load_strategy, parse_roles

COMMON = ["--num-kv-blocks", "512", "--max-model-len", "2048", "--log-level", "error"]
PREFIX = "A long shared system prompt about serving. " * 4  # ~176 tokens: 11 blocks


@pytest.fixture(scope="module")
def llm(demo_path):
    return LLM(demo_path)


def want(llm, prompt, n=8):
    return llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].text


def router(strategy: str, engines, *args: str):
    cmd = ["--strategy", strategy, "--served-model-name", "demo", "--log-level", "error", *args]
    for e in engines:
        cmd += ["--engine", f"engine={e.rpc}"]
    return start_router(*cmd)


def oai(dep) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)


@pytest.mark.slow
async def test_engine_failures_retry_then_error_and_keep_serving(demo_path, llm):
    procs = [start_engine(str(demo_path), *COMMON, engine_id=n) for n in ("A", "B", "C")]
    a, b, c = (wait_engine(p) for p in procs)
    dep = router("round_robin", [a, b, c], "--max-retries", "2")
    client = oai(dep)
    try:
        # 1. B wedges (SIGSTOP): requests routed to it before the router notices are restarted elsewhere
        os.kill(b.proc.pid, signal.SIGSTOP)
        prompts = [f"retry me {i}" for i in range(6)]
        outs = await asyncio.wait_for(asyncio.gather(*(
            client.completions.create(model="demo", prompt=p, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True}) for p in prompts)), 60)
        assert [o.choices[0].text for o in outs] == [want(llm, p) for p in prompts]
        m = await metrics(dep)
        assert m["microserve_request_retries_total"] >= 1
        assert m["microserve_engine_up{engine=B,role=engine}"] == 0
        b.kill()

        # 2. C dies while streaming: its streams go on, on A (prompt + the tokens so far), without a gap or
        # a repeat; every stream ends as it would have on one engine, the gateway keeps serving
        retried = (await metrics(dep))["microserve_request_retries_total"]
        streams = [await client.completions.create(model="demo", prompt=f"long {i}", max_tokens=600, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}) for i in range(4)]
        firsts = [await s.__anext__() for s in streams]
        assert all(f.choices for f in firsts)
        c.kill()
        results = await asyncio.gather(*(_drain(s) for s in streams), return_exceptions=True)
        assert results == ["length"] * 4, results
        assert (await metrics(dep))["microserve_request_retries_total"] > retried  # C's streams failed over
        out = await client.completions.create(model="demo", prompt="still serving", max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert out.choices[0].text == want(llm, "still serving")
        async with aiohttp.ClientSession() as s, s.get(dep.url + "/health") as r:
            health = await r.json()
        assert health["engines"] == {"A": "up", "B": "down", "C": "down"}
        await assert_no_leaks({"A": a.rpc})

        # 3. no engine left: 503 with Retry-After, and /health says so
        a.kill()
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as s:
            async with s.post(dep.base_url + "/completions", json={"prompt": "anyone?"}) as r:
                assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
                assert (await r.json())["error"]["code"] == "unavailable"
            async with s.get(dep.url + "/health") as r:
                assert r.status == 503
    finally:
        await client.close()
        assert dep.stop() == 0
        for e in (a, b, c):
            e.kill()


async def _drain(stream) -> str | None:
    reason = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            reason = chunk.choices[0].finish_reason
    return reason


@pytest.fixture(scope="module")
def pair(demo_path):
    procs = [start_engine(str(demo_path), *COMMON, engine_id=n) for n in ("E0", "E1")]
    engines = [wait_engine(p) for p in procs]
    yield engines
    for e in engines:
        assert e.stop() == 0


@pytest.mark.slow
async def test_cache_aware_locality_and_spread(pair, llm):
    dep = router("cache_aware", pair)
    client = oai(dep)
    try:
        before = await metrics(dep)
        prompts = [PREFIX + f"question {i}?" for i in range(6)]
        for p in prompts:  # one after another: the prefix is cached after the first
            out = await client.completions.create(model="demo", prompt=p, max_tokens=4, temperature=0,
                                                  extra_body={"ignore_eos": True})
            assert out.choices[0].text == want(llm, p, 4)
            await asyncio.sleep(0.1)  # KV events reach the router
        after = await metrics(dep)
        routed = {e: after[f"microserve_engine_requests_total{{engine={e}}}"]
                  - before[f"microserve_engine_requests_total{{engine={e}}}"] for e in ("E0", "E1")}
        hits = {e: after[f"microserve_prefix_cache_hit_tokens_total{{engine={e}}}"]
                - before[f"microserve_prefix_cache_hit_tokens_total{{engine={e}}}"] for e in ("E0", "E1")}
        holder = max(routed, key=routed.get)
        other = "E1" if holder == "E0" else "E0"
        assert routed == {holder: 6, other: 0}
        assert hits[holder] >= 5 * 160 and hits[other] == 0, hits

        # a hot prefix: many at once must not all pile onto the holder
        before = after
        hot = [PREFIX + f"hot {i}" for i in range(12)]
        outs = await asyncio.gather(*(client.completions.create(
            model="demo", prompt=p, max_tokens=48, temperature=0, extra_body={"ignore_eos": True}) for p in hot))
        assert all(o.usage.completion_tokens == 48 for o in outs)
        after = await metrics(dep)
        spread = {e: after[f"microserve_engine_requests_total{{engine={e}}}"]
                  - before[f"microserve_engine_requests_total{{engine={e}}}"] for e in ("E0", "E1")}
        assert spread[other] >= 2 and spread[holder] >= 2, spread
    finally:
        await client.close()
        assert dep.stop() == 0
    await assert_no_leaks({e.engine_id: e.rpc for e in pair})


@pytest.mark.slow
async def test_context_migration_moves_kv_and_keeps_output(pair, llm):
    # busy_margin=-1: always move the context when the least loaded engine is not its holder
    dep = router("context_migration", pair, "--strategy-arg", "busy_margin=-1")
    client = oai(dep)
    try:
        prefix = "Another long context, to be moved between engines. " * 4  # cached nowhere yet
        prompts = [prefix + f"migrate {i}" for i in range(6)]
        for p in prompts:
            out = await client.completions.create(model="demo", prompt=p, max_tokens=6, temperature=0,
                                                  extra_body={"ignore_eos": True})
            assert out.choices[0].text == want(llm, p, 6)
            await asyncio.sleep(0.1)
        m = await metrics(dep)
        assert m["sum(microserve_kv_transfer_bytes_total)"] > 0
        assert m["microserve_kv_transfer_seconds_count"] >= 1
    finally:
        await client.close()
        assert dep.stop() == 0
    await assert_no_leaks({e.engine_id: e.rpc for e in pair})


async def test_deadline_is_enforced_and_frees_kv(pair):
    dep = router("round_robin", pair, "--request-timeout", "0.5")
    try:
        with pytest.raises(openai.APIStatusError) as err:
            await oai(dep).completions.create(model="demo", prompt="slow", max_tokens=1800, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert err.value.status_code == 504
    finally:
        assert dep.stop() == 0
    await assert_no_leaks({e.engine_id: e.rpc for e in pair})


async def test_connect_scripts_the_three_calls(pair, llm):
    cluster = await microserve.connect({"prefill": [pair[0].rpc], "decode": [pair[1].rpc]})
    try:
        ids = llm.tokenizer.encode(PREFIX + "connect")
        req = Request("sdk-connect", ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        p, d = cluster.least_loaded("prefill"), cluster.least_loaded("decode")
        end = len(ids) - 1
        ticket = await d.prep_recv(req, end=end)
        if ticket.matched < end:
            result = await p.remote_send(req, ticket.kv, begin=ticket.matched, end=end)
            assert result.bytes > 0
        tokens = [t async for chunk in d.start_generate(req, begin=end) for t in chunk.token_ids]
        assert llm.tokenizer.decode(tokens) == want(llm, PREFIX + "connect")
        await asyncio.sleep(0.2)
        engine, matched = cluster.prefix_index.longest_match(req)
        assert engine is not None and matched >= 160
        assert cluster.load(d).requests == 0 and cluster.engines("decode") == [d]
        late = await microserve.connect([pair[0].rpc, pair[1].rpc])  # joins later: learns caches by snapshot
        try:
            engine, matched = late.prefix_index.longest_match(req)
            assert engine is not None and matched >= 160
        finally:
            await late.close()
    finally:
        await cluster.close()


# -- strategies: the loader and the command line ----------------------------------------
def test_prefix_index_follows_events():
    index = PrefixIndex({"x": "X", "y": "Y"}.get)
    index.add_engine("x", 4)
    index.add_engine("y", 4)
    from kvapi.radix import prefix_hashes

    prompt = list(range(20))
    h = prefix_hashes(prompt, 4)
    index.apply(KVEvent("x", "stored", h[:3], 1))
    index.apply(KVEvent("y", "stored", h[:1], 1))
    assert index.matches(prompt) == {"X": 12, "Y": 4}
    assert index.longest_match(prompt) == ("X", 12)
    index.apply(KVEvent("x", "evicted", h[2:3], 2))
    assert index.longest_match(prompt) == ("X", 8)
    index.apply(KVEvent("x", "stored", h[:1], 1))  # sequence went back: x restarted, its cache is new
    assert index.matches(prompt) == {"X": 4, "Y": 4}
    assert index.longest_match([99, 98, 97, 96]) == (None, 0)


@pytest.mark.parametrize("source,match", [
    ("x = 1\n", "defines no microserve.Strategy"),
    ("from microserve import Strategy\nclass A(Strategy):\n    async def generate(self, r, c):\n        yield 1\n"
     "class B(A):\n    pass\n", "defines 2 Strategy subclasses"),
    ("import not_a_module_anywhere\n", "failed to import: ModuleNotFoundError"),
    ("from microserve import Strategy\nclass A(Strategy):\n    async def generate(self, r, c):\n        return 1\n",
     "must be an async generator"),
    ("from microserve import Strategy\nclass A(Strategy):\n    roles = {'p': 0}\n"
     "    async def generate(self, r, c):\n        yield 1\n", "positive integer"),
])
def test_strategy_loader_errors(tmp_path, source, match):
    path = tmp_path / "s.py"
    path.write_text(source)
    with pytest.raises(StrategyError, match=match):
        load_strategy(path)


def test_strategy_parameters_and_roles():
    s = load_strategy("balanced_pd", {"fraction": "0.25"})
    assert s.fraction == 0.25 and type(s).roles == {"prefill": 1, "decode": 1}
    with pytest.raises(StrategyError, match="no parameter 'fractoin'"):
        load_strategy("balanced_pd", {"fractoin": "0.2"})
    with pytest.raises(StrategyError, match="is not a float"):
        load_strategy("balanced_pd", {"fraction": "lots"})
    with pytest.raises(StrategyError, match="not found"):
        load_strategy("no_such_strategy")
    assert parse_roles("prefill=1, decode=2") == {"prefill": 1, "decode": 2}
    for bad in ("prefill", "prefill=0", "=1", ""):
        with pytest.raises(StrategyError):
            parse_roles(bad)


@pytest.mark.parametrize("args,match", [
    (["--strategy", "pd", "--roles", "engine=2"], "missing: prefill, decode"),
    (["--strategy", "pd", "--engines", "2"], "use --roles"),
    (["--strategy", "nope.py"], "not found"),
    (["--strategy", "round_robin", "--strategy-arg", "x"], "NAME=VALUE"),
])
def test_launch_refuses_bad_layouts_before_starting_engines(args, match):
    res = subprocess.run([sys.executable, "-m", "microserve", "launch", "--model", "demo", "--port", "0", *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert match in res.stderr
