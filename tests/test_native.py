"""Native CPU kernels (`csrc/cpu_kernels.cpp`) against their pure-torch twins, and the whole
engine on the fast path against the plain path: same tokens."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import assert_follows_reference, make_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

from microserve import LLM, SamplingParams
from microserve.engine.model import attention, native
from microserve.engine.model.models.llama import Linear, apply_rope


@pytest.fixture(scope="module")
def kernels():
    mod = native.load()
    # NOTE: no skip: CI and every developer machine have a C++ compiler; a broken build must fail here
    assert mod is not None, "native kernels failed to build (see the warning log)"
    return mod


def _tol(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 6), group=st.sampled_from([1, 2, 4]), kv_heads=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([8, 64, 80]), block=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_paged_decode_matches_gather_sdpa(kernels, batch, group, kv_heads, head_dim, block, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 40
    cache = torch.randn(2, num_blocks, block, kv_heads, head_dim, generator=g).to(dtype)
    lens = torch.randint(1, 6 * block + 1, (batch,), generator=g)
    max_blocks = int(-(-lens.max() // block))
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(batch)])
    q = torch.randn(batch, kv_heads * group, head_dim, generator=g).to(dtype)
    mask = (torch.arange(max_blocks * block) < lens[:, None])[:, None, None, :]
    scale = head_dim**-0.5
    with torch.inference_mode():  # as in the engine (the gather workspace is an inference tensor)
        ref = attention._decode(q, cache, tables, mask, scale).view_as(q)
        got = kernels.paged_decode(q, cache, tables, lens, scale)
    torch.testing.assert_close(got.float(), ref.float(), atol=_tol(dtype), rtol=_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrowing_rounds_as_torch(kernels, dtype):
    """The kernels' vectorised float32 -> bf16 / fp16 narrowing, seen through the residual sum
    of `add_rms_norm` (x + r in float32, rounded once): bit for bit torch's rounding, ties to
    even, overflow to inf, subnormals, signed zeros; NaN stays NaN."""
    g = torch.Generator().manual_seed(3)
    big = 3.0e38 if dtype == torch.bfloat16 else 6.0e4
    x = torch.randn(256, 64, generator=g) * torch.logspace(-8, 8, 64)  # spread exponents: ties, cancellations
    r = torch.randn(256, 64, generator=g) * torch.logspace(8, -8, 64)
    specials = torch.tensor([1.0, 1.0 + 2**-7, big, -big, float("inf"), float("nan"), 0.0, -0.0, 6e-8, 1e-40,
                             -1.0, 2**-8, 2**-24, 65519.0, float("-inf"), 3.0])
    x[:4, :16], r[:4, :16] = specials, specials.flip(0)
    x[4, :16], r[4, :16] = specials, specials  # doubles: overflow, subnormals
    x, r = x.to(dtype), r.to(dtype)
    with torch.inference_mode():
        _, got = kernels.add_rms_norm(x, r, torch.ones(64, dtype=dtype), 1e-6)
    want = (r.float() + x.float()).to(dtype)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


def test_gather_workspace_stays_bounded_across_dtypes(monkeypatch):
    """Engines of several dtypes in one process share the gather workspace: it keeps one buffer
    per dtype (a single buffer once doubled on every dtype switch, to a 37 GB allocation)."""
    monkeypatch.setattr(attention, "_workspace", attention._Workspace())
    cache = torch.randn(2, 8, 4, 2, 8)
    ids = torch.tensor([5, 1, 3])
    with torch.inference_mode():
        for _ in range(40):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                c = cache.to(dtype)
                assert torch.equal(attention.gather_blocks(c, ids), c[:, ids])
    page = 4 * 2 * 8
    assert sorted(b.numel() for b in attention._workspace.bufs.values()) == [2 * 3 * page] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_and_rope(kernels, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 2 * 24, generator=g).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_and_mul(x).float(), (torch.nn.functional.silu(gate) * up).float(),
                               atol=_tol(dtype), rtol=_tol(dtype))
    hq, hkv, d, t = 4, 2, 16, 9
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    angles = torch.rand(t, d // 2, generator=g) * 6
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    rq, rk = apply_rope(q.reshape(t, hq, d), k.reshape(t, hkv, d), cos, sin)
    v_before = v.clone()
    kernels.rope_(qkv, hq + hkv, d, cos, sin)
    torch.testing.assert_close(qkv[:, :hq * d].float(), rq.reshape(t, -1).float(), atol=_tol(dtype), rtol=_tol(dtype))
    torch.testing.assert_close(qkv[:, hq * d:(hq + hkv) * d].float(), rk.reshape(t, -1).float(),
                               atol=_tol(dtype), rtol=_tol(dtype))
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before), "rope_ must leave the v heads alone"


def test_vectorised_exp_over_the_whole_range(kernels):
    """SiLU and the decode softmax use an 8-lane exp (clamped polynomial): against float64
    over [-100, 100], the clamp's edges, a width with a scalar tail, and NaN/inf propagation."""
    a = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-87.5, -87.3, 88.3, 88.5, 0.0, -0.0, 1e-30])])
    x = torch.cat([a, torch.ones_like(a)]).view(1, -1)  # up = 1: the output is silu(a)
    got = kernels.silu_and_mul(x)[0].double()
    want = a.double() * torch.sigmoid(a.double())
    # NOTE: below -87.3 exp's input is clamped: silu is then ~1e-36 instead of ~1e-42, hence the atol
    err = (got - want).abs() - 1e-6 * want.abs()
    assert err.max() < 1e-30, (err.max(), a[err.argmax()])
    odd = kernels.silu_and_mul(torch.tensor([[float("nan"), float("inf"), 5.0, 1.0, 1.0, 1.0]]))[0]
    assert odd[0].isnan() and odd[1] == float("inf") and abs(odd[2] - 5 * torch.sigmoid(torch.tensor(5.0))) < 1e-6
    # softmax: one query over a context whose scores span ~170 (exp's whole range after the max shift)
    ctx, d = 37, 8
    q = torch.ones(1, 1, d)
    keys = torch.linspace(-12, 9, ctx).view(ctx, 1).expand(ctx, d)  # scores -96 .. 72
    cache = torch.zeros(2, 1, ctx, 1, d)
    cache[0, 0, :, 0] = keys
    cache[1, 0, :, 0] = torch.arange(ctx, dtype=torch.float32).view(ctx, 1)
    out = kernels.paged_decode(q, cache, torch.zeros(1, 1, dtype=torch.long), torch.tensor([ctx]), 1.0)
    p = torch.softmax((keys @ q.view(d)).double(), 0)
    torch.testing.assert_close(out.view(d).double(), (p * torch.arange(ctx).double()).sum().expand(d),
                               atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 32, 300])  # one thread, and several
