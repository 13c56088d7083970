"""Logs an operator can read: the format (`--log-format text|json`), one access line per request, a
periodic stats line.

    INFO  microserve.access  request cmpl-3f.. 200 success strategy=PD engines=prefill-0,decode-1 prompt=512
                             output=128 cached=0 ttft_ms=41.2 e2e_ms=1870.3 finish=length
    INFO  microserve.stats   2.4 req/s, running 8, waiting 0, KV 31% (engines' mean), prefix hits 12%,
                             store hits 0%, KV transfer 0.41 GB/s, retries 0, moves 0, 3 engines

With `--log-format json` every line is one JSON object (`ts`, `level`, `logger`, `msg`, and the
fields of access and stats lines by name), for log shippers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from kvapi.transfer.base import TRANSPORTS

ACCESS = logging.getLogger("microserve.access")
STATS = logging.getLogger("microserve.stats")


class JSONFormatter(logging.Formatter):
    """One JSON object per record: `ts`, `level`, `logger`, `msg`, and a record's `fields` by name."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                               "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Configure the root logger of a microserve process (`--log-level`, `--log-format`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if fmt == "json" else
                         logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def access(request_id: str, status: str, *, code: str = "", strategy: str = "", engines: list[str] | None = None,
           prompt: int = 0, output: int = 0, cached: int = 0, ttft_s: float | None = None, e2e_s: float = 0.0,
           finish: str | None = None) -> None:
    """One access line for a finished request (success, error, aborted, rejected)."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    fields = {"request_id": request_id, "status": status, "code": code or None, "strategy": strategy,
              "engines": engines or [], "prompt_tokens": prompt, "output_tokens": output, "cached_tokens": cached,
              "ttft_ms": None if ttft_s is None else round(ttft_s * 1e3, 1), "e2e_ms": round(e2e_s * 1e3, 1),
              "finish_reason": finish}
    text = " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in fields.items()
                    if k not in ("request_id", "status") and v not in (None, "", []))
    ACCESS.info("request %s %s %s", request_id, status, text, extra={"fields": fields})


class StatsLine:
    """Every `interval` seconds, one line of what the router and its engines did since the last one.

    Args:
        router: the `Router` (its metrics and cluster).
        interval: seconds between lines.
        model: the model's name, leading each line (a gateway of several models: one line per model).
    """

    def __init__(self, router, interval: float, model: str = "") -> None:
        self.router, self.interval, self.model = router, interval, model
        self._last: dict[str, float] = {}
        self._at = time.monotonic()

    def _totals(self) -> dict[str, float]:
        cluster, value = self.router.cluster, self.router.metrics.registry.get_sample_value
        out = {"requests": sum(value("microserve_requests_total", {"status": s}) or 0.0
                               for s in ("success", "error", "aborted", "rejected")),
               "prompt": value("microserve_prompt_tokens_total") or 0.0,
               "retries": value("microserve_request_retries_total") or 0.0,
               "moves": value("microserve_request_moves_total") or 0.0,
               "transfer": sum(value("microserve_kv_transfer_bytes_total", {"transport": t}) or 0.0
                               for t in TRANSPORTS),
               "prefix": 0.0, "store": 0.0}
        for h in cluster.handles:
            s = cluster.load(h).stats
            if s is not None:
                out["prefix"] += s.prefix_cache_hit_tokens
                out["store"] += sum(t.hit_tokens for t in s.kv_store)
        return out

    def line(self) -> dict[str, Any]:
        """The fields of the next line (and remember where this one ends)."""
        now, totals = time.monotonic(), self._totals()
        span = max(1e-9, now - self._at)
        d = {k: v - self._last.get(k, 0.0) for k, v in totals.items()}
        self._last, self._at = totals, now
        cluster = self.router.cluster
        loads = [cluster.load(h) for h in cluster.engines()]
        prompt = max(d["prompt"], 1.0)
        return {"req_per_s": round(d["requests"] / span, 2), "running": sum(x.running for x in loads),
                "waiting": sum(x.waiting for x in loads),
                "kv_use": round(sum(x.kv_usage for x in loads) / max(1, len(loads)), 3),
                "prefix_hit_rate": round(min(1.0, d["prefix"] / prompt), 3),
                "store_hit_rate": round(min(1.0, d["store"] / prompt), 3),
                "transfer_gb_per_s": round(d["transfer"] / span / 1e9, 3), "retries": int(d["retries"]),
                "moves": int(d["moves"]), "engines": len(loads)}

    async def run(self) -> None:
        self.line()  # the baseline
        while True:
            await asyncio.sleep(self.interval)
            f = self.line()
            STATS.info("%s%.2f req/s, running %d, waiting %d, KV %.0f%% (engines' mean), prefix hits %.0f%%, "
                       "store hits %.0f%%, KV transfer %.2f GB/s, retries %d, moves %d, %d engines",
                       f"{self.model}: " if self.model else "", f["req_per_s"],
                       f["running"], f["waiting"], 100 * f["kv_use"], 100 * f["prefix_hit_rate"],
                       100 * f["store_hit_rate"], f["transfer_gb_per_s"], f["retries"], f["moves"], f["engines"],
                       extra={"fields": f | ({"model": self.model} if self.model else {})})
