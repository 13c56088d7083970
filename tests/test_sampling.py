"""Engine-side sampling against transformers: logprobs, penalties, logit_bias, min_tokens, min_p;
then the same fields through a real PD deployment and the official `openai` client (n, best_of,
echo, logprobs in both OpenAI formats, streamed and not)."""

from __future__ import annotations

import math
import random

import msgspec
import openai
import pytest
import torch
from checkpoints import make_checkpoint
from deploy import start_launch

from microserve import LLM, SamplingParams

PROMPT = [random.Random(3).randrange(2, 300) for _ in range(40)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("sampling"), "llama")


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(str(ckpt[0]))


def hf_loop(model, prompt: list[int], steps: int, process=None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy with transformers' logits, after `process(input_ids, logits)`; returns tokens and raw logits."""
    ids, raw = list(prompt), []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            raw.append(logits.clone())
            if process is not None:
                logits = process(torch.tensor([ids]), logits.unsqueeze(0))[0]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], raw


def test_logprobs_match_transformers_log_softmax(llm, ckpt):
    _, hf = ckpt
    out = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5))[0]
    tokens, raw = hf_loop(hf, PROMPT, 6)
    assert out.token_ids == tokens
    for (lp, top), token, logits in zip(out.logprobs, tokens, raw):
        ref = logits.log_softmax(-1)
        assert abs(lp - float(ref[token])) < 1e-4
        want = ref.topk(5)
        assert [t for t, _ in top] == want.indices.tolist()
        assert max(abs(a - b) for (_, a), b in zip(top, want.values.tolist())) < 1e-4
    # logprobs=0: the sampled token's own logprob and no alternatives
    zero = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=0))[0]
    assert [top for _, top in zero.logprobs] == [[], []]
    assert llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0))[0].logprobs is None


def test_prompt_logprobs_match_transformers_in_chunks_and_bypass_the_cache(ckpt):
    path, hf = ckpt
    llm = LLM(str(path), max_num_batched_tokens=16)  # the 40-token prompt is prefilled in 3 chunks
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([PROMPT])).logits[0].float().log_softmax(-1)
    for _ in range(2):  # the second run would hit the prefix cache: prompt logprobs must bypass it
        out = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2))[0]
        assert len(out.prompt_logprobs) == len(PROMPT) - 1
        for j, (lp, top, rank) in enumerate(out.prompt_logprobs):
            assert abs(lp - float(ref[j, PROMPT[j + 1]])) < 1e-4
            assert [t for t, _ in top] == ref[j].topk(2).indices.tolist()
            assert rank == int((ref[j] > ref[j, PROMPT[j + 1]]).sum()) + 1  # NOTE: also beyond the top 2
        assert max(r for _, _, r in out.prompt_logprobs) > 2
    assert llm.generate([PROMPT], SamplingParams(max_tokens=2))[0].prompt_logprobs is None


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_as_transformers(llm, ckpt, penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    _, hf = ckpt
    out = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                repetition_penalty=penalty))[0]
    want, _ = hf_loop(hf, PROMPT, 12, RepetitionPenaltyLogitsProcessor(penalty))
    assert out.token_ids == want


def test_presence_frequency_penalties_and_logit_bias_as_openai_defines_them(llm, ckpt):
    _, hf = ckpt
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=1.5,
                        frequency_penalty=0.8, logit_bias={7: 3.0, 11: -100.0})
    out = llm.generate([PROMPT], sp)[0]

    def openai_penalties(ids, logits):
        out_ids = ids[0, len(PROMPT):]
        counts = torch.bincount(out_ids, minlength=logits.shape[-1]).float()
        logits = logits.clone()
        logits[0, 7] += 3.0
        logits[0, 11] -= 100.0
        return logits - 0.8 * counts - 1.5 * (counts > 0).float()

    want, _ = hf_loop(hf, PROMPT, 12, openai_penalties)
    assert out.token_ids == want
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert plain.token_ids != out.token_ids  # the penalties changed something
    forced = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0, logit_bias={9: 100.0}))[0]
    assert forced.token_ids == [9, 9, 9, 9]


