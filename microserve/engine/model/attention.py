"""Paged attention over a `kvapi` block cache, for a flattened (varlen) batch.

A step's tokens are laid out flat, decodes first, then prefill chunks:

    | d0 | d1 | ... | d_{B-1} | p0 chunk .......... | p1 chunk ..... |
      one token per decode      `num_tokens` per prefill, positions [start, start+n)

Decodes are batched: on CPU a native kernel (`csrc/cpu_kernels.cpp`) reads K/V
straight from the pages through the block tables; otherwise (CUDA, or no compiler) one
gather of their block tables and one SDPA call. Each prefill
chunk attends to its cached context `[0, start)` plus itself, causally.
GQA is handled by folding the query heads of one KV head together, so K/V are
never repeated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa
# most context tokens (chunks x context) one batched prefill call gathers; more are split
BATCHED_CONTEXT_TOKENS = 65536


@dataclass
class PrefillChunk:
    token_start: int  # index of the chunk's first token in the flat batch
    num_tokens: int
    start_pos: int  # tokens of this sequence already in the cache
    block_table: torch.Tensor  # [num_blocks] long, covers [0, start_pos + num_tokens)


@dataclass
class BorrowedRows:
    """The rows of one sequence whose prompt has ranges on lenders (DistAttention): its attention is
    computed in parts, over its local runs of blocks here and over each pushed lent range on its lender,
    and merged (`dist_attention.attend_borrowed`)."""

    token_start: int  # index of the first row in the flat batch
    num_tokens: int
    positions: torch.Tensor  # [num_tokens] long: start, start + 1, ...
    start: int  # the first row's position
    local: list[tuple[int, int, torch.Tensor]]  # (begin, end, blocks): runs of positions whose KV is here
    remote: list[list[Any]]  # the peers of the lent ranges already moved, grouped by lender (one message each)
    seq: Any  # the Sequence: a lender's failure sets its `error`


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: cache slot (block * block_size + offset) per token
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] long
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] bool, True = attend
    decode_lens: torch.Tensor | None = None  # [B] long: context length incl. this token
    # native kernel (q, cache, tables, lens, scale) -> [B, Hq, D]; None = gather + SDPA
    native_decode: Callable[..., torch.Tensor] | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    # called with the layer index once that layer's KV of this step is written (KV streaming)
    layer_hooks: list[Callable[[int], None]] = field(default_factory=list)
    borrowed: list[BorrowedRows] = field(default_factory=list)  # after the prefills in the flat batch
    layer: int = 0  # the layer being computed (set by the model; lenders attend per layer)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store new K/V.  cache: [2, NB, bs, Hkv, D]; k, v: [T, Hkv, D]."""
    flat = cache.view(2, -1, *cache.shape[-2:])
    flat[0].index_copy_(0, slots, k)
    flat[1].index_copy_(0, slots, v)


class _Workspace:
    """Grow-only scratch buffers for gathered pages, one per (dtype, device), reused by every
    layer and step.

    Layers run one after another and consume the gathered K/V before the next gather,
    so one buffer per dtype suffices. Reuse avoids first-touch page faults on fresh large
    allocations (3x faster gathers at 640-token contexts on CPU).
    NOTE: keyed by dtype, not replaced on a dtype change: engines of different dtypes in one
    process (tests, a bf16 and a float32 model side by side) once made a single buffer double
    on every switch, up to a 37 GB allocation.
    """

    def __init__(self) -> None:
        self.bufs: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, rows: int, row_numel: int, like: torch.Tensor) -> torch.Tensor:
        need = rows * row_numel
        key = (like.dtype, like.device)
        b = self.bufs.get(key)
        if b is None or b.numel() < need:
            self.bufs[key] = b = torch.empty(max(need, 2 * b.numel() if b is not None else 0), dtype=like.dtype,
                                             device=like.device)
        return b[:need].view(rows, row_numel)


