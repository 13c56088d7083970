"""Token sampling for one batch: logits processors, then greedy or temperature / top-k / top-p / min-p.

    raw logits ──> logprobs (log_softmax of the raw logits, as vLLM's default `raw_logprobs`)
        └─> processors, only on the rows that ask: logit_bias, min_tokens (EOS and stop ids
            banned), repetition (prompt + output, as transformers), frequency / presence (output,
            as OpenAI), the grammar's token mask (structured outputs) ──> greedy argmax, or
            temperature, top-k, top-p, min-p and a seeded draw ──> the grammar consumes the token

Sampling uses the exponential-race trick (argmax of probs / Exp(1) noise), with noise drawn
from the request's own generator, so a seeded request gives the same tokens whatever else
shares its batch. Rows that ask for nothing special take the fast path (one argmax), so a batch
of greedy requests pays nothing for the others' processors.
"""

from __future__ import annotations

import math

import torch

from microserve.engine.core.sequence import Sequence
from microserve.engine.model.structured import apply_masks


def _generator(seq: Sequence, device: torch.device, fallback: torch.Generator, vocab: int) -> torch.Generator:
    if seq.sampling.seed is None:
        return fallback
    if seq.generator is None:
        seq.generator = torch.Generator(device=device).manual_seed(seq.sampling.seed)
        skip = seq.sampling.resumed  # NOTE: draws of the tokens generated before a move: one `vocab` draw each
        if device.type == "cpu":
            _advance(seq.generator, skip * vocab)
        else:
            for _ in range(skip):
                torch.empty(vocab, device=device).exponential_(generator=seq.generator)
    return seq.generator


