"""LoRA adapters in the built-in engine against transformers + peft: two PEFT adapters of random
weights (rank 8 on every projection, rank 16 on attention only) on a tiny Llama; greedy tokens and
top-5 logprobs per adapter, a batch mixing both adapters and the base model, KV never shared across
adapters, and the errors a user meets."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import aiohttp
import openai
import pytest
import torch
from checkpoints import hf_greedy, make_checkpoint
from deploy import start_launch

from kvapi.radix import namespace_seed, prefix_hashes
from microserve import LLM, SamplingParams
from microserve.engine.model.lora import LoraError, load_peft

ADMIN = "admin-key-for-tests"
PROMPTS = [[5, 17, 42, 9, 88, 120, 7, 3] * 3, [200, 11, 64, 64, 31, 2, 90] * 4, list(range(40, 75))]
ADAPTERS = {"a8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]),
            "b16": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import peft  # NOTE: here, not at the top: it imports transformers and torch._dynamo (4 s of CPU) in every
    # worker that collects this file, and only the one that runs it needs it

    root = tmp_path_factory.mktemp("lora")
    path, base = make_checkpoint(root / "base", "llama", seed=3)
    refs = {}
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        model = make_checkpoint(root / f"copy-{name}", "llama", seed=3)[1]
        tuned = peft.get_peft_model(model, peft.LoraConfig(**cfg))
        with torch.no_grad():
            for n, p in tuned.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)  # NOTE: peft zeroes B; random both so the adapter matters
        tuned.save_pretrained(root / name, safe_serialization=True)
        refs[name] = tuned.eval()
    return path, base.eval(), refs, {name: str(root / name) for name in ADAPTERS}


def _top(model, prompt: list[int], tokens: list[int]) -> list[list[int]]:
    """Top-5 token ids after the prompt and each generated token (the reference's)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    return logits.log_softmax(-1).topk(5, dim=-1).indices.tolist()


def test_each_adapter_and_the_base_equal_peft_in_one_mixed_batch(setup):
    path, base, refs, folders = setup
    llm = LLM(str(path), enable_lora=True, lora_modules=folders)
    greedy = dict(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)
    rows = [(p, name) for p in PROMPTS for name in (None, "a8", "b16")]
    outs = llm.generate([p for p, _ in rows], [SamplingParams(**greedy, lora=name) for _, name in rows])
    for (prompt, name), out in zip(rows, outs):
        ref = base if name is None else refs[name]
        want = hf_greedy(ref, prompt, 12)
        assert out.token_ids == want, (name, prompt[:4])
        top = _top(ref, prompt, out.token_ids)
        assert [[t for t, _ in alts] for _, alts in out.logprobs] == top, name
    # the adapters do change the output (the test is not vacuous)
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3
    # a batch under one adapter alone (the step computes only the slots it uses)
    for name in ("b16", "a8"):
        alone = llm.generate(PROMPTS, SamplingParams(**greedy, lora=name))
        assert [o.token_ids for o in alone] == [hf_greedy(refs[name], p, 12) for p in PROMPTS], name


def test_kv_computed_under_one_adapter_is_never_reused_under_another(setup):
    path, _, _, folders = setup
    llm = LLM(str(path), enable_lora=True, lora_modules=folders, block_size=8)
    prompt = PROMPTS[2]
    sp = dict(max_tokens=2, temperature=0.0, ignore_eos=True)
    first = llm.generate([prompt], SamplingParams(**sp, lora="a8"))[0]
    assert first.num_cached_tokens == 0
    for name in ("b16", None):
        assert llm.generate([prompt], SamplingParams(**sp, lora=name))[0].num_cached_tokens == 0, name
    again = llm.generate([prompt], SamplingParams(**sp, lora="a8"))[0]
    assert again.num_cached_tokens == 32 and again.token_ids == first.token_ids
    cached = set(llm.engine.kv.radix.prefix_hashes())
    for name in ("a8", "b16", None):  # each tree announces its own hashes
        assert set(prefix_hashes(prompt, 8, namespace_seed(name))) <= cached
    assert not set(prefix_hashes(prompt, 8, namespace_seed("a8"))) & set(prefix_hashes(prompt, 8))


def test_lora_errors_are_clear(setup, tmp_path):
    path, _, _, folders = setup
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(str(path), lora_modules=folders)
    with pytest.raises(LoraError, match="rank 16 > --max-lora-rank 8"):
        LLM(str(path), enable_lora=True, lora_modules=folders, max_lora_rank=8)
    # one slot for two adapters: each request waits for the slot, and every output is still right
    one = LLM(str(path), enable_lora=True, lora_modules=folders, max_loras=1)
    names = ["a8", "b16", None, "b16", "a8"]
    outs = one.generate([PROMPTS[i % 3] for i in range(5)], [
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, lora=n) for n in names])
    want = LLM(str(path), enable_lora=True, lora_modules=folders).generate(
        [PROMPTS[i % 3] for i in range(5)], [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, lora=n)
                                              for n in names])
    assert [o.token_ids for o in outs] == [w.token_ids for w in want]
    assert one.engine.lora.loads >= 2 and len(one.engine.lora.slots) == 1
    with pytest.raises(LoraError, match=r"adapter_config\.json"):
        load_peft("x", tmp_path, 2)
    llm = LLM(str(path), enable_lora=True, lora_modules={"a8": folders["a8"]})
    with pytest.raises(ValueError, match="unknown LoRA adapter 'b16'"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2, lora="b16"))
    plain = LLM(str(path))
    with pytest.raises(ValueError, match="enable-lora"):
        plain.generate([PROMPTS[0]], SamplingParams(max_tokens=2, lora="a8"))
    llm.engine.unload_lora("a8")
    llm.engine.load_lora("b16", folders["b16"])
    assert llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, lora="b16"))


