"""Benchmark workloads: seeded synthetic prompts with length distributions, or a JSONL file.

Lengths are drawn in *tokens*; prompts are text made of pseudo-words, `tokens_per_word`
tokens each (1.3 suits BPE tokenizers of Llama/Qwen; the demo model's byte tokenizer
needs ~6). What the server really counted comes back in `usage` and is what the report
shows, so a rough `tokens_per_word` only shifts the workload, never the numbers.

| name | input tokens | output tokens | shape |
|---|---|---|---|
| `sonnet` | ~3000 (normal, sd 150) | 100 | the microserving paper's evaluation |
| `sonnet-llmperf` | as `sonnet` | normal(100, sd 80), redrawn until > 0 | LLMPerf's default spread |
| `chat` | lognormal, median 200 | lognormal, median 180 | ShareGPT-like turns |
| `long-doc` | 8000–16000 | lognormal, median 50 | LooGLE-like documents |
| `multi-turn` | each turn adds ~120 to its session's prompt | lognormal, median 120 | shared growing prefixes |
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "ge", "hu", "ji", "wa", "zo", "be",
              "fa", "ko", "li", "mo", "nu", "ra", "se", "to"]
WORKLOADS = ("sonnet", "sonnet-llmperf", "chat", "long-doc", "multi-turn")


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    max_tokens: int
    session: int | None = None  # multi-turn: requests of one session share a growing prefix


# every word of 1-3 syllables; a word's length is uniform in 1..3, its syllables uniform
_WORDS = [a + b + c for n in (1, 2, 3) for a in _SYLLABLES for b in (_SYLLABLES if n > 1 else [""])
          for c in (_SYLLABLES if n > 2 else [""])]
_CUM_WEIGHTS = list(itertools.accumulate(1 / 3 / len(_SYLLABLES) ** (1 + (i >= 24) + (i >= 24 + 24 ** 2))
                                         for i in range(len(_WORDS))))


def _text(rng: random.Random, tokens: int, tokens_per_word: float) -> str:
    words = max(1, round(tokens / tokens_per_word))
    return " ".join(rng.choices(_WORDS, cum_weights=_CUM_WEIGHTS, k=words))


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def _positive_gauss(rng: random.Random, mean: float, sd: float) -> int:
    """LLMPerf's `sample_random_positive_int`: a normal draw, drawn again until positive."""
    while (value := int(rng.gauss(mean, sd))) <= 0:
        pass
    return value


def synthetic(name: str, n: int, seed: int = 0, tokens_per_word: float = 1.3) -> list[BenchRequest]:
    """`n` requests of the built-in workload `name` (deterministic for a seed)."""
    rng = random.Random(seed)
    if name in ("sonnet", "sonnet-llmperf"):
        # NOTE: sonnet-llmperf: LLMPerf's token_benchmark_ray draws every request's max_tokens from
        # normal(mean, --stddev-output-tokens = 80 by default); the prompts are the same as sonnet's
        spread = random.Random(seed + 1) if name == "sonnet-llmperf" else None
        return [BenchRequest(_text(rng, int(max(100, rng.gauss(3000, 150))), tokens_per_word),
                             100 if spread is None else _positive_gauss(spread, 100, 80)) for _ in range(n)]
    if name == "chat":
        return [BenchRequest(_text(rng, _lognormal(rng, 200, 0.8, 8, 2048), tokens_per_word),
                             _lognormal(rng, 180, 0.7, 8, 1024)) for _ in range(n)]
    if name == "long-doc":
        return [BenchRequest(_text(rng, rng.randint(8000, 16000), tokens_per_word),
                             _lognormal(rng, 50, 0.5, 16, 256)) for _ in range(n)]
    if name == "multi-turn":
        out: list[BenchRequest] = []
        session = 0
        while len(out) < n:
            prefix = _text(rng, 200, tokens_per_word)  # a system prompt per session
            for _ in range(rng.randint(3, 6)):
                prefix += "\n" + _text(rng, _lognormal(rng, 120, 0.5, 16, 512), tokens_per_word)
                out.append(BenchRequest(prefix, _lognormal(rng, 120, 0.5, 8, 512), session))
            session += 1
        return out[:n]
    raise ValueError(f"unknown workload {name!r}; built-in: {', '.join(WORKLOADS)}, or a .jsonl file")


def from_jsonl(path: Path, n: int | None = None) -> list[BenchRequest]:
    """One JSON object per line: {"prompt": str, "max_tokens": int} ("output_len" also read)."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, max_tokens = row["prompt"], int(row.get("max_tokens", row.get("output_len")))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{i}: expected {{\"prompt\": str, \"max_tokens\": int}} ({exc})") from None
        if not isinstance(prompt, str) or not prompt or max_tokens < 1:
            raise ValueError(f"{path}:{i}: prompt must be a non-empty string and max_tokens >= 1")
        out.append(BenchRequest(prompt, max_tokens, row.get("session")))
    if not out:
        raise ValueError(f"{path}: no requests")
    return out if n is None else [out[i % len(out)] for i in range(n)]


def load(spec: str, n: int, seed: int = 0, tokens_per_word: float = 1.3,
         max_output_tokens: int | None = None) -> list[BenchRequest]:
    """A built-in workload name or a JSONL path; `max_output_tokens` caps every request."""
    reqs = from_jsonl(Path(spec), n) if spec.endswith(".jsonl") or Path(spec).is_file() else \
        synthetic(spec, n, seed, tokens_per_word)
    if max_output_tokens is not None:
        reqs = [BenchRequest(r.prompt, min(r.max_tokens, max_output_tokens), r.session) for r in reqs]
    return reqs
