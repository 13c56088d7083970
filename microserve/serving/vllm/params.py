"""Our sampling as vLLM's and vLLM's outputs as ours (the vLLM backend's translations).

    SamplingParams ─ to_vllm ─> vllm.SamplingParams (penalties, logit_bias, min_tokens, min_p, logprobs,
                                structured outputs as StructuredOutputsParams; one choice, delta outputs)
    RequestOutput.outputs[0].logprobs ─ logprobs_of ─> [(sampled token's logprob, top alternatives)]
"""

from __future__ import annotations

import json

from microserve.sampling_params import SamplingParams
from microserve.serving.api import EngineError, ErrorCode


def to_vllm(sampling: SamplingParams, extra: dict | None = None):
    """vLLM's SamplingParams for one of our requests (`extra`: our KV connector's transfer params)."""
    from vllm import SamplingParams as VSP
    from vllm.sampling_params import RequestOutputKind

    if sampling.priority:
        raise EngineError(ErrorCode.BAD_REQUEST, "the vLLM backend schedules first come, first served: "
                          "priority is served by the built-in engine")
    # NOTE: `sampling.resumed` (a moved or failed-over request) has no vLLM equivalent: vLLM's sampler cannot
    # skip seeded draws nor count prompt tokens as output, so seeded output and penalties restart here
    # (greedy output stays exact; docs/elastic.md, "Not built")
    return VSP(n=1, max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
               top_k=sampling.top_k if sampling.top_k > 0 else 0, seed=sampling.seed,
               stop_token_ids=list(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos,
               presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
               repetition_penalty=sampling.repetition_penalty, logit_bias=dict(sampling.logit_bias) or None,
               min_tokens=sampling.min_tokens, min_p=sampling.min_p, logprobs=sampling.logprobs,
               prompt_logprobs=sampling.prompt_logprobs,
               structured_outputs=_structured(sampling),
               output_kind=RequestOutputKind.DELTA, detokenize=False,
               extra_args={"kv_transfer_params": {"microserve": extra}} if extra else None)


def logprobs_of(out, tokens: list[int], k: int | None) -> list | None:
    """vLLM's per-token {token id: Logprob(logprob, rank, ...)} (the top `k` and the sampled token) as
    ours: (the sampled token's logprob, [(token id, logprob)] of ranks 1..k)."""
    per_token = out.outputs[0].logprobs if out.outputs and k is not None else None
    if not per_token:
        return None
    return [(entry[token].logprob, sorted(((t, lp.logprob) for t, lp in entry.items() if lp.rank <= k),
                                          key=lambda item: -item[1]))
            for token, entry in zip(tokens, per_token)]


def _structured(sampling: SamplingParams):
    """Our StructuredOutput as vLLM's StructuredOutputsParams (None without one)."""
    spec = sampling.structured
    if spec is None:
        return None
    if spec.done:
        raise EngineError(ErrorCode.BAD_REQUEST, "the vLLM backend cannot continue a structured output another "
                          "engine started (a failover)")
    from vllm.sampling_params import StructuredOutputsParams

    value = {"json": lambda: json.loads(spec.spec), "json_object": lambda: True, "regex": lambda: spec.spec,
             "choice": lambda: json.loads(spec.spec), "grammar": lambda: spec.spec}[spec.kind]()
    return StructuredOutputsParams(**{spec.kind: value}, disable_any_whitespace=spec.compact)


def prompt_logprobs_of(out, k: int | None) -> list | None:
    """vLLM's prompt_logprobs (None, then {token id: Logprob} per prompt token) as ours, for tokens 1..:
    (the token's logprob, [(token id, logprob)] of ranks 1..k, the token's rank)."""
    entries = getattr(out, "prompt_logprobs", None)
    if k is None or not entries:
        return None
    prompt = out.prompt_token_ids or []
    return [(entry[token].logprob, sorted(((t, lp.logprob) for t, lp in entry.items() if lp.rank <= k),
                                          key=lambda item: -item[1]), entry[token].rank)
            for token, entry in zip(prompt[1:], entries[1:])]
