"""Sizes roles to latency targets, as Dynamo's SLA planner does: prefill by the prompt tokens to compute
over what one engine was measured to compute, decode by the streams to hold over what one engine holds
at the ITL target (its measured streams scaled by target / measured ITL). A role that misses its
target gets at least one more engine; the bounds and the cooldown keep it from flapping."""

import math

from microserve import Planner


class SLOPlanner(Planner):
    interval = 10.0
    cooldown = 30.0
    ttft_ms = 2000.0  # target: 90th percentile time to first token
    itl_ms = 50.0  # target: 90th percentile of the requests' mean time between tokens
    headroom = 0.8  # plan for this share of the measured capacity

    async def plan(self, cluster, window):
        want = {}
        slow_first = window.ttft_p90 * 1e3 > self.ttft_ms
        slow_next = window.itl_p90 * 1e3 > self.itl_ms
        for role, w in window.roles.items():
            if not w.engines:
                continue
            if role == "prefill":
                per_engine = w.capacity_tokens_per_s * self.headroom
                need = max(1, math.ceil(window.prompt_tokens_per_s / per_engine)) if per_engine > 0 else w.engines
                want[role] = max(need, w.engines + 1) if slow_first else need
                continue
            streams, per = w.running + w.waiting, w.running / w.engines
            if window.itl_p90 > 0 and per > 0:  # streams one engine holds at the target, by the measurement
                holds = max(1.0, per * self.itl_ms / (window.itl_p90 * 1e3)) * self.headroom
                need = math.ceil(streams / holds)
            else:
                need = w.engines if streams else 1  # nothing measured: keep, or shrink when idle
            if slow_next or (slow_first and "prefill" not in window.roles):
                need = max(need, w.engines + 1)
            want[role] = need
        return want
