"""Attention split across engines (DistKV-LLM's DistAttention): the exact math, one place.

A request whose KV does not fit one engine keeps some token ranges on lenders. Each layer's
attention is then computed in parts: every holder of KV (the borrower over its local blocks,
each lender over the range it holds) attends the query rows to its keys alone and returns the
softmax-normalized output of its part with the log-sum-exp of its scores; the parts merge
exactly, as flash-decoding merges its splits:

    part i:   o_i = softmax(q K_i^T * scale) V_i       lse_i = log sum_j exp(q k_ij * scale)
    merged:   lse = log sum_i exp(lse_i)               o = sum_i exp(lse_i - lse) * o_i

Only the query rows go to a lender and `(o_i, lse_i)` come back: per layer and row,
`Hq * D` values out and `Hq * (D + 1)` back, whatever the length of the lent range.

`range_attention` is what a lender runs over its lent blocks (causal by position: a row at
position p sees keys at positions <= p); `merge` is what the borrower runs. Both take the
paged cache layout of `attention.py` ([2, NB, bs, Hkv, D]) and fold GQA query heads per KV
head, so K/V are never repeated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from microserve.engine.model.attention import BorrowedRows, gather_blocks


def range_attention(q: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, blocks: torch.Tensor,
                    begin: int, end: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query rows over the keys of positions `[begin, end)` alone.

    Args:
        q: [R, Hq, D] query rows (any positions; several requests' rows share a range only if
            they share its KV).
        positions: [R] long, each row's position in its sequence (causality).
        cache: [2, NB, bs, Hkv, D] the paged KV cache.
        blocks: [ceil((end - begin) / bs)] long, the blocks holding the range: block i holds
            positions `begin + i * bs ...` (ranges start on a block boundary of the holder).
        scale: the softmax scale.

    Returns:
        out [R, Hq, D] (q's dtype), normalized over this range; lse [R, Hq] float32. A row that sees
        no key of the range (it comes before `begin`) gets out 0 and lse -inf, which `merge` ignores.
    """
    r, hq, d = q.shape
    hkv = cache.shape[-2]
    g = hq // hkv
    n = end - begin
    if n <= 0:
        raise ValueError(f"empty range [{begin}, {end})")
    # NOTE: private pages, not the step's shared workspace: a lender attends from another thread
    kv = gather_blocks(cache, blocks, private=True).flatten(1, 2)[:, :n].float()  # [2, n, Hkv, D]
    keys, values = kv[0].permute(1, 2, 0), kv[1].transpose(0, 1)  # [Hkv, D, n], [Hkv, n, D]
    qg = q.float().view(r, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, r * g, d)  # rows ordered (row, head)
    scores = torch.bmm(qg, keys).mul_(scale)  # [Hkv, R * G, n]
    key_pos = torch.arange(begin, end, device=q.device)
    visible = (key_pos[None, :] <= positions[:, None]).repeat_interleave(g, dim=0)  # [R * G, n]
    scores.masked_fill_(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [Hkv, R * G, 1]; -inf where nothing is visible
    probs = torch.exp(scores.sub_(torch.where(torch.isfinite(lse), lse, 0.0)))
    out = torch.bmm(probs, values)  # [Hkv, R * G, D]
    out = out.view(hkv, r, g, d).permute(1, 0, 2, 3).reshape(r, hq, d)
    return out.to(q.dtype), lse.view(hkv, r, g).permute(1, 0, 2).reshape(r, hq)


def seen_whole(decode: Callable[..., torch.Tensor] | None, q: torch.Tensor, first: int, cache: torch.Tensor,
               runs: list[tuple[int, int, torch.Tensor]], scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(out, lse)` over the keys of `runs` ((begin, end, blocks), sorted) in one call of the paged decode
    kernel (`decode`: the native CPU kernel or its Triton twin, with `lse=`), when it applies: every row
    sees every key (the first row's position `first` is at or past the last key: decode rows), every run
    starts on a block boundary and every run but the last ends on one (their blocks then read as one
    context). None otherwise (the caller runs `range_attention` per run)."""
    bs = cache.shape[2]
    if decode is None or not runs or first < runs[-1][1] - 1 or any(b % bs for b, _, _ in runs) \
            or any(e % bs for _, e, _ in runs[:-1]):
        return None
    blocks = torch.cat([blk[:-(-(end - begin) // bs)] for begin, end, blk in runs]) if len(runs) > 1 else runs[0][2]
    r, hq = q.shape[:2]
    lse = torch.empty(r, hq, dtype=torch.float32, device=q.device)
    lens = torch.full((r,), sum(end - begin for begin, end, _ in runs), dtype=torch.long, device=q.device)
    out = decode(q, cache, blocks.expand(r, -1).contiguous(), lens, scale, lse=lse)
    return out, lse


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The attention output over the union of the parts' keys: parts are `(out [R, Hq, D], lse [R, Hq])`
    over disjoint key sets of the same query rows. A row that no part saw raises (every row sees at
    least its own token, which one part holds)."""
    if len(parts) == 2:  # NOTE: the common case (local + one lender), in five ops: it runs once per layer and step
        (o1, l1), (o2, l2) = parts
        w = torch.sigmoid(l1 - l2)  # exp(l1) / (exp(l1) + exp(l2)): 1 where l2 = -inf, NaN where both are
        if w.isnan().any():
            raise ValueError("a query row saw no key in any part")
        o2f = o2.float()
        return (o2f + w.unsqueeze(-1) * (o1.float() - o2f)).to(o1.dtype)
    out, lse = merge_parts(parts)
    if not torch.isfinite(lse).all():
        raise ValueError("a query row saw no key in any part")
    return out


def merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Parts over disjoint key sets merged into one part `(out, lse)` over their union (a lender merges
    the ranges it holds for one request; merging is associative). A row no part saw keeps out 0, lse -inf."""
    if not parts:
        raise ValueError("nothing to merge")
    if len(parts) == 1:  # NOTE: a lender holding one range of the request (the common case)
        return parts[0]
    lse = torch.stack([p[1] for p in parts])  # [P, R, Hq]
    total = torch.logsumexp(lse, dim=0)  # [R, Hq]
    weights = torch.exp(lse - torch.where(torch.isfinite(total), total, 0.0))  # [P, R, Hq]; 0 for unseen
    out = sum(w[..., None] * p[0].float() for w, p in zip(weights, parts))
    return out.to(parts[0][0].dtype), total  # type: ignore[union-attr]


def ask_lenders(q: torch.Tensor, layer: int, borrowed: list[BorrowedRows], scale: float) -> list[list[tuple]]:
    """The borrower's first half: send the rows of this step's borrowing sequences to their lenders, one
    message per lender and layer (every sequence and range on that lender rides in it). Called before
    the batch's local attention, so the round trips run while it computes. Returns, per sequence,
    `(ranges, part)` pairs for `attend_borrowed` (`part.result()`: that lender's `(out, lse)`)."""
    by_lender: dict[Any, list[tuple[int, list, torch.Tensor, torch.Tensor]]] = {}
    for i, rows in enumerate(borrowed):
        if rows.seq.error is None:
            qs = q[rows.token_start:rows.token_start + rows.num_tokens]
            for group in rows.remote:
                by_lender.setdefault(group[0].lender, []).append((i, group, rows.positions, qs))
    asked: list[list[tuple]] = [[] for _ in borrowed]
    for items in by_lender.values():
        lender = items[0][1][0]  # NOTE: any range's peer sends for its lender (serving.lenders.RemoteLender)
        parts = lender.attend(layer, scale, [(group, positions, qs) for _, group, positions, qs in items])
        for (i, group, _, _), part in zip(items, parts):
            asked[i].append((group, part))
    return asked


def attend_borrowed(q: torch.Tensor, cache: torch.Tensor, rows: BorrowedRows, scale: float,
                    asked: list[tuple[list, Any]], decode: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """The borrower's second half: the sequence's rows attend over its local runs here (`seen_whole` with
    the paged decode kernel `decode` when it applies), then the lenders' parts (`asked`) are collected and
    everything is merged. A lender's failure sets the sequence's `error` (it ends after this step; the
    other rows of the batch are not touched) and gives zero rows. Returns [rows, Hq * D]."""
    n = rows.num_tokens
    qs = q[rows.token_start:rows.token_start + n]
    seq = rows.seq
    whole = seen_whole(decode, qs, rows.start, cache, rows.local, scale)
    parts = [whole] if whole is not None else [
        range_attention(qs, rows.positions, cache, blocks, begin, end, scale) for begin, end, blocks in rows.local]
    for group, part in asked:
        try:
            parts.append(part.result())
        except Exception as exc:  # NOTE: one lost lender fails its borrower, never the step
            if seq.error is None:
                spans = ", ".join(f"[{p.begin}, {p.end})" for p in group)
                seq.error = f"remote attention over positions {spans} failed: {exc or repr(exc)}"
                seq.error_peer = getattr(exc, "peer", "")
    if seq.error is not None:
        return qs.new_zeros(n, qs.shape[1] * qs.shape[2])
    return merge(parts).reshape(n, -1)
