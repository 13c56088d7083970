"""The built-in engine on CUDA: parity with transformers, batching, chunking, prefix cache,
preemption, half precision, and PD between two CUDA engines over TCP.

Marked `gpu`: skipped where torch sees no CUDA device (conftest.py), run with `pytest -m gpu`
on a machine with one.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from checkpoints import VARIANTS, assert_follows_reference, hf_greedy, make_checkpoint
from deploy import start_launch
from engines import spawn_engine
from hypothesis import given, settings
from hypothesis import strategies as st

from kvapi.transfer.nixl import nixl_available
from microserve import LLM, SamplingParams
from microserve.engine.model import attention
from microserve.engine.model.cuda_graphs import batch_buckets
from microserve.engine.model.models.llama import RMSNorm, apply_rope
from microserve.engine.model.triton_ops import TritonOps, add_rms_norm, paged_decode, rope_, silu_and_mul
from microserve.protocol import Request
from microserve.router import EngineHandle

pytestmark = pytest.mark.gpu

DEV = "cuda"
NEW_TOKENS = 40
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _prompts(lengths, salt=0):
    return [[(11 * i + 5 * j + salt) % 300 + 5 for i in range(n)] for j, n in enumerate(lengths)]


@pytest.fixture(autouse=True)
def _exact_float32():
    # NOTE: TF32 matmuls would round float32 to 10 mantissa bits: parity needs true float32
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, hf = make_checkpoint(tmp_path_factory.mktemp("cuda-llama"), "llama")
    return path, hf.to(DEV)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cuda_greedy_matches_transformers(tmp_path, variant):
    path, hf = make_checkpoint(tmp_path, variant)
    hf = hf.to(DEV)
    prompts = [[(7 * i + 13 * s) % 300 + 5 for i in range(n)] for s, n in enumerate((1, 5, 16, 17, 40, 100))]
    llm = LLM(path, device=DEV, dtype="float32", max_num_batched_tokens=64)
    assert llm.engine.runner.kv_cache.device.type == "cuda"
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"{variant}, prompt of {len(prompt)} tokens"


def test_cuda_batching_chunking_prefix_cache_preemption(ckpt):
    """Everything the CPU engine tests check for scheduling, on CUDA, against each prompt alone."""
    path, hf = ckpt
    prompts = _prompts([3, 50, 16, 31, 80, 1, 64])
    solo = LLM(path, device=DEV, enable_prefix_caching=False)
    alone = [solo.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert alone[1] == hf_greedy(hf, prompts[1], GREEDY.max_tokens)
    for kw in (dict(), dict(max_num_batched_tokens=7), dict(max_num_batched_tokens=33),
               dict(block_size=8, num_kv_blocks=24)):
        llm = LLM(path, device=DEV, **kw)
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == alone, kw
        if "num_kv_blocks" in kw:
            assert llm.engine.stats().num_preemptions > 0
        kv = llm.engine.kv
        kv.pool.check_invariants()
        assert kv.pool.num_used == kv.num_cached
    llm = LLM(path, device=DEV, block_size=16)
    shared = _prompts([70], salt=3)[0]
    llm.generate([shared + [9, 10, 11]], GREEDY)
    b = llm.generate([shared + [12, 13]], GREEDY)[0]
    assert b.num_cached_tokens == 64
    assert b.token_ids == hf_greedy(hf, shared + [12, 13], GREEDY.max_tokens)


def test_cuda_seeded_sampling_is_reproducible(ckpt):
    llm = LLM(ckpt[0], device=DEV)
    sp = SamplingParams(max_tokens=32, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    prompts = _prompts([10, 30, 5])
    alone = llm.generate([prompts[1]], sp)[0].token_ids
    together = llm.generate(prompts, [GREEDY, sp, SamplingParams(max_tokens=8, temperature=0.7)])
    assert together[1].token_ids == alone


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_precision_follows_the_reference(tmp_path, dtype):
    """Half precision on CUDA: every token is the reference's choice up to rounding
    (`assert_follows_reference`)."""
    path, hf = make_checkpoint(tmp_path, "qwen3")
    hf = hf.to(DEV, getattr(torch, dtype))
    prompts = _prompts([5, 40, 100], salt=1)
    llm = LLM(path, device=DEV, dtype=dtype)
    assert llm.engine.runner.kv_cache.dtype == getattr(torch, dtype)
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    assert_follows_reference(hf, prompts, outs, dtype)


@pytest.mark.parametrize("transport", ["tcp", pytest.param("nixl", marks=pytest.mark.skipif(
    not nixl_available(), reason="nixl is not installed (pip install 'microserve[nixl]')"))])
async def test_cuda_pd(tmp_path, transport):
    """Prefill on one CUDA engine, decode on another: over tcp the pages stage through host memory;
    over nixl the sender WRITEs VRAM to VRAM (both engines registered their pools as VRAM)."""
    path, _ = make_checkpoint(tmp_path, "llama", max_position_embeddings=4096)
    args = ["--device", DEV, "--num-kv-blocks", "200", "--block-size", "16", "--log-level", "error"]
    engines = [spawn_engine(str(path), *args, engine_id=name) for name in ("P", "D", "R")]
    assert all("shm" not in e.transports and transport in e.transports for e in engines)
    p, d, r = (EngineHandle(e.rpc, name=n, timeout=60) for e, n in zip(engines, "PDR"))
    try:
        prompt = [(17 * i) % 250 + 3 for i in range(77)]
        sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        alone = [t async for c in r.start_generate(Request("ref", prompt, sp)) for t in c.token_ids]
        req = Request("pd", prompt, sp)
        ticket = await d.prep_recv(req, end=len(prompt))
        sent = await p.remote_send(req, ticket.kv, begin=0, end=len(prompt), transport=transport)
        assert sent.computed_tokens == len(prompt) and sent.transport == transport
        spec = ticket.kv.spec
        assert sent.bytes == -(-len(prompt) // 16) * spec.page_bytes * 2 * spec.num_layers
        got = [t async for c in d.start_generate(req, begin=len(prompt)) for t in c.token_ids]
        assert got == alone
    finally:
        for h in (p, d, r):
            await h.close()
        for e in engines:
            assert e.stop() == 0


def test_cuda_engine_refuses_shm(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama")
    proc = subprocess.run([sys.executable, "-m", "microserve", "engine", "--model", str(path), "--device", DEV,
                           "--transport", "shm"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--transport shm: the KV pool is not in host memory" in proc.stderr


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 9), group=st.sampled_from([1, 2, 4, 8]), kv_heads=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([8, 64, 80, 128]), block=st.sampled_from([1, 12, 16, 32]),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       index=st.sampled_from([torch.int32, torch.long]))
def test_cuda_paged_decode_matches_gather_sdpa(batch, group, kv_heads, head_dim, block, seed, dtype, index):
    """The Triton decode kernel against the eager gather + SDPA path, fresh random pages each time."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    num_blocks = 60
    cache = torch.randn(2, num_blocks, block, kv_heads, head_dim, generator=g, device=DEV).to(dtype)
    lens = torch.randint(1, 9 * block + 1, (batch,), generator=g, device=DEV)
    max_blocks = int(-(-lens.max() // block))
    tables = torch.stack([torch.randperm(num_blocks, generator=g, device=DEV)[:max_blocks] for _ in range(batch)])
    q = torch.randn(batch, kv_heads * group, head_dim, generator=g, device=DEV).to(dtype)
    mask = (torch.arange(max_blocks * block, device=DEV) < lens[:, None])[:, None, None, :]
    with torch.inference_mode():
        ref = attention._decode(q.double(), cache.double(), tables, mask, head_dim**-0.5).view_as(q)
        got = paged_decode(q, cache, tables.to(index), lens.to(index), head_dim**-0.5)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


def test_cuda_graphs_equal_eager(ckpt):
    """Decode steps replayed from CUDA graphs give the eager engine's tokens (float32; half precision
    is checked against transformers above, with graphs on): batches that fill a bucket and batches
    padded up to one, sequences joining and leaving, greedy and seeded."""
    dtype = "float32"
    path, _ = ckpt
    prompts = _prompts([3, 50, 16, 31, 80, 1, 64, 7, 120, 33, 2, 90, 45], salt=5)
    sps = [SamplingParams(max_tokens=8 + 5 * (i % 4), temperature=0, ignore_eos=True) for i in range(len(prompts))]
    sps[3] = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    eager = LLM(path, device=DEV, dtype=dtype, cuda_graphs=False, max_num_seqs=8)
    assert eager.engine.runner.graphs is None
    want = [o.token_ids for o in eager.generate(prompts, sps)]
    fast = LLM(path, device=DEV, dtype=dtype, max_num_seqs=8, max_num_batched_tokens=128)
    graphs = fast.engine.runner.graphs
    assert graphs is not None and graphs.buckets == [1, 2, 4, 8]
    assert [o.token_ids for o in fast.generate(prompts, sps)] == want
    assert graphs.replays > 20
    kv = fast.engine.kv
    assert kv.pool.num_used == kv.num_cached


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_fused_ops_match_torch(dtype):
    """add + RMSNorm, SiLU·up and in-place RoPE (Triton) against the model's torch ops."""
    g = torch.Generator(device=DEV).manual_seed(3)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=DEV).to(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    x, r = rnd(7, 2000), rnd(7, 2000)  # not a power of two: masked tails
    norm = RMSNorm(2000, 1e-6).to(DEV, dtype)
    norm.weight.data = rnd(2000)
    out, res = add_rms_norm(x, r, norm.weight, 1e-6)
    torch.testing.assert_close(res, r + x, atol=0, rtol=0)  # the residual stream: rounded as torch adds
    torch.testing.assert_close(out, norm(r + x), atol=tol, rtol=tol)
    out, same = add_rms_norm(x, None, norm.weight, 1e-6)
    assert same is x
    torch.testing.assert_close(out, norm(x), atol=tol, rtol=tol)
    gu = rnd(5, 2 * 1376)
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(gu), torch.nn.functional.silu(gate) * up, atol=tol, rtol=tol)
    hq, hkv, d = 8, 2, 80
    qkv = rnd(6, (hq + 2 * hkv) * d)
    angles = torch.rand(6, d // 2, generator=g, device=DEV) * 100
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    want_q, want_k = apply_rope(q.view(6, hq, d).float(), k.view(6, hkv, d).float(), cos, sin)
    v_before = v.clone()
    rope_(qkv, hq + hkv, d, cos, sin)
    torch.testing.assert_close(q.view(6, hq, d).float(), want_q, atol=tol, rtol=tol)
    torch.testing.assert_close(k.view(6, hkv, d).float(), want_k, atol=tol, rtol=tol)
    assert torch.equal(v, v_before), "RoPE touched the v heads"


def test_cuda_fast_path_equals_torch_path(ckpt):
    """Triton ops + CUDA graphs against plain torch ops, eager: the same float32 tokens."""
    path, _ = ckpt
    prompts = _prompts([3, 50, 16, 31, 80, 1, 64], salt=9)
    plain = LLM(path, device=DEV, native_kernels=False, cuda_graphs=False)
    assert plain.engine.runner.native_decode is None and plain.engine.runner.graphs is None
    fast = LLM(path, device=DEV)
    assert fast.engine.runner.model.model.norm.kernels is TritonOps
    assert [o.token_ids for o in fast.generate(prompts, GREEDY)] == \
        [o.token_ids for o in plain.generate(prompts, GREEDY)]


def test_cuda_launch_pd_through_the_openai_gateway(ckpt):
    """`microserve launch --device cuda --strategy pd`, the official openai client: the text one
    offline CUDA engine gives (graphs on in both)."""
    from openai import OpenAI

    path, _ = ckpt
    prompt = [(13 * i) % 250 + 5 for i in range(90)]
    want = LLM(path, device=DEV).generate([prompt], GREEDY)[0].text
    dep = start_launch("--strategy", "pd", "--model", str(path), "--device", DEV, "--num-kv-blocks", "256",
                       timeout=300)
    try:
        client = OpenAI(base_url=dep.base_url, api_key="none")
        out = client.completions.create(model=path.name, prompt=prompt, max_tokens=GREEDY.max_tokens,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == want
        assert out.usage.completion_tokens == GREEDY.max_tokens
    finally:
        assert dep.stop() == 0


def _peft_folder(path, cfg, rank: int, seed: int):
    """A PEFT LoRA folder of random weights on every projection, written by hand (no peft needed)."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                          "target_modules": ["q_proj", "v_proj", "down_proj"]}))
    g = torch.Generator().manual_seed(seed)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    h, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * head_dim
    shapes = {"self_attn.q_proj": (h, h), "self_attn.v_proj": (kv, h), "mlp.down_proj": (h, inter)}
    tensors = {}
    for i in range(cfg.num_hidden_layers):
        for name, (out, inp) in shapes.items():
            key = f"base_model.model.model.layers.{i}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.3
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return str(path)


def test_cuda_lora_adapters_equal_the_cpu_engine(ckpt, tmp_path):
    """Rows under two adapters and the base model in one CUDA batch: greedy tokens equal the CPU engine's
    (the same torch ops; CUDA graphs are skipped for steps whose rows use an adapter)."""
    path, hf = ckpt
    folders = {"a": _peft_folder(tmp_path / "a", hf.config, 8, 1), "b": _peft_folder(tmp_path / "b", hf.config, 16, 2)}
    prompts = _prompts([20, 33, 47])
    rows = [(p, name) for p in prompts for name in (None, "a", "b")]
    params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, lora=n) for _, n in rows]
    want = LLM(str(path), enable_lora=True, lora_modules=folders).generate([p for p, _ in rows], params)
    got = LLM(str(path), device=DEV, enable_lora=True, lora_modules=folders).generate([p for p, _ in rows], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert len({tuple(o.token_ids) for o in want[:3]}) == 3  # the adapters change the output
