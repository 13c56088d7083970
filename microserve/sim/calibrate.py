"""`microserve sim --calibrate`: profile the real engine on this machine, write a `--gpu` profile.

    microserve sim --calibrate --model demo --threads 1 --out cpu.json
    microserve sim --gpu cpu.json --model demo --max-num-batched-tokens 2048 --max-num-seqs 64 ...

It runs the real `LLMEngine` in this process on a ladder of batches (prefills of 8 to
2048 tokens, decode batches of 1 to 32 sequences at short and long contexts) and times
every step. Each step's shape goes through the same accounting as the simulator
(`SimEngine.batch_shape` and `CostModel`), and the profile's numbers are fitted to the
measured times:

    step = overhead + per-sequence x sequences + max(FLOPs / F, bytes / B)

(F, B on a log grid; overhead and per-sequence by least squares on relative error, kept
non-negative). F and B are written as `peak_tflops` and `hbm_tb_s` with efficiencies 1.0,
and `memory_gb` is set so the simulated KV pool has the real engine's number of blocks.
The fit's error over the measured steps is printed and stored in the profile.

The ladder times the model alone. A deployment also spends host time outside it: the
engine's step loop (handing the step to its thread, streaming tokens over ZeroMQ), and
per request the client, gateway, router and RPCs; on a CPU host those share the cores
with the model. With `--url` the calibration also runs the workload (`--workload`,
`--rate`/`--concurrency`, `--num-requests`) against a running deployment of the same
model, strategy and roles, simulates the same requests, and fits two host terms:

    step_overhead_ms  += what makes the simulated mean TPOT equal the measured one
    frontend_ms        = what then remains of the mean TTFT (a per-request delay)

Calibrate at one load and check the simulator at another (tests/test_sim_vs_real.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

from microserve.engine.config import EngineConfig
from microserve.engine.core.scheduler import ScheduledBatch
from microserve.engine_knobs import CPU_MAX_PREFILL_TOKENS
from microserve.sampling_params import SamplingParams
from microserve.sim.costs import GPU, CostModel, ModelShape, load_model
from microserve.sim.engine import batch_shape

Point = tuple[list[tuple[int, int]], list[int], int, int, float]  # prefill, decodes, sampled, seqs, seconds


def measure(model_path: Path, config: EngineConfig, device: str = "cpu", seed: int = 0,
            quick: bool = False) -> tuple[list[Point], int]:
    """Time the real engine's steps; returns (points, the engine's KV blocks)."""
    from microserve.engine.engine import LLMEngine

    engine = LLMEngine(model_path, device=device, config=config)
    rng = random.Random(seed)
    shapes: list[tuple] = []
    execute = engine._execute

    def timed_execute(batch: ScheduledBatch):
        shapes.append(batch_shape(batch))
        return execute(batch)

    engine._execute = timed_execute  # type: ignore[method-assign]
    vocab, limit = engine.vocab_size, engine.max_tokens_per_seq
    ids = iter(range(1 << 30))

    def run(prompt_len: int, batch: int, max_tokens: int) -> list[Point]:
        for _ in range(batch):
            prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
            engine.add_request(f"cal-{next(ids)}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        points = []
        while engine.has_unfinished():
            shapes.clear()
            t0 = time.perf_counter()
            engine.step()
            seconds = time.perf_counter() - t0
            if shapes:
                prefill, decodes, sampled = shapes[0]
                points.append((prefill, decodes, len(sampled), len(prefill) + len(decodes), seconds))
        return points

    run(64, 2, 4)  # warm-up (kernels, allocator)
    prefills = [8, 32, 128, 512] if quick else [8, 32, 128, 512, 1024, 2048]
    batches = [1, 4, 16] if quick else [1, 2, 4, 8, 16, 32]
    contexts = [64, 512] if quick else [64, 512, 1024]
    points: list[Point] = []
    for _ in range(2 if quick else 3):
        for n in prefills:
            if n + 1 < limit:
                points += run(n, 1, 1)
    for c in contexts:
        for b in batches:
            if b <= config.max_num_seqs and c + 16 < limit:
                points += [p for p in run(c, b, 12) if not p[0]]  # decode-only steps
    return points, engine.kv.num_blocks


def fit(points: list[Point], model: ModelShape) -> tuple[GPU, float]:
    """The profile that best explains the points, and its mean absolute relative error."""
    cost = CostModel(model, GPU("unit", 1.0, 1.0, 0.0))
    rows = [(*cost.work(p, d, s), n, t) for p, d, s, n, t in points]
    best: tuple[float, GPU] | None = None
    for f_exp in _grid(7.0, 15.0):
        for b_exp in _grid(8.0, 13.0):
            F, B = 10 ** f_exp, 10 ** b_exp
            resid = [(t - max(fl / F, by / B), s, t) for fl, by, s, t in rows]
            c0, c1 = _nonneg_lsq(resid)
            err = statistics.fmean(abs(c0 + c1 * s + (t - r) - t) / t for r, s, t in resid)
            if best is None or err < best[0]:
                best = (err, GPU("calibrated", F / 1e12, B / 1e12, 0.0, 1.0, 1.0, c0 * 1e3, c1 * 1e6))
    assert best is not None
    return best[1], best[0]


def _grid(lo: float, hi: float, step: float = 0.05) -> list[float]:
    return [lo + i * step for i in range(int((hi - lo) / step) + 1)]


def _nonneg_lsq(resid: list[tuple[float, int, float]]) -> tuple[float, float]:
    """min sum(((c0 + c1 s - y) / t)^2) over c0, c1 >= 0, for rows (y, s, t)."""
    w = [1 / t / t for _, _, t in resid]
    sw = sum(w)
    sws = sum(wi * s for wi, (_, s, _) in zip(w, resid))
    swss = sum(wi * s * s for wi, (_, s, _) in zip(w, resid))
    swy = sum(wi * y for wi, (y, _, _) in zip(w, resid))
    swsy = sum(wi * s * y for wi, (y, s, _) in zip(w, resid))
    det = sw * swss - sws * sws
    if det > 0:
        c0, c1 = (swy * swss - sws * swsy) / det, (sw * swsy - sws * swy) / det
        if c0 >= 0 and c1 >= 0:
            return c0, c1
    only_c0 = (max(0.0, swy / sw), 0.0)
    only_c1 = (0.0, max(0.0, swsy / swss) if swss else 0.0)

    def loss(c: tuple[float, float]) -> float:
        return sum(wi * (c[0] + c[1] * s - y) ** 2 for wi, (y, s, _) in zip(w, resid))

    return min(only_c0, only_c1, key=loss)


def memory_for_pool(model: ModelShape, num_blocks: int, block_size: int) -> float:
    """`memory_gb` for which `CostModel.kv_capacity_tokens` gives `num_blocks` blocks."""
    kv = num_blocks * block_size * model.kv_bytes_per_token
    return (kv + model.total_params * model.bytes_per_param) / 0.9 / 1e9 * (1 + 1e-9)


def _means(results) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    return {"ttft_ms": statistics.fmean(r.ttft for r in ok) * 1e3, "tpot_ms": statistics.fmean(tpots) * 1e3,
            "e2e_ms": statistics.fmean(r.e2e for r in ok) * 1e3}


def _check_deployment_args(args: argparse.Namespace) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in ("strategy", "workload", "num_requests") if getattr(args, n) is None]
    if missing or (args.rate is None and args.concurrency is None):
        raise ValueError("--calibrate --url runs a workload against the deployment: give "
                         f"{', '.join(missing or ['--rate or --concurrency'])} (the deployment's strategy and roles)")


def fit_deployment(args: argparse.Namespace, path: Path, model: ModelShape, gpu: GPU,
                   config: EngineConfig) -> tuple[GPU, dict]:
    """Time the workload against the deployment at `args.url`, simulate the same requests
    with `gpu`, and fit its host terms (`step_overhead_ms`, `frontend_ms`) to the measured
    mean TPOT and TTFT. Returns the fitted profile and a record of the fit."""
    from microserve.bench import loadgen, workloads
    from microserve.router.strategy import load_strategy, parse_roles
    from microserve.sim.costs import load_link
    from microserve.sim.run import SimRequest, prompt_encoder, simulate_workload

    _check_deployment_args(args)
    strategy = load_strategy(args.strategy, dict(a.split("=", 1) for a in args.strategy_arg if "=" in a))
    layout = parse_roles(args.roles) if args.roles else dict(type(strategy).roles)
    link = load_link(args.link)
    bench_reqs = workloads.load(args.workload, args.num_requests, args.seed, args.tokens_per_word,
                                args.max_output_tokens)
    encode = prompt_encoder(str(path), model.vocab, args.tokens_per_word)
    reqs = [SimRequest(encode(r.prompt), r.max_tokens, r.session) for r in bench_reqs]
    api_key = os.environ.get("OPENAI_API_KEY")
    try:
        served = asyncio.run(loadgen.first_model(args.url, api_key))
    except (TimeoutError, OSError) as exc:
        raise ValueError(f"cannot reach {args.url}: {exc}") from None
    cfg = loadgen.LoadConfig(args.url, served, api_key, args.rate, args.concurrency or 1, args.seed)
    real_results, _ = asyncio.run(loadgen.run_load(cfg, bench_reqs))
    failed = [r for r in real_results if not r.ok]
    if failed:
        raise ValueError(f"{len(failed)} of {len(real_results)} requests failed against {args.url}: {failed[0].error}")
    if [r.prompt_tokens for r in real_results] != [len(r.prompt_ids) for r in reqs]:
        raise ValueError(f"{args.url} tokenizes the prompts differently from {path}: is it serving that model?")
    sim_config = replace(config, native_kernels=False)

    def simulated(g: GPU) -> dict[str, float]:
        results, _, _ = simulate_workload(strategy, layout, CostModel(model, g), link, sim_config, reqs, args.rate,
                                          args.concurrency or 1, args.seed)
        return _means(results)

    real, engines_only = _means(real_results), simulated(gpu)
    fitted, got = gpu, engines_only
    for _ in range(6):  # TPOT grows ~1:1 with the per-step overhead; a few rounds settle batching effects
        gap = real["tpot_ms"] - got["tpot_ms"]
        if abs(gap) <= 0.01 * real["tpot_ms"] or (gap < 0 and fitted.step_overhead_ms == 0):
            break
        fitted = replace(fitted, step_overhead_ms=max(0.0, fitted.step_overhead_ms + gap))
        got = simulated(fitted)
    fitted = replace(fitted, frontend_ms=max(0.0, real["ttft_ms"] - got["ttft_ms"]))
    record = {"url": args.url, "strategy": args.strategy, "roles": layout, "workload": args.workload,
              "rate": args.rate, "concurrency": args.concurrency, "num_requests": args.num_requests,
              "seed": args.seed, "real": real, "simulated_engines_only": engines_only,
              "simulated_fitted": simulated(fitted),
              "step_overhead_added_ms": fitted.step_overhead_ms - gpu.step_overhead_ms}
    return fitted, record


def run(args: argparse.Namespace) -> int:
    import torch

    from microserve.demo import resolve_model

    if args.out is None:
        raise ValueError("--calibrate writes a profile: give --out PATH.json")
    if args.url:
        _check_deployment_args(args)  # before the ladder, not after it
    path = resolve_model(args.model)
    if not (path / "config.json").is_file():
        raise ValueError(f"--calibrate needs a real checkpoint (a folder or demo), not {args.model!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    default = EngineConfig()
    config = EngineConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                          max_num_batched_tokens=args.max_num_batched_tokens or default.max_num_batched_tokens,
                          max_num_seqs=args.max_num_seqs or default.max_num_seqs,
                          max_prefill_tokens=args.max_prefill_tokens or (
                              CPU_MAX_PREFILL_TOKENS if args.device == "cpu" else None),  # `microserve engine`'s
                          enable_prefix_caching=not args.no_prefix_caching)
    model = load_model(str(path))
    t0 = time.perf_counter()
    points, num_blocks = measure(path, config, args.device, args.seed, quick=args.quick)
    gpu, err = fit(points, model)
    gpu = replace(gpu, memory_gb=memory_for_pool(model, num_blocks, config.block_size))
    deployment = None
    if args.url:
        gpu, deployment = fit_deployment(args, path, model, gpu, config)
    profile = {
        "peak_tflops": gpu.peak_tflops, "hbm_tb_s": gpu.hbm_tb_s, "memory_gb": gpu.memory_gb,
        "compute_efficiency": 1.0, "memory_efficiency": 1.0, "step_overhead_ms": gpu.step_overhead_ms,
        "seq_overhead_us": gpu.seq_overhead_us, "frontend_ms": gpu.frontend_ms,
        "source": f"microserve sim --calibrate on {platform.processor() or platform.machine()} "
                  f"({torch.get_num_threads()} threads, {args.device}) with {path.name}, "
                  f"{time.strftime('%Y-%m-%d')}: {len(points)} timed steps",
        "fit": {"points": len(points), "mean_abs_rel_error": err},
        "engine": {"block_size": config.block_size, "num_kv_blocks": num_blocks,
                   "max_num_batched_tokens": config.max_num_batched_tokens, "max_num_seqs": config.max_num_seqs,
                   "max_prefill_tokens": config.max_prefill_tokens},
    }
    if deployment is not None:
        profile["deployment"] = deployment
    Path(args.out).write_text(json.dumps(profile, indent=1))
    print(f"calibrated {path.name} on {args.device} ({torch.get_num_threads()} threads): {len(points)} steps in "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"  effective compute {gpu.peak_tflops * 1e3:.2f} GFLOP/s, memory {gpu.hbm_tb_s * 1e3:.1f} GB/s, "
          f"step overhead {gpu.step_overhead_ms:.3f} ms, per sequence {gpu.seq_overhead_us:.1f} us")
    print(f"  fit error: {err:.1%} mean absolute (relative) over the measured steps")
    if deployment is not None:
        print(f"  deployment at {args.url} ({args.workload}, {deployment['num_requests']} requests): step overhead "
              f"{deployment['step_overhead_added_ms']:+.3f} ms, front-end {gpu.frontend_ms:.1f} ms per request")
        print("    mean (ms)            TTFT     TPOT      JCT")
        for label, key in (("real", "real"), ("sim, engines only", "simulated_engines_only"),
                           ("sim, fitted", "simulated_fitted")):
            m = deployment[key]
            print(f"    {label:<18}{m['ttft_ms']:>8.1f}{m['tpot_ms']:>9.2f}{m['e2e_ms']:>9.1f}")
    print(f"  wrote {args.out}; use it with: microserve sim --gpu {args.out} --model {args.model} "
          f"--max-num-batched-tokens {config.max_num_batched_tokens} --max-num-seqs {config.max_num_seqs}"
          + (f" --max-prefill-tokens {config.max_prefill_tokens}" if config.max_prefill_tokens else "") + " ...")
    return 0