_workspace = _Workspace()


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, private: bool = False) -> torch.Tensor:
    """Copy whole pages: cache [2, NB, bs, Hkv, D], block_ids [N] -> [2, N, bs, Hkv, D].

    `index_select` on a `[2 * NB, page]` view copies rows with memcpy; advanced indexing
    of the 5-D tensor is several times slower on CPU. The result lives in a shared
    workspace: it is valid until the next call (`private`: a fresh tensor, for callers
    outside the step thread).
    """
    two, nb = cache.shape[:2]
    rows = torch.cat((block_ids, block_ids + nb)) if two == 2 else block_ids
    flat = cache.view(two * nb, -1)
    out = None if private else _workspace.get(rows.numel(), flat.shape[1], flat)
    pages = torch.index_select(flat, 0, rows, out=out)
    return pages.view(two, block_ids.numel(), *cache.shape[2:])


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (this step's, already written); returns [T, Hq * D]."""
    num_tokens, num_heads, head_dim = q.shape
    out = q.new_empty(num_tokens, num_heads * head_dim)
    asked_lenders = []
    if meta.borrowed:  # NOTE: first, so the lenders' round trips run while this batch's attention computes
        from microserve.engine.model import dist_attention  # NOTE: it imports this module

        asked_lenders = dist_attention.ask_lenders(q, meta.layer, meta.borrowed, scale)
    if meta.num_decodes:
        nd = meta.num_decodes
        if meta.native_decode is not None:
            out[:nd] = meta.native_decode(q[:nd], cache, meta.decode_block_tables, meta.decode_lens, scale).view(nd, -1)
        else:
            out[:nd] = _decode(q[:nd], cache, meta.decode_block_tables, meta.decode_mask, scale)
    groups: dict[tuple[int, int], list[PrefillChunk]] = {}
    for chunk in meta.prefills:  # chunks of one shape attend in one batched call
        groups.setdefault((chunk.num_tokens, chunk.start_pos), []).append(chunk)
    for (n, start), chunks in groups.items():
        per_call = max(1, BATCHED_CONTEXT_TOKENS // (start + n))
        for i in range(0, len(chunks), per_call):
            part = chunks[i:i + per_call]
            if len(part) == 1 or (start == 0 and not _HAS_GQA):
                for chunk in part:
                    sl = slice(chunk.token_start, chunk.token_start + n)
                    out[sl] = _prefill(q[sl], k[sl], v[sl], cache, chunk, scale)
            else:
                _prefill_batched(q, k, v, cache, part, scale, out)
    for rows, asked in zip(meta.borrowed, asked_lenders):  # NOTE: empty unless borrowed (then imported above)
        out[rows.token_start:rows.token_start + rows.num_tokens] = dist_attention.attend_borrowed(
            q, cache, rows, scale, asked, meta.native_decode)
    return out


def _decode(
    q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    b, hq, d = q.shape
    hkv = cache.shape[-2]
    # kv: [2, B * max_blocks, bs, Hkv, D] -> [2, B, Hkv, S, D]
    kv = gather_blocks(cache, tables.flatten()).view(2, b, -1, hkv, d).transpose(2, 3)
    qg = q.view(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    o = F.scaled_dot_product_attention(qg, kv[0], kv[1], attn_mask=mask, scale=scale)
    return o.reshape(b, hq * d)


def _prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, chunk: PrefillChunk, scale: float
) -> torch.Tensor:
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    # fold query heads per KV head: [n, Hkv, G, D] -> [Hkv, G * n, D] (rows ordered g-major)
    qg = q.view(n, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * n, d)
    ctx = chunk.start_pos + n
    if chunk.start_pos == 0 and _HAS_GQA:  # fresh prompt: plain causal attention, fast kernel
        # NOTE: 4-D inputs ([1, H, n, D]); with 3-D ones CPU SDPA falls back to its slow math path
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           is_causal=True, scale=scale, enable_gqa=True)[0]
        return o.transpose(0, 1).reshape(n, hq * d)
    if chunk.start_pos == 0:
        keys, values = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, n, D]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril_()
    else:
        kv = gather_blocks(cache, chunk.block_table).flatten(1, 2)[:, :ctx]  # [2, ctx, Hkv, D]
        keys, values = kv[0].transpose(0, 1), kv[1].transpose(0, 1)
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril_(chunk.start_pos)
    mask = mask.repeat(g, 1)  # same causal rows for each folded head
    o = F.scaled_dot_product_attention(qg[None], keys[None], values[None], attn_mask=mask, scale=scale)
    return o.view(hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, hq * d)


def _prefill_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                     chunks: list[PrefillChunk], scale: float, out: torch.Tensor) -> None:
    """Chunks of the same length at the same start position in one SDPA call (batch = chunks):
    32 prompts of one length, or 31 requests sharing a cached prefix with their own tails.
    Same arithmetic per chunk as `_prefill`; one call instead of one per chunk."""
    c, n, start = len(chunks), chunks[0].num_tokens, chunks[0].start_pos
    _, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    first = chunks[0].token_start
    if all(ch.token_start == first + i * n for i, ch in enumerate(chunks)):  # adjacent: a view, no copies
        rows: slice | torch.Tensor = slice(first, first + c * n)
    else:
        rows = torch.cat([torch.arange(ch.token_start, ch.token_start + n, device=q.device) for ch in chunks])
    qs = q[rows].view(c, n, hq, d)
    if start == 0:  # fresh prompts: causal over their own K/V
        o = F.scaled_dot_product_attention(qs.transpose(1, 2), k[rows].view(c, n, hkv, d).transpose(1, 2),
                                           v[rows].view(c, n, hkv, d).transpose(1, 2), is_causal=True, scale=scale,
                                           enable_gqa=True)  # [c, Hq, n, D]
        out[rows] = o.transpose(1, 2).reshape(c * n, hq * d)
        return
    ctx = start + n
    qg = qs.view(c, n, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(c, hkv, g * n, d)
    # NOTE: CPU float32 only for now (the CUDA and half-precision paths keep the SDPA below)
    shared = _shared_blocks(chunks, cache.shape[2]) if qg.dtype == torch.float32 and qg.device.type == "cpu" else 0
    if shared:
        out[rows] = _cascade(qg, cache, chunks, shared, scale).view(c, hkv, g, n, d).permute(0, 3, 1, 2, 4).reshape(
            c * n, hq * d)
        return
    kv = gather_blocks(cache, torch.cat([ch.block_table for ch in chunks]))  # [2, c * nb, bs, Hkv, D]
    kv = kv.view(2, c, -1, hkv, d)[:, :, :ctx]
    mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril_(start).repeat(g, 1)
    o = F.scaled_dot_product_attention(qg, kv[0].transpose(1, 2), kv[1].transpose(1, 2), attn_mask=mask, scale=scale)
    out[rows] = o.view(c, hkv, g, n, d).permute(0, 3, 1, 2, 4).reshape(c * n, hq * d)


CASCADE_MIN_TOKENS = 256  # shared context worth attending once for all chunks
CASCADE_MAX_SCORES = 1 << 24  # most query rows x shared keys in one cascade call (float32 scores)


def _shared_blocks(chunks: list[PrefillChunk], block_size: int) -> int:
    """Leading blocks every chunk's table holds at the same place (one cached prefix), all before
    the chunks' start; 0 when too few to be worth a cascade."""
    start = chunks[0].start_pos
    tables = torch.stack([ch.block_table for ch in chunks])
    same = (tables == tables[0]).all(dim=0)
    m = min(int(same.cumprod(0).sum()), start // block_size)
    rows = len(chunks) * chunks[0].num_tokens
    return m if m * block_size >= CASCADE_MIN_TOKENS and rows * m * block_size <= CASCADE_MAX_SCORES else 0


def _cascade(qg: torch.Tensor, cache: torch.Tensor, chunks: list[PrefillChunk], m: int, scale: float) -> torch.Tensor:
    """Cascade attention (as FlashInfer's): the queries of all chunks attend to the shared prefix
    (`m` blocks) in one pass, each chunk to its own rest (causal), and the two softmaxes merge by
    their maxima and sums, exactly. qg: [c, Hkv, G * n, D] -> [c, Hkv, G * n, D]."""
    c, hkv, rows, d = qg.shape
    n, start = chunks[0].num_tokens, chunks[0].start_pos
    bs = cache.shape[2]
    shared = gather_blocks(cache, chunks[0].block_table[:m]).flatten(1, 2)  # [2, m * bs, Hkv, D]
    ks, vs = shared[0].transpose(0, 1), shared[1].transpose(0, 1)  # [Hkv, L1, D]
    q_all = qg.transpose(0, 1).reshape(hkv, c * rows, d)
    s1 = torch.bmm(q_all, ks.transpose(1, 2)).mul_(scale)  # [Hkv, c * rows, L1]
    m1 = s1.amax(dim=-1, keepdim=True)
    p1 = s1.sub_(m1).exp_()
    l1 = p1.sum(dim=-1, keepdim=True)
    o1 = torch.bmm(p1, vs)  # [Hkv, c * rows, D]
    m1, l1, o1 = (t.view(hkv, c, rows, -1).transpose(0, 1) for t in (m1, l1, o1))  # [c, Hkv, rows, .]
    own = start + n - m * bs  # keys after the shared blocks: the chunks' own context and tokens
    kv = gather_blocks(cache, torch.cat([ch.block_table[m:] for ch in chunks]))  # [2, c * nb2, bs, Hkv, D]
    kv = kv.view(2, c, -1, hkv, d)[:, :, :own]
    s2 = torch.matmul(qg, kv[0].permute(0, 2, 3, 1)).mul_(scale)  # [c, Hkv, rows, own]
    mask = torch.ones(n, own, dtype=torch.bool, device=qg.device).tril_(start - m * bs).repeat(rows // n, 1)
    s2.masked_fill_(~mask, float("-inf"))
    m2 = s2.amax(dim=-1, keepdim=True)  # finite: each query sees at least its own token
    p2 = s2.sub_(m2).exp_()
    l2 = p2.sum(dim=-1, keepdim=True)
    o2 = torch.matmul(p2, kv[1].transpose(1, 2))  # [c, Hkv, rows, D]
    mx = torch.maximum(m1, m2)
    w1, w2 = (m1 - mx).exp_(), (m2 - mx).exp_()
    return (o1 * w1 + o2 * w2) / (l1 * w1 + l2 * w2)
