"""`SamplingParams`: per-request decoding options (a msgspec struct, so it goes on the wire as is)."""

from __future__ import annotations

import msgspec

# bounded list fields: a request cannot make every step of its engine slow (vLLM has no bound;
# OpenAI allows 4 stop strings)
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default --max-logprobs; OpenAI's top_logprobs cap)


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_GRAMMAR_CHARS = 1 << 20


class StructuredOutput(msgspec.Struct, forbid_unknown_fields=True):
    """A grammar the output must follow (vLLM's `structured_outputs`).

    Args:
        kind: "json" (a JSON schema), "json_object" (any JSON object), "regex", "choice" (one of a
            JSON list of strings) or "grammar" (a Lark / GBNF grammar, as llguidance reads it).
        spec: the schema / regex / JSON list / grammar text ("" for json_object).
        done: tokens an earlier engine already generated under this grammar (a failover).
        compact: JSON without optional whitespace (vLLM's `disable_any_whitespace`).
    """

    kind: str
    spec: str = ""
    done: list[int] = msgspec.field(default_factory=list)
    compact: bool = False

    def validate(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}")
        if len(self.spec) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"structured output spec is longer than {MAX_GRAMMAR_CHARS} characters")


class SamplingParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Decoding options of one request, as in vLLM.

    Args:
        max_tokens: most tokens to generate.
        temperature: 0 means greedy.
        top_p: nucleus sampling mass in (0, 1].
        top_k: keep the k most likely tokens; 0 or -1 disables.
        seed: per-request seed; the same seed gives the same tokens whatever the batch.
        stop_token_ids: tokens that end generation (the token id is in the output ids; its text is not).
        stop: strings that end generation (applied on text by the router/offline API).
        ignore_eos: keep going past the model's EOS token.
        include_stop_str_in_output: keep the stop string (or the stop token's text) in the text.
        presence_penalty: subtracted from the logit of every token already generated (OpenAI).
        frequency_penalty: subtracted once per time a token was generated (OpenAI).
        repetition_penalty: > 1 discourages every token of the prompt and the output (transformers:
            a positive logit is divided by it, a negative one multiplied).
        logit_bias: token id -> bias added to its logit (clamped to [-100, 100]).
        min_tokens: EOS and `stop_token_ids` cannot be sampled before this many tokens.
        min_p: drop tokens less likely than `min_p` times the most likely one (after temperature).
        logprobs: with each token, its logprob and this many top alternatives (0..20); None: none.
        prompt_logprobs: the same for every prompt token after the first (the whole prompt is
            computed: no prefix cache, no received KV).
        n: choices per request (the router runs n requests that share the prompt's KV; choice i
            uses `seed + i` when a seed is given).
        best_of: generate this many choices and return the `n` of highest cumulative logprob.
        structured: a grammar the output follows (`StructuredOutput`).
        allowed_token_ids: only these tokens may be generated (vLLM's).
        priority: scheduling priority, lower first (vLLM's): the engine admits waiting requests in
            priority order and preempts the lowest-priority running one first.
        lora: the LoRA adapter this request runs under (its name, as the engine loaded it: `--lora-modules`,
            `LLM(lora_modules=...)`); None: the base model. Its KV is keyed by the adapter (never reused
            under another adapter or the base model). The gateway sets it from the `model` a client names.
        resumed: set by the router, not by users: how many tokens at the end of the prompt this
            request already generated elsewhere (a failover or a live migration continues it). The
            seeded generator skips their draws and presence/frequency penalties count them as
            output, so a continued request samples exactly as if it had not moved.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    stop: list[str] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    min_tokens: int = 0
    min_p: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    best_of: int | None = None
    structured: StructuredOutput | None = None
    allowed_token_ids: list[int] | None = None
    priority: int = 0
    lora: str | None = None
    resumed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off), 0 (off) or positive, got {self.top_k!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed!r}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids may list at most {MAX_STOP_TOKEN_IDS} ids, "
                             f"got {len(self.stop_token_ids)}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative, got {self.stop_token_ids!r}")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise ValueError(f"stop may list at most {MAX_STOP_STRINGS} strings of at most "
                             f"{MAX_STOP_STRING_CHARS} characters")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora or len(self.lora) > 256):
            raise ValueError(f"lora must be an adapter's name (1-256 characters), got {self.lora!r}")
        if not isinstance(self.resumed, int) or self.resumed < 0:
            raise ValueError(f"resumed must be an integer >= 0, got {self.resumed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS or any(t < 0 for t in self.logit_bias):
            raise ValueError(f"logit_bias maps at most {MAX_LOGIT_BIAS} non-negative token ids to biases")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k!r}")
        if not isinstance(self.n, int) or not 1 <= self.n <= 128:
            raise ValueError(f"n must be in [1, 128], got {self.n!r}")
        if self.best_of is not None and not self.n <= self.best_of <= 128:
            raise ValueError(f"best_of must be in [n={self.n}, 128], got {self.best_of!r}")
        if self.structured is not None:
            self.structured.validate()
        if not isinstance(self.priority, int) or not -(2**31) <= self.priority < 2**31:
            raise ValueError(f"priority must be a 32-bit integer, got {self.priority!r}")
        if self.allowed_token_ids is not None and (not self.allowed_token_ids or len(self.allowed_token_ids) > 1 << 18
                                                   or any(t < 0 for t in self.allowed_token_ids)):
            raise ValueError("allowed_token_ids must list 1 to 262144 non-negative token ids")

    def after(self, generated: list[int]) -> SamplingParams:
        """The sampling of this request continued after `generated` tokens (a failover, a migration):
        the rest of max_tokens and min_tokens, a grammar that has already read them, and `resumed`
        (the seeded draws to skip, the output the penalties count)."""
        structured = self.structured and msgspec.structs.replace(self.structured, done=self.structured.done + generated)
        return msgspec.structs.replace(self, max_tokens=self.max_tokens - len(generated),
                                       min_tokens=max(0, self.min_tokens - len(generated)), structured=structured,
                                       resumed=self.resumed + len(generated))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
