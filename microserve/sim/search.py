"""`microserve sim --search`: which layout serves a workload best on a GPU budget (DistServe's placement
search, Dynamo's planner, for our strategies).

    microserve sim --search --model llama-3.1-70b --dtype fp8 --gpu h100 --gpus 8 --workload sonnet \\
        --rates 1.6,2.6,3.6,4.6,5.6 --slo-ttft-ms 2000 --slo-tpot-ms 50 --num-requests 200 --plot search.png

Candidates, every one using exactly `--gpus` GPUs:
  data parallel (round_robin) with TP t on gpus/t engines, for each t of --tp-choices;
  xPyD (pd) and balanced PD (balanced_pd, each of --fractions) with x prefill engines of TP tp and
  y decode engines of TP td, x*tp + y*td = gpus.
A layout whose engines cannot hold the model plus 8 of the workload's longest requests in KV is
skipped (and said so). Each candidate runs the workload at each rate (the same requests, seed, and
the real router path as `microserve sim`); a rate is met when >= --attainment of the requests meet
every SLO. Layouts are ranked by goodput per GPU: the highest rate met, divided by the GPUs (ties:
the lower mean JCT there).

With `--planner FILE` each layout also runs at each rate with the planner starting from it (bounds:
`--scale-bounds`), and a "planner" column gives the same goodput over the GPUs the planner kept on
average (its GPU-hours over the run's length): what the layout is worth as a planner's start.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from microserve.bench import loadgen, report, workloads
from microserve.router.strategy import load_strategy
from microserve.sim.costs import CostModel, load_gpu, load_link, load_model, with_precision
from microserve.sim.run import SimRequest, prompt_encoder, simulate_workload
from microserve.sim.setup import engine_config


@dataclass
class Layout:
    name: str
    strategy: str
    args: dict[str, str]
    roles: dict[str, int]
    tp: dict[str, int]
    points: dict[float, dict[str, Any]] = field(default_factory=dict)  # rate -> summary
    planned: dict[float, dict[str, Any]] = field(default_factory=dict)  # rate -> summary with --planner

    @property
    def gpus(self) -> int:
        return sum(n * self.tp[r] for r, n in self.roles.items())


def candidates(gpus: int, tps: list[int], fractions: list[float]) -> list[Layout]:
    out = [Layout(f"DP {gpus // t} x TP{t}", "round_robin", {}, {"engine": gpus // t}, {"engine": t})
           for t in tps if gpus % t == 0]
    for tp in tps:
        for td in tps:
            for x in range(1, gpus // tp + 1):
                rest = gpus - x * tp
                if rest < td or rest % td:
                    continue
                y = rest // td
                roles, tp_of = {"prefill": x, "decode": y}, {"prefill": tp, "decode": td}
                label = f"{x}P{y}D TP{tp}/TP{td}" if tp != td else f"{x}P{y}D TP{tp}"
                out.append(Layout(label, "pd", {}, roles, tp_of))
                out += [Layout(f"{label} balanced {f:g}", "balanced_pd", {"fraction": str(f)}, roles, tp_of)
                        for f in fractions]
    return out


def run(args: argparse.Namespace) -> int:
    if args.workload is None:
        raise ValueError("microserve sim --search needs --workload")
    rates = [float(x) for x in (args.rates or "").split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise ValueError("--search needs --rates R1,R2,... (requests per second, > 0)")
    slo = {k: v / 1e3 for k, v in (("ttft_s", args.slo_ttft_ms), ("tpot_s", args.slo_tpot_ms),
                                   ("e2e_s", args.slo_e2e_ms)) if v is not None}
    if not slo:
        raise ValueError("--search needs at least one SLO (--slo-ttft-ms, --slo-tpot-ms, --slo-e2e-ms)")
    tps = sorted({int(t) for t in args.tp_choices.split(",")})
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    n = args.num_requests or 200
    model = with_precision(load_model(args.model), args.dtype, args.kv_dtype)
    gpu, link = load_gpu(args.gpu), load_link(args.link)
    bench = workloads.load(args.workload, n, args.seed, args.tokens_per_word, args.max_output_tokens)
    encode = prompt_encoder(args.model, model.vocab, args.tokens_per_word)
    reqs = [SimRequest(encode(r.prompt), r.max_tokens, r.session) for r in bench]
    longest = max(len(r.prompt_ids) + r.max_tokens for r in reqs)
    config = engine_config(args)
    layouts, skipped = [], []
    for lay in candidates(args.gpus, tps, fractions):
        try:
            costs = {r: CostModel(model, gpu, lay.tp[r]) for r in lay.roles}
            if min(c.kv_capacity_tokens() for c in costs.values()) < 8 * longest:
                raise ValueError("too little KV room")
        except ValueError as exc:
            skipped.append(f"{lay.name} ({exc})")
            continue
        layouts.append((lay, costs))
    if not layouts:
        raise ValueError(f"no layout of {args.gpus} x {gpu.name} holds {model.name}: {'; '.join(skipped)}")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    bar = loadgen.Progress(len(layouts) * len(rates), progress)
    wall = time.perf_counter()
    for lay, costs in layouts:
        strategy = load_strategy(lay.strategy, lay.args)
        for rate in rates:
            results, duration, _ = simulate_workload(strategy, lay.roles, costs, link, config, reqs, rate, 1,
                                                     args.seed)
            summary = report.summarize(results, duration, slo)
            summary["attainment"] = sum(report.meets_slo(r, slo) for r in results) / len(results)
            lay.points[rate] = summary
            if args.planner:
                lay.planned[rate] = _planned(args, strategy, lay, costs, link, config, reqs, rate, slo)
            bar.update(True)
    ranked = rank([lay for lay, _ in layouts], args.attainment)
    print_table(ranked, rates, args, model.name, gpu.name, slo, time.perf_counter() - wall, skipped)
    if args.plot:
        plot(ranked, rates, args.plot, args.attainment)
    return 0


def _planned(args, strategy, lay: Layout, costs, link, config, reqs, rate: float, slo: dict) -> dict[str, Any]:
    """One run of the layout at `rate` with the planner (a fresh one) starting from it."""
    from microserve.control.planner import load_planner, parse_bounds
    from microserve.sim.run import SimPlan

    planner_args = dict(a.split("=", 1) for a in args.planner_arg if "=" in a)
    plan = SimPlan(load_planner(args.planner, planner_args), costs, parse_bounds(args.scale_bounds), args.planner,
                   planner_args)
    results, duration, _ = simulate_workload(strategy, lay.roles, costs, link, config, reqs, rate, 1, args.seed,
                                             plan=plan)
    summary = report.summarize(results, duration, slo)
    summary["attainment"] = sum(report.meets_slo(r, slo) for r in results) / len(results)
    summary["mean_gpus"] = plan.gpu_hours * 3600 / duration if duration > 0 else float(lay.gpus)
    return summary


def planner_goodput(lay: Layout, attainment: float) -> float | None:
    """The highest rate the planner met from this layout, over the GPUs it kept on average there."""
    if not lay.planned:
        return None
    met = [r for r, s in lay.planned.items() if s["attainment"] >= attainment]
    return max(met) / lay.planned[max(met)]["mean_gpus"] if met else 0.0


def rank(layouts: list[Layout], attainment: float) -> list[tuple[Layout, float, float | None]]:
    """[(layout, goodput per GPU, mean JCT at its best met rate)], best first."""
    out = []
    for lay in layouts:
        met = [r for r, s in lay.points.items() if s["attainment"] >= attainment]
        best = max(met, default=0.0)
        jct = lay.points[best]["e2e_s"]["mean"] if best else None
        out.append((lay, best / lay.gpus, jct))
    return sorted(out, key=lambda x: (-x[1], x[2] if x[2] is not None else float("inf")))


def print_table(ranked, rates: list[float], args, model: str, gpu: str, slo: dict, wall: float,
                skipped: list[str]) -> None:
    limits = ", ".join(f"{k[:-2]} <= {v * 1e3:g} ms" for k, v in slo.items())
    print(f"sim --search: {model} on {args.gpus} x {gpu}, {args.workload}, rates {', '.join(map(str, rates))} req/s, "
          f"{args.num_requests or 200} requests each, SLO {limits} for >= {args.attainment:.0%} "
          f"({len(ranked)} layouts in {wall:.0f} s)")
    head = "".join(f"{r:>7g}" for r in rates)
    planned = bool(ranked and ranked[0][0].planned)
    extra = f"{'planner':>10}" if planned else ""
    print(f"{'rank':<5}{'layout':<28}{'goodput/GPU':>12}{'JCT@best':>10}{extra}   attainment at each rate:{head}")
    for i, (lay, per_gpu, jct) in enumerate(ranked, 1):
        att = "".join(f"{lay.points[r]['attainment']:>7.0%}" for r in rates)
        col = f"{planner_goodput(lay, args.attainment):>8.3f}/s" if planned else ""
        print(f"{i:<5}{lay.name:<28}{per_gpu:>10.3f}/s{(f'{jct:.2f}s' if jct else '-'):>10}{col}"
              f"{'':>27}{att}")
    if skipped:
        reasons: dict[str, list[str]] = {}
        for item in skipped:
            name, _, why = item.rpartition(" (")
            reasons.setdefault(why.rstrip(")"), []).append(name)
        for why, names in reasons.items():
            print(f"skipped ({why}): {', '.join(names)}")


def plot(ranked, rates: list[float], path, attainment: float, top: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for lay, _, _ in ranked[:top]:
        axes[0].plot(rates, [lay.points[r]["attainment"] for r in rates], marker="o", label=lay.name)
        axes[1].plot(rates, [lay.points[r]["e2e_s"]["mean"] for r in rates], marker="o", label=lay.name)
    axes[0].axhline(attainment, color="grey", ls="--", lw=1)
    axes[0].set(xlabel="request rate (req/s)", ylabel="SLO attainment", title="SLO attainment (top layouts)")
    axes[1].set(xlabel="request rate (req/s)", ylabel="s", title="mean JCT")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
