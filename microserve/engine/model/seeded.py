"""Seeded sampling: each request draws from its own generator (`torch.Generator` seeded with its
`seed`), so its tokens do not depend on what else shares the batch, and a moved or failed-over
request skips the draws of the tokens it already has (`sampling.resumed`, `advance`).

    draw_seeded       the tokens of `draw_seeded_full`, bit for bit, without its vocabulary sort when
                      the answer does not depend on it (CPU): a row ranks its top candidates only
    draw_seeded_full  sort the vocabulary, cut (top-k, top-p, min-p), race the truncated probabilities
                      against a vocabulary of the request's exponential noise laid out by rank

The batched, unseeded draw is `sampler.py`'s.
"""

from __future__ import annotations

import math

import torch

from microserve.engine.core.sequence import Sequence


def generator(seq: Sequence, device: torch.device, fallback: torch.Generator, vocab: int) -> torch.Generator:
    if seq.sampling.seed is None:
        return fallback
    if seq.generator is None:
        seq.generator = torch.Generator(device=device).manual_seed(seq.sampling.seed)
        skip = seq.sampling.resumed  # NOTE: draws of the tokens generated before a move: one `vocab` draw each
        if device.type == "cpu":
            advance(seq.generator, skip * vocab)
        else:
            for _ in range(skip):
                torch.empty(vocab, device=device).exponential_(generator=seq.generator)
    return seq.generator


def advance(gen: torch.Generator, n: int) -> None:
    """Move a CPU generator past `n` float exponential draws without making them: each such draw
    reads one 64-bit word of the Mersenne twister, as each of these cheaper integer draws does (a
    test checks the states agree)."""
    for start in range(0, n, 1 << 20):
        torch.empty(min(1 << 20, n - start), dtype=torch.int64).random_(0, 1 << 31, generator=gen)


CANDIDATES = 256  # tokens a seeded row without top-k ranks before it falls back to sorting the vocabulary
TAIL = 1e-3  # a temperature-only row tries its candidates when they hold all but this much of its mass
NEAR = 1e-5  # relative distance from a cut or a runner-up under which a row takes the full path


def draw_seeded(sub: torch.Tensor, seqs: list[Sequence], fallback: torch.Generator) -> torch.Tensor:
    """Seeded rows: the tokens of `draw_seeded_full`, bit for bit, without its vocabulary sort when
    the answer does not depend on it (CPU). The full path ranks every token and races a vocabulary of
    the request's noise, laid out by rank, against the truncated probabilities; only the kept ranks can
    win. So a row ranks its `topk` candidates, finds its cut among them, draws noise for the kept ranks
    only and moves its generator past the rest (`advance`). A row whose cut falls outside the
    candidates, whose kept logits tie (ranks an unstable sort could swap), or whose cut or winner lies
    within `NEAR` of the next decision (where float rounding of a different sum order could matter)
    takes the full path with its generator as it was. Temperature-only rows keep every rank: they draw
    the whole noise vector and take the best candidate when no later rank can beat it (bounded by the
    largest later probability over the smallest later noise)."""
    vocab = sub.shape[-1]
    if sub.device.type != "cpu" or vocab < 2:
        return draw_seeded_full(sub, seqs, fallback)
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
            gen = generator(seqs[i], sub.device, fallback, vocab)
            state = gen.get_state()
            rank = _seeded_row(vals[row], ks[i], float(totals[i]), seqs[i].sampling, gen, vocab)
            if rank is None:
                gen.set_state(state)
                slow.append(i)
            ranks[row] = rank or 0
        out[tried] = ids.gather(1, torch.tensor(ranks).unsqueeze(1)).squeeze(1)
    if slow:
        out[slow] = draw_seeded_full(sub[slow], [seqs[i] for i in slow], fallback)
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
        advance(gen, vocab - keep)
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


def draw_seeded_full(sub: torch.Tensor, seqs: list[Sequence], fallback: torch.Generator) -> torch.Tensor:
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
    noise = torch.stack([torch.empty(vocab, device=dev).exponential_(generator=generator(s, dev, fallback, vocab))
                         for s in seqs])
    return order.gather(1, (probs / noise).argmax(dim=-1, keepdim=True)).squeeze(1)
