"""Tool calling through the gateway with a Hermes / Qwen-style chat template (the demo checkpoint with
a template that renders `tools`), called with the official `openai` client."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
from deploy import start_launch

from microserve.gateway.tools import ToolStream, parse

TEMPLATE = (
    "{% if tools %}<|system|>\nYou may call these tools:\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "</tools>\nAnswer with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.</s>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}"
    "<tool_call>\n{{ c['function'] | tojson }}\n</tool_call>\n{% endfor %}{% else %}{{ m['content'] }}{% endif %}"
    "</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["paris", "rome"]}}, "required": ["city"],
                   "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Rome?"}]


def test_hermes_parser():
    content, calls = parse('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "rome"}}\n'
                           '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call>')
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "rome"} and calls[0]["id"].startswith("call_")
    assert parse("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    assert parse("no calls") == ("no calls", [])


@pytest.fixture(scope="module")
def dep(demo_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(demo_path, path)
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_file.write_text(json.dumps(cfg))
    d = start_launch("--strategy", "strategies/round_robin.py", "--model", str(path), "--engines", "1",
                     "--served-model-name", "demo", "--log-level", "error")
    yield d
    d.stop()


async def test_named_and_required_tool_choices_return_valid_calls(dep):
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
    named = await client.chat.completions.create(
        model="demo", messages=ASK, tools=[WEATHER, TIME], max_tokens=40, temperature=0.7, seed=1,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("paris", "rome")
    required = await client.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER, TIME],
                                                    tool_choice="required", max_tokens=300, temperature=0.7, seed=2)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        args = json.loads(call.function.arguments)
        assert (call.function.name, set(args)) in (("get_weather", {"city"}), ("get_time", {"zone"}))


async def test_auto_parses_a_hermes_call_and_a_conversation_goes_on(dep):
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
    forced = '<tool_call>\\n\\{"name": "get_weather", "arguments": \\{"city": "rome"\\}\\}\\n</tool_call>'
    out = await client.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER], max_tokens=150,
                                               extra_body={"structured_outputs": {"regex": forced}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "rome"}
    # the call and its result go back to the model: the template renders both
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24C"}]
    again = await client.chat.completions.create(model="demo", messages=follow, tools=[WEATHER], max_tokens=5)
    assert again.choices[0].message.content is not None
    plain = await client.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER], max_tokens=5,
                                                 tool_choice="none")
    assert plain.choices[0].message.tool_calls is None


async def test_tool_refusals(dep):
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
    cases = [({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
             ({"tools": [{"type": "retrieval"}]}, "tools"),
             ({"tool_choice": "required"}, "tool_choice")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="demo", messages=ASK, max_tokens=4, **extra)
        assert info.value.body["param"] == param, (extra, info.value.body)


def _reassemble(pieces: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    """(content, [(name, arguments)]) from streamed deltas, as a client reassembles them."""
    content, calls = "", {}
    for delta in pieces:
        content += delta.get("content") or ""
        for tc in delta.get("tool_calls") or []:
            call = calls.setdefault(tc["index"], ["", ""])
            call[0] += (tc.get("function") or {}).get("name") or ""
            call[1] += (tc.get("function") or {}).get("arguments") or ""
    return content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_streamed_calls_reassemble_to_the_parsed_ones_whatever_the_pieces(size):
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "rome"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call>')
    for sample, want_reason in ((text, "tool_calls"), ("no calls <tool but text", "stop"),
                                ("<tool_call>{not json}</tool_call>", "stop"), ("half <tool_call>{\"na", "length")):
        stream, deltas, reason = ToolStream("auto", None), [], None
        pieces = [sample[i:i + size] for i in range(0, len(sample), size)]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            delta, reason = stream.push(piece, ("length" if "half" in sample else "stop") if last else None)
            deltas.append(delta)
        content, calls = parse(sample)
        got_content, got_calls = _reassemble(deltas)
        assert got_calls == [(c["function"]["name"], c["function"]["arguments"]) for c in calls], sample
        assert got_content == (content or ""), (sample, got_content)
        assert reason == want_reason


async def test_streamed_tool_calls_equal_the_non_streamed_ones(dep):
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
    forced = '<tool_call>\\n\\{"name": "get_weather", "arguments": \\{"city": "rome"\\}\\}\\n</tool_call>'
    for kw in (dict(extra_body={"structured_outputs": {"regex": forced}}, max_tokens=150),
               dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40,
                    temperature=0.7, seed=1),
               dict(tool_choice="required", max_tokens=300, temperature=0.7, seed=2)):
        whole = await client.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER, TIME], **kw)
        stream = await client.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER, TIME], stream=True,
                                                      **kw)
        chunks = [c async for c in stream]
        deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
        _, calls = _reassemble(deltas)
        want = whole.choices[0].message.tool_calls
        assert want and calls == [(c.function.name, c.function.arguments) for c in want], kw
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