def test_min_tokens_bans_stop_tokens_until_reached(llm):
    first = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0))[0].token_ids[0]
    stopped = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first]))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first],
                                                 min_tokens=3))[0]
    assert first not in held.token_ids[:3] and len(held.token_ids) >= 3


def test_min_p_keeps_only_tokens_near_the_most_likely(llm):
    outs = llm.generate([PROMPT] * 4, [SamplingParams(max_tokens=16, temperature=1.0, seed=s, min_p=0.3,
                                                      ignore_eos=True, logprobs=1) for s in range(4)])
    for out in outs:
        for lp, top in out.logprobs:  # temperature 1: the raw logprobs are the sampling distribution
            assert math.exp(lp) >= 0.3 * math.exp(top[0][1]) - 1e-6


@pytest.mark.parametrize("k", [1, 7, 19])
def test_a_resumed_request_samples_exactly_as_if_it_had_not_moved(llm, k):
    """A failover or a migration continues a request as prompt + its first k tokens with
    `sampling.after(first k)`: with a seed and penalties, the rest equals the unmoved run."""
    prompt = [random.Random(k).randrange(5, 200) for _ in range(12)]
    sp = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, presence_penalty=0.7,
                        frequency_penalty=0.4, ignore_eos=True)
    whole = llm.generate([prompt], sp)[0].token_ids
    rest = llm.generate([prompt + whole[:k]], sp.after(whole[:k]))[0].token_ids
    assert rest == whole[k:]
    fresh = llm.generate([prompt + whole[:k]], msgspec.structs.replace(sp.after(whole[:k]), resumed=0))[0]
    assert fresh.token_ids != whole[k:]  # without `resumed` it would not be (the test can fail)


def test_bulk_skip_of_the_seeded_generator_equals_single_draws():
    for vocab, n in ((261, 5), (32000, 3), (151936, 70)):
        single = torch.Generator().manual_seed(9)
        for _ in range(n):
            torch.empty(vocab).exponential_(generator=single)
        bulk = torch.Generator().manual_seed(9)
        for start in range(0, n, 64):
            torch.empty(min(64, n - start), vocab).exponential_(generator=bulk)
        assert torch.equal(torch.empty(vocab).exponential_(generator=single),
                           torch.empty(vocab).exponential_(generator=bulk))


def test_offline_refuses_n_and_bad_values(llm):
    with pytest.raises(ValueError, match="n / best_of"):
        llm.generate([PROMPT], SamplingParams(n=2))
    for bad in ({"logprobs": 21}, {"min_p": 1.5}, {"presence_penalty": 3.0}, {"repetition_penalty": 0.0},
                {"min_tokens": 9, "max_tokens": 4}, {"logit_bias": {-1: 1.0}}, {"best_of": 1, "n": 2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


# -- through a deployment (PD: the numbers come from the decode engine after a KV transfer) ------------------
@pytest.fixture(scope="module")
def pd(demo_path):
    dep = start_launch("--strategy", "strategies/pd.py", "--model", str(demo_path), "--served-model-name", "demo",
                       "--log-level", "error")
    yield dep
    dep.stop()


@pytest.fixture(scope="module")
def demo_llm(demo_path):
    return LLM(str(demo_path))


async def test_logprobs_through_pd_equal_one_engine(pd, demo_llm):
    client = openai.AsyncOpenAI(base_url=pd.base_url, api_key="x", max_retries=0)
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = demo_llm.tokenizer.encode(prompt)
    ref = demo_llm.generate([ids], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3))[0]
    out = await client.completions.create(model="demo", prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                          extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert max(abs(a - b) for a, (b, _) in zip(lp.token_logprobs, ref.logprobs)) < 1e-5
    # NOTE: OpenAI's top_logprobs is a dict by token text: ids that decode alike (partial bytes) collapse
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs) and len(lp.top_logprobs) == 6 and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == out.choices[0].text
    streamed = []
    async for event in await client.completions.create(model="demo", prompt=prompt, max_tokens=6, temperature=0,
                                                       logprobs=3, stream=True, extra_body={"ignore_eos": True}):
        if event.choices and event.choices[0].logprobs:
            streamed += event.choices[0].logprobs.token_logprobs
    assert streamed == lp.token_logprobs
    chat = await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


async def test_echo_with_logprobs_and_prompt_logprobs_through_pd(pd, demo_llm):
    client = openai.AsyncOpenAI(base_url=pd.base_url, api_key="x", max_retries=0)
    prompt = "Prompt logprobs, please"
    ids = demo_llm.tokenizer.encode(prompt)
    ref = demo_llm.generate([ids], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=1,
                                                  prompt_logprobs=1))[0]
    out = await client.completions.create(model="demo", prompt=prompt, max_tokens=3, temperature=0, logprobs=1,
                                          echo=True, extra_body={"ignore_eos": True, "prompt_logprobs": 1})
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None
    want = [p[0] for p in ref.prompt_logprobs] + [a for a, _ in ref.logprobs]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-5
    vllm_style = choice.model_extra["prompt_logprobs"]
    assert vllm_style[0] is None and len(vllm_style) == len(ids)
    assert abs(vllm_style[1][str(ids[1])]["logprob"] - ref.prompt_logprobs[0][0]) < 1e-5
    # each prompt token's rank in the whole vocabulary, as vLLM gives it, also outside the top 1
    ranks = [vllm_style[j][str(ids[j])]["rank"] for j in range(1, len(ids))]
    assert ranks == [p[2] for p in ref.prompt_logprobs] and max(ranks) > 1
    for (logprob, top, rank) in ref.prompt_logprobs:
        assert (rank == 1) == (abs(logprob - top[0][1]) < 1e-6) and rank >= 1


