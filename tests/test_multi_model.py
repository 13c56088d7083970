"""Several models behind one gateway: `launch --config FILE` (docs/models.md).

One real deployment: the demo model under cache_aware on two engines, and a tiny random Llama under
PD (one prefill, one decode engine). Each served name returns its own model's greedy output (the
offline engine's), a request reaches its model's engines only, `ctl --model` scales one model, and the
config's mistakes are refused before any engine starts.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys

import aiohttp
import openai
import pytest
from checkpoints import make_checkpoint
from deploy import start_launch

from microserve import LLM, SamplingParams
from microserve.cli import main
from microserve.model_config import load_config

ADMIN = "multi-admin"
PROMPTS = [[5 + i, 17, 33 + 2 * i, 8, 40, 41, 42 + i, 9, 12, 70 + i, 71, 72, 73, 74, 75, 76, 77 + i] for i in range(3)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("mm") / "llama", "llama")
    return str(path)


def _config(tmp_path, models: list[dict]) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(json.dumps({"models": models}))  # NOTE: JSON is YAML
    return str(path)


async def test_two_models_each_name_serves_its_own_model(llama, tmp_path):
    config = _config(tmp_path, [
        {"model": "demo", "served_model_name": ["demo", "small"], "strategy": "cache_aware", "engines": 2},
        {"model": llama, "served_model_name": "llama", "strategy": "pd", "roles": {"prefill": 1, "decode": 1},
         "max_num_seqs": 16, "planner": "queue", "planner_args": {"interval": 3600},
         "scale_bounds": {"prefill": "1:1", "decode": "1:2"}},
    ])
    dep = start_launch("--config", config, "--admin-key", ADMIN, "--log-level", "error", "--log-stats-interval", "0")
    try:
        assert dep.ready["model"] == "demo,llama" and dep.ready["strategy"] == "CacheAware,PD"
        c = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
        models = {m.id: m for m in (await c.models.list()).data}
        assert set(models) == {"demo", "small", "llama"}
        assert models["llama"].root == llama and models["demo"].root != llama

        async def one(model: str, prompt: list[int]) -> list[int]:
            out = await c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True, "return_token_ids": True})
            assert out.model == model
            return out.choices[0].token_ids

        greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        want = {name: [o.token_ids for o in LLM(path).generate(PROMPTS, greedy)]
                for name, path in (("demo", "demo"), ("llama", llama))}
        assert want["demo"] != want["llama"]
        rows = [(name, i) for name in ("demo", "small", "llama") for i in range(len(PROMPTS))] * 2
        got = await asyncio.gather(*(one(name, PROMPTS[i]) for name, i in rows))
        for (name, i), ids in zip(rows, got):
            assert ids == want["llama" if name == "llama" else "demo"][i], (name, i)
        assert await one(llama, PROMPTS[0]) == want["llama"][0]  # the checkpoint path as given
        with pytest.raises(openai.NotFoundError, match="'demo', 'small', 'llama'"):
            await c.completions.create(model="nope", prompt="hi", max_tokens=2)
        chat = await c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, temperature=0)
        assert chat.model == "llama" and chat.choices[0].message.content is not None

        # each model's requests reached its own engines only (the routers' per-engine counts)
        async with aiohttp.ClientSession() as s, s.get(dep.url + "/metrics") as r:
            text = await r.text()
        routed = {(m[1], m[2]): float(m[3]) for m in re.finditer(
            r'^microserve_engine_requests_total\{engine="([^"]+)",model_name="([^"]+)"\} (\S+)$', text, re.M)}
        assert {e for e, _ in routed} == {"demo-engine-0", "demo-engine-1", "llama-prefill-0", "llama-decode-0"}
        assert all(e.startswith(model) for e, model in routed)
        assert sum(v for (e, m), v in routed.items() if m == "demo") == 12
        assert routed[("llama-decode-0", "llama")] == 8 and routed[("llama-prefill-0", "llama")] == 0

        # the admin API: every engine with its model; `ctl --model llama` scales llama only
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.get(dep.url + "/admin/engines") as r:
                engines = {e["id"]: e["model"] for e in (await r.json())["engines"]}
            assert engines == {"demo-engine-0": "demo", "demo-engine-1": "demo", "llama-prefill-0": "llama",
                               "llama-decode-0": "llama"}
            async with s.get(dep.url + "/admin/strategy?model=llama") as r:
                assert (await r.json())["name"] == "PD"
            async with s.get(dep.url + "/admin/planner?model=llama") as r:  # each model its own planner, or none
                planner = await r.json()
                assert planner["bounds"]["decode"] == [1, 2] and planner["args"]["interval"] == 3600, planner
            async with s.get(dep.url + "/admin/planner?model=demo") as r:
                assert r.status == 404
            async with s.get(dep.url + "/admin/strategy?model=nope") as r:
                assert r.status == 404
        async with aiohttp.ClientSession() as s, s.get(dep.url + "/admin/strategy?model=nope") as r:
            assert r.status == 401  # NOTE: the key is checked before the model is looked up
        ctl = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "microserve", "ctl", "--url", dep.url, "--admin-key", ADMIN, "--model", "llama",
            "scale", "decode=2", stdout=asyncio.subprocess.PIPE)
        out, _ = await ctl.communicate()
        assert ctl.returncode == 0 and json.loads(out)["roles"]["decode"] == ["llama-decode-0", "llama-decode-1"]
        async with aiohttp.ClientSession(headers=headers) as s, s.get(dep.url + "/admin/engines?model=demo") as r:
            assert sorted(e["id"] for e in (await r.json())["engines"]) == ["demo-engine-0", "demo-engine-1"]
        got = await asyncio.gather(*(one("llama", p) for p in PROMPTS))
        assert got == want["llama"]
        await c.close()
    finally:
        assert dep.stop() == 0


@pytest.mark.parametrize("models, words", [
    ([], "non-empty list"),
    ([{"served_model_name": "x"}], "at least `model: PATH`"),
    ([{"model": "demo", "strategy": "round_robin", "port": 9}], "'port' is not a per-model option"),
    ([{"model": "demo", "strategy": "round_robin", "max_num_seqs": True}], "max_num_seqs takes a value"),
])
def test_config_mistakes_are_named(tmp_path, models, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        load_config(_config(tmp_path, models))


def test_config_entries_become_launch_arguments(tmp_path):
    (argv,) = load_config(_config(tmp_path, [{
        "model": "demo", "strategy": "pd", "roles": {"prefill": 1, "decode": 2}, "served-model-name": ["a", "b"],
        "strategy_args": {"x": 1}, "enable_lora": True, "no_prefix_caching": False,
        "lora_modules": {"sql": "/a/sql"}}]))
    assert argv == ["--model", "demo", "--strategy", "pd", "--roles", "prefill=1,decode=2", "--served-model-name",
                    "a", "b", "--strategy-arg", "x=1", "--enable-lora", "--lora-modules", "sql=/a/sql"]


def test_launch_refuses_a_bad_config_before_any_engine_starts(tmp_path, capsys):
    two = [{"model": "demo", "strategy": "round_robin", "served_model_name": "same"},
           {"model": "demo", "strategy": "round_robin", "served_model_name": "same"}]
    assert main(["launch", "--config", _config(tmp_path, two)]) == 2
    assert "the served name 'same' is given to models 0 and 1" in capsys.readouterr().err
    one = [{"model": "demo", "strategy": "round_robin"}]
    assert main(["launch", "--config", _config(tmp_path, one), "--model", "demo"]) == 2
    assert "give --model in its entries" in capsys.readouterr().err
    bad = [{"model": "demo", "strategy": "no_such_strategy"}]
    assert main(["launch", "--config", _config(tmp_path, bad)]) == 2
    assert "no_such_strategy" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("models: [")
    assert main(["launch", "--config", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