def test_add_rms_norm(kernels, dtype, rows):
    from microserve.engine.model.models.llama import RMSNorm

    g = torch.Generator().manual_seed(rows)
    x, r = torch.randn(rows, 200, generator=g).to(dtype), torch.randn(rows, 200, generator=g).to(dtype)
    norm = RMSNorm(200, 1e-6).to(dtype)
    norm.weight.data = torch.randn(200, generator=g).to(dtype)
    with torch.inference_mode():
        out, res = kernels.add_rms_norm(x, r, norm.weight, 1e-6)
        assert torch.equal(res, r + x), "the residual stream is rounded as torch adds"
        torch.testing.assert_close(out.float(), norm(r + x).float(), atol=_tol(dtype), rtol=_tol(dtype))
        out, same = kernels.add_rms_norm(x, None, norm.weight, 1e-6)
        assert same.data_ptr() == x.data_ptr()
        torch.testing.assert_close(out.float(), norm(x).float(), atol=_tol(dtype), rtol=_tol(dtype))
    with pytest.raises(RuntimeError, match="residual must match"):
        kernels.add_rms_norm(x, r[:, :100], norm.weight, 1e-6)


# rows: groups of 1-4 (near-equal splits of 5, 7, 9, 13, 33 rows), and past one 64-row block (300);
# n = 1000: many tiles per thread, so the next-tile prefetch runs across chunk boundaries
@pytest.mark.parametrize("rows", [1, 3, 5, 6, 7, 8, 9, 13, 33, 300])
@pytest.mark.parametrize("n", [16, 48, 320, 100, 1000])
def test_skinny_linear_and_packed_head(kernels, rows, n):

    g = torch.Generator().manual_seed(rows * 1000 + n)
    lin = Linear(40, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, 40, generator=g))
        lin.bias.copy_(torch.randn(n, generator=g))
    x = torch.randn(rows, 40, generator=g)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    lin.transpose_weight_()
    lin.kernels = kernels
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), ref, atol=1e-4, rtol=1e-4)  # MKL on W_t
        w_t = lin.weight_t
        lin.pack_weight_()  # n = 100: padded to 112 columns, sliced back (bias added after)
        torch.testing.assert_close(lin(x), ref, atol=1e-4, rtol=1e-4)
        lin.kernels = None  # packed weight, torch only: one batched matmul
        torch.testing.assert_close(lin(x), ref, atol=1e-4, rtol=1e-4)
        lin.weight_packed, lin.weight_t = None, w_t  # the oneDNN layout (kernels without AVX2)
        if lin.prepack_dnn_():
            assert lin.weight_t is None
            torch.testing.assert_close(lin(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 33, 300])
