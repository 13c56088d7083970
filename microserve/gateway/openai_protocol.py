"""OpenAI request bodies (msgspec, validated) and the response/error JSON we send back.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send `user`,
`metadata`, ...). Fields we cannot honour (`prompt_logprobs`, `echo` with `logprobs`, tools,
structured outputs...) are refused with a 400 naming the field, never silently ignored.
Extensions, as in vLLM: `top_k`, `min_p`, `min_tokens`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids`, `include_stop_str_in_output`.

One cohesive unit, over 300 lines on purpose: it is the API's schema, one struct per body with the
checks of its fields, read side by side with OpenAI's and vLLM's references.
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec

from microserve.engine.model.structured import check as check_grammar
from microserve.router.runtime import RouterError
from microserve.sampling_params import SamplingParams, StructuredOutput
from microserve.serving.api import ErrorCode
from microserve.text import InvalidRequestError

BAD = ErrorCode.BAD_REQUEST  # every refusal here is a 400

# Fields of vLLM's CompletionRequest / ChatCompletionRequest we do not serve: any value but the
# default is refused with a 400 that names the field (tests/test_openai_fields.py walks them all).
REFUSED: dict[str, tuple[Any, str]] = {
    "bad_words": ([], "bad_words is not supported"),
    "cache_salt": (None, "cache_salt is not supported (the prefix cache is shared by every request)"),
    "kv_transfer_params": (None, "kv_transfer_params is not accepted: KV moves through the microserving calls"),
    "ec_transfer_params": (None, "ec_transfer_params is not supported"),
    "length_penalty": (1.0, "length_penalty needs beam search, which is not supported"),
    "use_beam_search": (False, "beam search is not supported"),
    "logprob_token_ids": (None, "logprob_token_ids is not supported"),
    "prompt_embeds": (None, "prompt_embeds are not supported"),
    "repetition_detection": (None, "repetition_detection is not supported"),
    "return_mm_kwargs": (None, "multimodal inputs are not supported"),
    "return_token_offsets": (False, "return_token_offsets is not supported"),
    "routed_experts_prompt_start": (0, "routed_experts_prompt_start is not supported"),
    "session_id": (None, "session_id is not supported"),
    "skip_special_tokens": (True, "skip_special_tokens=false is not supported"),
    "spaces_between_special_tokens": (True, "spaces_between_special_tokens=false is not supported"),
    "stream_interval": (None, "stream_interval is not a per-request option here: the engines' --stream-interval "
                               "sets it for every stream"),
    "thinking_token_budget": (None, "thinking_token_budget is not supported"),
    "vllm_xargs": (None, "vllm_xargs is not supported"),
    "watermarking": (None, "watermarking is not supported"),
    "chat_template": (None, "a request may not replace the server's chat template"),
    "documents": (None, "documents are not supported"),
    "media_io_kwargs": (None, "multimodal inputs are not supported"),
    "mm_processor_kwargs": (None, "multimodal inputs are not supported"),
    "reasoning_effort": (None, "reasoning_effort is not supported"),
    "return_prompt_text": (None, "return_prompt_text is not supported"),
    "suffix": (None, "suffix is not supported"),
}
# Accepted with no effect on a text-only server without a reasoning parser (as vLLM with none):
# "user", "mm_payload", "include_reasoning", "parallel_tool_calls".


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries its choice's running usage


class _Common(msgspec.Struct, kw_only=True):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    min_p: float | None = None
    prompt_logprobs: int | None = None
    user: str | None = None
    include_stop_str_in_output: bool = False
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    request_id: str | None = None  # the response's id (the engines' ids stay random)
    add_special_tokens: bool | None = None  # completions: True, chat: False (as vLLM)
    truncate_prompt_tokens: int | None = None
    truncation_side: str | None = None
    allowed_token_ids: list[int] | None = None
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    mm_payload: Any = None
    bad_words: Any = None
    cache_salt: Any = None
    kv_transfer_params: Any = None
    ec_transfer_params: Any = None
    length_penalty: Any = None
    use_beam_search: Any = None
    logprob_token_ids: Any = None
    priority: int = 0
    prompt_embeds: Any = None
    repetition_detection: Any = None
    return_mm_kwargs: Any = None
    return_token_offsets: Any = None
    routed_experts_prompt_start: Any = None
    session_id: Any = None
    skip_special_tokens: Any = None
    spaces_between_special_tokens: Any = None
    stream_interval: Any = None
    thinking_token_budget: Any = None
    vllm_xargs: Any = None
    watermarking: Any = None
    guided_json: Any = None  # vLLM's older names for structured_outputs' fields
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def _structured(self) -> StructuredOutput | None:
        """The grammar asked for, from `response_format`, vLLM's `structured_outputs` or `guided_*`."""
        found: list[tuple[str, StructuredOutput]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type", "text")
            if kind == "json_object":
                found.append(("response_format", StructuredOutput("json_object")))
            elif kind == "json_schema":
                schema = (rf.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise RouterError(BAD, "response_format json_schema needs json_schema.schema (an object)",
                                      param="response_format")
                found.append(("response_format", StructuredOutput("json", json.dumps(schema))))
            elif kind != "text":
                raise RouterError(BAD, f"response_format type {kind!r} is not supported (text, json_object, "
                                  "json_schema)", param="response_format")
        so = dict(self.structured_outputs or {})
        compact = bool(so.pop("disable_any_whitespace", False))
        for name, value in (("json", self.guided_json), ("regex", self.guided_regex),
                            ("choice", self.guided_choice), ("grammar", self.guided_grammar)):
            if value is not None:
                so[name] = value
        for name, value in so.items():
            if value in (None, False):
                continue
            if name == "json":
                spec = value if isinstance(value, str) else json.dumps(value)
                found.append((name, StructuredOutput("json", spec)))
            elif name == "json_object":
                found.append((name, StructuredOutput("json_object")))
            elif name in ("regex", "grammar") and isinstance(value, str):
                found.append((name, StructuredOutput(name, value)))
            elif name == "choice" and isinstance(value, list) and value and all(isinstance(c, str) for c in value):
                found.append((name, StructuredOutput("choice", json.dumps(value))))
            else:
                raise RouterError(BAD, f"structured_outputs.{name} is not supported (json, json_object, regex, "
                                  "choice: a list of strings, grammar)", param="structured_outputs")
        if len(found) > 1:
            raise RouterError(BAD, f"give one structured output, got {', '.join(n for n, _ in found)}",
                              param="structured_outputs")
        if not found:
            return None
        name, spec = found[0]
        spec.compact = compact
        try:
            check_grammar(spec)
        except InvalidRequestError as exc:
            raise RouterError(BAD, str(exc), param="response_format" if name == "response_format"
                              else "structured_outputs") from None
        return spec

    def _logit_bias(self) -> dict[int, float]:
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise RouterError(BAD, f"logit_bias keys are token ids, got {key!r}", param="logit_bias")
            out[int(key)] = bias
        return out

    def check_refused(self) -> None:
        """A 400 naming the first field (of vLLM's) we do not serve that has a value other than its default."""
        for name, (default, why) in REFUSED.items():
            value = getattr(self, name, None)
            if value is not None and value != default:
                raise RouterError(BAD, why, param=name)
        if self.truncation_side not in (None, "left", "right"):
            raise RouterError(BAD, "truncation_side must be left or right", param="truncation_side")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise RouterError(BAD, "truncate_prompt_tokens must be >= 1", param="truncate_prompt_tokens")

    def _prompt_logprobs(self, logprobs: int | None) -> int | None:
        """vLLM's prompt_logprobs (completions widen it for `echo` with `logprobs`)."""
        return self.prompt_logprobs

    def truncate(self, prompt: list[int]) -> list[int]:
        """vLLM's `truncate_prompt_tokens`: keep that many prompt tokens (the last ones, or the first
        with truncation_side=right)."""
        k = self.truncate_prompt_tokens
        if k is None or len(prompt) <= k:
            return prompt
        return prompt[:k] if self.truncation_side == "right" else prompt[-k:]

    def sampling(self, max_tokens: int | None, default_max_tokens: int,
                 logprobs: int | None = None) -> tuple[SamplingParams, bool]:
        """SamplingParams for this body, and whether max_tokens was given."""
        self.check_refused()
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise RouterError(BAD, f"temperature must be in [0, 2], got {self.temperature}", param="temperature")
        if self.stream_options is not None and not self.stream:
            raise RouterError(BAD, "stream_options is only allowed with stream=true", param="stream_options")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            sp = SamplingParams(
                max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=-1 if self.top_k is None else self.top_k,
                seed=self.seed, stop=stop, stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
                presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                logit_bias=self._logit_bias(), min_tokens=self.min_tokens, min_p=self.min_p or 0.0,
                logprobs=logprobs, n=self.n, best_of=getattr(self, "best_of", None), structured=self._structured(),
                prompt_logprobs=self._prompt_logprobs(logprobs),
                allowed_token_ids=self.allowed_token_ids, priority=self.priority)
        except ValueError as exc:
            raise RouterError(BAD, str(exc), param=str(exc).split()[0]) from None
        return sp, max_tokens is not None


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self, max_model_len: int | None = None) -> list[str | list[int]]:
        """The prompt(s): a string, a list of strings, token ids, or a list of token-id lists. A
        token-id prompt longer than `max_model_len` is refused before its ids are checked one by one."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RouterError(BAD, "prompt is empty", param="prompt")
        if max_model_len is not None and isinstance(p[0], int) and len(p) > max_model_len:
            raise RouterError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"this model's maximum context length is "
                              f"{max_model_len} tokens; the prompt has {len(p)}", param="prompt")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [list(p)]
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in p):
            return [list(x) for x in p]
        raise RouterError(BAD, "prompt must be a string, a list of strings, a list of token ids, or a list of "
                               "token-id lists", param="prompt")

    def _prompt_logprobs(self, logprobs: int | None) -> int | None:
        if self.echo and logprobs is not None:  # NOTE: echo with logprobs lists the prompt's logprobs too
            return max(logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    def check_unsupported(self) -> None:
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise RouterError(BAD, "best_of > n cannot be streamed", param="best_of")


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a "tool" message answers this call

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RouterError(BAD, f"unsupported content part {part.get('type')!r}: only text parts are "
                                       "supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    echo: bool = False  # vLLM: the reply starts with the last message when that is the assistant's
    chat_template: Any = None
    documents: Any = None
    media_io_kwargs: Any = None
    mm_processor_kwargs: Any = None
    reasoning_effort: Any = None
    return_prompt_text: Any = None
    include_reasoning: Any = None
    parallel_tool_calls: Any = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def template_options(self) -> dict[str, Any]:
        """How to render the chat template (vLLM's fields)."""
        if self.continue_final_message and self.add_generation_prompt:
            raise RouterError(BAD, "continue_final_message needs add_generation_prompt=false",
                              param="continue_final_message")
        if self.continue_final_message and (not self.messages or self.messages[-1].role != "assistant"):
            raise RouterError(BAD, "continue_final_message needs a final assistant message", param="messages")
        return {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message, "kwargs": dict(self.chat_template_kwargs or {})}

    def chat_messages(self) -> list[dict[str, str]]:
        if not self.messages:
            raise RouterError(BAD, "messages is empty", param="messages")
        out = []
        for m in self.messages:
            msg: dict[str, Any] = {"role": m.role, "content": m.text()}
            for key in ("name", "tool_calls", "tool_call_id"):
                if getattr(m, key) is not None:
                    msg[key] = getattr(m, key)
            out.append(msg)
        return out

    def logprobs_k(self) -> int | None:
        """SamplingParams.logprobs for this body (OpenAI: top_logprobs needs logprobs=true)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise RouterError(BAD, "top_logprobs needs logprobs=true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_unsupported(self) -> None:
        if self.add_special_tokens:
            raise RouterError(BAD, "add_special_tokens=true is not supported on chat (the template adds them)",
                              param="add_special_tokens")



class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


def decode_body(body: bytes, kind: type[msgspec.Struct]) -> Any:
    if not body:
        raise RouterError(BAD, "the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        if "$." in msg:
            param = msg.rsplit("$.", 1)[-1].rstrip("`").split("[")[0].split(".")[0]
        elif "missing required field" in msg:
            param = msg.rsplit("`", 2)[-2]
        else:
            param = None
        raise RouterError(BAD, f"invalid request: {msg}", param=param) from None
    except msgspec.DecodeError as exc:
        raise RouterError(BAD, f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise RouterError(BAD, "the JSON body nests too deeply") from None


# -- responses ------------------------------------------------------------------------
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}, "object": "error"}


def usage_json(usage) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                           "total_tokens": usage.total_tokens}
    if usage.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return out


def now() -> int:
    return int(time.time())
