"""DistAttention between real engine processes: a borrower whose pool holds 1,024 tokens serves a
3,000-token prompt and 200 decoded tokens with ranges of its prompt on two lenders (the KV written
through kvapi.transfer, each layer's attention over a lent range computed on its lender). Outputs equal
an engine whose pool is large enough; lifetimes end with the request; a lost lender fails the request
alone, quickly, with a clear error, and leaks nothing."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from checkpoints import make_checkpoint
from engines import start_engine, wait_engine

from microserve import SamplingParams
from microserve.protocol import Request
from microserve.router import EngineCallError, EngineHandle

BS, RANGE = 16, 256
COMMON = ["--block-size", str(BS), "--max-num-batched-tokens", "256", "--log-level", "error"]
SAMPLING = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("da"), "llama", max_position_embeddings=4096)
    return str(path)


@pytest.fixture(scope="module")
def engines(model):
    layout = {"B": ["--num-kv-blocks", "64"], "L1": ["--num-kv-blocks", "128"], "L2": ["--num-kv-blocks", "128"],
              "R": ["--num-kv-blocks", "256", "--no-prefix-caching"]}
    procs = {name: start_engine(model, *COMMON, *extra, engine_id=name) for name, extra in layout.items()}
    running = {name: wait_engine(p) for name, p in procs.items()}
    yield running
    for eng in running.values():
        eng.proc.terminate()
    for eng in running.values():
        eng.proc.wait(30)


def prompt_of(n: int, seed: int, vocab: int = 320) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, vocab) for _ in range(n)]


async def collect(stream) -> tuple[list[int], list]:
    tokens, logprobs = [], []
    async for chunk in stream:
        tokens += chunk.token_ids
        logprobs += chunk.logprobs or []
    return tokens, logprobs


async def lend_overflow(req: Request, lenders: list[EngineHandle], begin: int, end: int) -> list:
    """Ranges of RANGE tokens over [begin, end), dealt to the lenders in turn."""
    return [await lenders[i % len(lenders)].lend(req, b, b + RANGE) for i, b in enumerate(range(begin, end, RANGE))]


async def settle(h: EngineHandle, ok, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not ok(s := await h.stats()):
        assert time.monotonic() < deadline, f"{h.name}: {s}"
        await asyncio.sleep(0.05)
    return s


async def test_a_prompt_three_times_the_pool_decodes_as_one_large_engine(engines):
    b, l1, l2, r = (EngineHandle(engines[n].rpc, name=n, timeout=60.0) for n in ("B", "L1", "L2", "R"))
    try:
        prompt = prompt_of(3000, seed=1)
        with pytest.raises(EngineCallError, match="more KV blocks") as err:
            await collect(b.start_generate(Request("too-big", prompt, SAMPLING)))
        assert err.value.code == "bad_request"
        want, want_lps = await collect(r.start_generate(Request("ref", prompt, SAMPLING)))
        cached = [(await h.stats()).kv_blocks_cached for h in (l1, l2)]
        sent, served = (await b.stats()).remote_attends, [(await h.stats()).attends_served for h in (l1, l2)]

        req = Request("dist", prompt, SAMPLING)
        lent = await lend_overflow(req, [l1, l2], RANGE, 2816)  # B keeps [0, 256) and [2816, 3200)
        assert [(await h.stats()).kv_blocks_lent for h in (l1, l2)] == [80, 80]
        got, lps = await collect(b.start_generate(req, lenders=lent))
        assert got == want
        assert len(lps) == len(want_lps) == 200
        for lp, ref in zip(lps, want_lps):
            assert lp.logprob == pytest.approx(ref.logprob, abs=1e-4)
            assert [t for t, _ in lp.top] == [t for t, _ in ref.top]
            assert [v for _, v in lp.top] == pytest.approx([v for _, v in ref.top], abs=1e-4)
        s = await b.stats()
        assert s.kv_blocks_used == s.kv_blocks_cached <= 64 and s.running == 0
        # one attend message per lender, layer and step once a range moved (200 decode steps at least)
        layers = (await b.health()).kv_spec.num_layers
        got_served = [(await h.stats()).attends_served - n for h, n in zip((l1, l2), served)]
        assert s.remote_attends - sent == sum(got_served) and min(got_served) >= 200 * layers, got_served
        assert [(await h.stats()).kv_blocks_cached for h in (l1, l2)] == cached, "lent KV entered a prefix cache"
        for h in (l1, l2):  # the request ended: its strategy aborts it on the lenders
            assert await h.abort(req.request_id)
            await settle(h, lambda s: s.kv_blocks_lent == 0 and s.open_tickets == 0)
    finally:
        for h in (b, l1, l2, r):
            await h.close()


async def test_a_lender_killed_mid_decode_fails_its_request_quickly_and_leaks_nothing(engines, model):
    lost = wait_engine(start_engine(model, *COMMON, "--num-kv-blocks", "128", engine_id="L3"))
    b, l1, l3 = (EngineHandle(rpc, name=n, timeout=60.0) for n, rpc in
                 (("B", engines["B"].rpc), ("L1", engines["L1"].rpc), ("L3", lost.rpc)))
    try:
        before = await b.stats()
        prompt = prompt_of(2000, seed=2)
        req = Request("lost", prompt, SAMPLING)
        lent = await lend_overflow(req, [l1, l3], RANGE, 1792)
        stream = b.start_generate(req, lenders=lent)
        first = await anext(aiter(stream))
        assert first.token_ids
        assert (await b.stats()).kv_blocks_borrowed == (1792 - RANGE) // BS  # every lent range is on its lender
        lost.proc.kill()
        with pytest.raises(EngineCallError) as err:  # NOTE: bounded by the attend deadline (ATTEND_TIMEOUT_S, 5 s)
            async for _ in stream:
                pass
        assert err.value.code == "unavailable" and "lender" in str(err.value).lower(), err.value
        assert err.value.remote and err.value.peer == "L3"  # the router checks the lender, not the borrower
        await settle(b, lambda s: s.running == 0 and s.kv_blocks_used == s.kv_blocks_cached)
        assert (await b.stats()).kv_blocks_cached >= before.kv_blocks_cached
        assert await l1.abort(req.request_id)
        await settle(l1, lambda s: s.kv_blocks_lent == 0 and s.open_tickets == 0)
        # the borrower still serves
        tokens, _ = await collect(b.start_generate(Request("after", prompt[:100], SAMPLING)))
        assert len(tokens) == 200
    finally:
        for h in (b, l1, l3):
            await h.close()
        lost.proc.kill()


async def test_launch_dist_attention_serves_a_prompt_no_engine_holds_and_survives_a_lost_lender(engines, model):
    """`launch --strategy strategies/dist_attention.py` over four engines of 1,024 tokens each: a
    2,000-token prompt (token ids, through the official client) decodes as the large engine does, the
    lenders' ranges are freed when it ends, and a small request still runs on one engine. Then a lender
    is SIGKILLed mid-decode: the router checks the engine the borrower names, marks it down and
    continues the stream over the three left (the prompt and the tokens so far recomputed), with the
    same greedy tokens; no block is left lent or used anywhere."""
    import os
    import signal
    from pathlib import Path

    import aiohttp
    import openai
    from deploy import start_launch

    from microserve.engine.model.tokenizer import Tokenizer

    prompt = prompt_of(2000, seed=3, vocab=261)  # NOTE: ids the tokenizer knows (the gateway checks them)
    r = EngineHandle(engines["R"].rpc, name="R", timeout=60.0)
    try:
        want, _ = await collect(r.start_generate(Request("ref-launch", prompt, SAMPLING)))
    finally:
        await r.close()
    tokenizer = Tokenizer(model)
    dep = start_launch("--strategy", "strategies/dist_attention.py", "--engines", "4", "--model", model,
                       *COMMON, "--num-kv-blocks", "64", "--max-retries", "2")
    handles = {name: EngineHandle(rpc, name=name, timeout=10.0) for name, rpc in dep.engines.items()}
    try:
        client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="unused", max_retries=0, timeout=120)
        await asyncio.sleep(2.0)  # NOTE: the router's first stats poll tells it every engine's free blocks
        out = await client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert out.choices[0].text == tokenizer.decode(want[:40])
        small = await client.completions.create(model=model, prompt=prompt[:50], max_tokens=5, temperature=0)
        assert small.choices[0].finish_reason == "length"

        async def idle(h: EngineHandle) -> None:
            await settle(h, lambda s: s.kv_blocks_lent == 0 and s.running == 0 and s.open_tickets == 0
                         and s.kv_blocks_used == s.kv_blocks_cached)

        for h in handles.values():
            await idle(h)
        await asyncio.sleep(1.5)  # NOTE: fresh stats again (the strategy places by them)
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=200, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        text, reasons, killed = "", [], None
        async for chunk in stream:
            text += chunk.choices[0].text
            reasons.append(chunk.choices[0].finish_reason)
            if killed is None and text:
                lent = {n: (await h.stats()).kv_blocks_lent for n, h in handles.items()}
                killed = max(lent, key=lent.get)
                assert lent[killed] > 0, lent
                pid = next(p for p in dep.children()
                           if f"\0{killed}\0".encode() in Path(f"/proc/{p}/cmdline").read_bytes())
                os.kill(pid, signal.SIGKILL)
        assert text == tokenizer.decode(want) and reasons[-1] == "length"
        for name, h in handles.items():
            if name != killed:
                await idle(h)
        async with aiohttp.ClientSession() as s, s.get(dep.url + "/metrics") as got:
            retries = [line for line in (await got.text()).splitlines()
                       if line.startswith("microserve_request_retries_total")]
        assert retries and float(retries[0].split()[-1]) >= 1, "the request was not failed over"
        await client.close()
    finally:
        for h in handles.values():
            await h.close()
        dep.stop()


async def test_attends_keep_a_lent_range_alive_past_its_lease_and_it_ends_when_they_stop(engines):
    """A range lent with a 1.5 s lease and attended every 0.25 s still answers after 3 s (each attend
    renews the lease: the range is marked used, its expiry timer re-arms); once the attends stop, the
    lease ends it and its blocks go back."""
    b, l1 = (EngineHandle(engines[n].rpc, name=n, timeout=60.0) for n in ("B", "L1"))
    try:
        req = Request("renewed", prompt_of(600, seed=5), SAMPLING)
        lent = await l1.lend(req, RANGE, 2 * RANGE, lease_s=1.5)
        await b.remote_send(req, lent.kv, RANGE, 2 * RANGE)
        spec = (await l1.health()).kv_spec
        q = bytes(spec.num_kv_heads * spec.head_dim * 4)  # one row, float32 (the checkpoint's dtype)
        for _ in range(12):
            await l1.attend(lent, 0, [599], q, 0.1)
            await asyncio.sleep(0.25)
        assert (await l1.stats()).kv_blocks_lent == RANGE // BS
        await settle(l1, lambda s: s.kv_blocks_lent == 0 and s.open_tickets == 0)
        with pytest.raises(EngineCallError) as err:
            await l1.attend(lent, 0, [599], q, 0.1)
        assert err.value.code == "not_found"
    finally:
        for h in (b, l1):
            await h.close()


async def test_a_disconnect_mid_decode_and_the_lease_give_every_block_back(engines):
    """The client leaves mid-decode (the borrower's stream closed): the borrower frees the request at once;
    nobody aborts it on the lenders, so their ranges end with the lease (each attend renewed it)."""
    b, l1, l2 = (EngineHandle(engines[n].rpc, name=n, timeout=60.0) for n in ("B", "L1", "L2"))
    try:
        base = [await h.stats() for h in (b, l1, l2)]
        req = Request("gone", prompt_of(1500, seed=4), SAMPLING)
        lent = [await (l1, l2)[i % 2].lend(req, begin, begin + RANGE, lease_s=2.0)
                for i, begin in enumerate(range(RANGE, 1280, RANGE))]
        stream = b.start_generate(req, lenders=lent)
        async for chunk in stream:
            if chunk.token_ids:
                break
        await stream.aclose()
        await settle(b, lambda s: s.running == 0 and s.kv_blocks_used == s.kv_blocks_cached)
        assert [(await h.stats()).kv_blocks_lent for h in (l1, l2)] == [32, 32]  # held until the lease ends
        for h, before in zip((l1, l2), base[1:]):
            await settle(h, lambda s, used=before.kv_blocks_used: s.kv_blocks_lent == 0 and s.open_tickets == 0
                         and s.kv_blocks_used == used)
    finally:
        for h in (b, l1, l2):
            await h.close()
