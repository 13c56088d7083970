"""Tool calling (OpenAI's `tools` / `tool_choice`) for checkpoints whose chat template renders tools,
in the Hermes / Qwen convention (vLLM's `hermes` parser):

    tools ─> the chat template's `tools` variable ─> the model writes, after any text,
        <tool_call>
        {"name": "get_weather", "arguments": {"city": "Paris"}}
        </tool_call>
    ─ parse ─> message.tool_calls = [{id, type: "function", function: {name, arguments: JSON text}}],
               finish_reason "tool_calls"; the text before the first tag is the content

`tool_choice`: "none" (tools shown, nothing parsed), "auto" (parsed), a named function (the output is
that function's arguments, constrained by its JSON schema: a structured output), "required" (one or
more calls, constrained by a grammar whose JSON parts are the tools' schemas). A template without
tools, or tool calls in a stream, are refused with a 400 that says so.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from microserve.router.runtime import RouterError
from microserve.sampling_params import StructuredOutput
from microserve.serving.api import ErrorCode

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _bad(message: str, param: str = "tools") -> RouterError:
    return RouterError(ErrorCode.BAD_REQUEST, message, param=param)


def _functions(tools: list[Any]) -> dict[str, dict]:
    out = {}
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad("each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}")
        out[fn["name"]] = fn.get("parameters") or {"type": "object"}
    return out


def plan(tools: list[Any] | None, tool_choice: Any, template: str | None, stream: bool) -> tuple[str, Any]:
    """What to do with a chat request's tools: ("", None) without tools or with tool_choice "none";
    ("auto", None); ("named", name); ("required", None). Refusals are 400s naming the field."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise _bad("tool_choice needs tools", param="tool_choice")
        return "", None
    if not template or "tools" not in template:
        raise _bad("the served chat template does not render tools, so this model cannot call them")
    functions = _functions(tools)
    if tool_choice in (None, "auto"):
        mode, name = "auto", None
    elif tool_choice == "none":
        return "", None
    elif tool_choice == "required":
        mode, name = "required", None
    elif isinstance(tool_choice, dict) and isinstance((tool_choice.get("function") or {}).get("name"), str):
        mode, name = "named", tool_choice["function"]["name"]
        if name not in functions:
            raise _bad(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    else:
        raise _bad("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                   "{\"name\": ...}}", param="tool_choice")
    if stream:
        raise _bad("tool calls cannot be streamed yet; send stream=false (or tool_choice=none)", param="stream")
    return mode, name


def constraint(mode: str, name: str | None, tools: list[Any]) -> StructuredOutput | None:
    """The grammar a named or required tool choice puts on the output (None for auto)."""
    functions = _functions(tools)
    if mode == "named":
        return StructuredOutput("json", json.dumps(functions[name]))
    if mode == "required":
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": schema},
                           "required": ["name", "arguments"], "additionalProperties": False}
                          for n, schema in functions.items()],
                "x-guidance": {"whitespace_flexible": False}}  # NOTE: compact: a call cannot pad itself forever
        lark = f'start: call+\ncall: "<tool_call>\\n" %json {json.dumps(call)} "\\n</tool_call>\\n"\n'
        return StructuredOutput("grammar", lark, compact=True)
    return None


def _call(name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def parse(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a Hermes-style output; a call that is not valid JSON stays in the content."""
    calls = []
    for body in _CALL.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, []
        calls.append(_call(obj["name"], obj.get("arguments", {})))
    if not calls:
        return text, []
    content = text[:text.find("<tool_call>")].strip()
    return content or None, calls


def message(mode: str, name: str | None, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
    """The assistant message (and finish reason) of a finished choice under tool mode `mode`."""
    if mode == "named":
        return {"role": "assistant", "content": None, "tool_calls": [_call(name or "", text)]}, reason
    content, calls = parse(text)
    if not calls:
        return {"role": "assistant", "content": text}, reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
