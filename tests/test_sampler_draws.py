"""The sampler's draws against the exact truncated softmax: temperature, top-k, top-p, min-p and their
combinations (chi-square over 20k draws, fixed seed); truncation keeps exactly its set, ties
included; seeded requests keep their recorded tokens, whatever shares their batch."""

from __future__ import annotations

import math

import pytest
import torch

from microserve import LLM, SamplingParams
from microserve.engine.model import sampler, seeded

VOCAB = 40


class _Seq:
    """What the draw reads of a sequence."""

    def __init__(self, sp: SamplingParams) -> None:
        self.sampling, self.generator = sp, None


def _row() -> torch.Tensor:
    """A fixed logits row with ties: the most likely pair, a triple at places 3-5 (cut by top-k 3 and
    4), a plateau further down; the rest distinct, below 1."""
    row = torch.linspace(-3.0, 1.0, VOCAB)
    row[[1, 2]] = 4.0
    row[[7, 8, 9]] = 2.5
    row[[20, 21, 22, 23]] = -0.5
    return row


def _expected(row: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token must follow, computed plainly: softmax(row / T) restricted to
    the top-k logits (ties at the k-th kept), then to the tokens whose strictly-more-likely mass is at
    most top_p, then to those at least min_p x the largest probability."""
    logits, vocab = row.double() / sp.temperature, row.numel()
    if 0 < sp.top_k < vocab:
        kth = sorted(logits.tolist(), reverse=True)[sp.top_k - 1]
        logits = torch.where(logits >= kth, logits, torch.tensor(float("-inf"), dtype=torch.double))
    p = logits.softmax(-1)
    keep = torch.tensor([float(p[p > p[i]].sum()) <= sp.top_p + 1e-9 for i in range(vocab)])
    keep &= p >= sp.min_p * p.max()
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty: the chi-square quantile with `df` degrees of freedom at the normal quantile `z`
    (3.719: one in 10,000)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.9, top_k=8, top_p=0.8),
    SamplingParams(temperature=1.2, top_k=20, top_p=0.95, min_p=0.02),
    SamplingParams(temperature=1.0, top_p=0.3, min_p=0.1),
]


@pytest.fixture(params=["native", "torch"])
def draw_path(request, monkeypatch):
    """Which batched draw runs on CPU: the native kernel (`sample_rows`, rows without top-k) or torch ops."""
    if request.param == "native":
        if sampler._kernels() is None:
            pytest.skip("the native CPU kernels are not built with AVX2 here")
    else:
        monkeypatch.setattr(sampler, "_kernels", lambda: None)
    return request.param


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("sp", SETTINGS, ids=lambda sp: f"T{sp.temperature}-k{sp.top_k}-p{sp.top_p}-m{sp.min_p}")
def test_draws_follow_the_exact_truncated_softmax(sp, device, draw_path):
    """On CUDA (`.ci/gpu-check`) the same torch ops draw on the device, with the device's generator."""
    row, n = _row(), 20_000
    want = _expected(row, sp)
    gen = torch.Generator(device=device).manual_seed(1234)
    batch = row.unsqueeze(0).repeat(2_000, 1).to(device)
    seqs = [_Seq(sp)] * batch.shape[0]
    counts = torch.zeros(VOCAB, dtype=torch.double)
    for _ in range(n // batch.shape[0]):
        counts += torch.bincount(sampler._draw(batch, seqs, gen).cpu(), minlength=VOCAB).double()
    inside = want > 0
    assert counts[~inside].sum() == 0, f"drew tokens outside the set: {(~inside & (counts > 0)).nonzero().tolist()}"
    expected = want[inside] * n
    assert (counts[inside] > 0).all() or (expected < 5).any(), "a token inside the set was never drawn"
    chi2 = float(((counts[inside] - expected) ** 2 / expected).sum())
    df = int(inside.sum()) - 1
    if df:
        assert chi2 < _chi2_critical(df), (chi2, df, counts[inside].tolist(), expected.tolist())


def test_truncation_keeps_every_tie_at_the_cut(draw_path):
    """Draw many times: exactly the set comes out. top-k 3 and 4 cut inside the tied triple, so all
    five most likely tokens stay; top-p 0.05 is covered by the first of the tied pair, so both stay."""
    row = _row()
    for k in (3, 4, 5):
        assert (_expected(row, SamplingParams(top_k=k)) > 0).nonzero().flatten().tolist() == [1, 2, 7, 8, 9]
    assert (_expected(row, SamplingParams(top_p=0.05)) > 0).nonzero().flatten().tolist() == [1, 2]
    gen = torch.Generator().manual_seed(0)
    for sp in (SamplingParams(top_k=4), SamplingParams(top_k=3), SamplingParams(top_k=6), SamplingParams(top_p=0.05),
               SamplingParams(top_p=0.5, min_p=0.01)):
        want = _expected(row, sp) > 0
        drawn = torch.bincount(sampler._draw(row.unsqueeze(0).repeat(4_000, 1), [_Seq(sp)] * 4_000, gen),
                               minlength=VOCAB) > 0
        assert torch.equal(drawn, want), (sp, drawn.nonzero().flatten().tolist(), want.nonzero().flatten().tolist())


# recorded with the sampler before the batched draw existed: seeded streams must not change
SEEDED_PROMPTS = ["Seeded sampling is pinned.", "Another prompt, a little longer than the first one.", [5, 6, 7, 8]]
SEEDED = [SamplingParams(max_tokens=12, temperature=0.8, seed=11, ignore_eos=True),
          SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=40, seed=12, ignore_eos=True),
          SamplingParams(max_tokens=12, temperature=0.6, min_p=0.05, seed=13, presence_penalty=0.3, ignore_eos=True)]
RECORDED = [[192, 106, 180, 164, 180, 95, 186, 309, 284, 49, 243, 106],
            [37, 277, 92, 244, 53, 227, 54, 268, 41, 232, 61, 95],
            [162, 259, 56, 278, 289, 215, 55, 190, 11, 28, 261, 100]]


def test_seeded_requests_keep_their_recorded_tokens_whatever_shares_the_batch(demo_path):
    llm = LLM(str(demo_path))
    assert [o.token_ids for o in llm.generate(SEEDED_PROMPTS, SEEDED)] == RECORDED
    # the same requests one by one, and among unseeded sampled and greedy neighbours
    assert [llm.generate([p], sp)[0].token_ids for p, sp in zip(SEEDED_PROMPTS, SEEDED)] == RECORDED
    noise = [SamplingParams(max_tokens=20, temperature=1.0, top_p=0.8, ignore_eos=True),
             SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)] * 3
    outs = llm.generate([f"neighbour {i}" for i in range(6)] + SEEDED_PROMPTS, noise + SEEDED)
    assert [o.token_ids for o in outs[6:]] == RECORDED


