"""`SimEngine`: one simulated engine, scheduled exactly like the real one, timed by the cost model.

It runs the real `Scheduler` (continuous batching, token budget, chunked prefill,
preemption by recompute) over the real `KVCacheManager` (`kvapi` block pool and radix
prefix cache) sized to the KV that fits beside the model on its GPUs. Only the model is
replaced: a step takes `CostModel.step_seconds` of virtual time and every sampled token
is a placeholder id. Token ids of prompts are real, so prefix caching behaves as in
serving (shared system prompts, multi-turn sessions).
"""

from __future__ import annotations

from dataclasses import dataclass

from microserve.engine.config import EngineConfig
from microserve.engine.kv_manager import KVCacheManager
from microserve.engine.scheduler import Scheduler
from microserve.engine.sequence import Sequence
from microserve.sampling_params import SamplingParams
from microserve.sim.costs import CostModel

PLACEHOLDER_TOKEN = 0


@dataclass
class SimOutput:
    request_id: str
    num_new_tokens: int  # 0 or 1 this step
    finished: bool


class SimEngine:
    """Args:
        cost: the engine's cost model (model, GPU, TP).
        config: scheduler knobs; `num_kv_blocks` None sizes the pool from the GPUs' memory.
    """

    def __init__(self, cost: CostModel, config: EngineConfig | None = None, engine_id: str = "sim") -> None:
        self.cost, self.engine_id = cost, engine_id
        self.config = config or EngineConfig()
        bs = self.config.block_size
        num_blocks = self.config.num_kv_blocks or max(1, cost.kv_capacity_tokens() // bs)
        self.kv = KVCacheManager(num_blocks, bs, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.kv)
        self.computed_tokens_total = 0

    def add_request(self, request_id: str, prompt_ids: list[int], max_tokens: int) -> Sequence:
        if not prompt_ids or max_tokens < 1:
            raise ValueError("a simulated request needs a prompt and max_tokens >= 1")
        if self.kv.pool.num_blocks * self.config.block_size <= len(prompt_ids):
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit in the KV pool")
        seq = Sequence(request_id, list(prompt_ids), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        self.scheduler.add(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> tuple[float, list[SimOutput]]:
        """Schedule and "run" one step: (virtual seconds it takes, what it produced)."""
        batch = self.scheduler.schedule()
        if not batch:
            return 0.0, []
        prefill, decodes, sampled = [], [], 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                decodes.append(seq.num_computed_tokens + 1)
            else:
                prefill.append((seq.num_computed_tokens, n))
            sampled += seq.num_computed_tokens + n == seq.num_tokens
        seconds = self.cost.step_seconds(prefill, decodes, sampled)
        self.computed_tokens_total += sum(batch.num_new_tokens)
        outputs = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens < seq.num_tokens:  # a prefill chunk that does not finish the prompt
                self.kv.cache_computed(seq)
                outputs.append(SimOutput(seq.request_id, 0, False))
                continue
            seq.token_ids.append(PLACEHOLDER_TOKEN)
            done = seq.num_output_tokens >= seq.sampling.max_tokens
            if done:
                self.scheduler.finish(seq, "length")
            else:
                self.kv.cache_computed(seq)
            outputs.append(SimOutput(seq.request_id, 1, done))
        return seconds, outputs
