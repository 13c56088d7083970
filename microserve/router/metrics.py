"""Prometheus metrics of a router (names in DESIGN.md, "Metrics").

Request-level series are recorded by the router as requests flow; engine-level series
(`microserve_engine_*`, `microserve_prefix_cache_hit_tokens_total`) are read from the
engines' polled `stats` when `/metrics` is scraped, so they are the engines' own
counters, not the router's guesses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from kvapi.transfer.base import TRANSPORTS
from microserve import protocol

if TYPE_CHECKING:
    from microserve.router.cluster import Cluster

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)


class RouterMetrics:
    """One registry per router (tests run several routers in one process)."""

    def __init__(self, cluster: Cluster) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("microserve_requests", "Requests by outcome (success, error, aborted, rejected)",
                                ["status"], registry=r)
        self.ttft = Histogram("microserve_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("microserve_inter_token_latency_seconds", "Time between streamed tokens", buckets=_ITL,
                             registry=r)
        self.finished = Counter("microserve_request_success", "Requests served to their end, by finish reason",
                                ["finished_reason"], registry=r)
        self.e2e = Histogram("microserve_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=_LATENCY, registry=r)
        # the engine's phases of each request (the engine that generated: its own clock), as vLLM's
        self.queue_time = Histogram("microserve_request_queue_time_seconds", "Time a request waited in the "
                                    "engine's queue", buckets=_LATENCY, registry=r)
        self.prefill_time = Histogram("microserve_request_prefill_time_seconds", "Engine time from first "
                                      "scheduled to first token", buckets=_LATENCY, registry=r)
        self.decode_time = Histogram("microserve_request_decode_time_seconds", "Time from first token to the "
                                     "last", buckets=_LATENCY, registry=r)
        self.inference_time = Histogram("microserve_request_inference_time_seconds", "Prefill and decode time",
                                        buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("microserve_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("microserve_generation_tokens", "Tokens generated", registry=r)
        self.retries = Counter("microserve_request_retries", "Requests restarted on another engine", registry=r)
        self.moves = Counter("microserve_request_moves", "Running requests moved with their KV off a draining "
                             "engine", registry=r)
        self.kv_bytes = Counter("microserve_kv_transfer_bytes", "KV bytes moved by remote_send, by transport",
                                ["transport"], registry=r)
        for transport in TRANSPORTS:
            self.kv_bytes.labels(transport)  # every series exists from the start (rates need a zero)
        self.kv_seconds = Histogram("microserve_kv_transfer_seconds", "Duration of remote_send calls",
                                    buckets=_LATENCY, registry=r)
        self.routed = Counter("microserve_engine_requests", "start_generate calls routed to each engine",
                              ["engine"], registry=r)
        for status in ("success", "error", "aborted", "rejected"):
            self.requests.labels(status)  # every series exists from the start (rates need a zero)
        self.admin = Counter("microserve_admin_changes", "Changes made through the admin API, by action",
                             ["action"], registry=r)
        self.refused = Counter("microserve_rejected_requests", "Requests the gateway answered with an error before "
                               "any output, by reason (the error code)", ["reason"], registry=r)
        self.planner_decisions = Counter("microserve_planner_decisions", "Engine count changes a planner made, by "
                                         "role and direction (up, down)", ["role", "direction"], registry=r)
        self.http = Counter("microserve_http_requests", "HTTP requests by endpoint, method and status",
                            ["handler", "method", "status"], registry=r)
        self.http_seconds = Histogram("microserve_http_request_duration_seconds", "HTTP request time by endpoint "
                                      "(to the last byte of a stream)", ["handler"], buckets=_LATENCY, registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.vllm_names = False  # `--metrics-names vllm`: the engine series and latencies under vLLM's names too
        self.cluster = cluster
        r.register(_EngineCollector(cluster))
        for h in cluster.handles:
            self.attach(h)
        cluster.on_join.append(self.attach)

    def attach(self, h) -> None:
        """Count an engine's sends and routed requests (every engine, those that join later too)."""
        h.on_send = self.observe_send
        h.on_generate = self.observe_generate
        self.routed.labels(h.name)

    def observe_send(self, result: protocol.SendResult) -> None:
        self.kv_bytes.labels(result.transport or "none").inc(result.bytes)
        self.kv_seconds.observe(result.seconds)

    def observe_generate(self, handle) -> None:
        self.routed.labels(handle.name).inc()

    def render(self, model_name: str = "") -> bytes:
        """The exposition text; every series carries `model_name` (as vLLM's) when one is given."""
        if not model_name and not self.vllm_names:
            return generate_latest(self.registry)
        outer = CollectorRegistry()
        outer.register(_ModelLabel(self.registry, model_name))
        if self.vllm_names:
            outer.register(_VLLMNames(self.registry, self.cluster, model_name))
        return generate_latest(outer)