def test_advance_moves_a_cpu_generator_as_exponential_draws_do():
    for vocab, drawn in ((7, 3), (512, 0), (32000, 1000), (151936, 151936)):
        gen = torch.Generator().manual_seed(vocab)
        start = gen.get_state()
        torch.empty(2, vocab).exponential_(generator=gen)
        want = gen.get_state()
        gen.set_state(start)
        torch.empty(drawn).exponential_(generator=gen)
        seeded.advance(gen, 2 * vocab - drawn)
        assert torch.equal(gen.get_state(), want)


SETTINGS = [dict(temperature=0.7), dict(temperature=1.0, top_p=0.9), dict(temperature=0.8, top_k=50),
            dict(temperature=0.9, min_p=0.05), dict(top_p=0.5, top_k=40, min_p=0.02), dict(temperature=1.3, top_p=0.95)]


def test_the_seeded_fast_path_draws_the_full_paths_tokens_and_leaves_the_same_generators(monkeypatch):
    """Flat and peaked rows, float32 and bfloat16 logits (ties), every truncation: three steps of each
    seeded row give the tokens of the full sort-and-race path, and each request's generator ends in the
    same state; the fast path must actually serve a good share of the rows."""
    full, calls = seeded.draw_seeded_full, []
    monkeypatch.setattr(seeded, "draw_seeded_full",
                        lambda sub, seqs, fb: calls.append(len(seqs)) or full(sub, seqs, fb))
    torch.manual_seed(0)
    rows = 0
    for vocab in (300, 4096):
        for scale in (0.3, 6.0, 12.0):
            for dtype in (torch.float32, torch.bfloat16):
                logits = (torch.randn(8, vocab) * scale).to(dtype).float()
                for setting in SETTINGS:
                    fast = [_Seq(SamplingParams(seed=j, **setting)) for j in range(8)]
                    ref = [_Seq(SamplingParams(seed=j, **setting)) for j in range(8)]
                    for _ in range(3):
                        got = seeded.draw_seeded(logits, fast, None)
                        assert torch.equal(got, full(logits, ref, None)), (vocab, scale, dtype, setting)
                        rows += len(fast)
                    for a, b in zip(fast, ref):
                        assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert sum(calls) < 0.6 * rows, (sum(calls), rows)  # NOTE: counts the fast path's fallbacks only


@pytest.mark.parametrize("sp", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_p=0.9),
                                SamplingParams(temperature=2.0, min_p=0.3)], ids=["T", "T-p", "T-m"])
def test_masked_logits_are_never_drawn_and_a_lone_survivor_always_is(sp, draw_path):
    """-inf (a grammar's mask, a banned token) has no weight, in a row whose length is no multiple of 8 (the
    kernel's scalar tail); a row with one finite logit always gives that token."""
    gen = torch.Generator().manual_seed(5)
    row = torch.linspace(-2.0, 2.0, 37)
    row[[0, 9, 17, 36]] = float("-inf")
    batch = row.unsqueeze(0).repeat(3_000, 1)
    drawn = sampler._draw(batch, [_Seq(sp)] * 3_000, gen)
    assert not set(drawn.tolist()) & {0, 9, 17, 36}
    assert set(drawn.tolist()) == set((_expected(row, sp) > 0).nonzero().flatten().tolist())
    lone = torch.full((4, 37), float("-inf"))
    lone[:, 23] = -50.0
    assert sampler._draw(lone, [_Seq(sp)] * 4, gen).tolist() == [23] * 4
