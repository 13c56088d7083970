"""`SimEngine`: one simulated engine, scheduled exactly like the real one, timed by the cost model.

It is an `EngineCore` (the real `Scheduler`: continuous batching, token budget, chunked
prefill, preemption by recompute, in-batch prefix sharing; over the real
`KVCacheManager`: `kvapi` block pool and radix prefix cache) sized to the KV that fits
beside the model on its GPUs. Only the model is replaced: a step takes
`CostModel.step_seconds` of virtual time (`last_step_seconds`) and every sampled token is
a placeholder id. Token ids of prompts are real, so prefix caching behaves as in
serving (shared system prompts, multi-turn sessions).
"""

from __future__ import annotations

from kvapi import KVSpec
from kvapi.radix import EventHook
from microserve.engine.config import EngineConfig
from microserve.engine.core.engine_core import EngineCore
from microserve.engine.core.scheduler import ScheduledBatch
from microserve.engine.core.sequence import Sequence
from microserve.sim.costs import CostModel

PLACEHOLDER_TOKEN = 0


def batch_shape(batch: ScheduledBatch) -> tuple[list[tuple[int, int]], list[int], list[Sequence]]:
    """What the cost model needs of a batch: prefill chunks (start, tokens), decode context
    lengths (with the new token), and the sequences that sample a token this step."""
    prefill, decodes, sampled = [], [], []
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        if n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens:
            decodes.append(seq.num_computed_tokens + 1)
        else:
            prefill.append((seq.num_computed_tokens, n))
        if seq.num_computed_tokens + n == seq.num_tokens and not seq.prefill_only:
            sampled.append(seq)
    return prefill, decodes, sampled


class SimEngine(EngineCore):
    """Args:
        cost: the engine's cost model (model, GPU, TP).
        config: scheduler knobs; `num_kv_blocks` None sizes the pool from the GPUs' memory.
        max_model_len: context limit (default: the model's `max_position_embeddings`).
        on_kv_event: hook called with ("stored"|"evicted", prefix hashes), as in `LLMEngine`.
    """

    def __init__(self, cost: CostModel, config: EngineConfig | None = None, engine_id: str = "sim",
                 max_model_len: int | None = None, on_kv_event: EventHook | None = None) -> None:
        self.cost, self.engine_id = cost, engine_id
        config = config or EngineConfig()
        bs = config.block_size
        num_blocks = config.num_kv_blocks or max(1, cost.kv_capacity_tokens() // bs)
        self._init_books(config, num_blocks, max_model_len or cost.model.max_position_embeddings, cost.model.vocab,
                         frozenset(), on_kv_event)
        m = cost.model
        self.kv_spec = KVSpec(m.layers, m.kv_heads, m.head_dim, m.kv_dtype, bs)
        self.last_step_seconds = 0.0

    def _execute(self, batch: ScheduledBatch) -> dict[Sequence, int]:
        prefill, decodes, sampled = batch_shape(batch)
        self.last_step_seconds = self.cost.step_seconds(prefill, decodes, len(sampled), len(batch.seqs))
        return dict.fromkeys(sampled, PLACEHOLDER_TOKEN)

    def step(self):
        self.last_step_seconds = 0.0
        return super().step()