async def test_launch_serves_adapters_by_model_name_over_pd_and_loads_them_while_serving(setup):
    """`launch --strategy pd --enable-lora --lora-modules a8=...`: a client names an adapter as its model;
    the prefill engine computes the prompt under it, the KV moves keyed by it, and the decode engine
    continues under it, so each name's output equals the offline engine's with that adapter. An
    operator loads b16 on every engine while requests stream (none fails), scales decode to two engines
    (the new one loads b16 first), then unloads it."""
    path, _, _, folders = setup
    dep = start_launch("--strategy", "pd", "--model", str(path), "--served-model-name", "base", "--enable-lora",
                       "--max-loras", "2", "--lora-modules", f"a8={folders['a8']}", "--admin-key", ADMIN,
                       "--log-level", "error")
    try:
        llm = LLM(str(path), enable_lora=True, lora_modules=folders)
        c = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
        models = {m.id: m for m in (await c.models.list()).data}
        assert set(models) == {"base", "a8"} and models["a8"].parent == "base" and models["base"].parent is None

        async def one(prompt: list[int], name: str, n: int = 10) -> list[int]:
            out = await c.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0,
                                             extra_body={"ignore_eos": True, "return_token_ids": True})
            return out.choices[0].token_ids

        def offline(rows, n: int = 10):
            return [o.token_ids for o in llm.generate([p for p, _ in rows], [
                SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, lora=None if m == "base" else m)
                for _, m in rows])]

        busy = [(p, name) for p in PROMPTS for name in ("base", "a8")] * 2
        running = asyncio.gather(*(one(p, name, 40) for p, name in busy))
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as s:
            async with s.post(dep.url + "/v1/load_lora_adapter", json={"lora_name": "b16",
                                                                         "lora_path": folders["b16"]}) as r:
                assert r.status == 200, await r.text()
            rows = [(p, name) for p in PROMPTS for name in ("base", "a8", "b16")]
            assert await asyncio.gather(*(one(p, name) for p, name in rows)) == offline(rows)
            assert await running == offline(busy, 40)  # NOTE: every request under load succeeded, unchanged
            assert "b16" in {m.id for m in (await c.models.list()).data}
            # a decode engine started now loads b16 (loaded at run time) before it takes traffic
            async with s.put(dep.url + "/admin/scale", json={"decode": 2}) as r:
                assert r.status == 200, await r.text()
            async with s.get(dep.url + "/admin/engines") as r:
                held = {e["id"]: set(e["loras"]) for e in (await r.json())["engines"]}
            assert held["decode-1"] == {"a8", "b16"}, held
            rows = [(p, "b16") for p in PROMPTS] * 2
            assert await asyncio.gather(*(one(p, name) for p, name in rows)) == offline(rows)
            async with s.post(dep.url + "/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "/nope"}) as r:
                assert r.status == 400 and "adapter_config.json" in await r.text()
            async with s.post(dep.url + "/v1/unload_lora_adapter", json={"lora_name": "b16"}) as r:
                assert r.status == 200, await r.text()
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer x"}) as s, \
                s.post(dep.url + "/v1/unload_lora_adapter", json={"lora_name": "a8"}) as r:
            assert r.status == 401  # NOTE: the API key never opens it
        assert {m.id for m in (await c.models.list()).data} == {"base", "a8"}
        with pytest.raises(openai.NotFoundError):
            await c.completions.create(model="b16", prompt="hi", max_tokens=2)
        await c.close()
    finally:
        assert dep.stop() == 0


def test_launch_refuses_adapters_without_enable_lora(setup):
    path, _, _, folders = setup
    out = subprocess.run([sys.executable, "-m", "microserve", "launch", "--strategy", "round_robin", "--model",
                          str(path), "--lora-modules", f"a8={folders['a8']}"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "--lora-modules needs --enable-lora" in out.stderr


async def test_lora_affinity_keeps_each_adapter_on_one_engine(setup):
    """`launch --strategy lora_affinity --engines 2`: interleaved requests under two adapters settle one
    adapter per engine (each engine's batches then run one adapter), with outputs as offline."""
    path, _, _, folders = setup
    dep = start_launch("--strategy", "lora_affinity", "--engines", "2", "--model", str(path), "--enable-lora",
                       "--lora-modules", *(f"{k}={v}" for k, v in folders.items()), "--admin-key", ADMIN,
                       "--log-level", "error")
    try:
        c = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
        names = ["a8", "b16"] * 4
        outs = await asyncio.gather(*(c.completions.create(model=n, prompt=PROMPTS[i % 3], max_tokens=24,
                                                           temperature=0, extra_body={"ignore_eos": True})
                                      for i, n in enumerate(names)))
        llm = LLM(str(path), enable_lora=True, lora_modules=folders)
        want = llm.generate([PROMPTS[i % 3] for i in range(len(names))],
                            [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, lora=n) for n in names])
        assert [o.choices[0].text for o in outs] == [w.text for w in want]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as s, \
                s.get(dep.url + "/admin/requests") as r:
            engine_of = {e["request_id"]: e["calls"][0]["engine"] for e in (await r.json())["requests"]}
        placed = {n: {engine_of[o.id] for o, m in zip(outs, names) if m == n} for n in ("a8", "b16")}
        assert len(placed["a8"]) == len(placed["b16"]) == 1 and placed["a8"] != placed["b16"], placed
        await c.close()
    finally:
        assert dep.stop() == 0


def _triton_python() -> str | None:
    """A python that imports Triton: this one, else the vLLM environment's (its CPU build carries Triton)."""
    for python in (sys.executable, os.environ.get("MICROSERVE_VLLM_PYTHON")):
        if python and subprocess.run([python, "-c", "import triton"], capture_output=True).returncode == 0:
            return python
    return None


_TRITON_CHECK = r"""
import sys, torch
from microserve import LLM, SamplingParams
from microserve.engine.model.triton_lora import lora_apply

# the kernels alone: three fused parts, rows under slots 2, none, 0, 2, 1
torch.manual_seed(0)
slots, rank, parts, k = 3, 8, [48, 16, 16], 40
a = torch.randn(k, len(parts) * slots * rank)
b = torch.randn(slots * rank, sum(parts))
x, y = torch.randn(5, k), torch.randn(5, sum(parts))
rows = torch.tensor([2, -1, 0, 2, 1], dtype=torch.int32)
want = y.clone()
for t, s in enumerate(rows.tolist()):
    if s < 0:
        continue
    off = 0
    for p, n in enumerate(parts):
        cols = slice((p * slots + s) * rank, (p * slots + s + 1) * rank)
        want[t, off:off + n] += x[t] @ a[:, cols] @ b[s * rank:(s + 1) * rank, off:off + n]
        off += n
got = lora_apply(x, a, b, rows, y.clone(), parts, slots, rank)
torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

# the engine: a batch mixing both adapters and the base, the Triton path against the torch path
path, folders = sys.argv[1], dict(item.split("=", 1) for item in sys.argv[2:])
prompts = [[5, 17, 42, 9, 88, 120, 7, 3] * 2, [200, 11, 64, 64, 31, 2, 90] * 2]
rows = [(p, name) for p in prompts for name in (None, "a8", "b16")]
params = [SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=3, lora=n) for _, n in rows]
outs = {}
for triton_path in (False, True):
    llm = LLM(path, enable_lora=True, lora_modules=folders)
    llm.engine.lora_slots().use_triton = triton_path
    outs[triton_path] = llm.generate([p for p, _ in rows], params)
for plain, fused in zip(outs[False], outs[True]):
    assert plain.token_ids == fused.token_ids, (plain.token_ids, fused.token_ids)
    for (_, x), (_, y) in zip(plain.logprobs, fused.logprobs):
        assert [t for t, _ in x] == [t for t, _ in y]
        assert max(abs(p - q) for (_, p), (_, q) in zip(x, y)) < 1e-3
print("OK", len(rows), "rows")
"""


TRITON_PYTHON = _triton_python()


@pytest.mark.skipif(TRITON_PYTHON is None, reason="no python here imports Triton (the vLLM environment carries "
                    "it: MICROSERVE_VLLM_PYTHON; .ci/run builds it)")
def test_the_triton_lora_kernels_equal_the_torch_path_under_the_interpreter(setup, tmp_path):
    """The CUDA path's Triton kernels (triton_lora.py) run on CPU tensors under Triton's interpreter: alone
    against a per-row reference (three fused parts, a row under no adapter), and in the engine, where a
    batch mixing both adapters and the base gives the torch path's tokens and logprobs."""
    path, _, _, folders = setup
    script = tmp_path / "check.py"
    script.write_text(_TRITON_CHECK)
    out = subprocess.run([TRITON_PYTHON, str(script), str(path), *(f"{k}={v}" for k, v in folders.items())],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert out.returncode == 0 and "OK 6 rows" in out.stdout, out.stderr[-3000:]