@pytest.mark.parametrize("n", [48, 100])
def test_skinny_linear_half_precision(kernels, dtype, rows, n):
    """bf16 / fp16 weights widened in registers, float32 accumulation, one rounding of y to the
    dtype: within an ulp or two of the exact product of the rounded inputs (torch's own CPU
    GEMM in these dtypes is the slow path this replaces)."""
    g = torch.Generator().manual_seed(rows * 7 + n)
    lin = Linear(96, n, bias=True).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, 96, generator=g))
        lin.bias.copy_(torch.randn(n, generator=g))
    x = torch.randn(rows, 96, generator=g).to(dtype)
    exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    lin.transpose_weight_()
    lin.kernels = kernels
    lin.pack_weight_()
    assert lin.weight_packed.dtype == dtype
    with torch.inference_mode():
        got = lin(x)
    assert got.dtype == dtype and got.shape == (rows, n)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # relative spacing of the dtype
    # n = 100 pads to 112 columns: y is rounded, then the bias is added in the dtype (two roundings,
    # each within an ulp of the magnitudes involved, not of a result that cancels)
    scale = torch.nn.functional.linear(x.double().abs(), lin.weight_packed.double().abs().transpose(0, 1)
                                       .reshape(96, -1)[:, :n].t()) + lin.bias.double().abs()
    assert bool(((got.double() - exact).abs() <= ulp * scale).all())
    # the same with x in float32 rows of the dtype's values: the kernel widens exactly
    if n % 16 == 0:
        assert torch.equal(got, kernels.skinny_linear(x, lin.weight_packed, lin.bias))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", ["qwen3", "llama-mha-bias"])
def test_half_precision_engine_follows_the_reference(kernels, tmp_path, dtype, variant):
    """A bf16 / fp16 model on CPU runs every projection in the native GEMM (weights kept in the
    dtype) and every token is transformers' choice up to half-precision rounding; the plain torch
    path is held to the same check."""
    path, hf = make_checkpoint(tmp_path, variant)
    hf = hf.to(getattr(torch, dtype))
    prompts = [[(11 * i + 5 * j) % 300 + 5 for i in range(n)] for j, n in enumerate([5, 40, 100])]
    sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    fast = LLM(path, dtype=dtype)
    assert fast.engine.runner.kv_cache.dtype == getattr(torch, dtype)
    if kernels.simd():
        assert all(lin.weight_packed is not None and lin.weight_packed.dtype == getattr(torch, dtype)
                   for lin in fast.engine.runner.model.modules() if isinstance(lin, Linear))
    assert_follows_reference(hf, prompts, fast.generate(prompts, sp), f"{variant} {dtype} native")
    plain = LLM(path, dtype=dtype, native_kernels=False)
    assert_follows_reference(hf, prompts, plain.generate(prompts, sp), f"{variant} {dtype} torch")


