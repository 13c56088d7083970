"""Live migration (`cluster.migrate`): a streaming request moves to another engine with its KV at
several points, over shm and tcp; the client's text equals an unmigrated run and the target computes
only what was not moved."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import openai
import pytest
from deploy import start_launch

from microserve import LLM, SamplingParams
from microserve.router import EngineHandle

MOVE = '''
from microserve import Strategy


class MoveAfter(Strategy):
    roles = {"engine": 2}
    after = 3

    async def generate(self, req, cluster):
        source, target = sorted(cluster.engines(), key=lambda e: e.name)
        generated, stream = [], source.start_generate(req)
        async for chunk in stream:
            generated += chunk.token_ids
            yield chunk
            if chunk.finish_reason is not None:
                return
            if len(generated) >= self.after:
                break
        await stream.aclose()
        async for chunk in cluster.migrate(req, generated, source, to=target):
            yield chunk
'''
PROMPT = "Live migration moves the KV of a running request. " * 4
MAX = 24


@pytest.fixture(scope="module")
def reference(demo_path):
    return LLM(str(demo_path)).generate([PROMPT], SamplingParams(max_tokens=MAX, temperature=0, ignore_eos=True))[0]


SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 77, "presence_penalty": 0.5}


@pytest.fixture(scope="module")
def seeded_reference(demo_path):
    return LLM(str(demo_path)).generate([PROMPT], SamplingParams(max_tokens=MAX, ignore_eos=True, **SEEDED))[0]


ADMIN = "migration-admin"


@pytest.fixture(scope="module")
def deployments(demo_path, tmp_path_factory):
    """One 2-engine deployment per transport, started once; each case swaps in its `after` through
    `PUT /admin/strategy` (a relaunch per case cost ~15 s each)."""
    strategy = tmp_path_factory.mktemp("move") / "move_after.py"
    strategy.write_text(MOVE)
    deps = {}
    try:
        for transport in ("shm", "tcp"):
            deps[transport] = start_launch("--strategy", str(strategy), "--model", str(demo_path), "--transport",
                                           transport, "--served-model-name", "demo", "--num-kv-blocks", "256",
                                           "--admin-key", ADMIN, "--log-level", "error")
        yield strategy, deps
    finally:
        for dep in deps.values():
            assert dep.stop() == 0


# after the first token, early, mid-decode, one token before the end; over shm and tcp; greedy and seeded
@pytest.mark.parametrize("transport,after,seeded", [("shm", 1, False), ("tcp", 3, False), ("shm", 12, False),
                                                    ("tcp", MAX - 1, False), ("shm", 5, True), ("tcp", 17, True)])
async def test_a_migrated_stream_equals_an_unmigrated_run(deployments, reference, seeded_reference,
                                                          transport, after, seeded):
    strategy, deps = deployments
    dep = deps[transport]
    swap = {"path": str(strategy), "args": {"after": str(after)}}  # NOTE: this case's move point, as --strategy-arg
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as s, \
            s.put(dep.url + "/admin/strategy", json=swap) as r:
        assert r.status == 200, await r.text()
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
    engines = sorted(dep.engines.items())
    computed = {}
    for name, address in engines:
        async with EngineHandle(address, name=name, timeout=10) as h:
            computed[name] = (await h.stats()).computed_tokens_total
    ids = []
    sampling = dict(SEEDED) if seeded else {"temperature": 0}
    async for event in await client.completions.create(
            model="demo", prompt=PROMPT, max_tokens=MAX, stream=True, **sampling,
            extra_body={"ignore_eos": True, "return_token_ids": True}):
        ids += event.choices[0].model_extra.get("token_ids") or [] if event.choices else []
    assert ids == (seeded_reference if seeded else reference).token_ids, (transport, after)
    target_name, target_address = engines[1]
    async with EngineHandle(target_address, name=target_name, timeout=10) as h:
        used = (await h.stats()).computed_tokens_total - computed[target_name]
    # the target computed at most a partial block and the last token, then its decode steps
    # (a recompute would be the whole prompt, over 200 tokens; earlier cases' KV in its cache only lowers it)
    assert 0 < used <= 16 + (MAX - after), (after, used)


MOVE_IN_PREFILL = '''
import asyncio

from microserve import Strategy


class MoveInPrefill(Strategy):
    roles = {"engine": 2}
    cached = 256  # move once the source has this many prompt tokens in its prefix cache

    async def generate(self, req, cluster):
        source, target = sorted(cluster.engines(), key=lambda e: e.name)
        stream = source.start_generate(req)
        first = asyncio.ensure_future(stream.__anext__())
        while not first.done() and cluster.prefix_index.matches(req).get(source, 0) < self.cached:
            await asyncio.sleep(0.002)
        if first.done():
            raise RuntimeError("the prefill ended before the move")
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await stream.aclose()
        async for chunk in cluster.migrate(req, [], source, to=target):
            yield chunk
'''


async def test_a_request_moves_during_its_prefill_with_what_was_computed(demo_path, tmp_path):
    """Before its first token, a request moves with the prompt blocks the source has computed; the
    target computes only the rest, and the output equals an unmigrated run."""
    prompt = "".join(chr(97 + (j * j + 3 * j) % 26) for j in range(1500))
    ref = LLM(str(demo_path)).generate([prompt], SamplingParams(max_tokens=MAX, temperature=0, ignore_eos=True))[0]
    strategy = tmp_path / "move_in_prefill.py"
    strategy.write_text(MOVE_IN_PREFILL)
    dep = start_launch("--strategy", str(strategy), "--model", str(demo_path), "--served-model-name", "demo",
                       "--num-kv-blocks", "512", "--max-num-batched-tokens", "32", "--log-level", "error")
    try:
        client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
        engines = sorted(dep.engines.items())
        before = [(await stats(a)).computed_tokens_total for _, a in engines]
        out = await client.completions.create(model="demo", prompt=prompt, max_tokens=MAX, temperature=0,
                                              extra_body={"ignore_eos": True, "return_token_ids": True})
        assert out.choices[0].model_extra["token_ids"] == ref.token_ids
        src, dst = [(await stats(a)).computed_tokens_total - b for (_, a), b in zip(engines, before)]
        n = len(ref.prompt_token_ids)
        assert 256 <= src < n, src  # the source computed part of the prompt and stopped
        assert dst <= n - 256 + MAX + 32, (dst, n)  # the target did not compute the moved part again
    finally:
        assert dep.stop() == 0


async def test_rebalance_moves_a_long_decode_and_keeps_its_output(demo_path, reference):
    # thresholds that always hold, so the shipped strategy's move path runs on every request
    dep = start_launch("--strategy", "strategies/rebalance.py", "--strategy-arg", "high=-1",
                       "--strategy-arg", "margin=-2", "--strategy-arg", "min_tokens=4", "--model", str(demo_path),
                       "--served-model-name", "demo", "--num-kv-blocks", "256", "--log-level", "error")
    try:
        client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
        before = {}
        for name, address in dep.engines.items():
            async with EngineHandle(address, name=name, timeout=10) as h:
                before[name] = (await h.stats()).kv_bytes_sent
        out = await client.completions.create(model="demo", prompt=PROMPT, max_tokens=MAX, temperature=0,
                                              extra_body={"ignore_eos": True, "return_token_ids": True})
        assert out.choices[0].model_extra["token_ids"] == reference.token_ids
        sent = 0
        for name, address in dep.engines.items():
            async with EngineHandle(address, name=name, timeout=10) as h:
                sent += (await h.stats()).kv_bytes_sent - before[name]
        assert sent > 0, "no KV moved: the request was not migrated"
    finally:
        assert dep.stop() == 0


@pytest.fixture(scope="module")
def pair(demo_path):
    dep = start_launch("--strategy", "strategies/round_robin.py", "--engines", "2", "--model", str(demo_path),
                       "--api-key", "k", "--admin-key", "k", "--served-model-name", "demo", "--num-kv-blocks", "1600",
                       "--max-num-seqs", "32", "--log-level", "error")
    yield dep
    dep.stop()


def long_prompts(n: int) -> list[str]:
    return [f"{i:03d} " + "".join(chr(97 + (i * 7 + j * j) % 26) for j in range(296)) for i in range(n)]


async def stream(client, prompt: str, max_tokens: int, progress=None, **sampling) -> list[int]:
    """The token ids of one streamed completion; `progress(n)` after each event with the count so far."""
    ids = []
    async for event in await client.completions.create(
            model="demo", prompt=prompt, max_tokens=max_tokens, stream=True, **(sampling or {"temperature": 0}),
            extra_body={"ignore_eos": True, "return_token_ids": True}):
        ids += event.choices[0].model_extra.get("token_ids") or [] if event.choices else []
        if progress is not None:
            progress(len(ids))
    return ids


async def stats(address: str):
    async with EngineHandle(address, timeout=10) as h:
        return await h.stats()


async def test_drain_moves_16_running_streams_with_their_kv(pair):
    """`ctl remove` (DELETE /admin/engines/{id}) with 16 streams running on two engines: the drained
    engine's streams move with their KV to the other one and every stream equals an undrained run
    (greedy and seeded); the drain ends while the streams still run; no block leaks anywhere; the
    target computes no moved prompt again."""
    import asyncio

    dep = pair
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="k", max_retries=0, timeout=120)
    prompts, tokens = long_prompts(16), 768
    sampled = [dict(SEEDED, seed=i) if i % 2 else {} for i in range(16)]
    ref = await asyncio.gather(*(stream(client, p, tokens, **s) for p, s in zip(prompts, sampled)))
    # fresh prompts of the same shape, so nothing is in a prefix cache; their reference comes after
    prompts = [p.replace(" ", "#", 1) for p in prompts]
    keep, drained = dep.engines["engine-0"], dep.engines["engine-1"]
    before, sent_before = await stats(keep), (await stats(drained)).kv_bytes_sent
    load = asyncio.gather(*(stream(client, p, tokens, **s) for p, s in zip(prompts, sampled)))
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as s, s.delete(dep.url + "/admin/engines/engine-1",
                                                       headers={"Authorization": "Bearer k"}) as r:
        assert r.status == 200, await r.text()
    streams_still_running = not load.done()  # the drain ended before the streams: it moved them, not waited
    got = await load
    after = await stats(keep)
    ref = await asyncio.gather(*(stream(client, p, tokens, **s) for p, s in zip(prompts, sampled)))
    assert got == ref
    assert all(len(ids) == tokens for ids in got)
    assert streams_still_running
    assert (await stats(drained)).kv_bytes_sent > sent_before, "no KV moved"
    # engine-0's own 8 requests cost at most prompt + tokens each; the 8 moved ones at most a partial block
    # and their remaining decode steps (a recompute would add ~300 prompt tokens each)
    prompt_len = len(prompts[0]) + 1
    assert after.computed_tokens_total - before.computed_tokens_total <= 8 * (prompt_len + tokens) + 8 * (16 + tokens)
    for address in (keep, drained):
        s = await stats(address)
        assert s.running == 0 and s.kv_blocks_used == s.kv_blocks_cached, s


async def test_kill_9_with_streams_in_flight_every_stream_completes_exactly(demo_path):
    """An engine SIGKILLed mid-stream: each of its requests continues on the other engine (prompt +
    tokens so far, `sampling.resumed`); every stream, greedy or seeded, equals a run without the kill."""
    import asyncio
    import os
    import signal

    dep = start_launch("--strategy", "strategies/round_robin.py", "--engines", "2", "--model", str(demo_path),
                       "--api-key", "k", "--served-model-name", "demo", "--num-kv-blocks", "1600",
                       "--max-retries", "3", "--log-level", "critical")
    try:
        client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="k", max_retries=0, timeout=120)
        prompts = [p.replace(" ", "!", 1) for p in long_prompts(12)]
        sampled = [dict(SEEDED, seed=100 + i) if i % 2 else {} for i in range(12)]
        ref = await asyncio.gather(*(stream(client, p, 128, **s) for p, s in zip(prompts, sampled)))
        victim = next(pid for pid in dep.children() if b"engine-1" in Path(f"/proc/{pid}/cmdline").read_bytes())
        counts, streaming = [0] * 12, asyncio.Event()

        def seen(i: int):
            def update(n: int) -> None:
                counts[i] = n
                if min(counts) >= 16:
                    streaming.set()
            return update

        load = asyncio.gather(*(stream(client, p, 128, progress=seen(i), **s)
                                for i, (p, s) in enumerate(zip(prompts, sampled))))
        async with asyncio.timeout(120):
            await streaming.wait()  # NOTE: every stream under way, none near its end (the kill lands mid-stream)
        os.kill(victim, signal.SIGKILL)
        got = await load
        assert [len(ids) for ids in got] == [128] * 12
        assert got == ref
        async with aiohttp.ClientSession() as s, s.get(dep.url + "/metrics") as r:
            retries = [line for line in (await r.text()).splitlines()
                       if line.startswith("microserve_request_retries_total")]
        assert retries and float(retries[0].split()[-1]) >= 1, "no request was failed over"
    finally:
        dep.stop()