def render_models(models: list[tuple[RouterMetrics, str]]) -> bytes:
    """The exposition text of a gateway's models (`launch --config`): each router's series labelled with its
    model's name, one family per metric name; the process series once (one process serves them all)."""
    if len(models) == 1:
        metrics, name = models[0]
        return metrics.render(name)
    merged: dict[str, Metric] = {}
    for i, (metrics, name) in enumerate(models):
        outer = CollectorRegistry()
        outer.register(_ModelLabel(metrics.registry, name))
        if metrics.vllm_names:
            outer.register(_VLLMNames(metrics.registry, metrics.cluster, name))
        for family in outer.collect():
            if i and family.name.startswith("process_"):
                continue
            out = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            out.samples += family.samples
    outer = CollectorRegistry()
    outer.register(_Families(list(merged.values())))
    return generate_latest(outer)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def describe(self) -> list:
        return []

    def collect(self):
        yield from self.families


class _ModelLabel:
    """Every family of `inner`, each sample labelled `model_name` (dashboards built for vLLM filter on it)."""

    def __init__(self, inner: CollectorRegistry, model_name: str) -> None:
        self.inner, self.model_name = inner, model_name

    def describe(self) -> list:
        return []

    def collect(self):
        for family in self.inner.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(s.name, {**s.labels, "model_name": self.model_name}, s.value, s.timestamp, s.exemplar)
            yield out


_VLLM_RENAMED = {  # ours -> vLLM's, same type, same buckets
    "microserve_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "microserve_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "microserve_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "microserve_prompt_tokens": "vllm:prompt_tokens",
    "microserve_generation_tokens": "vllm:generation_tokens",
    "microserve_request_success": "vllm:request_success",
    "microserve_request_queue_time_seconds": "vllm:request_queue_time_seconds",
    "microserve_request_prefill_time_seconds": "vllm:request_prefill_time_seconds",
    "microserve_request_decode_time_seconds": "vllm:request_decode_time_seconds",
    "microserve_request_inference_time_seconds": "vllm:request_inference_time_seconds",
}


class _VLLMNames:
    """vLLM's own series (`vllm:*`, label `model_name`, per engine `engine`), so dashboards, alerts and scrapers
    written for vLLM (production-stack's router, llm-d's scheduler, KEDA rules) work unchanged."""

    def __init__(self, inner: CollectorRegistry, cluster: Cluster, model_name: str) -> None:
        self.inner, self.cluster, self.model_name = inner, cluster, model_name

    def describe(self) -> list:
        return []

    def collect(self):
        for family in self.inner.collect():
            name = _VLLM_RENAMED.get(family.name)
            if name is None:
                continue
            out = Metric(name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(name + s.name[len(family.name):], {**s.labels, "model_name": self.model_name},
                               s.value, s.timestamp, s.exemplar)
            yield out
        labels = ["model_name", "engine"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests running on the engine", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting on the engine", labels=labels)
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache usage (1 = full)", labels=labels)
        preempted = CounterMetricFamily("vllm:num_preemptions", "Preemptions on the engine", labels=labels)
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache",
                                   labels=labels)
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels=labels)
        for h in self.cluster.handles:
            s = self.cluster.load(h).stats
            if s is None:
                continue
            key = [self.model_name, h.name]
            running.add_metric(key, s.running)
            waiting.add_metric(key, s.waiting)
            # NOTE: as vLLM's: blocks only the prefix cache holds count as free
            usage.add_metric(key, s.kv_usage)
            preempted.add_metric(key, s.num_preemptions)
            hits.add_metric(key, s.prefix_cache_hit_tokens)
            queries.add_metric(key, s.prefix_cache_query_tokens)
        yield from (running, waiting, usage, preempted, hits, queries)


