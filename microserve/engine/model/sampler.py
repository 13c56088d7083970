"""Token sampling for one batch: logits processors, then greedy or temperature / top-k / top-p / min-p.

    raw logits ──> logprobs (log_softmax of the raw logits, as vLLM's default `raw_logprobs`)
        └─> processors, only on the rows that ask: logit_bias, min_tokens (EOS and stop ids
            banned), repetition (prompt + output, as transformers), frequency / presence (output,
            as OpenAI), the grammar's token mask (structured outputs) ──> greedy argmax, or
            temperature, top-k, top-p, min-p and a seeded draw ──> the grammar consumes the token

Seeded rows use the exponential-race trick (argmax of probs / Exp(1) noise), with noise drawn
from the request's own generator, so a seeded request gives the same tokens whatever else
shares its batch. The other sampled rows share one batched draw: on CPU the native kernel
`sample_rows` (temperature, min-p, top-p and the draw in a few passes over each row, rows in
parallel) where it is built with AVX2, else torch ops. Rows that ask for nothing special take
the fast path (one argmax), so a batch of greedy requests pays nothing for the others' processors.
"""

from __future__ import annotations

import torch

from microserve.engine.core.sequence import Sequence
from microserve.engine.model import native
from microserve.engine.model.seeded import draw_seeded
from microserve.engine.model.structured import apply_masks


def _needs_processing(seq: Sequence) -> bool:
    sp = seq.sampling
    return bool(seq.matcher is not None or sp.allowed_token_ids or sp.logit_bias or sp.presence_penalty
                or sp.frequency_penalty or sp.repetition_penalty != 1.0
                or (sp.min_tokens and seq.num_output_tokens < sp.min_tokens))


def process(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """Apply each row's logits processors in place (rows: indices into `logits` and `seqs`)."""
    vocab, dev = logits.shape[-1], logits.device
    for i in rows:
        seq, row = seqs[i], logits[i]
        sp = seq.sampling
        if sp.allowed_token_ids:
            keep = torch.full_like(row, float("-inf"))
            ids = torch.tensor([t for t in sp.allowed_token_ids if t < vocab], device=dev, dtype=torch.long)
            keep[ids] = 0.0
            row += keep
        if sp.logit_bias:
            ids = [t for t in sp.logit_bias if t < vocab]
            row[torch.tensor(ids, device=dev, dtype=torch.long)] += torch.tensor(
                [max(-100.0, min(100.0, sp.logit_bias[t])) for t in ids], device=dev, dtype=row.dtype)
        if sp.min_tokens and seq.num_output_tokens < sp.min_tokens:
            banned = [t for t in {*sp.stop_token_ids, *(() if sp.ignore_eos else seq.eos_ids)} if t < vocab]
            if banned:
                row[torch.tensor(banned, device=dev, dtype=torch.long)] = float("-inf")
        if sp.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=dev, dtype=torch.long)
            score = row[seen]
            row[seen] = torch.where(score > 0, score / sp.repetition_penalty, score * sp.repetition_penalty)
        if (sp.presence_penalty or sp.frequency_penalty) and seq.num_output_tokens + sp.resumed:
            out = torch.tensor(seq.token_ids[max(0, seq.num_prompt_tokens - sp.resumed):], device=dev, dtype=torch.long)
            counts = torch.bincount(out[out < vocab], minlength=vocab).to(row.dtype)
            row -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(row.dtype)


def _logprobs(raw: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> None:
    """Record, per sequence that asked, the sampled token's logprob and its `logprobs` top alternatives."""
    rows = [i for i, s in enumerate(seqs) if s.sampling.logprobs is not None]
    if not rows:
        return
    logp = raw[rows].float().log_softmax(dim=-1)
    k = max(seqs[i].sampling.logprobs for i in rows)
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logp.device)).squeeze(1).tolist()
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        n = seqs[i].sampling.logprobs
        seqs[i].logprobs.append((chosen[j], list(zip(top_ids[j][:n], top_lp[j][:n]))))