async def test_n_choices_are_the_seeded_single_requests(pd):
    client = openai.AsyncOpenAI(base_url=pd.base_url, api_key="x", max_retries=0)
    kw = dict(model="demo", prompt="Once upon a time", max_tokens=8, temperature=1.0)
    many = await client.completions.create(n=4, seed=100, **kw)
    singles = [(await client.completions.create(seed=100 + j, **kw)).choices[0].text for j in range(4)]
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text for c in many.choices] == singles and len(set(singles)) > 1
    assert many.usage.prompt_tokens == (await client.completions.create(seed=1, **kw)).usage.prompt_tokens
    chat = await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], n=3,
                                                max_tokens=5, temperature=1.0, seed=7)
    assert [c.index for c in chat.choices] == [0, 1, 2]


async def test_n_choices_share_one_prefill_on_any_strategy(demo_path):
    """Round robin over two engines: the 4 choices of one prompt still prefill it once (the others
    follow the first to its engine and hit its prefix cache)."""
    from microserve.router import EngineHandle

    dep = start_launch("--strategy", "strategies/round_robin.py", "--model", str(demo_path), "--engines", "2",
                       "--served-model-name", "demo", "--log-level", "error")
    try:
        async def computed() -> int:
            total = 0
            for name, address in dep.engines.items():
                async with EngineHandle(address, name=name, timeout=10) as h:
                    total += (await h.stats()).computed_tokens_total
            return total

        client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
        prompt = "A long shared prompt for four choices. " * 8  # ~320 tokens with the byte-level tokenizer
        before = await computed()
        out = await client.completions.create(model="demo", prompt=prompt, n=4, max_tokens=4, temperature=1.0,
                                              seed=9, extra_body={"ignore_eos": True})
        used = await computed() - before
        n_prompt = out.usage.prompt_tokens
        assert len(out.choices) == 4 and n_prompt > 300
        # one prefill, 3 x at most a partial block re-run, 4 x 4 decode steps (4 prefills would be > 1200)
        assert used <= n_prompt + 3 * 16 + 4 * 4, (used, n_prompt)
    finally:
        assert dep.stop() == 0


