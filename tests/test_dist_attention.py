"""DistAttention's math (microserve/engine/model/dist_attention.py): attention computed in parts where the
KV lives (the borrower's own blocks, each lender's range, each in its own paged cache) and merged by
log-sum-exp equals attention over the whole context, for decode rows and prefill rows that straddle a
range boundary, with GQA."""

from __future__ import annotations

import pytest
import torch

from microserve.engine.model.dist_attention import merge, merge_parts, range_attention, seen_whole

BS, HKV, G, D = 16, 2, 4, 32
HQ = HKV * G


def _reference(q: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Causal attention of each row over the contiguous keys [0, its position], in float64."""
    kk, vv = (t.double().repeat_interleave(G, dim=1) for t in (k, v))  # [N, Hq, D]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, p in enumerate(positions.tolist()):
        s = torch.einsum("hd,nhd->hn", q[i].double(), kk[:p + 1]) * scale
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), vv[:p + 1])
    return out


def _holder(k: torch.Tensor, v: torch.Tensor, begin: int, end: int, num_blocks: int, gen: torch.Generator):
    """A cache of `num_blocks` random pages holding positions [begin, end) in scattered blocks."""
    cache = torch.randn(2, num_blocks, BS, HKV, D, generator=gen)
    n = -(-(end - begin) // BS)
    blocks = torch.randperm(num_blocks, generator=gen)[:n]
    for i, b in enumerate(blocks.tolist()):
        lo = begin + i * BS
        hi = min(end, lo + BS)
        cache[0, b, :hi - lo], cache[1, b, :hi - lo] = k[lo:hi], v[lo:hi]
    return cache, blocks


@pytest.mark.parametrize("rows", ["decode", "prefill straddling a boundary", "rows before a lent range"])
def test_parts_where_the_kv_lives_merge_into_whole_attention(rows):
    gen = torch.Generator().manual_seed(0)
    n = 150
    k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
    # the borrower keeps [0, 48) and [112, 150); lender A holds [48, 80), lender B [80, 112)
    ranges = [(0, 48), (48, 80), (80, 112), (112, 150)]
    holders = [_holder(k, v, b, e, 24, gen) for b, e in ranges]
    positions = {"decode": torch.tensor([149]), "prefill straddling a boundary": torch.arange(100, 150),
                 "rows before a lent range": torch.arange(20, 60)}[rows]
    q = torch.randn(len(positions), HQ, D, generator=gen)
    scale = D ** -0.5
    parts = [range_attention(q, positions, cache, blocks, b, e, scale)
             for (b, e), (cache, blocks) in zip(ranges, holders)]
    for (b, _), (_, lse) in zip(ranges, parts):
        assert torch.isinf(lse[positions < b]).all() and torch.isfinite(lse[positions >= b]).all()
    got = merge(parts)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), _reference(q, positions, k, v, scale), atol=1e-5, rtol=1e-5)


def test_a_part_of_one_range_is_that_range_alone_and_a_row_nobody_saw_is_an_error():
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(40, HKV, D, generator=gen), torch.randn(40, HKV, D, generator=gen)
    cache, blocks = _holder(k, v, 0, 40, 8, gen)
    q, positions = torch.randn(3, HQ, D, generator=gen), torch.tensor([0, 17, 39])
    out, lse = range_attention(q, positions, cache, blocks, 0, 40, 0.2)
    torch.testing.assert_close(merge([(out, lse)]).double(), _reference(q, positions, k, v, 0.2), atol=1e-5, rtol=1e-5)
    lent_cache, lent_blocks = _holder(k, v, 32, 40, 4, gen)
    unseen = range_attention(q[:1], positions[:1], lent_cache, lent_blocks, 32, 40, 0.2)
    for parts in ([unseen], [unseen, unseen], [unseen] * 3):
        with pytest.raises(ValueError, match="saw no key"):
            merge(parts)
    with pytest.raises(ValueError, match="empty range"):
        range_attention(q, positions, cache, blocks, 8, 8, 0.2)


def test_half_precision_rows_merge_within_half_precision():
    gen = torch.Generator().manual_seed(2)
    k, v = torch.randn(96, HKV, D, generator=gen), torch.randn(96, HKV, D, generator=gen)
    ranges = [(0, 64), (64, 96)]
    holders = [_holder(k, v, b, e, 8, gen) for b, e in ranges]
    positions = torch.arange(60, 96)
    q = torch.randn(len(positions), HQ, D, generator=gen)
    parts = [range_attention(q.bfloat16(), positions, c.bfloat16(), bl, b, e, D ** -0.5)
             for (b, e), (c, bl) in zip(ranges, holders)]
    got = merge(parts)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), _reference(q, positions, k, v, D ** -0.5), atol=3e-2, rtol=3e-2)


def _decode_kernel(device: str):
    if device == "cuda":
        from microserve.engine.model import triton_ops

        return triton_ops.paged_decode
    from microserve.engine.model import native

    kernels = native.load()
    assert kernels is not None, "the native CPU kernels did not build (tests/test_native.py says why)"
    return kernels.paged_decode


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_over_several_runs_take_one_kernel_call_with_its_lse(device, dtype):
    """`seen_whole`: runs of one cache read as one context by the paged decode kernel, with the lse the
    merge needs: equal to the per-run parts merged; None for rows that do not see every key."""
    gen = torch.Generator().manual_seed(3)
    n = 150
    k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
    runs = [(0, 48), (112, 150)]  # a borrower's local runs around a lent range (the last one ends mid-block)
    cache = torch.randn(2, 24, BS, HKV, D, generator=gen)
    free = torch.randperm(24, generator=gen).tolist()
    placed = []
    for b, e in runs:
        blocks = torch.tensor([free.pop() for _ in range(-(-(e - b) // BS))])
        for i, blk in enumerate(blocks.tolist()):
            lo, hi = b + i * BS, min(e, b + (i + 1) * BS)
            cache[0, blk, :hi - lo], cache[1, blk, :hi - lo] = k[lo:hi], v[lo:hi]
        placed.append((b, e, blocks.to(device)))
    cache = cache.to(device, dtype)
    q = torch.randn(3, HQ, D, generator=gen).to(device, dtype)
    positions = torch.full((3,), 149, device=device)
    want = merge_parts([range_attention(q, positions, cache, blk, b, e, 0.2) for b, e, blk in placed])
    out, lse = seen_whole(_decode_kernel(device), q, 149, cache, placed, 0.2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want[0].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want[1], atol=1e-4, rtol=1e-4)
    assert seen_whole(_decode_kernel(device), q, 148, cache, placed, 0.2) is None  # rows inside the last run
    assert seen_whole(None, q, 149, cache, placed, 0.2) is None


class _Lender:
    """An in-process lender: its own paged cache; `write` copies the borrower's pages of the range into
    it, `attend` is `range_attention` there (the real one is an engine process: test_microserving.py)."""

    def __init__(self, engine, begin: int, end: int, lender=None) -> None:
        self.engine, self.begin, self.end = engine, begin, end
        n = (end - begin) // engine.block_size
        self.cache = engine.kv_spec.allocate(n + 3, "cpu")
        self.blocks = torch.tensor([n + 2 - i for i in range(n)])  # scattered, not the borrower's numbers
        self.attends = 0  # messages
        self.asks: list[int] = []  # requests per message
        self.lender = lender or self  # NOTE: its own engine (one range), unless one is shared

    def write(self, seq, begin: int, end: int) -> None:
        bs = self.engine.block_size
        assert (begin, end) == (self.begin, self.end)
        src = torch.tensor(seq.block_table[begin // bs:end // bs])
        self.cache[:, :, self.blocks] = self.engine.runner.kv_cache[:, :, src]

    def attend(self, layer, scale, asks):
        from concurrent.futures import Future

        self.lender.attends += 1
        self.lender.asks.append(len(asks))
        parts = []
        for ranges, positions, q in asks:
            (r,) = ranges
            assert r.lender is self.lender
            done: Future = Future()
            done.set_result(range_attention(q, positions, r.cache[layer], r.blocks, r.begin, r.end, scale))
            parts.append(done)
        return parts


def _serve(engine, requests: dict[str, tuple[list[int], list | None]], sampling) -> dict[str, tuple[list, list]]:
    for rid, (prompt, lent) in requests.items():
        engine.add_request(rid, prompt, sampling, lent=lent)
    out: dict[str, tuple[list, list]] = {rid: ([], []) for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.finish_reason != "error", o.error
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(o.logprobs or ())
    return out


@pytest.mark.parametrize("variant,seed", [("llama", None), ("qwen3", None), ("llama", 7)])
def test_an_engine_serves_a_prompt_larger_than_its_pool_with_two_lenders(tmp_path, variant, seed):
    """A 400-token prompt and 30 decoded tokens in a pool of 320 tokens: positions [64, 192) and [192, 320)
    live on two lenders (prefill chunks of 48 tokens straddle both boundaries). Greedy (or seeded sampled)
    tokens and top-5 logprobs equal an engine with a pool large enough, also for a request without lenders
    in the same batches; the lent KV left the borrower's pool, and its blocks are all back at the end."""
    from checkpoints import make_checkpoint

    from microserve import SamplingParams
    from microserve.engine.config import EngineConfig
    from microserve.engine.core.sequence import LentRange
    from microserve.engine.engine import LLMEngine

    path, _ = make_checkpoint(tmp_path / variant, variant)
    gen = torch.Generator().manual_seed(5)
    long, short = (torch.randint(2, 320, (n,), generator=gen).tolist() for n in (400, 40))
    sp = SamplingParams(max_tokens=30, temperature=0.0 if seed is None else 0.8, seed=seed, ignore_eos=True,
                        logprobs=5)
    cfg = dict(block_size=BS, max_num_batched_tokens=48, skip_tokenizer_init=True)
    big = LLMEngine(path, config=EngineConfig(num_kv_blocks=64, **cfg))
    want = _serve(big, {"long": (long, None), "short": (short, None)}, sp)

    small = LLMEngine(path, config=EngineConfig(num_kv_blocks=20, enable_prefix_caching=False, **cfg))
    with pytest.raises(Exception, match="more KV blocks"):
        small.validate_prompt(long)
    lenders = [_Lender(small, 64, 192), _Lender(small, 192, 320)]
    got = _serve(small, {"long": (long, [LentRange(x.begin, x.end, x) for x in lenders]), "short": (short, None)}, sp)
    for rid in ("long", "short"):
        assert got[rid][0] == want[rid][0], rid
        for (lp, top), (lp_ref, top_ref) in zip(got[rid][1], want[rid][1]):
            assert lp == pytest.approx(lp_ref, abs=1e-4)
            assert [t for t, _ in top] == [t for t, _ in top_ref]
    assert all(x.attends > 0 for x in lenders)
    assert small.kv.pool.num_used == 0


def test_borrowers_of_one_lender_share_one_message_per_layer(tmp_path):
    """Two requests with a range each on the same lender, decoding in the same steps: each layer of a step
    sends one message to that lender with both requests' rows; outputs equal an engine with room."""
    from checkpoints import make_checkpoint

    from microserve import SamplingParams
    from microserve.engine.config import EngineConfig
    from microserve.engine.core.sequence import LentRange
    from microserve.engine.engine import LLMEngine

    path, _ = make_checkpoint(tmp_path / "llama", "llama")
    gen = torch.Generator().manual_seed(6)
    a, b = (torch.randint(2, 320, (200,), generator=gen).tolist() for _ in range(2))
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    cfg = dict(block_size=BS, max_num_batched_tokens=128, skip_tokenizer_init=True)
    want = _serve(LLMEngine(path, config=EngineConfig(num_kv_blocks=64, **cfg)), {"a": (a, None), "b": (b, None)}, sp)
    engine = LLMEngine(path, config=EngineConfig(num_kv_blocks=32, enable_prefix_caching=False, **cfg))
    shared = _Lender(engine, 64, 128)  # the lender engine; each request's range below is on it
    ranges = {rid: _Lender(engine, 64, 128, lender=shared) for rid in ("a", "b")}
    got = _serve(engine, {rid: (p, [LentRange(64, 128, ranges[rid])]) for rid, p in (("a", a), ("b", b))}, sp)
    assert {rid: g[0] for rid, g in got.items()} == {rid: w[0] for rid, w in want.items()}
    layers = engine.kv_spec.num_layers
    assert shared.attends % layers == 0 and 2 in shared.asks and set(shared.asks) <= {1, 2}
    assert shared.attends < sum(shared.asks), "requests of one step went to one lender in separate messages"
