"""`microserve top --url URL`: a live view of a deployment over its admin API, refreshing in place.

    microserve top --url http://127.0.0.1:8000 --admin-key K            (Ctrl-C to leave)
    microserve top --url URL --once                                     (one frame: scripts, tests)

Engines (role, state, running, waiting, KV use, prefix and store-tier hits, KV bytes sent and
received: per second between frames, totals in the first) and the router's moves and retries from
`GET /admin/engines`; the request rate and latency percentiles over the last `--window` seconds
from `GET /admin/requests`.
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


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return ""


def frame(args: argparse.Namespace, before: dict | None = None) -> tuple[str, dict]:
    """One frame, and what the next one measures rates against (`before`: the last frame's)."""
    listed = _call(args, "GET", "/admin/engines")
    engines, router = listed["engines"], listed.get("router", {})
    requests = _call(args, "GET", "/admin/requests?limit=1000")["requests"]
    now = time.time()
    recent = [r for r in requests if now - r["start"] <= args.window]
    ttft = [r["ttft_ms"] for r in recent if r.get("ttft_ms") is not None]
    e2e = [r["e2e_ms"] for r in recent if r["status"] == "success"]
    failed = sum(r["status"] in ("error", "rejected") for r in recent)
    lines = [f"microserve top  {args.url}  {time.strftime('%H:%M:%S')}  {len(engines)} engines",
             f"requests: {len(recent) / args.window:.2f}/s over {args.window:.0f}s, {failed} failed or refused;  "
             f"TTFT ms p50 {_pct(ttft, 50)} p90 {_pct(ttft, 90)};  E2E ms p50 {_pct(e2e, 50)} p90 {_pct(e2e, 90)};  "
             f"moves {router.get('moves', 0):.0f}, retries {router.get('retries', 0):.0f}",
             "",
             f"{'ENGINE':<16}{'ROLE':<10}{'STATE':<10}{'RUNNING':>8}{'WAITING':>8}{'KV USE':>8}{'PREFIX HITS':>12}"
             f"{'KV SENT':>10}{'KV RECV':>10}  TIER HITS (tokens)"]
    seen = {"t": now, **{e["id"]: (e.get("kv_bytes_sent", 0), e.get("kv_bytes_received", 0)) for e in engines}}
    dt = now - before["t"] if before else 0.0
    for e in engines:
        state = "draining" if e.get("draining") else "up" if e["alive"] else "DOWN"
        kv = f"{100 * e['kv_blocks_used'] / e['kv_blocks_total']:.0f}%" if e.get("kv_blocks_total") else "-"
        sent, recv = seen[e["id"]]
        if dt > 0 and e["id"] in before:  # type: ignore[operator]
            sent0, recv0 = before[e["id"]]  # type: ignore[index]
            moved = f"{_bytes((sent - sent0) / dt) + '/s':>10}{_bytes((recv - recv0) / dt) + '/s':>10}"
        else:
            moved = f"{_bytes(sent):>10}{_bytes(recv):>10}"
        tiers = " ".join(f"{t}:{n}" for t, n in e.get("tier_hit_tokens", {}).items()) or "-"
        lines.append(f"{e['id']:<16}{e['role'] or '':<10}{state:<10}{e['running']:>8}{e['waiting']:>8}{kv:>8}"
                     f"{e.get('prefix_hit_tokens', 0):>12}{moved}  {tiers}")
    return "\n".join(lines), seen


def main(args: argparse.Namespace) -> int:
    try:
        if args.once:
            print(frame(args)[0])
            return 0
        seen = None
        while True:
            text, seen = frame(args, seen)
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")  # NOTE: home + clear: the frame redraws in place
            sys.stdout.flush()
            time.sleep(args.interval)
    except SystemExit as exc:  # a refused or failed call (ctl's message)
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