async def test_best_of_returns_the_most_likely_choice_and_echo(pd):
    client = openai.AsyncOpenAI(base_url=pd.base_url, api_key="x", max_retries=0)
    kw = dict(model="demo", prompt="In the beginning", max_tokens=6, temperature=1.0, logprobs=0)
    cands = [(await client.completions.create(seed=40 + j, **kw)).choices[0] for j in range(3)]
    best = max(cands, key=lambda c: sum(c.logprobs.token_logprobs))
    out = await client.completions.create(best_of=3, n=1, seed=40, **kw)
    assert out.choices[0].text == best.text
    echoed = await client.completions.create(model="demo", prompt="Echo me", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Echo me")


# -- structured outputs (llguidance) --------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"enum": ["x", "yes"]}},
          "required": ["a", "b"], "additionalProperties": False}


def check_schema(text: str) -> None:
    import json

    obj = json.loads(text)
    assert set(obj) == {"a", "b"} and isinstance(obj["a"], int) and 0 <= obj["a"] <= 99 and obj["b"] in ("x", "yes")


def test_structured_outputs_offline_and_unconstrained_neighbours_unchanged(llm):
    import json
    import re

    from microserve.sampling_params import StructuredOutput

    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = llm.generate([PROMPT], greedy)[0].token_ids
    cases = [StructuredOutput("regex", "[0-9]{3}-[a-c]{2}"), StructuredOutput("choice", json.dumps(["alpha", "beta"])),
             StructuredOutput("json", json.dumps(SCHEMA), compact=True), StructuredOutput("json_object", compact=True)]
    outs = llm.generate([PROMPT] * 5, [SamplingParams(max_tokens=60, temperature=t, seed=1, structured=c)
                                       for c, t in zip(cases, (0.0, 0.0, 1.0, 0.0))] + [greedy])
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", outs[0].text) and outs[0].finish_reason == "stop"
    assert outs[1].text in ("alpha", "beta")
    check_schema(outs[2].text)
    assert isinstance(json.loads(outs[3].text), dict) or outs[3].finish_reason == "length"
    assert outs[4].token_ids == alone  # a constrained batch does not change an unconstrained neighbour
    with pytest.raises(ValueError, match="structured output"):
        llm.generate([PROMPT], SamplingParams(structured=StructuredOutput("regex", "[0-9")))
    # a failover: the next engine's grammar has read what the first one generated
    done = llm.tokenizer.encode("12", add_special_tokens=False)
    rest = llm.generate([PROMPT + done], SamplingParams(max_tokens=20, temperature=0.0, structured=StructuredOutput(
        "regex", "[0-9]{3}-[a-c]{2}", done=done)))[0]
    assert re.fullmatch("[0-9]-[a-c]{2}", rest.text), rest.text


async def test_structured_outputs_through_pd_with_vllms_field_names(pd):
    import json
    import re

    client = openai.AsyncOpenAI(base_url=pd.base_url, api_key="x", max_retries=0)
    chat = await client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "give me json"}], max_tokens=60, temperature=0.8, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}},
        extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    check_schema(chat.choices[0].message.content)
    comp = await client.completions.create(model="demo", prompt="json:", max_tokens=60, temperature=0.8, seed=4,
                                           extra_body={"response_format": {"type": "json_schema",
                                                                           "json_schema": {"schema": SCHEMA}},
                                                       "structured_outputs": {"disable_any_whitespace": True}})
    check_schema(comp.choices[0].text)
    regex = await client.completions.create(model="demo", prompt="code:", max_tokens=20, temperature=1.0,
                                            extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{2}"}})
    assert re.fullmatch("[A-Z]{2}[0-9]{2}", regex.choices[0].text)
    choice = await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "?"}],
                                                  max_tokens=10, extra_body={"guided_choice": ["left", "right"]})
    assert choice.choices[0].message.content in ("left", "right")
    many = await client.completions.create(model="demo", prompt="n:", max_tokens=20, n=3, temperature=1.0, seed=5,
                                           extra_body={"structured_outputs": {"choice": ["a1", "b2", "c3"]}})
    assert all(c.text in ("a1", "b2", "c3") for c in many.choices)
    for bad, param in (({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs"),
                       ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
                        "response_format"),
                       ({"response_format": {"type": "yaml"}}, "response_format"),
                       ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
                       ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs")):
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model="demo", prompt="x", max_tokens=5, extra_body=bad)
        assert info.value.body["param"] == param, (bad, info.value.body)
    assert json.loads(chat.choices[0].message.content)
