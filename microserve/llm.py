"""Offline API, as vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch

from microserve.demo import resolve_model
from microserve.engine.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.sampling_params import SamplingParams
from microserve.text import NoTokenizer, TextStream

Prompt = str | list[int]


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    # with SamplingParams(logprobs=k): per token, (its logprob, [(token id, logprob)] top k alternatives)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    # prompt tokens 1..: (logprob, top k alternatives, the token's rank in the vocabulary)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]], int]] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's field)


class LLM:
    """Generate offline with the built-in engine.

    Args:
        model: checkpoint folder, or "demo" for the tiny random demo model.
        device: "cpu" or "cuda".
        dtype: None takes the checkpoint's dtype (float16 becomes float32 on CPU).
        **engine_kwargs: fields of `EngineConfig` (block_size, num_kv_blocks,
            max_num_batched_tokens, max_prefill_tokens (None here: no limit, for throughput), max_num_seqs,
            max_model_len, enable_prefix_caching,
            skip_tokenizer_init: token-id prompts, outputs as token ids with empty text...).
    """

    def __init__(self, model: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None,
                 **engine_kwargs) -> None:
        self.engine = LLMEngine(resolve_model(model), device=device, dtype=dtype, config=EngineConfig(**engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run all prompts to completion; outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt
        sampling = sampling or SamplingParams()
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        if isinstance(self.tokenizer, NoTokenizer) and any(sp.stop for sp in params):
            raise ValueError("stop strings need the tokenizer (LLM(..., skip_tokenizer_init=True) has none)")
        if any(sp.n != 1 or sp.best_of is not None for sp in params):
            raise ValueError("n / best_of are served by the gateway; offline, repeat the prompt with one seed each")
        ids = [self._encode(p) for p in prompts]
        for p in ids:  # validate all before queueing any
            self.engine.validate_prompt(p)
        rids = [f"offline-{next(self._ids)}" for _ in ids]
        outs: dict[str, list[int]] = {rid: [] for rid in rids}
        lps: dict[str, list] = {rid: [] for rid in rids}
        plps: dict[str, list | None] = {rid: None for rid in rids}
        texts = {rid: TextStream(self.tokenizer, sp) for rid, sp in zip(rids, params)}
        done: dict[str, tuple[str | None, int]] = {}
        for rid, p, sp in zip(rids, ids, params):
            self.engine.add_request(rid, p, sp)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                rid = out.request_id
                if rid in done:
                    continue
                outs[rid].extend(out.new_token_ids)
                lps[rid].extend(out.logprobs or ())
                plps[rid] = plps[rid] or out.prompt_logprobs
                texts[rid].push(out.new_token_ids, out.finish_reason is not None, out.finish_reason)
                if out.finish_reason:
                    done[rid] = (out.finish_reason, out.num_cached_tokens)
                elif texts[rid].hit is not None:  # a stop string: the request ends here
                    seq = self.engine.sequence(rid)
                    done[rid] = ("stop", seq.num_cached_tokens if seq else 0)
                    self.engine.abort(rid)
        return [RequestOutput(rid, p, outs[rid], texts[rid].text, *done[rid],
                              lps[rid] if sp.logprobs is not None else None, plps[rid],
                              texts[rid].stop_reason(outs[rid], done[rid][0]))
                for rid, p, sp in zip(rids, ids, params)]

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

