"""Greedy token parity with transformers (float32) for every supported architecture."""

import pytest
from checkpoints import VARIANTS, hf_greedy, make_checkpoint

from microserve import LLM, SamplingParams

PROMPT_LENGTHS = (1, 5, 16, 17, 40, 100)
NEW_TOKENS = 40


def _prompt(n: int, salt: int) -> list[int]:
    return [(7 * i + 13 * salt) % 300 + 5 for i in range(n)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_transformers(tmp_path, variant):
    path, hf = make_checkpoint(tmp_path, variant)
    prompts = [_prompt(n, i) for i, n in enumerate(PROMPT_LENGTHS)]
    llm = LLM(path, max_num_batched_tokens=64)  # small budget: batching + chunked prefill mixed in
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"{variant}, prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length"
