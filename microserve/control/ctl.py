"""`microserve ctl`: the admin API from the shell (microserve/control/admin.py).

    microserve ctl --url http://127.0.0.1:8000 engines
    microserve ctl --url URL add tcp://10.0.0.3:5601 --role decode
    microserve ctl --url URL role decode-1 prefill
    microserve ctl --url URL remove decode-1
    microserve ctl --url URL strategy strategies/balanced_pd.py --strategy-arg fraction=0.2
    microserve ctl --url URL scale decode=3 prefill=1      (engines `launch` / `launch --ray` starts itself)
    microserve ctl --url URL requests --limit 5            (the last requests with their calls, as timelines)
    microserve ctl --url URL planner                       (the planner's last decisions)
    microserve ctl --url URL planner planners/slo.py --planner-arg itl_ms=40
    microserve ctl --url URL --model llama scale decode=2   (launch --config: the model a call is for)

The key comes from `--admin-key` or `$MICROSERVE_ADMIN_KEY`. Prints the JSON answer; a refused or
failed call prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8000")
    p.add_argument("--admin-key", default=os.environ.get("MICROSERVE_ADMIN_KEY"))
    p.add_argument("--model", default=None, help="with several models (launch --config): the model a call is for "
                   "(default: the first; `engines` lists them all)")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("engines", help="list the engines with their load")
    add = sub.add_parser("add", help="add a running engine")
    add.add_argument("address")
    add.add_argument("--role", required=True)
    role = sub.add_parser("role", help="change an engine's role")
    role.add_argument("id")
    role.add_argument("role")
    rm = sub.add_parser("remove", help="drain an engine (its streams move away) and remove it")
    rm.add_argument("id")
    rm.add_argument("--no-migrate", action="store_true", help="let its requests finish there instead of moving")
    st = sub.add_parser("strategy", help="replace the strategy (requests in flight keep the old one)")
    st.add_argument("path")
    st.add_argument("--strategy-arg", action="append", default=[], metavar="NAME=VALUE")
    sc = sub.add_parser("scale", help="start or drain-and-stop engines until each role has N")
    sc.add_argument("counts", nargs="+", metavar="ROLE=N")
    pl = sub.add_parser("planner", help="the planner's last decisions; with PATH: replace the planner")
    pl.add_argument("path", nargs="?", default=None)
    pl.add_argument("--planner-arg", action="append", default=[], metavar="NAME=VALUE")
    pl.add_argument("--limit", type=int, default=10, help="decisions to show")
    rq = sub.add_parser("requests", help="the last requests with the calls their strategy made, as timelines")
    rq.add_argument("--limit", type=int, default=10)
    rq.add_argument("--json", action="store_true", help="the JSON answer instead of timelines")


def _call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict:
    if getattr(args, "model", None) is not None:  # NOTE: `microserve top` calls this too, without --model
        path += ("&" if "?" in path else "?") + urllib.parse.urlencode({"model": args.model})
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {})})
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # NOTE: straight to the gateway
        with opener.open(req, timeout=600) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            text = json.loads(text)["error"]["message"]
        raise SystemExit(f"error: {method} {path}: {exc.code} {text}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(f"error: cannot reach {args.url}: {exc.reason}") from None


def run(args: argparse.Namespace) -> int:
    if args.action == "engines":
        out = _call(args, "GET", "/admin/engines")
    elif args.action == "add":
        out = _call(args, "POST", "/admin/engines", {"address": args.address, "role": args.role})
    elif args.action == "role":
        out = _call(args, "PATCH", f"/admin/engines/{args.id}", {"role": args.role})
    elif args.action == "remove":
        out = _call(args, "DELETE", f"/admin/engines/{args.id}" + ("?migrate=0" if args.no_migrate else ""))
    elif args.action == "scale":
        counts = {}
        for item in args.counts:
            role, sep, n = item.partition("=")
            if not sep or not n.strip().isdigit():
                raise SystemExit(f"error: scale {item!r}: expected ROLE=N with N >= 0")
            counts[role.strip()] = int(n)
        out = _call(args, "PUT", "/admin/scale", counts)
    elif args.action == "requests":
        out = _call(args, "GET", f"/admin/requests?limit={args.limit}")
        if not args.json:
            print(timelines(out["requests"]))
            return 0
    elif args.action == "planner":
        if args.path is None:
            out = _call(args, "GET", "/admin/planner")
            out["decisions"] = out.get("decisions", [])[:max(0, args.limit)]
        else:
            planner_args = dict(item.split("=", 1) for item in args.planner_arg if "=" in item)
            out = _call(args, "PUT", "/admin/planner", {"path": args.path, "args": planner_args})
    else:
        strategy_args = dict(item.split("=", 1) for item in args.strategy_arg if "=" in item)
        out = _call(args, "PUT", "/admin/strategy", {"path": args.path, "args": strategy_args})
    print(json.dumps(out, indent=2))
    return 0


def timelines(requests: list[dict]) -> str:
    """Each request as a header and one line per call, offsets from its arrival."""
    lines = []
    for r in requests:
        ttft = f", TTFT {r['ttft_ms']:.1f} ms" if r.get("ttft_ms") is not None else ""
        code = f" ({r['code']})" if r.get("code") else ""
        lines.append(f"{r['request_id']}  {r['status']}{code}  {r['e2e_ms']:.1f} ms{ttft}  {r['strategy']}  "
                     f"prompt {r['prompt_tokens']} -> {r['output_tokens']} tokens")
        for c in r["calls"]:
            size = f"  {c['bytes'] / 2**20:.1f} MiB" if c["bytes"] else ""
            error = f"  {c['error']}" if c["error"] else ""
            lines.append(f"  +{c['start_ms']:>9.1f} ms  {c['engine']:<14} {c['call']:<15}{c['ms']:>9.1f} ms"
                         f"{size}{error}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