def sample(logits: torch.Tensor, seqs: list[Sequence], fallback: torch.Generator) -> list[int]:
    """logits: [B, V] float32, one row per sequence; returns one token id per row (and records the
    logprobs of the rows that ask for them on their sequences)."""
    special = [i for i, s in enumerate(seqs) if _needs_processing(s)]
    raw = logits
    if special:
        if any(s.sampling.logprobs is not None for s in seqs):
            logits = logits.clone()  # NOTE: logprobs are of the raw logits
        process(logits, seqs, special)
        constrained = [i for i in special if seqs[i].matcher is not None]
        if constrained:
            apply_masks(logits, constrained, [seqs[i].matcher for i in constrained])
    greedy = [s.sampling.greedy for s in seqs]
    if not any(greedy):  # NOTE: no argmax and no row copy when every row samples
        out = _draw(logits, seqs, fallback)
    else:
        out = logits.argmax(dim=-1)
        if not all(greedy):
            rows = [i for i, g in enumerate(greedy) if not g]
            out[rows] = _draw(logits[rows], [seqs[i] for i in rows], fallback)
    tokens = out.tolist()
    for seq, token in zip(seqs, tokens):
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
    _logprobs(raw, seqs, tokens)
    return tokens


def _draw(sub: torch.Tensor, seqs: list[Sequence], fallback: torch.Generator) -> torch.Tensor:
    """One token per row of `sub` (processed logits of the rows that sample). Seeded rows keep their
    exact per-request streams (`seeded.draw_seeded`); the rest share one batched draw (`_draw_batched`)."""
    seeded = [j for j, s in enumerate(seqs) if s.sampling.seed is not None]
    if not seeded:
        return _draw_batched(sub, seqs, fallback)
    if len(seeded) == len(seqs):
        return draw_seeded(sub, seqs, fallback)
    free = [j for j, s in enumerate(seqs) if s.sampling.seed is None]
    out = torch.empty(len(seqs), dtype=torch.long, device=sub.device)
    out[seeded] = draw_seeded(sub[seeded], [seqs[j] for j in seeded], fallback)
    out[free] = _draw_batched(sub[free], [seqs[j] for j in free], fallback)
    return out


def _draw_batched(sub: torch.Tensor, seqs: list[Sequence], gen: torch.Generator) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p without sorting the vocabulary, one batched draw for every
    row: the same truncated softmax as `seeded.draw_seeded` samples from (a tie at a cut keeps every tied
    token), drawn by inverse CDF (a cumulative sum and one uniform number per row) instead of a race
    against a vocabulary of exponential noise (and 10x cheaper than `torch.multinomial` on the CPU).

    top-k: the k largest logits by partial selection (`topk`); the rows that ask for it then work on
    those k candidates only (a row with a tie at the k-th logit keeps the whole row, masked). min-p: a
    fraction of the row's largest probability. top-p by rejection with pivots (as FlashInfer samples):
    draw from what is left; the token stands when the mass of the tokens strictly more likely than it
    is at most `top_p`, else only those more likely tokens stay and the row draws again. Each round is
    one pass over the rows that drew outside the set, and the result is exactly the truncated
    distribution."""
    vocab, dev = sub.shape[-1], sub.device
    sp = [s.sampling for s in seqs]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in sp]
    if not any(ks) and dev.type == "cpu" and sub.dtype == torch.float32 and (kernels := _kernels()) is not None:
        seeds = torch.randint(-2**63, 2**63 - 1, (len(sp),), generator=gen, dtype=torch.long)
        return kernels.sample_rows(sub, torch.tensor([p.temperature for p in sp]), torch.tensor([p.top_p for p in sp]),
                                   torch.tensor([p.min_p for p in sp]), seeds)
    logits = sub / torch.tensor([p.temperature for p in sp], device=dev, dtype=sub.dtype).unsqueeze(1)
    if all(ks):
        vals, ids = logits.topk(max(ks), dim=-1)  # descending
        kth = vals.gather(1, torch.tensor([[k - 1] for k in ks], device=dev))
        if bool(((logits >= kth).sum(dim=-1) == torch.tensor(ks, device=dev)).all()):  # no tie at any cut
            vals.masked_fill_(vals < kth, float("-inf"))
            return ids.gather(1, _truncated_draw(vals, sp, gen).unsqueeze(1)).squeeze(1)
        logits.masked_fill_(logits < kth, float("-inf"))
    elif any(ks):
        kth = logits.topk(max(ks), dim=-1).values.gather(1, torch.tensor([[max(k, 1) - 1] for k in ks], device=dev))
        kth[torch.tensor([k == 0 for k in ks], device=dev)] = float("-inf")
        logits.masked_fill_(logits < kth, float("-inf"))
    return _truncated_draw(logits, sp, gen)


def _kernels():
    """The native CPU kernels this process loaded (the engine does at start), when built with AVX2 (the scalar
    build's `exp` is slower than torch's softmax)."""
    kernels = native.loaded()
    return kernels if kernels is not None and kernels.simd() else None


def _truncated_draw(logits: torch.Tensor, sp: list, gen: torch.Generator) -> torch.Tensor:
    """Column indices drawn from softmax(logits) under each row's min-p and top-p (see `_draw_batched`)."""
    dev = logits.device
    probs = logits.softmax(dim=-1)
    if any(p.min_p for p in sp):
        floor = torch.tensor([p.min_p for p in sp], device=dev, dtype=probs.dtype).unsqueeze(1)
        probs.masked_fill_(probs < floor * probs.amax(dim=-1, keepdim=True), 0.0)
    tokens = _inverse_cdf(probs, gen)
    rows = [j for j, p in enumerate(sp) if p.top_p < 1.0]
    if rows:
        _top_p_by_rejection(probs, torch.tensor(rows, device=dev),
                            torch.tensor([sp[j].top_p for j in rows], device=dev, dtype=probs.dtype), tokens, gen)
    return tokens


