"""Sizes roles to latency targets, as Dynamo's SLA planner does: prefill by the prompt tokens to compute over
what one engine was measured to compute, as a queue (M/M/c, Erlang C: the fewest engines at which at most
`ttft_miss` of the prompts would wait past the TTFT target, none more than `headroom` busy; few engines need
more room than many), decode by the streams to hold over what one engine holds at the ITL target (its
measured streams scaled by target / measured ITL; with a queue, no more than they run), and by the KV its
streams hold (at most `kv_target` of every decode engine's blocks, projected along the demand's rise: a
decode engine out of blocks refuses the next request's KV). The demand is smoothed over intervals (an
exponential average) and projected `lookahead` seconds ahead along its rise (a least-squares slope over the
last `trend` intervals: a short window's slope swings with the arrivals; a new engine takes a minute or more
to serve), a role grows at once and shrinks only after `calm` intervals in a row that want fewer, to the
most any of them wanted (Kubernetes' scale-down stabilization window: decode's KV use swings with the
streams' lengths) and to prefill engines that keep `shrink_miss` and decode engines that would hold at most
`kv_low` of their KV (hysteresis), and a missed target or a refused KV receive (an engine out of blocks)
adds at least one engine (none more while engines asked for earlier still start: the signal lags them); the
bounds and the cooldown do the rest against flapping."""

import math
from collections import deque

from microserve import Planner


class SLOPlanner(Planner):
    interval = 10.0
    cooldown = 30.0
    ttft_ms = 2000.0  # target: 90th percentile time to first token
    itl_ms = 50.0  # target: 90th percentile of the requests' mean time between tokens
    headroom = 0.8  # plan for this share of the measured capacity
    kv_target = 0.8  # plan for decode engines to hold at most this share of their KV blocks
    kv_low = 0.5  # shrink decode only to engines that would hold at most this share of their KV (hysteresis)
    smoothing = 0.3  # weight of the newest interval in the demand's average
    lookahead = 90.0  # seconds ahead to size for (about one engine start)
    trend = 12  # intervals of demand the rise is fitted to (least squares)
    calm = 6  # intervals in a row wanting fewer engines before a role shrinks
    ttft_miss = 0.01  # prefill: the share of prompts the queue model lets wait past the TTFT target
    shrink_miss = 0.0025  # ... and when shrinking (hysteresis)

    def __init__(self):
        self.demand = None  # prompt tokens per second, averaged
        self.prompt = None  # prompt tokens per request, averaged
        self.history = []  # the demand of the last `trend` intervals
        self.recent = {}  # role -> what the last `calm` intervals wanted

    async def plan(self, cluster, window):
        now = window.prompt_tokens_per_s
        if window.arrivals_per_s > 0:
            size = now / window.arrivals_per_s
            self.prompt = size if self.prompt is None else self.smoothing * size + (1 - self.smoothing) * self.prompt
        self.demand = now if self.demand is None else self.smoothing * now + (1 - self.smoothing) * self.demand
        self.history = (self.history + [now])[-self.trend:]
        rise = max(0.0, slope(self.history) / window.seconds)
        ahead = self.demand + rise * self.lookahead  # NOTE: not the last interval's: a burst is over before a start
        slow_first = window.ttft_p90 * 1e3 > self.ttft_ms
        slow_next = window.itl_p90 * 1e3 > self.itl_ms
        want = {}
        for role, w in window.roles.items():
            if not w.engines:
                continue
            have = w.engines + w.starting  # NOTE: engines asked for earlier count; a late signal adds one at most
            more = w.engines + max(1, w.starting)
            if role == "prefill":
                per_engine = w.capacity_tokens_per_s
                need = self._queue(ahead, per_engine, self.ttft_miss) if per_engine > 0 else have
                if need < have and per_engine > 0:  # NOTE: fewer engines only with room for the swings
                    need = max(need, self._queue(ahead, per_engine, self.shrink_miss))
                if slow_first:
                    need = max(need, more)
                if not w.capacity_measured:  # NOTE: a lower bound until an engine was seen saturated
                    need = max(need, have)
            else:
                streams, per = w.running + w.waiting + w.parked, w.running / w.engines  # parked: refused KV
                if window.itl_p90 > 0 and per > 0:  # streams one engine holds at the target, by the measurement
                    holds = max(1.0, per * self.itl_ms / (window.itl_p90 * 1e3)) * self.headroom
                    if w.waiting:  # NOTE: a queue: its engines run all their slots let them, whatever the ITL
                        holds = min(holds, per)
                    need = math.ceil(streams / holds)
                else:
                    need = have if streams else 1  # nothing measured: keep, or shrink when idle
                growth = ahead / self.demand if self.demand else 1.0  # NOTE: more streams, more KV, as load rises
                kv_load = w.engines * w.kv_usage * max(1.0, growth)  # engines' worth of KV the streams hold
                need = max(need, math.ceil(kv_load / self.kv_target))
                if need < have:  # NOTE: the streams' KV swings with their lengths: shrink only with room for it
                    need = max(need, math.ceil(kv_load / self.kv_low))
                if slow_next or (slow_first and "prefill" not in window.roles) or (
                        window.failed and w.kv_usage > self.kv_target):
                    need = max(need, more)
            if w.refused or w.parked:  # NOTE: out of KV blocks (a long prompt), whatever the mean use says
                need = max(need, more)
            recent = self.recent.setdefault(role, deque(maxlen=self.calm))
            recent.append(need)
            if need > have:
                want[role] = need
            elif len(recent) == self.calm and max(recent) < have:
                want[role] = max(recent)
                recent.clear()
        return want

    def _queue(self, demand: float, capacity: float, miss: float) -> int:
        """Prefill engines for `demand` prompt tokens per second, `capacity` each: at most `headroom` busy,
        and (M/M/c) at most `miss` of the prompts waiting longer than the TTFT target less their own compute."""
        load = demand / capacity  # engines' worth of work (Erlang's offered load)
        c = max(1, math.ceil(load / self.headroom))
        if not self.prompt or load <= 0:
            return c
        rate, service = demand / self.prompt, self.prompt / capacity  # prompts per second, seconds each
        budget = self.ttft_ms / 1e3 - service
        while budget > 0 and erlang_c(c, load) * math.exp(-(c / service - rate) * budget) > miss:
            c += 1
        return c


def erlang_c(c: int, load: float) -> float:
    """The probability that a request waits, c servers at offered load `load` (< c): Erlang B's recursion."""
    b = 1.0
    for k in range(1, c + 1):
        b = load * b / (k + load * b)
    return c * b / (c - load * (1 - b))


def slope(ys: list[float]) -> float:
    """Least-squares slope of `ys` per step (0 for fewer than two)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))