def test_bad_input_is_an_error_not_a_crash(kernels):
    cache = torch.zeros(2, 4, 16, 2, 8)
    with pytest.raises(RuntimeError, match="int64"):
        kernels.paged_decode(torch.zeros(1, 2, 8), cache, torch.zeros(1, 1, dtype=torch.int32),
                             torch.ones(1, dtype=torch.long), 1.0)
    with pytest.raises(RuntimeError, match="head layout"):
        kernels.paged_decode(torch.zeros(1, 3, 8), cache, torch.zeros(1, 1, dtype=torch.long),
                             torch.ones(1, dtype=torch.long), 1.0)
    with pytest.raises(RuntimeError, match="block id 9 out of range"):
        kernels.paged_decode(torch.zeros(1, 2, 8), cache, torch.full((1, 1), 9), torch.ones(1, dtype=torch.long), 1.0)
    with pytest.raises(RuntimeError, match="context length 17 out of range"):
        kernels.paged_decode(torch.zeros(1, 2, 8), cache, torch.zeros(1, 1, dtype=torch.long),
                             torch.full((1,), 17), 1.0)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.skinny_linear(torch.zeros(2, 8), torch.zeros(8, 20))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16 only"):
        kernels.skinny_linear(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(8, 16, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="x is Float, w is BFloat16"):
        kernels.skinny_linear(torch.zeros(2, 8), torch.zeros(8, 16, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bias must be BFloat16"):
        kernels.skinny_linear(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(8, 16, dtype=torch.bfloat16),
                              torch.zeros(16))
    with pytest.raises(RuntimeError, match="silu_and_mul"):
        kernels.silu_and_mul(torch.zeros(3, 5))


@pytest.mark.parametrize("variant_fixture", ["llama_ckpt", "demo_path"])
def test_fast_path_equals_plain_path(kernels, request, variant_fixture):
    path = request.getfixturevalue(variant_fixture)
    path = path[0] if isinstance(path, tuple) else path
    fast = LLM(path)
    assert fast.engine.runner.native_decode is not None, "CPU engine should take the native decode path"
    assert fast.engine.runner.model.model.norm.kernels is not None  # fused add + RMSNorm
    mlp = fast.engine.runner.model.model.layers[0].mlp
    if kernels.simd():  # every float32 projection in the native GEMM's tiles, one copy each
        assert all(lin.weight_packed is not None and lin.weight_t is None and lin.weight_dnn is None
                   for lin in fast.engine.runner.model.modules() if isinstance(lin, Linear))
    else:
        assert mlp.gate_up_proj.weight_dnn is not None and mlp.gate_up_proj.weight_t is None, "oneDNN layout"
    plain = LLM(path, native_kernels=False)
    assert plain.engine.runner.native_decode is None and plain.engine.runner.model.lm_head.weight_packed is None
    # which path runs is never a guess: stats() names it
    assert fast.engine.stats().kernels == ("native" if kernels.simd() else "native-scalar")
    assert plain.engine.stats().kernels == "torch"
    prompts = [[(7 * i + 3 * j) % 250 + 5 for i in range(n)] for j, n in enumerate([1, 5, 17, 40, 63, 100])]
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in fast.generate(prompts, sp)] == [o.token_ids for o in plain.generate(prompts, sp)]
    seeded = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    assert fast.generate(prompts[:3], seeded)[0].token_ids == plain.generate(prompts[:3], seeded)[0].token_ids


def test_half_precision_without_the_kernels_warns(demo_path, caplog):
    """torch's own bf16 GEMMs are scalar-speed on most CPUs: a model that would run them says so."""
    with caplog.at_level("WARNING", logger="microserve.engine.model.runner"):
        LLM(demo_path, dtype="bfloat16", native_kernels=False)
    assert any("without the native AVX2 kernels" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="microserve.engine.model.runner"):
        LLM(demo_path, dtype="bfloat16")
        LLM(demo_path, native_kernels=False)  # float32: MKL, nothing to say
    assert not [r for r in caplog.records if "native AVX2" in r.getMessage()]


def test_a_missing_kernel_source_warns_once_with_the_cause_and_the_cost(monkeypatch, tmp_path, caplog):
    """An install without the kernels' source (a broken wheel) is never silent."""
    monkeypatch.setattr(native, "_SOURCE", tmp_path / "cpu_kernels.cpp")
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_module", None)
    with caplog.at_level("WARNING", logger="microserve.engine.model.native"):
        assert native.load() is None and native.load() is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "is missing from this install" in warnings[0] and "1.7-1.8x" in warnings[0]
    assert native.path(None) == "torch"


def test_the_kernel_source_ships_inside_the_package():
    from pathlib import Path

    import microserve

    assert Path(microserve.__file__).resolve().parent / "csrc" / "cpu_kernels.cpp" == native._SOURCE
    assert native._SOURCE.is_file()


PORTABLE_CHECK = """
import sys
import torch
from microserve import LLM, SamplingParams
from microserve.engine.model import native
from microserve.engine.model.models.llama import Linear

kernels = native.load()
assert kernels is not None and not kernels.simd(), "expected the scalar build"
path = sys.argv[1]
prompts = [[(7 * i + 3 * j) % 250 + 5 for i in range(n)] for j, n in enumerate([1, 17, 63])]
sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
fast = LLM(path)
lins = [m for m in fast.engine.runner.model.modules() if isinstance(m, Linear)]
assert all(m.weight_packed is None for m in lins), "no packed tiles without AVX2"
assert any(m.weight_dnn is not None for m in lins) or not torch.backends.mkldnn.is_available()
assert fast.engine.runner.native_decode is not None
plain = LLM(path, native_kernels=False)
assert [o.token_ids for o in fast.generate(prompts, sp)] == [o.token_ids for o in plain.generate(prompts, sp)]
half = LLM(path, dtype="bfloat16")  # torch's GEMMs, the scalar kernels for the rest
assert all(len(o.token_ids) == 24 for o in half.generate(prompts, sp))
print("portable ok")
"""


@pytest.mark.slow
def test_portable_build_without_simd(llama_ckpt):
    """The build a CPU without AVX2 gets (`MICROSERVE_NATIVE_SIMD=0`, compiled on first use): scalar
    kernels, oneDNN projections, same tokens as the torch path."""
    env = dict(os.environ, MICROSERVE_NATIVE_SIMD="0")
    out = subprocess.run([sys.executable, "-c", PORTABLE_CHECK, str(llama_ckpt[0])], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "portable ok" in out.stdout, out.stderr[-3000:]


STALE_LOCK_CHECK = """
import sys
from microserve.engine.model import native
sys.exit(0 if native.load() is not None else 3)
"""


def test_a_lock_left_by_a_killed_build_does_not_hang_later_engines(tmp_path):
    """torch's build lock has no owner: a build killed mid-way left `lock` behind and every later
    process waited on it forever. A lock older than any build is removed (with a warning)."""
    import shutil

    from torch.utils import cpp_extension

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    built = [p for pattern in ("microserve_native_*", "*/microserve_native_*") for p in root.glob(pattern)
             if any(p.glob("*.so"))]
    assert built, "the session's native build (conftest) is not in torch's extension cache"
    ext = tmp_path / "ext"
    for b in built:  # a copy of the finished builds: nothing to compile, only the lock to get past
        shutil.copytree(b, ext / b.name)  # NOTE: under $TORCH_EXTENSIONS_DIR, no python/cuda subfolder
        lock = ext / b.name / "lock"
        lock.touch()
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext))
    res = subprocess.run([sys.executable, "-c", STALE_LOCK_CHECK], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "removing a build lock left" in res.stderr


def test_each_torch_install_keeps_its_own_build_of_the_kernels():
    """Two environments sharing torch's extension cache (the vLLM one and this one, in the suite) once
    shared one build folder and rebuilt the kernels over each other on every switch (~30 s each)."""
    from kvapi.native import build_name

    source = Path(native.__file__).parents[2] / "csrc" / "cpu_kernels.cpp"  # microserve/csrc
    here = build_name("microserve_native", source, ["-O3"])
    assert here == build_name("microserve_native", source, ["-O3"])
    assert here != build_name("microserve_native", source, ["-O3"], install="2.13.0+cpu /other/venv/torch")
    assert here != build_name("microserve_native", source, ["-O3", "-mavx2"])
