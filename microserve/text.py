"""Text around the token ids, shared by the router, the offline `LLM` and the engines:
prompt checks, incremental detokenization and stop strings.

`check_prompt` is the one check of a prompt's token ids (non-empty, inside the vocabulary,
room for one generated token); every engine backend and the router call it.

`IncrementalDetokenizer` turns token ids into text deltas as they arrive (as vLLM
does): it re-decodes a short window of recent tokens and emits only the new text, and
holds text back while it ends in an incomplete UTF-8 sequence ("\ufffd"), so
multi-byte characters split across tokens are never emitted half.

`StopChecker` applies stop strings to the text stream: it holds back the last
`max(len(stop)) - 1` characters (they may be the start of a stop string), and on a
match truncates the text before the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class InvalidRequestError(ValueError):
    """The request cannot be served as given (empty prompt, too long, bad token ids...)."""


def check_prompt(prompt_ids: Sequence[int], vocab_size: int, max_model_len: int) -> None:
    """Raise `InvalidRequestError` unless `prompt_ids` can be served by a model with this
    vocabulary and context (the prompt must leave room for at least one generated token)."""
    n = len(prompt_ids)
    if n == 0:
        raise InvalidRequestError("prompt is empty")
    if n >= max_model_len:
        raise InvalidRequestError(f"prompt has {n} tokens; this model's context is {max_model_len} "
                                  "(prompt must leave room for at least one generated token)")
    check_token_ids(prompt_ids, vocab_size)


def check_token_ids(prompt_ids: Sequence[int], vocab_size: int) -> None:
    """Raise `InvalidRequestError` unless every id is an int inside the vocabulary."""
    if prompt_ids and set(map(type, prompt_ids)) == {int} and min(prompt_ids) >= 0 and max(prompt_ids) < vocab_size:
        return  # NOTE: the common case in C loops (every prompt of every request passes here)
    bad = next((t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size),
               None)
    if bad is not None:
        raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab_size})")


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True) -> None:
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: a token boundary where the decoded text is complete
        self._read = 0  # tokens whose text has been emitted

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the text they complete (possibly "")."""
        self.ids.extend(new_ids)
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read], self.skip)
        text = self.tok.decode(self.ids[self._prefix:], self.skip)
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end decodes as "\ufffd")."""
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read], self.skip)
        text = self.tok.decode(self.ids[self._prefix:], self.skip)
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text):]


class StopChecker:
    def __init__(self, stop: list[str], include: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include = include  # keep the stop string itself in the text (vLLM's include_stop_str_in_output)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # everything seen so far (truncated at the stop string once hit)
        self._sent = 0
        self.hit: str | None = None

    def push(self, delta: str, final: bool = False) -> str:
        """Add text; return what may be emitted now. After a hit, `hit` is the stop string."""
        if self.hit is not None:
            return ""
        start = max(0, len(self.text) - self._hold)
        self.text += delta
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0:  # a later stop string can only match before an earlier one's cut
                self.text, self.hit = self.text[:i + len(s) if self.include else i], s
        end = len(self.text) if (final or self.hit is not None) else max(self._sent, len(self.text) - self._hold)
        out, self._sent = self.text[self._sent:end], end
        return out


class NoTokenizer:
    """What stands in for a tokenizer when a server or `LLM` runs without one (vLLM's
    `skip_tokenizer_init`): prompts are token ids, outputs are token ids and empty text."""

    vocab_size = 1 << 31  # NOTE: the engine checks ids against the model's vocabulary
    max_token_chars = 0
    chat_template = None
    eos_token_id = bos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise InvalidRequestError("this server runs without a tokenizer (skip_tokenizer_init): send token ids")

    def apply_chat_template(self, messages, **kwargs) -> str:
        raise InvalidRequestError("this server runs without a tokenizer (skip_tokenizer_init): chat needs one; "
                                  "send token ids to /v1/completions")


class TextStream:
    """One request's text from its token ids, as a client sees it (the router and the offline
    `LLM` both use it): incremental detokenization, stop strings (the text ends before the stop
    string, or after it with `include_stop_str_in_output`), and the text of a stop token
    (`stop_token_ids`, EOS) left out unless `include_stop_str_in_output`, as vLLM does."""

    def __init__(self, tokenizer: _Decoder, sampling) -> None:
        self.include = bool(getattr(sampling, "include_stop_str_in_output", False))
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopChecker(list(sampling.stop), self.include)
        self.stop_ids = frozenset(sampling.stop_token_ids)

    def push(self, ids: list[int], final: bool = False, reason: str | None = None) -> str:
        """Text completed by `ids` (the last ones of the request when `final`)."""
        if final and reason == "stop" and ids and ids[-1] in self.stop_ids and not self.include:
            ids = ids[:-1]
        text = self.detok.push(ids) + (self.detok.flush() if final else "")
        return self.stops.push(text, final=final)

    @property
    def hit(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self.stops.hit

    def stop_reason(self, ids: list[int], reason: str | None) -> str | int | None:
        """vLLM's `stop_reason`: the stop string or the `stop_token_ids` id that ended the request
        (None for EOS, a length limit, or a request still running)."""
        if self.hit is not None:
            return self.hit
        return ids[-1] if reason == "stop" and ids and ids[-1] in self.stop_ids else None

    @property
    def text(self) -> str:
        return self.stops.text