def _top_p_by_rejection(probs: torch.Tensor, rows: torch.Tensor, top_p: torch.Tensor, tokens: torch.Tensor,
                        gen: torch.Generator) -> None:
    """Redraw, in place in `tokens`, the `rows` whose token top-p leaves out (see `_draw_batched`)."""
    p, weights = (probs if rows.numel() == probs.shape[0] else probs[rows]), None  # NOTE: no copy when all rows
    while rows.numel():
        p_tok = p.gather(1, tokens[rows].unsqueeze(1))
        # 1.0 where a token is strictly more likely than the drawn one, else 0.0 (NOTE: float arithmetic: a
        # boolean mask and `where` take 3-6x longer on the CPU, and this runs on every sampled row each step)
        above = (p - p_tok).sign_().clamp_(min=0.0)
        out = (p * above).sum(dim=-1) > top_p  # strictly more likely tokens hold more than top_p
        if not bool(out.any()):
            return
        rows, p, top_p, above = rows[out], p[out], top_p[out], above[out]
        weights = p * above if weights is None else weights[out] * above
        tokens[rows] = _inverse_cdf(weights, gen)


def _inverse_cdf(weights: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row, drawn in proportion to `weights` (>= 0, not normalized): the first token
    whose running sum exceeds a uniform draw of the row's total (a zero weight is never drawn)."""
    cdf = weights.cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype, generator=gen) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[-1] - 1)


def prompt_logprobs(model, hidden: torch.Tensor, scheduled: list[tuple[Sequence, int]]) -> None:
    """For sequences that asked, the logprob of each prompt token after the first (and its top
    alternatives), from the hidden states of this step's chunk: position j predicts token j + 1."""
    offset = 0
    for seq, n in scheduled:
        k, start = seq.sampling.prompt_logprobs, seq.num_computed_tokens
        first = max(start + 1, len(seq.prompt_logprobs) + 1)  # NOTE: a recompute (preemption) adds nothing twice
        last = min(start + n, seq.num_prompt_tokens - 1)  # predicted token indices [first, last]
        if k is not None and first <= last:
            rows = hidden[offset + first - 1 - start:offset + last - start]
            logp = model.compute_logits(rows).float().log_softmax(dim=-1)
            targets = torch.tensor(seq.token_ids[first:last + 1], device=logp.device).unsqueeze(1)
            chosen = logp.gather(1, targets)
            ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()  # NOTE: vLLM's rank, also outside the top k
            top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
            seq.prompt_logprobs += [(c, list(zip(i, v)), r) for c, i, v, r in
                                    zip(chosen.squeeze(1).tolist(), top_ids.tolist(), top_lp.tolist(), ranks)]
        offset += n
