"""Triton kernels for CUDA engines: paged decode attention and the fused pointwise ops.

The CUDA twins of the CPU kernels in `csrc/` (same call signatures, so the model takes
either through `LlamaForCausalLM.use_native`): decode attention straight from the pages,
RoPE in place on the fused qkv row, SiLU·up in one pass, and residual add + RMSNorm in one
pass. Eager PyTorch runs each of those as 4-10 small kernels per layer; at decode sizes a
kernel costs its launch, not its bytes, so fewer kernels is what brings a step (a CUDA graph
of them, `cuda_graphs.py`) toward the memory roofline. Every op is also correct under
Triton's interpreter (`TRITON_INTERPRET=1`) on CPU tensors.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CUDA builds of torch ship Triton
    triton = None


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _decode_split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, part_ptr, lse_ptr, scale,
                             stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb, stride_ob, stride_oh,
                             NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                             BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
        """One program per (sequence, KV head, split of the context): the GROUP query heads that
        share the KV head are one matrix, so each page is read once for all of them; online
        softmax over the split's tokens, BLOCK_N at a time, each token's page from the table.
        One split: the result goes to `out`; several: normalised partials and their log-sum-exp
        go to `part`/`lse` for `_decode_reduce_kernel` (flash-decoding)."""
        b = tl.program_id(0)
        kv_h = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(lens_ptr + b).to(tl.int32)
        split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * split_len
        hi = tl.minimum(ctx, lo + split_len)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        gmask = g < GROUP
        dmask = d < HEAD_DIM
        heads = kv_h * GROUP + g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)
        m = tl.full((G_PAD,), float("-inf"), tl.float32)
        denom = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), tl.float32)
        for start in tl.range(lo, hi, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            valid = tok < hi
            page = tl.load(table_ptr + b * stride_tb + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            off = page * stride_cb + (tok % BLOCK_SIZE) * stride_ct + kv_h * stride_ch
            kv_mask = valid[:, None] & dmask[None, :]
            k = tl.load(k_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [G_PAD, BLOCK_N]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
        live = denom > 0  # a split past the end of a short context has no tokens
        res = acc / tl.where(live, denom, 1.0)[:, None]
        omask = gmask[:, None] & dmask[None, :]
        if NUM_SPLITS == 1:
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     res.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            row = (b * NUM_HEADS + heads) * NUM_SPLITS + split
            tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], res, mask=omask)
            tl.store(lse_ptr + row, tl.where(live, m + tl.log(denom), float("-inf")), mask=gmask)

    @triton.jit
    def _decode_reduce_kernel(part_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, NUM_HEADS: tl.constexpr,
                              NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                              D_PAD: tl.constexpr):
        """Merge the splits of one (sequence, query head) by their log-sum-exp."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        smask = sp < NUM_SPLITS
        dmask = d < HEAD_DIM
        row = (b * NUM_HEADS + h) * NUM_SPLITS + sp
        lse = tl.load(lse_ptr + row, mask=smask, other=float("-inf"))
        w = tl.exp(lse - tl.max(lse, axis=0))
        part = tl.load(part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None] & dmask[None, :],
                       other=0.0)
        res = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, res.to(out_ptr.dtype.element_ty), mask=dmask)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def paged_decode(q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                 scale: float, num_splits: int | None = None, *, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention straight from the pages (the CUDA twin of the CPU kernel in `csrc/`).

    q: [B, Hq, D]; cache: [2, NB, bs, Hkv, D]; tables: [B, max_blocks] (int32 or int64);
    lens: [B] context length including this step's token. Returns [B, Hq, D].
    `num_splits`: context splits per sequence (None: enough programs to fill the GPU). It
    depends on shapes alone, never on `lens`, so the call can be captured in a CUDA graph.
    `lse`: a float32 [B, Hq] filled with each row's log-sum-exp of its scaled scores (DistAttention's
    parts; taken from the splits' own, so at least 2 splits run).
    """
    b, hq, d = q.shape
    _, _, bs, hkv, _ = cache.shape
    assert cache.stride(-1) == 1 and q.stride(-1) == 1, "paged_decode needs the head dim contiguous"
    out = torch.empty_like(q)
    d_pad = max(16, triton.next_power_of_2(d))
    block_n = 64 if d_pad <= 128 else 32
    if num_splits is None:
        most = -(-tables.shape[1] * bs // 256)  # at least ~256 tokens a split
        num_splits = max(1, min(16, most, -(-2 * _num_sms(q.device) // (b * hkv))))
    if lse is not None:
        num_splits = max(2, num_splits)
    want_lse, part, lse = lse, out, out
    if num_splits > 1:
        part = torch.empty(b * hq * num_splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b * hq * num_splits, dtype=torch.float32, device=q.device)
    k, v = cache[0], cache[1]
    _decode_split_kernel[(b, hkv, num_splits)](
        q, k, v, tables, lens, out, part, lse, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), tables.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=hq, GROUP=hq // hkv, G_PAD=max(16, triton.next_power_of_2(hq // hkv)), BLOCK_SIZE=bs, HEAD_DIM=d,
        D_PAD=d_pad, BLOCK_N=block_n, NUM_SPLITS=num_splits, num_warps=4)
    if num_splits > 1:
        _decode_reduce_kernel[(b, hq)](part, lse, out, out.stride(0), out.stride(1), NUM_HEADS=hq,
                                       NUM_SPLITS=num_splits, S_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=d,
                                       D_PAD=triton.next_power_of_2(d), num_warps=4)
    if want_lse is not None:
        want_lse.copy_(torch.logsumexp(lse.view(b, hq, num_splits), dim=-1))
    return out


if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_x, stride_c, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
        """One program per (token, head): rotate-half RoPE in place, float32 math, one rounding."""
        t = tl.program_id(0)
        h = tl.program_id(1)
        i = tl.arange(0, HALF_PAD)
        mask = i < HALF
        base = x_ptr + t * stride_x + h * 2 * HALF
        x1 = tl.load(base + i, mask=mask, other=0.0)
        x2 = tl.load(base + HALF + i, mask=mask, other=0.0)
        c1 = tl.load(cos_ptr + t * stride_c + i, mask=mask, other=0.0)
        c2 = tl.load(cos_ptr + t * stride_c + HALF + i, mask=mask, other=0.0)
        s1 = tl.load(sin_ptr + t * stride_c + i, mask=mask, other=0.0)
        s2 = tl.load(sin_ptr + t * stride_c + HALF + i, mask=mask, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(base + i, (a * c1 - b * s1).to(x1.dtype), mask=mask)
        tl.store(base + HALF + i, (b * c2 + a * s2).to(x1.dtype), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N, BLOCK: tl.constexpr):
        """out[t, :] = silu(x[t, :N]) * x[t, N:], rounded as torch does (silu, then the product)."""
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0)
        u = tl.load(x_ptr + t * stride_x + N + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(out_ptr + t * stride_o + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, N, eps,
                             BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EXACT: tl.constexpr):
        """One program per row: (x + residual) -> residual_out, RMSNorm of it -> out.
        EXACT (float32): w * (x * rstd), as F.rms_norm; half precision: w * (x * rstd) rounded to the
        model dtype first, as transformers does."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(res_out_ptr + row * N + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        if EXACT:  # noqa: SIM108 (a constexpr branch, resolved at compile time)
            y = w.to(tl.float32) * (xf * rstd)
        else:
            y = w.to(tl.float32) * (xf * rstd).to(x.dtype).to(tl.float32)
        tl.store(out_ptr + row * N + cols, y.to(x.dtype), mask=mask)


def rope_(qkv: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half RoPE in place on the first `heads` heads of each row of qkv [T, >= heads * D];
    cos, sin: [T, D] float32 (the CPU kernel's contract)."""
    t = qkv.shape[0]
    assert qkv.stride(1) == 1 and cos.stride(1) == 1 and sin.stride() == cos.stride() and head_dim % 2 == 0
    if t:
        half = head_dim // 2
        _rope_kernel[(t, heads)](qkv, cos, sin, qkv.stride(0), cos.stride(0), HALF=half,
                                 HALF_PAD=triton.next_power_of_2(half), num_warps=1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate, up) -> silu(gate) * up, [T, I]."""
    t, two_n = x.shape
    n = two_n // 2
    assert x.stride(1) == 1
    out = x.new_empty(t, n)
    if t:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(t, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block,
                                                         num_warps=4)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual); with no residual, (RMSNorm(x), x). x: [T, N]."""
    t, n = x.shape
    assert x.stride(1) == 1 and (residual is None or residual.stride(1) == 1)
    out = x.new_empty(t, n)
    new_residual = x if residual is None else x.new_empty(t, n)
    if t:
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(t,)](x, x if residual is None else residual, weight, out, new_residual, x.stride(0),
                                   0 if residual is None else residual.stride(0), n, eps, BLOCK=block,
                                   HAS_RESIDUAL=residual is not None, EXACT=x.dtype == torch.float32,
                                   num_warps=min(16, max(1, block // 256)))
    return out, new_residual


class TritonOps:
    """The CUDA kernels under the names the model looks up on its `kernels` (as for `csrc/`)."""

    paged_decode = staticmethod(paged_decode)
    rope_ = staticmethod(rope_)
    silu_and_mul = staticmethod(silu_and_mul)
    add_rms_norm = staticmethod(add_rms_norm)
    skinny_linear = None  # CPU only: CUDA projections stay on cuBLAS
