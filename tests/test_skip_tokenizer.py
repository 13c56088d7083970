"""Serving without a tokenizer (vLLM's `skip_tokenizer_init`): a checkpoint with no tokenizer files at
all, token-id prompts in, token ids out, offline and through `launch` with the official client."""

from __future__ import annotations

import shutil

import openai
import pytest
from deploy import start_launch

from microserve import LLM, SamplingParams

IDS = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 32, 84, 104, 101]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def bare(demo_path, tmp_path_factory):
    """The demo checkpoint without any tokenizer file."""
    path = tmp_path_factory.mktemp("bare") / "model"
    shutil.copytree(demo_path, path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    return path


@pytest.fixture(scope="module")
def reference(demo_path):
    return LLM(str(demo_path)).generate([IDS], GREEDY)[0].token_ids


def test_offline_without_a_tokenizer(bare, reference):
    llm = LLM(str(bare), skip_tokenizer_init=True)
    out = llm.generate([IDS], GREEDY)[0]
    assert out.token_ids == reference and out.text == ""
    with pytest.raises(ValueError, match="without a tokenizer"):
        llm.generate(["text needs a tokenizer"], GREEDY)
    with pytest.raises(ValueError, match="stop strings"):
        llm.generate([IDS], SamplingParams(max_tokens=4, stop=["x"]))


async def test_launch_serves_token_ids_without_a_tokenizer(bare, reference):
    dep = start_launch("--strategy", "strategies/pd.py", "--model", str(bare), "--skip-tokenizer-init",
                       "--served-model-name", "bare", "--log-level", "error")
    try:
        client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
        out = await client.completions.create(model="bare", prompt=IDS, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True})
        choice = out.choices[0]
        assert choice.model_extra["token_ids"] == reference and choice.text == ""
        assert choice.model_extra["prompt_token_ids"] == IDS
        streamed = []
        async for event in await client.completions.create(model="bare", prompt=IDS, max_tokens=6, temperature=0,
                                                           stream=True, extra_body={"ignore_eos": True}):
            if event.choices:
                streamed += event.choices[0].model_extra.get("token_ids") or []
        assert streamed == reference
        for call, param in ((client.completions.create(model="bare", prompt="text", max_tokens=2), "prompt"),
                            (client.completions.create(model="bare", prompt=IDS, max_tokens=2, stop=["x"]), "stop"),
                            (client.chat.completions.create(model="bare", messages=[{"role": "user", "content": "hi"}],
                                                            max_tokens=2), "messages")):
            with pytest.raises(openai.BadRequestError) as info:
                await call
            assert info.value.body["param"] == param
    finally:
        assert dep.stop() == 0
