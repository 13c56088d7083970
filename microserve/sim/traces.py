"""Time-varying load for `microserve sim --trace`: requests with their own arrival times.

    --trace FILE.jsonl    ours: {"time": s, "prompt_tokens": n, "output_tokens": m[, "hash_ids": [...]]}, or the
                          public Mooncake trace: {"timestamp": ms, "input_length", "output_length", "hash_ids"}
    --trace FILE.csv      the Azure LLM inference trace: TIMESTAMP (a date-time), ContextTokens, GeneratedTokens
    --trace diurnal       a day: the rate follows a sine from trough to a 10x peak (`--rate` is the mean)
    --trace bursty        Poisson at `--rate` with bursts of 5x for a minute every ~10 minutes

`--rate-scale X` multiplies the rate (file traces: arrival times are divided by X). Prompts are token ids
made from the lengths: with `hash_ids` (Mooncake's 512-token blocks), equal ids give equal blocks, so
prefix sharing in the trace is prefix sharing in the simulation. `--trace-duration S` sets the
generators' length (default a day, 86,400 s) and cuts a file trace.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

BLOCK = 512  # tokens per Mooncake hash id
DAY = 86_400.0


@dataclass
class TraceRequest:
    time: float  # arrival, seconds from the trace's start
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()  # prefix blocks of BLOCK tokens (shared ids: shared prefixes)


def load(spec: str, rate: float | None = None, rate_scale: float = 1.0, seed: int = 0,
         duration: float | None = None) -> list[TraceRequest]:
    """The requests of a trace file or generator, sorted by arrival (see the module docs)."""
    if rate_scale <= 0:
        raise ValueError("--rate-scale must be > 0")
    if spec in ("diurnal", "bursty"):
        if rate is None or rate <= 0:
            raise ValueError(f"--trace {spec} needs --rate (the mean requests per second)")
        gen = diurnal if spec == "diurnal" else bursty
        return gen(rate * rate_scale, duration or DAY, seed)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--trace {spec!r}: no such file (or use diurnal, bursty)")
    reqs = _azure(path) if path.suffix == ".csv" else _jsonl(path)
    if not reqs:
        raise ValueError(f"--trace {spec}: no requests in it")
    t0 = min(r.time for r in reqs)
    for r in reqs:
        r.time = (r.time - t0) / rate_scale
    reqs.sort(key=lambda r: r.time)
    return [r for r in reqs if duration is None or r.time <= duration]


def _jsonl(path: Path) -> list[TraceRequest]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if "timestamp" in d:  # Mooncake: milliseconds, input_length, output_length, hash_ids
                out.append(TraceRequest(d["timestamp"] / 1e3, int(d["input_length"]), int(d["output_length"]),
                                        tuple(d.get("hash_ids", ()))))
            else:
                out.append(TraceRequest(float(d["time"]), int(d["prompt_tokens"]), int(d["output_tokens"]),
                                        tuple(d.get("hash_ids", ()))))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a trace line ({type(exc).__name__}: {exc}); expected time, "
                             "prompt_tokens, output_tokens (or Mooncake's timestamp, input_length, "
                             "output_length)") from None
    return out


def _azure(path: Path) -> list[TraceRequest]:
    out = []
    with path.open(newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            try:
                at = datetime.fromisoformat(row["TIMESTAMP"].strip().replace(" ", "T")[:26]).timestamp()
                out.append(TraceRequest(at, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not an Azure trace row ({type(exc).__name__}: {exc}); expected "
                                 "TIMESTAMP, ContextTokens, GeneratedTokens") from None
    return out


def _lengths(rng: random.Random) -> tuple[int, int]:
    """A chat-like request: prompt lognormal around 1,500 tokens, output around 200."""
    prompt = int(min(8000, max(32, rng.lognormvariate(math.log(1500), 0.6))))
    output = int(min(1024, max(8, rng.lognormvariate(math.log(200), 0.5))))
    return prompt, output


def poisson(peak: float, duration: float, seed: int, rate_at, lengths=None) -> list[TraceRequest]:
    """Arrivals of a Poisson process whose rate at time t is `rate_at(t)` <= `peak` (thinning);
    `lengths(rng) -> (prompt, output)` (default: chat-like, around 1,500 and 200 tokens)."""
    rng, out, t = random.Random(seed), [], 0.0
    lengths = lengths or _lengths
    while True:
        t += rng.expovariate(peak)
        if t > duration:
            return out
        if rng.random() * peak <= rate_at(t):
            out.append(TraceRequest(t, *lengths(rng)))


def diurnal(mean: float, duration: float = DAY, seed: int = 0) -> list[TraceRequest]:
    """One day in `duration` seconds: the rate is mean * (1 - a cos(2 pi t / duration)), a = 9/11, so the
    peak (mid-way) is 10x the trough (at the start and the end)."""
    a = 9 / 11
    return poisson(mean * (1 + a), duration, seed, lambda t: mean * (1 - a * math.cos(2 * math.pi * t / duration)))


def bursts(duration: float, seed: int, every: float = 600.0, length: float = 60.0, factor: float = 5.0):
    """`f(t)`: `factor` during a burst of `length` s starting about every `every` s (jittered), else 1."""
    rng = random.Random(seed + 1)
    starts, t = [], rng.uniform(0, every)
    while t < duration:
        starts.append(t)
        t += rng.uniform(every / 2, 1.5 * every)
    return lambda t: factor if any(b <= t < b + length for b in starts) else 1.0


def bursty(mean: float, duration: float = DAY, seed: int = 0) -> list[TraceRequest]:
    """Poisson at `mean`, with a burst of 5x `mean` for 60 s starting every ~600 s (jittered)."""
    burst = bursts(duration, seed)
    return poisson(5 * mean, duration, seed, lambda t: mean * burst(t))


def prompt_ids(r: TraceRequest, vocab: int, index: int) -> list[int]:
    """Token ids of `r`'s prompt: its hash ids' blocks (equal ids, equal blocks), then tokens of its own."""
    import numpy as np

    ids: list[int] = []
    for h in r.hash_ids[:-(-r.prompt_tokens // BLOCK)]:
        ids += np.random.default_rng([h, 17]).integers(0, vocab, BLOCK).tolist()
    ids = ids[:r.prompt_tokens]
    return ids + np.random.default_rng([index, 7919]).integers(0, vocab, r.prompt_tokens - len(ids)).tolist()
