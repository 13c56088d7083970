"""`microserve top --url URL`: a live view of a deployment over its admin API, refreshing in place.

    microserve top --url http://127.0.0.1:8000 --admin-key K            (Ctrl-C to leave)
    microserve top --url URL --once                                     (one frame: scripts, tests)

Engines (role, state, running, waiting, KV use) from `GET /admin/engines`; the request rate and
latency percentiles over the last `--window` seconds from `GET /admin/requests`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from microserve.control.ctl import _call


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8000")
    p.add_argument("--admin-key", default=os.environ.get("MICROSERVE_ADMIN_KEY"))
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    p.add_argument("--window", type=float, default=30.0, help="seconds of requests the rates and percentiles cover")


def _pct(values: list[float], q: int) -> str:
    if len(values) < 2:
        return f"{values[0]:.0f}" if values else "-"
    return f"{statistics.quantiles(values, n=100, method='inclusive')[q - 1]:.0f}"


def frame(args: argparse.Namespace) -> str:
    engines = _call(args, "GET", "/admin/engines")["engines"]
    requests = _call(args, "GET", "/admin/requests?limit=1000")["requests"]
    now = time.time()
    recent = [r for r in requests if now - r["start"] <= args.window]
    ttft = [r["ttft_ms"] for r in recent if r.get("ttft_ms") is not None]
    e2e = [r["e2e_ms"] for r in recent if r["status"] == "success"]
    failed = sum(r["status"] in ("error", "rejected") for r in recent)
    lines = [f"microserve top  {args.url}  {time.strftime('%H:%M:%S')}  {len(engines)} engines",
             f"requests: {len(recent) / args.window:.2f}/s over {args.window:.0f}s, {failed} failed or refused;  "
             f"TTFT ms p50 {_pct(ttft, 50)} p90 {_pct(ttft, 90)};  E2E ms p50 {_pct(e2e, 50)} p90 {_pct(e2e, 90)}",
             "",
             f"{'ENGINE':<16}{'ROLE':<10}{'STATE':<10}{'RUNNING':>8}{'WAITING':>8}{'KV USE':>8}"]
    for e in engines:
        state = "draining" if e.get("draining") else "up" if e["alive"] else "DOWN"
        kv = f"{100 * e['kv_blocks_used'] / e['kv_blocks_total']:.0f}%" if e.get("kv_blocks_total") else "-"
        lines.append(f"{e['id']:<16}{e['role'] or '':<10}{state:<10}{e['running']:>8}{e['waiting']:>8}{kv:>8}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        if args.once:
            print(frame(args))
            return 0
        while True:
            text = frame(args)
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")  # NOTE: home + clear: the frame redraws in place
            sys.stdout.flush()
            time.sleep(args.interval)
    except SystemExit as exc:  # a refused or failed call (ctl's message)
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
