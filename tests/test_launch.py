"""`microserve launch` with every shipped strategy, called with the official `openai` client.

Each deployment is real: engine subprocesses, ZeroMQ calls, KV transfers, the router and
the aiohttp gateway; strategies that route to the same roles share one, swapped in through
`PUT /admin/strategy`. Greedy outputs must equal `microserve.LLM` on one engine, for
completions and chat, streamed or not; afterwards no engine may hold a leaked block,
and SIGTERM must stop every process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import openai
import pytest
from deploy import start_launch

from microserve import LLM, SamplingParams
from microserve.router import EngineHandle

STRATEGIES = ["round_robin", "pd", "balanced_pd", "adaptive_pd", "context_migration", "cache_aware"]
MAX_TOKENS = 10
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog. " * 3,  # several KV blocks
    "The quick brown fox jumps over the lazy dog. " * 3 + "And then?",  # shares a cached prefix
    "Serving LLMs is mostly about moving KV caches around efficiently.",
]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a KV cache?"}]


@pytest.fixture(scope="module", params=["demo", "llama"])
def model(request, demo_path, llama_ckpt):
    path = str(demo_path if request.param == "demo" else llama_ckpt[0])
    llm = LLM(path)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    texts = [o.text for o in llm.generate(PROMPTS, greedy)]
    chat_ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(CHAT), add_special_tokens=False)
    chat_text = llm.generate([chat_ids], greedy)[0].text
    return path, texts, chat_text


async def assert_no_leaks(engines: dict[str, str]) -> None:
    """Every engine idle: no request, ticket or send left, used blocks == prefix-cached blocks."""
    for name, address in engines.items():
        async with EngineHandle(address, name=name, timeout=10) as h:
            for _ in range(100):
                s = await h.stats()
                if (s.running, s.waiting, s.open_tickets, s.active_sends) == (0, 0, 0, 0) \
                        and s.kv_blocks_used == s.kv_blocks_cached:
                    break
                await asyncio.sleep(0.05)
            assert (s.running, s.waiting, s.open_tickets, s.active_sends) == (0, 0, 0, 0), (name, s)
            assert s.kv_blocks_used == s.kv_blocks_cached, (name, s)


ADMIN = "launch-admin"
# strategies by the engine roles they route to: one deployment per group, the strategy swapped in through
# PUT /admin/strategy (each strategy still serves through a real launch: engines, ZeroMQ, KV, gateway)
GROUPS = {"round_robin": "engine", "context_migration": "engine", "cache_aware": "engine",
          "pd": "pd", "balanced_pd": "pd", "adaptive_pd": "pd"}


@pytest.fixture(scope="module")
def deployments(model):
    """Started on first use, one per role group; at the end SIGTERM must stop every process of each."""
    path = model[0]
    deps: dict[str, tuple] = {}

    def get(group: str):
        if group not in deps:
            first = "round_robin" if group == "engine" else "pd"
            dep = start_launch("--strategy", f"strategies/{first}.py", "--model", path, "--num-kv-blocks", "256",
                               "--admin-key", ADMIN, "--log-level", "error")
            deps[group] = (dep, dep.children())
            assert len(deps[group][1]) == 2
        return deps[group][0]

    yield get
    for dep, children in deps.values():
        assert dep.stop() == 0
        alive = [pid for pid in children if os.path.exists(f"/proc/{pid}")]
        assert not alive, f"engine processes left behind: {alive}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_launch_strategy_matches_one_engine(strategy, model, deployments):
    _, texts, chat_text = model
    dep = deployments(GROUPS[strategy])
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as s, \
            s.put(dep.url + "/admin/strategy", json={"path": f"strategies/{strategy}.py"}) as r:
        assert r.status == 200, await r.text()
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="unused", max_retries=0)
    [model_id] = [m.id async for m in client.models.list()]
    for prompt, want in zip(PROMPTS, texts):  # in order: later prompts hit cached prefixes
        out = await client.completions.create(model=model_id, prompt=prompt, max_tokens=MAX_TOKENS,
                                              temperature=0)
        assert out.choices[0].text == want, (strategy, prompt)
        assert out.usage.completion_tokens == MAX_TOKENS or out.choices[0].finish_reason == "stop"
    streamed = await asyncio.gather(*(_stream_completion(client, model_id, p) for p in PROMPTS))
    assert streamed == texts
    chat = await client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=MAX_TOKENS,
                                                temperature=0)
    assert chat.choices[0].message.content == chat_text
    assert chat.choices[0].message.role == "assistant"
    stream = await client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == chat_text
    assert usage is not None and usage.completion_tokens <= MAX_TOKENS and usage.prompt_tokens > 0
    await client.close()
    await assert_no_leaks(dep.engines)


def test_killed_launcher_takes_its_engines_along(demo_path):
    """Engines carry a parent-death signal: even SIGKILL on `launch` leaves no engine running."""
    dep = start_launch("--strategy", "round_robin", "--model", str(demo_path), "--log-level", "error")
    children = dep.children()
    assert len(children) == 2
    dep.stop(signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(pid) for pid in children):
        time.sleep(0.1)
    assert not [pid for pid in children if _running(pid)]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _stream_completion(client: openai.AsyncOpenAI, model_id: str, prompt: str) -> str:
    stream = await client.completions.create(model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True)
    return "".join([c.choices[0].text async for c in stream if c.choices])


async def test_several_served_names_the_model_path_and_version(demo_path, tmp_path):
    """`--served-model-name A B`: /v1/models lists both, either (and the --model path as given) is
    served and echoed back; an unknown name is a 404; /version answers as vLLM's. vLLM's
    `--chat-template`, `--generation-config`, `--tokenizer`, `--seed` and `--dtype float` are honoured."""
    import json
    import shutil

    import aiohttp

    import microserve

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>")
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "generation_config.json").write_text(json.dumps({"top_k": 1, "eos_token_id": 1}))
    tok = shutil.copytree(demo_path, tmp_path / "tok", ignore=shutil.ignore_patterns("*.safetensors"))
    dep = start_launch("--strategy", "round_robin", "--model", str(demo_path), "--served-model-name", "alpha", "beta",
                       "--num-kv-blocks", "128", "--log-level", "error", "--chat-template", str(template),
                       "--generation-config", str(tmp_path / "gen"), "--tokenizer", str(tok), "--seed", "7",
                       "--dtype", "float")
    try:
        client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="unused", max_retries=0)
        assert [m.id async for m in client.models.list()] == ["alpha", "beta"]
        texts = set()
        for name in ("alpha", "beta", str(demo_path)):
            out = await client.completions.create(model=name, prompt="names", max_tokens=4, temperature=0)
            assert out.model == name
            texts.add(out.choices[0].text)
        assert len(texts) == 1  # one model under every name
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="gamma", prompt="names", max_tokens=4)
        async with aiohttp.ClientSession() as s, s.get(dep.url + "/version") as r:
            assert (await r.json()) == {"version": microserve.__version__}
        # the generation config's top_k 1 makes a request that leaves sampling out greedy
        llm = LLM(demo_path)
        greedy = llm.generate(["defaults"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
        out = await client.completions.create(model="alpha", prompt="defaults", max_tokens=12,
                                              extra_body={"ignore_eos": True})
        assert out.choices[0].text == greedy.text
        async with aiohttp.ClientSession() as s, s.post(dep.url + "/tokenize", json={
                "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert (await r.json())["tokens"] == llm.tokenizer.encode("<user>hi\n<assistant>", False)
    finally:
        assert dep.stop() == 0
