"""Every field of vLLM's `CompletionRequest` and `ChatCompletionRequest` is honoured or refused with a
400 that names it, never silently ignored: the walk sends each field alone with a value other than
its default to a real gateway.

The field lists are vLLM 0.32's; with the vLLM environment (`.ci/vllm-env`, `$MICROSERVE_VLLM_PYTHON`)
the test also reads them from vLLM itself, so a field a new vLLM adds fails here until it is classified.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import aiohttp
import pytest
from deploy import start_launch

OK, REFUSED = "ok", "refused"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# field -> (extra body fields, expected); the extra fields set the field (and what it needs)
COMMON = {
    "add_special_tokens": ({"add_special_tokens": False}, OK),
    "allowed_token_ids": ({"allowed_token_ids": [40, 41, 42]}, OK),
    "bad_words": ({"bad_words": ["x"]}, REFUSED),
    "cache_salt": ({"cache_salt": "salt"}, REFUSED),
    "ec_transfer_params": ({"ec_transfer_params": {"a": 1}}, REFUSED),
    "echo": ({"echo": True}, OK),
    "frequency_penalty": ({"frequency_penalty": 0.5}, OK),
    "ignore_eos": ({"ignore_eos": True}, OK),
    "include_stop_str_in_output": ({"include_stop_str_in_output": True, "stop": ["e"]}, OK),
    "kv_transfer_params": ({"kv_transfer_params": {"a": 1}}, REFUSED),
    "length_penalty": ({"length_penalty": 2.0}, REFUSED),
    "logit_bias": ({"logit_bias": {"50": 5.0}}, OK),
    "logprob_token_ids": ({"logprob_token_ids": [1]}, REFUSED),
    "max_tokens": ({"max_tokens": 3}, OK),
    "min_p": ({"min_p": 0.1}, OK),
    "min_tokens": ({"min_tokens": 2}, OK),
    "mm_payload": ({"mm_payload": "none"}, OK),  # no multimodal input: nothing to send either way
    "model": ({"model": "demo"}, OK),
    "n": ({"n": 2}, OK),
    "presence_penalty": ({"presence_penalty": 0.5}, OK),
    "priority": ({"priority": 1}, OK),
    "prompt_logprobs": ({"prompt_logprobs": 1}, OK),
    "repetition_detection": ({"repetition_detection": {"max_pattern_size": 2}}, REFUSED),
    "repetition_penalty": ({"repetition_penalty": 1.1}, OK),
    "request_id": ({"request_id": "my-request-7"}, OK),
    "response_format": ({"response_format": {"type": "json_object"}, "max_tokens": 4}, OK),
    "return_mm_kwargs": ({"return_mm_kwargs": True}, REFUSED),
    "return_token_ids": ({"return_token_ids": True}, OK),
    "return_token_offsets": ({"return_token_offsets": True}, REFUSED),
    "return_tokens_as_token_ids": ({"return_tokens_as_token_ids": True, "logprobs": 1}, OK),
    "routed_experts_prompt_start": ({"routed_experts_prompt_start": 3}, REFUSED),
    "seed": ({"seed": 5}, OK),
    "session_id": ({"session_id": "s1"}, REFUSED),
    "skip_special_tokens": ({"skip_special_tokens": False}, REFUSED),
    "spaces_between_special_tokens": ({"spaces_between_special_tokens": False}, REFUSED),
    "stop": ({"stop": ["zz"]}, OK),
    "stop_token_ids": ({"stop_token_ids": [7]}, OK),
    "stream": ({"stream": True}, OK),
    "stream_interval": ({"stream_interval": 4}, REFUSED),
    "stream_options": ({"stream_options": {"include_usage": True}, "stream": True}, OK),
    "structured_outputs": ({"structured_outputs": {"regex": "[a-z]{2}"}}, OK),
    "temperature": ({"temperature": 0.5}, OK),
    "thinking_token_budget": ({"thinking_token_budget": 10}, REFUSED),
    "top_k": ({"top_k": 5}, OK),
    "top_p": ({"top_p": 0.9}, OK),
    "truncate_prompt_tokens": ({"truncate_prompt_tokens": 2}, OK),
    "truncation_side": ({"truncation_side": "right", "truncate_prompt_tokens": 2}, OK),
    "use_beam_search": ({"use_beam_search": True}, REFUSED),
    "user": ({"user": "someone"}, OK),
    "vllm_xargs": ({"vllm_xargs": {"a": 1}}, REFUSED),
    "watermarking": ({"watermarking": True}, REFUSED),
}
COMPLETION = COMMON | {
    "logprobs": ({"logprobs": 2}, OK),
    "prompt": ({"prompt": "other words"}, OK),
    "prompt_embeds": ({"prompt_embeds": "AAAA"}, REFUSED),
    "suffix": ({"suffix": "x"}, REFUSED),
}
CHAT = COMMON | {
    "add_special_tokens": ({"add_special_tokens": True}, REFUSED),  # chat's default is False
    "add_generation_prompt": ({"add_generation_prompt": False}, OK),
    "chat_template": ({"chat_template": "{{ messages }}"}, REFUSED),
    "chat_template_kwargs": ({"chat_template_kwargs": {"flag": True}}, OK),
    "continue_final_message": ({"continue_final_message": True, "add_generation_prompt": False,
                                "messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "Hel"}]}, OK),
    "documents": ({"documents": [{"title": "a", "text": "b"}]}, REFUSED),
    "include_reasoning": ({"include_reasoning": False}, OK),  # no reasoning parser: no reasoning to leave out
    "logprobs": ({"logprobs": True}, OK),
    "max_completion_tokens": ({"max_completion_tokens": 3}, OK),
    "media_io_kwargs": ({"media_io_kwargs": {"image": {}}}, REFUSED),
    "messages": ({"messages": [{"role": "user", "content": "other"}]}, OK),
    "mm_processor_kwargs": ({"mm_processor_kwargs": {"a": 1}}, REFUSED),
    "parallel_tool_calls": ({"parallel_tool_calls": False}, OK),  # only with tools, which are refused
    "reasoning_effort": ({"reasoning_effort": "low"}, REFUSED),
    "return_prompt_text": ({"return_prompt_text": True}, REFUSED),
    "tool_choice": ({"tool_choice": "required"}, REFUSED),
    "tools": ({"tools": [TOOL]}, REFUSED),
    "top_logprobs": ({"top_logprobs": 2, "logprobs": True}, OK),
    "return_tokens_as_token_ids": ({"return_tokens_as_token_ids": True, "logprobs": True}, OK),
}


def vllm_fields() -> dict[str, set[str]] | None:
    """Field names of vLLM's two request classes, from the vLLM environment when there is one."""
    python = os.environ.get("MICROSERVE_VLLM_PYTHON") or "/tmp/microserve-vllm-venv/bin/python"
    if not Path(python).exists():
        return None
    code = ("import json; from vllm.entrypoints.openai.completion.protocol import CompletionRequest as C; "
            "from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as H; "
            "print(json.dumps({'completion': sorted(C.model_fields), 'chat': sorted(H.model_fields)}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return {k: set(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def test_the_walk_covers_every_vllm_field():
    assert len(COMPLETION) == 55 and len(CHAT) == 68  # vLLM 0.32's CompletionRequest, ChatCompletionRequest
    live = vllm_fields()
    if live is not None:
        assert set(COMPLETION) == live["completion"], (set(COMPLETION) ^ live["completion"])
        assert set(CHAT) == live["chat"], (set(CHAT) ^ live["chat"])


@pytest.fixture(scope="module")
def dep(demo_path):
    d = start_launch("--strategy", "strategies/round_robin.py", "--model", str(demo_path), "--engines", "1",
                     "--served-model-name", "demo", "--log-level", "error")
    yield d
    d.stop()


async def _walk(dep, path: str, base: dict, table: dict) -> None:
    failures = []
    async with aiohttp.ClientSession() as s:
        for field, (extra, expected) in table.items():
            async with s.post(dep.url + path, json=base | extra) as r:
                text = await r.text()
            if expected == OK and r.status != 200:
                failures.append(f"{field}: expected 200, got {r.status} {text[:200]}")
            elif expected == REFUSED and (r.status != 400 or json.loads(text)["error"]["param"] != field):
                failures.append(f"{field}: expected a 400 naming it, got {r.status} {text[:200]}")
        async with s.post(dep.url + path, json=base | {"not_a_vllm_field": 1}) as r:
            if r.status != 200:  # fields outside vLLM's are ignored, as OpenAI servers do
                failures.append(f"an unknown field: expected 200, got {r.status} {(await r.text())[:200]}")
    assert not failures, "\n".join(failures)


async def test_every_completion_field_is_honoured_or_refused(dep):
    await _walk(dep, "/v1/completions", {"model": "demo", "prompt": "Hello there", "max_tokens": 3}, COMPLETION)


async def test_every_chat_field_is_honoured_or_refused(dep):
    await _walk(dep, "/v1/chat/completions",
                {"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}, CHAT)


async def test_honoured_vllm_extras_take_effect(dep):
    async with aiohttp.ClientSession() as s:
        body = {"model": "demo", "prompt": "Hello there", "max_tokens": 4, "temperature": 0}
        async with s.post(dep.url + "/v1/completions", json=body | {
                "request_id": "mine-1", "return_token_ids": True, "allowed_token_ids": [40, 41],
                "return_tokens_as_token_ids": True, "logprobs": 1}) as r:
            out = await r.json()
        choice = out["choices"][0]
        assert out["id"] == "mine-1" and set(choice["token_ids"]) <= {40, 41} and len(choice["token_ids"]) == 4
        assert all(t.startswith("token_id:") for t in choice["logprobs"]["tokens"])
        async with s.post(dep.url + "/v1/completions", json=body | {"return_token_ids": True,
                                                                    "truncate_prompt_tokens": 3}) as r:
            assert len((await r.json())["choices"][0]["prompt_token_ids"]) == 3
        chat = {"model": "demo", "max_tokens": 3, "temperature": 0, "echo": True, "add_generation_prompt": False,
                "continue_final_message": True,
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}]}
        async with s.post(dep.url + "/v1/chat/completions", json=chat) as r:
            assert (await r.json())["choices"][0]["message"]["content"].startswith("Well,")
