"""Structured outputs: a grammar per request, compiled by llguidance, masks the logits of its row.

    SamplingParams.structured (json schema | json_object | regex | choice | grammar)
        ─ Grammars.matcher ─> LLMatcher (fed the tokens an earlier engine already generated)
    each step, constrained rows only: matcher ─ token bitmask ─> logits of disallowed tokens = -inf
    after the draw: matcher.consume_token(token); a finished grammar allows only EOS

llguidance (`pip install 'microserve[structured]'`, no other dependency) computes a mask in
tens of microseconds; rows without a grammar are untouched, so unconstrained requests in the
same batch pay nothing (benchmarks/sampling_overhead.py).
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING

import numpy as np

from microserve.sampling_params import StructuredOutput
from microserve.text import InvalidRequestError

if TYPE_CHECKING:  # NOTE: the gateway checks grammars with this module without loading torch
    import torch

INSTALL = "structured outputs need llguidance: pip install 'microserve[structured]'"


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


class Grammars:
    """Compiles requests' grammars against one tokenizer (built once, on first use).

    Args:
        tokenizer_json: the `tokenizers` JSON of the checkpoint's tokenizer.
        vocab_size: the model's vocabulary (logit rows may be wider than the tokenizer's).
        eos_ids: the engine's EOS ids: what a finished grammar allows.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._json, self.vocab_size, self.eos_ids = tokenizer_json, vocab_size, sorted(eos_ids)
        self._tokenizer = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                self._tokenizer = llguidance.LLTokenizer(self._json, n_vocab=self.vocab_size,
                                                         eos_token=self.eos_ids or None)
            return self._tokenizer

    def matcher(self, spec: StructuredOutput):
        """A matcher for `spec`, advanced over `spec.done`; InvalidRequestError for a bad grammar."""
        import llguidance

        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar(spec))
        if matcher.is_error():
            raise InvalidRequestError(f"structured output ({spec.kind}): {matcher.get_error()}")
        for token in spec.done:
            if not matcher.consume_token(token):
                raise InvalidRequestError("structured output: the tokens generated so far do not follow the grammar")
        return matcher


def grammar(spec: StructuredOutput) -> str:
    """llguidance's grammar for `spec` (InvalidRequestError when it cannot be built or is invalid)."""
    if not available():
        raise InvalidRequestError(INSTALL)
    import llguidance

    kind, text = spec.kind, spec.spec
    try:
        if kind in ("json", "json_object"):
            schema = json.loads(text) if kind == "json" else {"type": "object"}
            if spec.compact and isinstance(schema, dict):
                schema = {**schema, "x-guidance": {**schema.get("x-guidance", {}), "whitespace_flexible": False}}
            out = llguidance.grammar_from("json_schema", json.dumps(schema))
        else:
            out = llguidance.grammar_from({"json": "json_schema", "grammar": "lark"}.get(kind, kind), text)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"structured output ({kind}): {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(out)
    if error and not error.startswith("WARNING"):
        raise InvalidRequestError(f"structured output ({kind}): {error}")
    return out


def check(spec: StructuredOutput) -> None:
    """Refuse a grammar that cannot compile before any engine works on the request (the gateway;
    without llguidance here, the engines refuse it)."""
    if available():
        grammar(spec)


def apply_masks(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """Set the logits of every token a row's grammar does not allow next to -inf (in place)."""
    import llguidance.numpy as llg_np
    import torch

    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    mask = np.full((len(rows), words), -1, dtype=np.int32)
    for k, matcher in enumerate(matchers):
        llg_np.fill_next_token_bitmask(matcher, mask, k)
    bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    allowed = torch.from_numpy(bits.astype(np.bool_)).to(logits.device)
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
