"""Benchmark results: summary statistics, the printed table, JSON and a PNG plot.

The JSON schema (`schema_version` 1) is shared by `microserve bench` and `microserve sim`:

    {"schema_version": 1, "config": {...}, "duration_s": float,
     "summary": {"requests": n, "ok": n, "failed": n, "request_throughput": req/s,
                 "output_throughput": tok/s, "total_token_throughput": tok/s,
                 "goodput": req/s | null, "slo": {...},
                 "ttft_s" | "tpot_s" | "itl_s" | "e2e_s": {"mean", "p50", "p90", "p99"}},
     "requests": [{"index", "start_s", "ok", "error", "ttft_s", "tpot_s", "e2e_s",
                   "prompt_tokens", "output_tokens", "chunks"}, ...]}
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # NOTE: loadgen imports aiohttp's client, which the CLI parser of every process need not
    from microserve.bench.loadgen import RequestResult

SCHEMA_VERSION = 1
METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {"mean": statistics.fmean(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99)}


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    if not r.ok:
        return False
    got = {"ttft_s": r.ttft, "tpot_s": r.tpot, "e2e_s": r.e2e}
    return all(got[k] is None or got[k] <= limit for k, limit in slo.items())


def summarize(results: list[RequestResult], duration: float, slo: dict[str, float] | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    values = {"ttft_s": [r.ttft for r in ok if r.ttft is not None],
              "tpot_s": [r.tpot for r in ok if r.tpot is not None],
              "itl_s": [gap for r in ok for gap in r.itl],
              "e2e_s": [r.e2e for r in ok if r.e2e is not None]}
    summary: dict[str, Any] = {
        "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "goodput": sum(meets_slo(r, slo) for r in results) / duration if slo else None, "slo": slo or {},
    }
    summary.update({k: _stats(v) for k, v in values.items()})
    return summary


def to_json(config: dict[str, Any], results: list[RequestResult], duration: float,
            summary: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "config": config, "duration_s": duration, "summary": summary,
            "requests": [{"index": r.index, "start_s": r.start, "ok": r.ok, "error": r.error, "ttft_s": r.ttft,
                          "tpot_s": r.tpot, "e2e_s": r.e2e, "prompt_tokens": r.prompt_tokens,
                          "output_tokens": r.output_tokens, "chunks": r.chunks} for r in results]}


def table(summary: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:.1f}"

    lines = [f"requests {summary['ok']}/{summary['requests']} ok, {summary['failed']} failed",
             f"throughput {summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.1f} output tok/s, "
             f"{summary['total_token_throughput']:.1f} total tok/s"]
    if summary["goodput"] is not None:
        slo = ", ".join(f"{k[:-2]} <= {v * 1e3:g} ms" for k, v in summary["slo"].items())
        lines.append(f"goodput {summary['goodput']:.2f} req/s ({slo})")
    lines.append(f"{'metric (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E (JCT)")):
        s = summary[name]
        lines.append(f"{label:<14}{ms(s['mean']):>10}{ms(s['p50']):>10}{ms(s['p90']):>10}{ms(s['p99']):>10}")
    return "\n".join(lines)


def emit(data: dict[str, Any], results: list[RequestResult], out: Path | None, png: Path | None, title: str) -> int:
    """Print the table and the failures, write the JSON and the plot; the exit status."""
    print(table(data["summary"]))
    for r in results:
        if not r.ok:
            print(f"request {r.index} failed: {r.error}", file=sys.stderr)
    if out:
        write_json(out, data)
    if png:
        plot(png, data, title)
    return 0 if data["summary"]["failed"] == 0 else 1


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1))


def plot(path: Path, data: dict[str, Any], title: str) -> None:
    """Four panels: CDFs of TTFT, TPOT and E2E, and E2E against start time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'microserve[bench]'") from None
    ok = [r for r in data["requests"] if r["ok"]]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, key, label in zip(axes.flat[:3], ("ttft_s", "tpot_s", "e2e_s"), ("TTFT", "TPOT", "E2E (JCT)")):
        xs = sorted(r[key] * 1e3 for r in ok if r[key] is not None)
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))])
        ax.set(xlabel=f"{label} (ms)", ylabel="fraction of requests", title=f"{label} CDF")
        ax.grid(alpha=0.3)
    ax = axes.flat[3]
    ax.scatter([r["start_s"] for r in ok], [r["e2e_s"] * 1e3 for r in ok], s=8)
    ax.set(xlabel="request start (s)", ylabel="E2E (ms)", title="latency over the run")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
