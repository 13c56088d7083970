"""Token sampling: greedy fast path, else temperature / top-k / top-p with per-request seeds.

Sampling uses the exponential-race trick (argmax of probs / Exp(1) noise), with noise
drawn from the request's own generator, so a seeded request gives the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import torch

from microserve.engine.core.sequence import Sequence


def _generator(seq: Sequence, device: torch.device, fallback: torch.Generator) -> torch.Generator:
    if seq.sampling.seed is None:
        return fallback
    if seq.generator is None:
        seq.generator = torch.Generator(device=device).manual_seed(seq.sampling.seed)
    return seq.generator


def sample(logits: torch.Tensor, seqs: list[Sequence], fallback: torch.Generator) -> list[int]:
    """logits: [B, V] float32, one row per sequence; returns one token id per row."""
    greedy = [s.sampling.greedy for s in seqs]
    if all(greedy):
        return logits.argmax(dim=-1).tolist()
    out = logits.argmax(dim=-1)
    rows = [i for i, g in enumerate(greedy) if not g]
    sub = logits[rows]
    vocab = sub.shape[-1]
    temps = torch.tensor([seqs[i].sampling.temperature for i in rows], device=sub.device).unsqueeze(1)
    sorted_logits, order = (sub / temps).sort(dim=-1, descending=True)
    ks = [seqs[i].sampling.top_k if seqs[i].sampling.top_k > 0 else vocab for i in rows]
    rank = torch.arange(vocab, device=sub.device).unsqueeze(0)
    sorted_logits.masked_fill_(rank >= torch.tensor(ks, device=sub.device).unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([seqs[i].sampling.top_p for i in rows], device=sub.device).unsqueeze(1)
    beyond = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already covers top_p
    probs.masked_fill_(beyond, 0.0)
    noise = torch.stack([
        torch.empty(vocab, device=sub.device).exponential_(generator=_generator(seqs[i], sub.device, fallback))
        for i in rows
    ])
    picked = order.gather(1, (probs / noise).argmax(dim=-1, keepdim=True)).squeeze(1)
    out[rows] = picked
    return out.tolist()
