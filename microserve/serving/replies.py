"""The replies `EngineService` assembles from its backend's books: `stats` and `health`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from microserve import protocol

if TYPE_CHECKING:
    from microserve.serving.base import EngineService


def stats(service: EngineService) -> protocol.StatsReply:
    s = service.backend.engine_stats()
    sent, received = service.backend.kv_bytes()
    return protocol.StatsReply(
        engine_id=service.engine_id, running=s.running, waiting=s.waiting, queued_tokens=s.queued_tokens,
        kv_blocks_total=s.kv_blocks_total, kv_blocks_used=s.kv_blocks_used, kv_blocks_cached=s.kv_blocks_cached,
        prefix_cache_hit_tokens=s.prefix_cache_hit_tokens, computed_tokens_total=s.computed_tokens_total,
        num_preemptions=s.num_preemptions, open_tickets=len(service.tickets), active_sends=len(service._sends),
        kv_bytes_sent=sent, kv_bytes_received=received, kernels=s.kernels, kv_store=service.backend.store_stats(),
        kv_blocks_lent=sum(len(t.blocks) for t in service.tickets.lent()), kv_blocks_borrowed=s.kv_blocks_borrowed,
        prefix_cache_query_tokens=s.prefix_cache_query_tokens, remote_attends=s.remote_attends,
        remote_attend_seconds=s.remote_attend_seconds, attends_served=service.attends_served,
        busy_seconds=service.busy_seconds, loras=list(s.loras), lora_loads=s.lora_loads,
        kv_refusals=service.kv_refusals)


def health(service: EngineService) -> protocol.HealthReply:
    return protocol.HealthReply(True, service.engine_id, service.model_name, service.kv_spec, list(service.transports),
                                service.events_addr, service.max_model_len)
