"""Tokenizer of a checkpoint folder: `tokenizer.json` (the `tokenizers` library) plus the
chat template and special tokens of `tokenizer_config.json`."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised form
        return value.get("content")
    return value


class Tokenizer:
    """Encode/decode and chat templating for one checkpoint."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json"
        if file.is_file():
            self._tok = _HFTokenizer.from_file(str(file))
        elif (path / "tokenizer.model").is_file():
            self._tok = _from_sentencepiece(path)
        else:
            raise FileNotFoundError(f"checkpoint {path} has no tokenizer.json (nor a sentencepiece tokenizer.model)")
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.chat_template: str | None = cfg.get("chat_template")
        jinja_file = path / "chat_template.jinja"
        if self.chat_template is None and jinja_file.is_file():
            self.chat_template = jinja_file.read_text()
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters of the longest token string: no text of n characters encodes to fewer
        than n / max_token_chars tokens (lets a router refuse a huge prompt before encoding it)."""
        return max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1) or 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def to_json(self) -> str:
        """The `tokenizers` JSON of this tokenizer (what grammar engines build their vocabulary from)."""
        return self._tok.to_str()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **kwargs: Any) -> str:
        """Render `messages` with the checkpoint's Jinja chat template. `continue_final_message`:
        the text ends with the last message's content, left open for the model to continue;
        `kwargs` reach the template (vLLM's `chat_template_kwargs`)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (tokenizer_config.json has no chat_template)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        values = {**kwargs, "messages": messages, "add_generation_prompt": add_generation_prompt,
                  "bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        text = env.from_string(self.chat_template).render(**values)
        if continue_final_message:
            content = str(messages[-1].get("content") or "")
            end = text.rfind(content) if content else -1
            if end < 0:
                raise ValueError("continue_final_message: the template does not render the final message verbatim")
            text = text[:end + len(content)]
        return text


def _from_sentencepiece(path: Path) -> _HFTokenizer:
    """The `tokenizers` form of a sentencepiece `tokenizer.model`, converted as transformers' fast
    tokenizers do (local files only; needs `transformers`, `sentencepiece` and `protobuf`)."""
    fix = ("pip install transformers sentencepiece protobuf, or write tokenizer.json once with transformers: "
           f"AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}')")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise FileNotFoundError(f"checkpoint {path} has only a sentencepiece tokenizer.model; to read it: {fix}") \
            from None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True).backend_tokenizer
    except Exception as exc:  # a missing sentencepiece/protobuf, or a model the converter does not know
        raise FileNotFoundError(f"cannot convert {path}/tokenizer.model ({type(exc).__name__}: {exc}); {fix}") \
            from None


def _raise(message: str) -> None:
    raise ValueError(message)
