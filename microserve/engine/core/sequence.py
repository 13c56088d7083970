"""`Sequence`: one request's state inside the engine."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvapi.radix import RadixCursor, namespace_seed, prefix_hashes
from microserve.sampling_params import SamplingParams

if TYPE_CHECKING:  # NOTE: the core stays torch-free (the simulator and routers import it)
    import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Finish(enum.StrEnum):
    """Why a sequence ended. The first three reach clients (`GenerateChunk.finish_reason`); the last
    two stay inside the engine's call layer (a send's prefill is done; a step failed)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    PREFILLED = "prefilled"
    ERROR = "error"


REMOTE = -1  # a block-table entry whose KV lives on a lender (DistAttention), not in this pool


@dataclass
class LentRange:
    """Prompt positions `[begin, end)` of a sequence whose KV a lender holds (DistAttention; both ends on
    block boundaries). Until the range is computed its KV stays in local blocks; then `peer.write`
    moves it to the lender, the local blocks are freed and `pushed` is set. `peer` (the model engine's side
    of a lender: `serving.lenders.RemoteLender`) has `begin`, `end`, `lender` (ranges with the same one
    share a message), `write(seq, begin, end)`, and `attend(layer, scale, asks)`: one message to its
    lender with each ask's rows (`(ranges, positions, q)`), one part per ask whose `result()` is
    `(out, lse)` over those ranges."""

    begin: int
    end: int
    peer: Any
    pushed: bool = False


class Sequence:
    """Token ids (prompt then output), how many of them have KV computed, and the blocks.

        token_ids:  | prompt ............................ | output ..... |
        KV:         | computed (cached or prefilled) | to compute |
                                                     ^ num_computed_tokens

    The scheduler's one rule: `num_computed_tokens` catches up to `num_tokens`; when it
    does, the last position's logits give the next token.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.sampling = sampling
        self.cache_seed = namespace_seed(sampling.lora)  # the prefix cache's tree for this adapter (kvapi.radix)
        self.lora_slot = -1  # the adapter's slot in the model's LoRA weights (engine.model.lora); -1: none
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.num_cached_blocks = 0  # leading blocks already offered to the prefix cache
        self.radix_cursor = RadixCursor()  # where the last offer ended in the prefix cache
        self.finish_reason: Finish | None = None
        self.generator: torch.Generator | None = None
        # prefill-only sequences (remote_send) stop once their KV is computed: no sampling
        self.prefill_only = False
        # called from the step thread with each layer index when the step that completes
        # this sequence's prefill has written that layer's KV (lets a transfer start early)
        self.layer_hook: Callable[[int], None] | None = None
        self._prompt_hashes: list[int] | None = None
        self.eos_ids: frozenset[int] = frozenset()  # the engine's EOS ids (min_tokens bans them early)
        # (logprob of the sampled token, [(token id, logprob), ...] top alternatives) per token sampled
        # since the last step output, when sampling.logprobs is set
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]], int]] = []  # prompt tokens 1.. (and ranks)
        self.lent: list[LentRange] = []  # ranges of the prompt held by lenders (sorted, disjoint)
        self.error: str | None = None  # why the step failed this sequence alone (a lender lost): it ends in error
        self.error_peer = ""  # the engine at fault for `error` (the lender's engine id), when known
        self.matcher = None  # the grammar of sampling.structured (engine.model.structured), set by the engine
        # unix ns: arrival, first scheduled, first token (the engine's phases, for traces)
        self.arrived_ns, self.scheduled_ns, self.first_token_ns = time.time_ns(), 0, 0
        self.chunks: list[tuple[int, int, int, int]] = []  # prompt steps: (unix ns begin, end, position, tokens)

    def set_prompt(self, prompt_ids: list[int]) -> None:
        """Replace the prompt (a received ticket's sequence becomes the request's, `HeldKV.adopt`)."""
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self._prompt_hashes = None  # NOTE: they were of the old prompt

    def prompt_block_hashes(self, block_size: int) -> list[int]:
        """Chained hashes of the prompt's full blocks (computed once)."""
        if self._prompt_hashes is None:
            self._prompt_hashes = prefix_hashes(self.token_ids[:self.num_prompt_tokens], block_size, self.cache_seed)
        return self._prompt_hashes

    @property
    def local_limit(self) -> int:
        """Positions whose blocks may enter the prefix cache: those before the first lent range."""
        return self.lent[0].begin if self.lent else len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