def _advance(gen: torch.Generator, n: int) -> None:
    """Move a CPU generator past `n` float exponential draws without making them: each such draw
    reads one 64-bit word of the Mersenne twister, as each of these cheaper integer draws does (a
    test checks the states agree)."""
    for start in range(0, n, 1 << 20):
        torch.empty(min(1 << 20, n - start), dtype=torch.int64).random_(0, 1 << 31, generator=gen)


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
    exact per-request streams (`_draw_seeded`); the rest share one batched draw (`_draw_batched`)."""
    seeded = [j for j, s in enumerate(seqs) if s.sampling.seed is not None]
    if not seeded:
        return _draw_batched(sub, seqs, fallback)
    if len(seeded) == len(seqs):
        return _draw_seeded(sub, seqs, fallback)
    free = [j for j, s in enumerate(seqs) if s.sampling.seed is None]
    out = torch.empty(len(seqs), dtype=torch.long, device=sub.device)
    out[seeded] = _draw_seeded(sub[seeded], [seqs[j] for j in seeded], fallback)
    out[free] = _draw_batched(sub[free], [seqs[j] for j in free], fallback)
    return out


def _draw_batched(sub: torch.Tensor, seqs: list[Sequence], gen: torch.Generator) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p without sorting the vocabulary, one batched draw for every
    row: the same truncated softmax as `_draw_seeded` samples from (a tie at a cut keeps every tied
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
    logits = sub / torch.tensor([p.temperature for p in sp], device=dev, dtype=sub.dtype).unsqueeze(1)
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in sp]
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


CANDIDATES = 256  # tokens a seeded row without top-k ranks before it falls back to sorting the vocabulary
TAIL = 1e-3  # a temperature-only row tries its candidates when they hold all but this much of its mass
NEAR = 1e-5  # relative distance from a cut or a runner-up under which a row takes the full path


def _draw_seeded(sub: torch.Tensor, seqs: list[Sequence], fallback: torch.Generator) -> torch.Tensor:
    """Seeded rows: the tokens of `_draw_seeded_full`, bit for bit, without its vocabulary sort when
    the answer does not depend on it (CPU). The full path ranks every token and races a vocabulary of
    the request's noise, laid out by rank, against the truncated probabilities; only the kept ranks can
    win. So a row ranks its `topk` candidates, finds its cut among them, draws noise for the kept ranks
    only and moves its generator past the rest (`_advance`). A row whose cut falls outside the
    candidates, whose kept logits tie (ranks an unstable sort could swap), or whose cut or winner lies
    within `NEAR` of the next decision (where float rounding of a different sum order could matter)
    takes the full path with its generator as it was. Temperature-only rows keep every rank: they draw
    the whole noise vector and take the best candidate when no later rank can beat it (bounded by the
    largest later probability over the smallest later noise)."""
    vocab = sub.shape[-1]
    if sub.device.type != "cpu" or vocab < 2:
        return _draw_seeded_full(sub, seqs, fallback)
    scaled = sub / torch.tensor([s.sampling.temperature for s in seqs]).unsqueeze(1)
    ks = [s.sampling.top_k if 0 < s.sampling.top_k < vocab else 0 for s in seqs]
    top = scaled.amax(dim=-1, keepdim=True)
    totals = (scaled - top).exp_().sum(dim=-1)
    # NOTE: rows whose cut cannot fall among the candidates (a flat row) go straight to the full path
    width = min(vocab - 1, max(ks) if all(ks) else max(max(ks), CANDIDATES))
    p_max = (1.0 / totals).tolist()
    floors = torch.tensor([math.log(s.sampling.min_p) if s.sampling.min_p else -math.inf for s in seqs]).unsqueeze(1)
    above = (scaled >= top + floors).sum(dim=-1).tolist() if any(s.sampling.min_p for s in seqs) else [0] * len(seqs)
    tried = [i for i, s in enumerate(seqs) if ks[i] or (above[i] <= width if s.sampling.min_p else
             s.sampling.top_p <= width * p_max[i] if s.sampling.top_p < 1.0 else width * p_max[i] >= 1 - TAIL)]
    out = torch.empty(len(seqs), dtype=torch.long)
    slow, ranks = sorted(set(range(len(seqs))) - set(tried)), [0] * len(tried)
    if tried:
        vals, ids = scaled[tried].topk(width + 1, dim=-1)
        for row, i in enumerate(tried):
            gen = _generator(seqs[i], sub.device, fallback, vocab)
            state = gen.get_state()
            rank = _seeded_row(vals[row], ks[i], float(totals[i]), seqs[i].sampling, gen, vocab)
            if rank is None:
                gen.set_state(state)
                slow.append(i)
            ranks[row] = rank or 0
        out[tried] = ids.gather(1, torch.tensor(ranks).unsqueeze(1)).squeeze(1)
    if slow:
        out[slow] = _draw_seeded_full(sub[slow], [seqs[i] for i in slow], fallback)
    return out


def _seeded_row(vals: torch.Tensor, k: int, total: float, sp, gen: torch.Generator, vocab: int) -> int | None:
    """The winning rank of one seeded row from its sorted candidate logits, or None for the full path."""
    if k:
        if vals[k - 1] <= vals[k]:  # NOTE: a tie at the top-k cut
            return None
        probs = (vals[:k] - vals[0]).exp()
        probs /= probs.sum()
    else:
        probs = (vals[:-1] - vals[0]).exp() / total
    keep = k or None
    if sp.top_p < 1.0:
        before = probs.cumsum(dim=0) - probs
        if bool(((before - sp.top_p).abs() <= NEAR * sp.top_p).any()):
            return None
        beyond = (before > sp.top_p).nonzero()
        keep = int(beyond[0]) if beyond.numel() else keep
    if sp.min_p:
        floor = sp.min_p * float(probs[0])
        if bool(((probs - floor).abs() <= NEAR * floor).any()):
            return None
        below = (probs < floor).nonzero()
        keep = min(keep or vocab, int(below[0])) if below.numel() else keep
    if keep is None and (sp.top_p < 1.0 or sp.min_p or float(probs.sum()) < 1 - TAIL):
        return None  # NOTE: the cut lies beyond the candidates, or too much mass does to bound a winner
    ranked = vals[:(keep or probs.numel()) + 1]
    finite = torch.isfinite(ranked[:-1])
    if bool(((ranked[:-1] == ranked[1:]) & finite).any()):
        return None
    if keep is not None:
        noise = torch.empty(keep).exponential_(generator=gen)
        _advance(gen, vocab - keep)
        ratio = probs[:keep] / noise
    else:  # temperature only: every rank counts
        noise = torch.empty(vocab).exponential_(generator=gen)
        ratio = probs / noise[:probs.numel()]
        later = float((vals[-1] - vals[0]).exp()) / total / float(noise[probs.numel():].min())
        if not float(ratio.max()) > later * (1 + NEAR):
            return None
    if ratio.numel() > 1:
        best = ratio.topk(2)
        if float(best.values[1]) >= float(best.values[0]) * (1 - NEAR):
            return None
        return int(best.indices[0])
    return 0


def _draw_seeded_full(sub: torch.Tensor, seqs: list[Sequence], fallback: torch.Generator) -> torch.Tensor:
    """The draw of seeded rows as seeds defined it (their outputs are pinned): sorted vocabulary,
    noise from each request's own generator laid out by rank."""
    vocab, dev = sub.shape[-1], sub.device
    temps = torch.tensor([s.sampling.temperature for s in seqs], device=dev).unsqueeze(1)
    sorted_logits, order = (sub / temps).sort(dim=-1, descending=True)
    ks = [s.sampling.top_k if s.sampling.top_k > 0 else vocab for s in seqs]
    rank = torch.arange(vocab, device=dev).unsqueeze(0)
    sorted_logits.masked_fill_(rank >= torch.tensor(ks, device=dev).unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([s.sampling.top_p for s in seqs], device=dev).unsqueeze(1)
    beyond = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already covers top_p
    probs.masked_fill_(beyond, 0.0)
    min_p = torch.tensor([s.sampling.min_p for s in seqs], device=dev).unsqueeze(1)
    probs.masked_fill_(probs < min_p * probs[:, :1], 0.0)  # NOTE: column 0 is each row's most likely token
    noise = torch.stack([torch.empty(vocab, device=dev).exponential_(generator=_generator(s, dev, fallback, vocab))
                         for s in seqs])
    return order.gather(1, (probs / noise).argmax(dim=-1, keepdim=True)).squeeze(1)


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
