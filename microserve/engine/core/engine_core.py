"""`EngineCore`: the scheduler, the KV books and the step loop of one engine, model aside.

    add_request ─> Scheduler.waiting ─ schedule() ─> ScheduledBatch ─> _execute (the model)
                                          ^                                 │ sampled tokens
                                          └──── step(): finish / cache blocks ┘

`LLMEngine` (engine.py) runs a real model in `_execute`; `SimEngine` (microserve.sim)
only times the step with a cost model. Everything else is shared, so the simulator
schedules exactly as the engine does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvapi import KVSpec
from kvapi.radix import EventHook
from microserve.engine.config import EngineConfig
from microserve.engine.core.held_kv import HeldKV
from microserve.engine.core.kv_manager import KVCacheManager
from microserve.engine.core.scheduler import ScheduledBatch, Scheduler
from microserve.engine.core.sequence import Finish, LentRange, Sequence
from microserve.sampling_params import SamplingParams
from microserve.text import InvalidRequestError, check_prompt

__all__ = ["EngineCore", "EngineStats", "InvalidRequestError", "StepOutput"]


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # a `sequence.Finish` (the backends pass vLLM's strings through)
    num_cached_tokens: int = 0
    logprobs: list | None = None  # per new token (logprob, top alternatives), when the request asked
    prompt_logprobs: list | None = None  # with the first token: the same for prompt tokens 1.., when asked
    phases: tuple | None = None  # with the first token: unix ns arrived, scheduled, first token, `Sequence.chunks`
    error: str | None = None  # with finish reason `Finish.ERROR`: why (a lender lost), when known
    error_peer: str = ""  # with `error`: the other engine at fault (the lost lender), when known

    def after(self, earlier: StepOutput | None) -> StepOutput:
        """This output with an `earlier` one of the same request (held back) in front of it."""
        if earlier is None:
            return self
        logprobs = None if earlier.logprobs is None and self.logprobs is None \
            else (earlier.logprobs or []) + (self.logprobs or [])
        return StepOutput(self.request_id, earlier.new_token_ids + self.new_token_ids, self.finish_reason,
                          self.num_cached_tokens or earlier.num_cached_tokens, logprobs,
                          earlier.prompt_logprobs or self.prompt_logprobs, earlier.phases or self.phases,
                          self.error, self.error_peer)


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_query_tokens: int = 0  # prompt tokens looked up in the prefix cache
    num_preemptions: int = 0
    computed_tokens_total: int = 0  # tokens run through the model (prefill + decode)
    queued_tokens: int = 0  # tokens still to compute over waiting and running requests
    kernels: str = ""  # which kernels the model runs: "native", "native-scalar", "torch", "triton" ("" no model)
    kv_blocks_borrowed: int = 0  # blocks of running requests' lent ranges whose KV lenders hold (DistAttention)
    remote_attends: int = 0  # attend messages this engine sent its lenders (one per lender, layer and step)
    remote_attend_seconds: float = 0.0  # their round trips, summed (send to reply, on the step thread)
    loras: tuple[str, ...] = ()  # LoRA adapters loaded (engine/model/lora.py)
    lora_loads: int = 0  # adapters written into a slot so far (each slot miss costs one)


class EngineCore(HeldKV):
    """Scheduler and KV books of one engine, and the step loop around a model.

    Subclasses set the attributes below in `__init__` and implement `_execute`:
    `LLMEngine` runs the real model; `microserve.sim.engine.SimEngine` only times the step.
    """

    config: EngineConfig
    kv: KVCacheManager
    scheduler: Scheduler
    block_size: int
    vocab_size: int
    max_model_len: int
    max_tokens_per_seq: int
    eos_token_ids: frozenset[int]
    kv_spec: KVSpec  # the KV layout peers must match to exchange pages

    def _init_books(self, config: EngineConfig, num_blocks: int, max_model_len: int, vocab_size: int,
                    eos_token_ids: frozenset[int], on_kv_event: EventHook | None = None) -> None:
        self.config = config
        self.block_size = config.block_size
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, on_kv_event)
        self.scheduler = Scheduler(config, self.kv)
        self.max_model_len, self.vocab_size, self.eos_token_ids = max_model_len, vocab_size, eos_token_ids
        self.computed_tokens_total = 0
        # a sequence may not outgrow the context nor the whole KV pool (it would preempt itself forever)
        self.max_tokens_per_seq = min(max_model_len, num_blocks * config.block_size)
        self._seqs: dict[str, Sequence] = {}

    def _attach(self, seq: Sequence) -> None:
        """Set up what sampling `seq` needs beyond its params (the model engine: its grammar);
        raises InvalidRequestError when that cannot be done. The simulator samples nothing."""

    def _execute(self, batch: ScheduledBatch) -> dict[Sequence, int]:
        """Compute the batch; the sampled token of each sequence that caught up this step."""
        raise NotImplementedError

    # -- requests -------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                    lent: list[LentRange] | None = None) -> Sequence:
        """Queue a request; raises InvalidRequestError for input that cannot be served. `lent`: ranges of
        the prompt whose KV lenders hold (DistAttention; sorted, disjoint, on block boundaries)."""
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        lent = list(lent or ())
        self._check_lent(lent, len(prompt_ids))
        self.validate_prompt(prompt_ids, lent)
        sampling.validate()
        seq = Sequence(request_id, prompt_ids, sampling)
        seq.lent = lent
        seq.eos_ids = self.eos_token_ids
        self._attach(seq)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a sequence built by the caller, possibly holding blocks with KV already
        computed (received from another engine) or marked `prefill_only`."""
        if seq.request_id in self._seqs:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
        self.validate_prompt(seq.token_ids[:seq.num_prompt_tokens])
        seq.sampling.validate()
        seq.eos_ids = self.eos_token_ids
        self._attach(seq)
        self._seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def validate_prompt(self, prompt_ids: list[int], lent: list[LentRange] = ()) -> None:
        """`lent`: ranges of the prompt that lenders hold (DistAttention). They count out of the pool
        check, but each is computed here before it moves: while they are, the local tokens before the
        last one and the ranges a prefill chunk spans (staging) must fit."""
        check_prompt(prompt_ids, self.vocab_size, self.max_model_len)
        n = len(prompt_ids)
        lent_tokens = sum(r.end - r.begin for r in lent)
        need = n + 1 - lent_tokens
        if lent:
            largest = max(r.end - r.begin for r in lent)
            staging = largest + max(largest, self.config.max_num_batched_tokens)
            need = max(need, lent[-1].end - lent_tokens + staging)
        if -(-need // self.block_size) > self.kv.num_blocks:
            raise InvalidRequestError(
                f"prompt of {n} tokens needs more KV blocks than the cache has ({self.kv.num_blocks})"
                + (f" with {lent_tokens} of them lent" if lent_tokens else ""))

    def _check_lent(self, lent: list[LentRange], n: int) -> None:
        """Raise InvalidRequestError for lent ranges that are not sorted, disjoint, on block boundaries and
        within the prompt."""
        bs, last = self.block_size, 0
        for r in lent:
            if r.begin < last or r.begin >= r.end or r.begin % bs or r.end % bs or r.end > n:
                raise InvalidRequestError(
                    f"lent range [{r.begin}, {r.end}): lent ranges are sorted, disjoint, non-empty, on block "
                    f"boundaries (block size {bs}) and within the prompt ({n} tokens)")
            last = r.end

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks; False if it is unknown or already done."""
        seq = self._seqs.pop(request_id, None)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq, Finish.ABORT)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def fail_running(self) -> list[StepOutput]:
        """End every running request with "error" (a step raised): their blocks are freed."""
        outs = []
        for seq in list(self.scheduler.running):
            self.scheduler.finish(seq, Finish.ABORT)
            self._seqs.pop(seq.request_id, None)
            outs.append(StepOutput(seq.request_id, [], Finish.ERROR))
        return outs

    # -- the loop ---------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one scheduling step; returns outputs of the requests that got tokens or ended."""
        batch = self.scheduler.schedule()
        if not batch:
            return self._failed()
        t0 = time.time_ns()
        sampled = self._execute(batch)
        t1 = time.time_ns()
        self.computed_tokens_total += sum(batch.num_new_tokens)
        outputs = self._failed()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens < seq.num_prompt_tokens:  # a prompt step (its span, for traces)
                seq.chunks.append((t0, t1, seq.num_computed_tokens, n))
            seq.num_computed_tokens += n
            if seq.lent:
                self._offload(seq)
            if seq.error is not None:
                self.scheduler.finish(seq, Finish.ABORT)
                self._seqs.pop(seq.request_id, None)
                outputs.append(StepOutput(seq.request_id, [], Finish.ERROR, error=seq.error,
                                          error_peer=seq.error_peer))
                continue
            token = sampled.get(seq)
            if token is None:
                self.kv.cache_computed(seq)
                if seq.prefill_only and seq.num_computed_tokens == seq.num_tokens:
                    # NOTE: keeps its blocks; the caller sends them, then calls `release`
                    self.scheduler.detach(seq)
                    self._seqs.pop(seq.request_id, None)
                    outputs.append(StepOutput(seq.request_id, [], Finish.PREFILLED, seq.num_cached_tokens))
                continue
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
                self._seqs.pop(seq.request_id, None)
            else:
                self.kv.cache_computed(seq)
            logprobs, seq.logprobs = (seq.logprobs or None), []
            asked = seq.num_output_tokens == 1 and seq.sampling.prompt_logprobs is not None
            prompt_lps = seq.prompt_logprobs if asked else None
            phases = None
            if seq.num_output_tokens == 1:
                seq.first_token_ns = time.time_ns()
                phases = (seq.arrived_ns, seq.scheduled_ns or seq.arrived_ns, seq.first_token_ns, tuple(seq.chunks))
            outputs.append(StepOutput(seq.request_id, [token], reason, seq.num_cached_tokens, logprobs, prompt_lps,
                                      phases))
        return outputs

    def _offload(self, seq: Sequence) -> None:
        """Move each lent range this step completed to its lender and free its local blocks
        (DistAttention); a failed write fails this sequence alone."""
        for rng in seq.lent:
            if rng.pushed or seq.num_computed_tokens < rng.end:
                continue
            try:
                rng.peer.write(seq, rng.begin, rng.end)
            except Exception as exc:  # NOTE: a lost lender ends its borrower, never the step
                seq.error = f"writing positions [{rng.begin}, {rng.end}) to their lender failed: {exc}"
                seq.error_peer = getattr(exc, "peer", "")
                return
            self.kv.offload(seq, rng.begin, rng.end)
            rng.pushed = True

    def _failed(self) -> list[StepOutput]:
        """Outputs for the borrowers the scheduler had to preempt (they cannot be recomputed)."""
        failed, self.scheduler.failed = self.scheduler.failed, []
        for seq in failed:
            self._seqs.pop(seq.request_id, None)
        return [StepOutput(seq.request_id, [], Finish.ERROR, error=seq.error, error_peer=seq.error_peer)
                for seq in failed]

    def _finish_reason(self, seq: Sequence, token: int) -> Finish | None:
        sp = seq.sampling
        if seq.matcher is not None and seq.matcher.is_stopped():  # the grammar is complete: nothing may follow
            return Finish.STOP
        if seq.num_output_tokens > sp.min_tokens and (  # NOTE: the first min_tokens tokens never stop
                token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids)):
            return Finish.STOP
        limit = self.max_model_len if seq.lent else self.max_tokens_per_seq  # NOTE: a borrower outgrows the pool
        if seq.num_output_tokens >= sp.max_tokens or seq.num_tokens >= limit:
            return Finish.LENGTH
        return None

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.kv.num_blocks,
            kv_blocks_used=self.kv.pool.num_used,
            kv_blocks_cached=self.kv.num_cached,
            prefix_cache_hit_tokens=self.kv.prefix_hit_tokens,
            prefix_cache_query_tokens=self.kv.prefix_query_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            computed_tokens_total=self.computed_tokens_total,
            queued_tokens=sum(s.num_tokens - s.num_computed_tokens
                              for s in (*self.scheduler.waiting, *self.scheduler.running)),
            kv_blocks_borrowed=sum((r.end - r.begin) // self.block_size
                                   for s in self.scheduler.running for r in s.lent if r.pushed),
        )

    def sequence(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)
