"""`Scheduler`: continuous batching under a token budget.

One rule drives everything: each running sequence's `num_computed_tokens` catches up
to its `num_tokens`, at most `max_num_batched_tokens` tokens per step over the batch.
A decode is a catch-up of one token; a prompt longer than the leftover budget is
prefilled in chunks; a cached prefix just starts the sequence further along. When
blocks run out, the newest running sequence is preempted (its blocks freed, its
computed full blocks left in the prefix cache) and recomputed later.

In-batch prefix sharing (32 prompts sharing a long system prompt, arriving together): the
prefix is computed once. A waiting request whose next uncached prompt blocks are completed
in this very step by a request scheduled before it shares those blocks at once (as vLLM's
scheduler does): a layer writes the K/V of every token of the step before any token
attends, so its chunk reads the prefix written earlier in the same layer. Shared blocks
are matched by chained hash and then by their tokens. A request whose next block is being
computed but not finished this step (a prefix longer than the budget) waits a step and
then hits the cache (as SGLang does); a hash collision there costs one step, never a
wrong answer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from microserve.engine.config import EngineConfig
from microserve.engine.core.kv_manager import KVCacheManager
from microserve.engine.core.sequence import Finish, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens to compute, per sequence

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.admit: Callable[[Sequence], bool] | None = None  # the engine's admission check (a LoRA slot)
        self.failed: list[Sequence] = []  # preempted borrowers, ended in error by the engine's step
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue `seq` behind every waiting request of its priority or a lower number (FCFS within one)."""
        self._insert(seq, lambda other: other.sampling.priority > seq.sampling.priority)

    def _insert(self, seq: Sequence, before) -> None:
        for i, other in enumerate(self.waiting):
            if before(other):
                self.waiting.insert(i, seq)
                return
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        if not self.config.mixed_batches and (batch := self._schedule_prefills()):
            return batch
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = self._schedule_running(batch, budget)
        budget -= sum(batch.num_new_tokens)
        if not preempted:
            self._schedule_waiting(batch, budget, self._prompt_room(batch))
        return batch

    def _prompt_room(self, batch: ScheduledBatch) -> int | None:
        """What `max_prefill_tokens` leaves after the prompt chunks already in `batch` (None: no limit)."""
        if (cap := self.config.max_prefill_tokens) is None:
            return None
        return cap - sum(n for seq, n in zip(batch.seqs, batch.num_new_tokens)
                         if n > 1 or seq.num_computed_tokens < seq.num_prompt_tokens)

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> bool:
        preempted, i = False, 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate(seq, seq.num_computed_tokens + n):
                # NOTE: the victim is the lowest priority (highest number) not yet in this batch, newest
                # first; a borrower only when nothing else is left (its lent ranges cannot be recomputed)
                rest = self.running[i:]
                victim = max(reversed(rest), key=lambda s: (not s.lent, s.sampling.priority))
                self.running.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    return True
            batch.add(seq, n)
            budget -= n
            i += 1
        return preempted

    def _schedule_prefills(self) -> ScheduledBatch:
        """Without mixed batches: a step of prompt work only (running chunked prompts, then waiting
        requests); empty when there is none, or when a running prompt is short of blocks (the mixed
        path then preempts as usual)."""
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        for seq in self.running:
            left = seq.num_tokens - seq.num_computed_tokens
            if budget <= 0 or (left == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens):  # a decode
                continue
            n = min(left, budget)
            if not self.kv.allocate(seq, seq.num_computed_tokens + n):
                return ScheduledBatch()
            batch.add(seq, n)
            budget -= n
        self._schedule_waiting(batch, budget, self._prompt_room(batch))
        return batch

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int, room: int | None = None) -> None:
        """Start waiting requests while the budget lasts; with `room` (what `max_prefill_tokens` leaves
        after the running prompts' chunks), also only while it does: the one that starts may take it past."""
        if not self.waiting:
            return
        caching = self.kv.enable_prefix_caching
        computing = self._computing() if caching else None
        producing = self._producing(batch) if caching else None
        deferred: list[Sequence] = []
        room = budget if room is None else room
        while self.waiting and budget > 0 and room > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            if self.admit is not None and not self.admit(seq):
                deferred.append(seq)  # NOTE: its LoRA adapter has no slot yet (engine/model/lora.py)
                continue
            matched_now = not seq.block_table and seq.num_computed_tokens == 0
            if matched_now:
                self.kv.match_prefix(seq)
                if producing and seq.sampling.prompt_logprobs is None:
                    self._share(seq, producing)
                if computing is not None and self._next_block_hash(seq) in computing:
                    self.kv.unmatch(seq)  # NOTE: a waiting request must not keep cache blocks pinned
                    deferred.append(seq)
                    continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.allocate(seq, seq.num_computed_tokens + n):
                if matched_now:
                    self.kv.unmatch(seq)
                self.waiting.appendleft(seq)
                break
            seq.status = SequenceStatus.RUNNING
            seq.scheduled_ns = seq.scheduled_ns or time.time_ns()
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
            room -= n
            if computing is not None:
                computing.update(self._uncomputed_hashes(seq))
                producing.update(self._completed_blocks(seq, n))
        self.waiting.extendleft(reversed(deferred))

    def _producing(self, batch: ScheduledBatch) -> dict[int, tuple[Sequence, int]]:
        """Prompt blocks the batch completes this step: chained hash -> (sequence, block index)."""
        out: dict[int, tuple[Sequence, int]] = {}
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            out.update(self._completed_blocks(seq, n))
        return out

    def _completed_blocks(self, seq: Sequence, n: int) -> dict[int, tuple[Sequence, int]]:
        bs = self.kv.block_size
        hashes = seq.prompt_block_hashes(bs)
        last = min(seq.num_computed_tokens + n, seq.num_prompt_tokens, seq.local_limit) // bs
        return {hashes[k]: (seq, k) for k in range(seq.num_computed_tokens // bs, last)}

    def _share(self, seq: Sequence, producing: dict[int, tuple[Sequence, int]]) -> None:
        """Give `seq` the blocks after its cached prefix that the batch completes this step."""
        bs = self.kv.block_size
        hashes = seq.prompt_block_hashes(bs)
        k = seq.num_computed_tokens // bs
        blocks: list[int] = []
        # NOTE: full prompt blocks only (a preempted request's generated tokens have no hashes), and
        # never the block of the last known token, which must be computed to yield logits
        end = min((seq.num_tokens - 1) // bs, len(hashes), seq.local_limit // bs)
        while k < end and hashes[k] in producing:
            owner, j = producing[hashes[k]]
            if j != k or owner.token_ids[k * bs:(k + 1) * bs] != seq.token_ids[k * bs:(k + 1) * bs]:
                break
            blocks.append(owner.block_table[k])
            k += 1
        if blocks:
            self.kv.share(seq, blocks)

    def _computing(self) -> set[int]:
        """Hashes of prompt blocks that running requests have yet to compute."""
        out: set[int] = set()
        for seq in self.running:
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                out.update(self._uncomputed_hashes(seq))
        return out

    def _uncomputed_hashes(self, seq: Sequence) -> list[int]:
        bs = self.kv.block_size
        return seq.prompt_block_hashes(bs)[seq.num_computed_tokens // bs:seq.local_limit // bs]

    def _next_block_hash(self, seq: Sequence) -> int | None:
        hashes = seq.prompt_block_hashes(self.kv.block_size)
        k = seq.num_computed_tokens // self.kv.block_size
        return hashes[k] if k < len(hashes) else None

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq, keep_tail=True)  # NOTE: it resumes on the KV it had, not a recompute of its last block
        self.num_preemptions += 1
        if seq.lent:  # NOTE: its pushed ranges live on lenders only: it ends in error instead
            seq.error = seq.error or "preempted for KV blocks, and a sequence with lent ranges cannot be recomputed"
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, Finish.ERROR
            self.failed.append(seq)
            return
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        # back at the front of its priority class: it was running before anything waiting there
        self._insert(seq, lambda other: other.sampling.priority >= seq.sampling.priority)

    def detach(self, seq: Sequence) -> None:
        """Take a running sequence out of scheduling without freeing its blocks."""
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = Finish.PREFILLED

    def finish(self, seq: Sequence, reason: Finish) -> None:
        """End `seq` (finished or aborted) and release its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.kv.free(seq, keep_tail=reason is Finish.ABORT)  # an aborted stream may move on (its tail goes along)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