class _EngineCollector:
    """Engine gauges/counters from the cluster's last polled stats."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def describe(self) -> list:
        return []  # NOTE: no eager collect at registration (the cluster may not be started yet)

    def collect(self):
        up = GaugeMetricFamily("microserve_engine_up", "1 while the engine answers", labels=["engine", "role"])
        running = GaugeMetricFamily("microserve_engine_running_requests", "Requests running on the engine",
                                    labels=["engine"])
        waiting = GaugeMetricFamily("microserve_engine_waiting_requests", "Requests queued on the engine",
                                    labels=["engine"])
        used = GaugeMetricFamily("microserve_engine_kv_blocks_used", "KV blocks in use (requests + prefix cache)",
                                 labels=["engine"])
        # NOTE: not `..._kv_blocks_total`: a `_total` suffix is reserved for counters (promtool)
        total = GaugeMetricFamily("microserve_engine_kv_blocks_capacity", "KV blocks of the engine",
                                  labels=["engine"])
        hits = CounterMetricFamily("microserve_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                   labels=["engine"])
        computed = CounterMetricFamily("microserve_engine_computed_tokens", "Tokens the engine computed",
                                       labels=["engine"])
        info = GaugeMetricFamily("microserve_engine_info", "Which kernels the engine runs (native, native-scalar, "
                                 "torch, triton, vllm); always 1", labels=["engine", "kernels"])
        store_hits = CounterMetricFamily("microserve_kv_store_hit_tokens", "Prompt tokens loaded from a KV store tier "
                                         "instead of computed", labels=["engine", "tier"])
        store_bytes = CounterMetricFamily("microserve_kv_store_bytes", "Bytes read from / written to a KV store tier",
                                          labels=["engine", "tier", "direction"])
        store_errors = CounterMetricFamily("microserve_kv_store_errors", "Failed KV store operations and corrupt "
                                           "entries (each a miss)", labels=["engine", "tier"])
        store_dropped = CounterMetricFamily("microserve_kv_store_dropped_writes", "Blocks not written to the KV store "
                                            "because its write queue was full", labels=["engine"])
        lent = GaugeMetricFamily("microserve_kv_blocks_lent", "KV blocks the engine holds for other engines' "
                                 "requests (DistAttention's lend)", labels=["engine"])
        borrowed = GaugeMetricFamily("microserve_kv_blocks_borrowed", "KV blocks of the engine's requests that "
                                     "lenders hold (DistAttention)", labels=["engine"])
        attends = SummaryMetricFamily("microserve_remote_attention_seconds", "Round trips of the attend messages "
                                      "the engine sent its lenders, one per lender, layer and step (DistAttention)",
                                      labels=["engine"])
        served = CounterMetricFamily("microserve_remote_attention_served", "Attend messages the engine answered as "
                                     "a lender (DistAttention)", labels=["engine"])
        engines = GaugeMetricFamily("microserve_engines", "Engines serving each role (live, not draining)",
                                    labels=["role"])
        parked = GaugeMetricFamily("microserve_requests_parked", "Requests the router holds because every engine "
                                   "of the role refused them for want of KV blocks", labels=["role"])
        for role in self.cluster.roles:
            engines.add_metric([role], len(self.cluster.engines(role)))
            parked.add_metric([role], self.cluster.kv_waiters.parked(role))
        for h in self.cluster.handles:
            up.add_metric([h.name, h.role or ""], 1.0 if h.alive else 0.0)
            s = self.cluster.load(h).stats
            if s is None:
                continue
            running.add_metric([h.name], s.running)
            waiting.add_metric([h.name], s.waiting)
            used.add_metric([h.name], s.kv_blocks_used)
            total.add_metric([h.name], s.kv_blocks_total)
            hits.add_metric([h.name], s.prefix_cache_hit_tokens)
            computed.add_metric([h.name], s.computed_tokens_total)
            info.add_metric([h.name, s.kernels or "none"], 1.0)
            lent.add_metric([h.name], s.kv_blocks_lent)
            borrowed.add_metric([h.name], s.kv_blocks_borrowed)
            attends.add_metric([h.name], s.remote_attends, s.remote_attend_seconds)
            served.add_metric([h.name], s.attends_served)
            for t in s.kv_store:
                store_hits.add_metric([h.name, t.tier], t.hit_tokens)
                store_bytes.add_metric([h.name, t.tier, "read"], t.bytes_read)
                store_bytes.add_metric([h.name, t.tier, "write"], t.bytes_written)
                store_errors.add_metric([h.name, t.tier], t.errors)
            if s.kv_store:
                store_dropped.add_metric([h.name], s.kv_store[0].dropped_writes)
        yield from (engines, parked, up, running, waiting, used, total, hits, computed, info, lent, borrowed, attends,
                    served, store_hits, store_bytes, store_errors, store_dropped)
