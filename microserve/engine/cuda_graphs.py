"""CUDA: a paged decode-attention kernel (Triton) and CUDA graphs of the decode step.

A decode step of a small batch is launch-bound in eager PyTorch (hundreds of small kernels,
each waiting on Python). `DecodeGraphs` captures the whole decode forward (embedding, every
layer, the final norm and the lm_head) once per batch-size bucket and replays it: the
host work of a step becomes a few copies into static buffers and one graph launch.

What a graph can hold: shapes fixed at capture, inputs read from static buffers. So the
decode attention reads K/V through the block table with each sequence's length read from
device memory (`paged_decode`, below), the table buffer is as wide as the longest context,
and a batch is padded up to its bucket with rows that write their K/V into one scratch
block that the pool never hands out (the runner allocates the cache one block larger).
Steps with prefill chunks, KV-streaming layer hooks or more sequences than the largest
bucket run eagerly.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("microserve.engine")

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
                 scale: float, num_splits: int | None = None) -> torch.Tensor:
    """Decode attention straight from the pages (the CUDA twin of the CPU kernel in `csrc/`).

    q: [B, Hq, D]; cache: [2, NB, bs, Hkv, D]; tables: [B, max_blocks] (int32 or int64);
    lens: [B] context length including this step's token. Returns [B, Hq, D].
    `num_splits`: context splits per sequence (None: enough programs to fill the GPU). It
    depends on shapes alone, never on `lens`, so the call can be captured in a CUDA graph.
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
    part = lse = out
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
    return out


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 8 up to `max_batch` (vLLM's ladder)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch + 8, 8))
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphs:
    """The decode forward captured once per batch bucket; `run` pads, copies, replays.

    Args:
        model: the model (its forward and `compute_logits`).
        kv_cache: [L, 2, NB + 1, bs, Hkv, D]; block NB (the last) is the scratch block.
        max_batch: the largest bucket (the engine's `max_num_seqs`).
        max_blocks: block-table width (blocks of the longest context).
    """

    def __init__(self, model, kv_cache: torch.Tensor, max_batch: int, max_blocks: int) -> None:
        from microserve.engine.attention import AttentionMetadata

        self.model, self.kv_cache = model, kv_cache
        dev = kv_cache.device
        self.block_size = kv_cache.shape[3]
        self.scratch = kv_cache.shape[2] - 1
        self.buckets = batch_buckets(max_batch)
        n = self.buckets[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), self.scratch * self.block_size, dtype=torch.long, device=dev)
        self.tables = torch.full((n, max_blocks), self.scratch, dtype=torch.int32, device=dev)
        self.lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0  # decode steps served by a graph (tests, stats)
        self.logits: dict[int, torch.Tensor] = {}
        self._meta = AttentionMetadata
        self._capture()

    def _forward(self, b: int) -> torch.Tensor:
        meta = self._meta(slot_mapping=self.slots[:b], num_decodes=b, decode_block_tables=self.tables[:b],
                          decode_lens=self.lens[:b], native_decode=paged_decode)
        hidden = self.model(self.ids[:b], self.pos[:b], self.kv_cache, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (Triton compiles, cuBLAS picks kernels) off the capture
            for b in self.buckets:
                self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        for b in reversed(self.buckets):  # largest first: the smaller ones reuse its memory pool
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits[b] = self._forward(b)
            pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.buckets[-1] and max_blocks <= self.tables.shape[1]

    def run(self, ids: list[int], pos: list[int], slots: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits [B, V] of one decode step (a view into the graph's output: use before the next run)."""
        n = len(ids)
        b = next(s for s in self.buckets if s >= n)
        pad, scratch = b - n, self.scratch
        # NOTE: only the table columns in use are copied; a row never reads past its own length, and
        # pad rows (length 1, table column 0 = the scratch block) write and read the scratch block alone
        width = max(len(t) for t in tables)
        rows = [t + [scratch] * (width - len(t)) for t in tables] + [[scratch] * width] * pad
        self.tables[:b, :width].copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)
        self.ids[:b].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.pos[:b].copy_(torch.tensor(pos + [0] * pad), non_blocking=True)
        self.slots[:b].copy_(torch.tensor(slots + [scratch * self.block_size] * pad), non_blocking=True)
        self.lens[:b].copy_(torch.tensor([p + 1 for p in pos] + [1] * pad, dtype=torch.int32), non_blocking=True)
        self.graphs[b].replay()
        self.replays += 1
        return self.logits[b][:n]
