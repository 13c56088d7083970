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
tools is refused with a 400 that says so.

Streamed (`ToolStream`, as vLLM streams them): text before the first `<tool_call>` goes out as
content (a piece that may start the tag waits); each call goes out as one `tool_calls` delta (index,
id, name, whole arguments) once its closing tag arrives; the last event's finish reason is
"tool_calls" when a call went out. A named choice streams its arguments as they come, after a first
delta with the call's id and name. Reassembled, the calls equal the non-streamed response's.
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


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


class ToolStream:
    """One streamed choice's deltas under tool mode `mode` (see the module docstring)."""

    def __init__(self, mode: str, name: str | None) -> None:
        self.mode, self.name = mode, name
        self.buffer, self.calls, self.in_call, self.started = "", 0, False, False
        self.gap = ""  # whitespace before the first tag: content again if that tag is not a call

    def push(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The delta for this piece of text, and the finish reason to show with it."""
        if self.mode == "named":
            delta: dict[str, Any] = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
            if not self.started:
                self.started = True
                call = _call(self.name or "", text)
                delta["tool_calls"][0] |= {"id": call["id"], "type": "function", "function": call["function"]}
            return delta, reason
        self.buffer += text
        content, calls = "", []
        while self.buffer:
            if not self.in_call:
                at = self.buffer.find(_OPEN)
                if at < 0:
                    cut = len(self.buffer) - (_partial_tag(self.buffer) if reason is None else 0)  # may begin a tag
                    while reason is None and cut and self.buffer[cut - 1].isspace():
                        cut -= 1  # NOTE: whitespace right before a call is not content (the parse strips it)
                    if not self.calls:  # NOTE: text after the calls is not content either
                        content += self.buffer[:cut]
                    self.buffer = self.buffer[cut:]
                    break
                if not self.calls:
                    before = self.buffer[:at]
                    content, self.gap = content + before.rstrip(), before[len(before.rstrip()):]
                self.buffer, self.in_call = self.buffer[at + len(_OPEN):], True
            end = self.buffer.find(_CLOSE)
            if end < 0:
                break
            body, self.buffer, self.in_call = self.buffer[:end], self.buffer[end + len(_CLOSE):], False
            try:
                obj = json.loads(body.strip())
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                call = _call(obj["name"], obj.get("arguments", {}))
                calls.append({"index": self.calls} | call)
                self.calls += 1
            elif not self.calls:  # NOTE: not a call after all: the text goes out as content
                content += f"{self.gap}{_OPEN}{body}{_CLOSE}"
        if reason is not None and self.in_call and not self.calls:
            content += self.gap + _OPEN + self.buffer  # NOTE: a tag never closed is content, as parse keeps it
        delta = ({"content": content} if content else {}) | ({"tool_calls": calls} if calls else {})
        return delta, ("tool_calls" if reason is not None and self.calls else reason)


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` could begin `<tool_call>`."""
    for n in range(min(len(text), len(_OPEN) - 1), 0, -1):
        if _OPEN.startswith(text[-n:]):
            return n
    return 0
