"""Model and engine configuration (frozen dataclasses).

`ModelConfig.from_pretrained` reads a Hugging Face `config.json` in either dialect:
the Hub's long-standing one (`rope_theta`, `rope_scaling`) and transformers 5's
(`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
_SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or options are not supported by the engine."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no config.json")
        config = cls.from_dict(json.loads(cfg_file.read_text()))
        gen_file = path / "generation_config.json"
        if gen_file.is_file():  # NOTE: Llama-3 instruct lists its end-of-turn token only here
            try:
                extra = _ids(json.loads(gen_file.read_text()).get("eos_token_id"))
            except (ValueError, AttributeError):
                extra = ()
            config = dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + extra)))
        return config

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        arch = _architecture(cfg)
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        is_qwen2, is_qwen3 = arch == "Qwen2ForCausalLM", arch == "Qwen3ForCausalLM"
        attn_bias = True if is_qwen2 else bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=_max_len(cfg),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=_rope(cfg),
            attention_bias=attn_bias,
            # Llama's `attention_bias` covers o_proj too; Qwen2's bias is on q/k/v only.
            o_proj_bias=attn_bias and not is_qwen2,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=is_qwen3,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            eos_token_ids=_ids(cfg.get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id"),
        )


def _architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise UnsupportedModelError(
        f"unsupported architecture {archs or cfg.get('model_type')!r}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _max_len(cfg: dict[str, Any]) -> int:
    n = cfg.get("max_position_embeddings", 4096)
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True) and window < n:
        # NOTE: no sliding-window attention kernel; cap the context where full attention
        # equals sliding-window attention, so outputs stay exact.
        n = window
    return n


def _rope(cfg: dict[str, Any]) -> RopeConfig:
    params = dict(cfg.get("rope_parameters") or {})  # transformers 5 dialect
    params.update(cfg.get("rope_scaling") or {})  # Hub dialect
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(_SUPPORTED_ROPE_TYPES)}")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine instance.

    Args:
        block_size: tokens per KV block.
        num_kv_blocks: size of the KV pool; None sizes it from `kv_cache_memory_gb`.
        kv_cache_memory_gb: memory for the KV pool when `num_kv_blocks` is None.
        max_num_batched_tokens: token budget of one step (prefill chunks + decodes).
        max_prefill_tokens: most prompt tokens one step starts or continues (SGLang's
            `--max-prefill-tokens`): waiting prompts join a step only while its prompt tokens are
            below it, and one prompt may take it past (up to the budget; longer prompts are chunked).
            Prompts that arrive together then get their first tokens one after another rather than
            all at the end of one long step, and running streams wait shorter steps. None: no
            limit but the budget (the `LLM` class's default, for throughput; `microserve engine`
            uses 512 on CPU, docs/engine.md).
        max_num_seqs: most requests running at once.
        max_model_len: context limit; None takes the model's.
        enable_prefix_caching: reuse KV of shared prefixes through the radix cache.
        native_kernels: on CPU, use the native kernels of `csrc/` when they build (the
            environment variable MICROSERVE_NATIVE=0 also turns them off); False = torch ops only.
        cuda_graphs: on CUDA, replay decode steps from CUDA graphs captured at start-up, one per
            batch-size bucket up to `max_num_seqs` (needs Triton); False = eager (`--enforce-eager`).
        skip_tokenizer_init: load no tokenizer (vLLM's): token-id prompts only, outputs as token ids;
            the checkpoint may have no tokenizer files at all.
        mixed_batches: a step carries prompt chunks and decodes together (vLLM's chunked prefill);
            False: a step that prefills carries no decodes, prompts first (SGLang's default, without
            `--enable-mixed-chunk`; MLC-LLM's `prefill_mode="chunked"`), which stalls decodes behind
            every prefill.
        stream_interval: after a request's first token, stream its tokens this many at a time (the
            last chunk goes at once), as SGLang's and vLLM's `--stream-interval`: fewer messages and
            wake-ups per token under high concurrency; 1 streams every token.
        enable_lora: serve LoRA adapters (vLLM's `--enable-lora`): requests name one in `SamplingParams.lora`.
        lora_modules: adapters loaded at start-up, name -> PEFT folder (`--lora-modules NAME=PATH`).
        max_loras: adapters loaded at once (one slot each; None: as many as `lora_modules`, at least 1).
        max_lora_rank: the largest adapter rank a slot holds (vLLM's default, 16).
        seed: the engine's sampling generator for unseeded requests (vLLM's `--seed`); None: random.
        tokenizer: a folder with the tokenizer to use instead of the checkpoint's (vLLM's `--tokenizer`).
        tensor_parallel_size: devices per engine; the built-in engine runs one (the vLLM backend passes it on).
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    max_num_batched_tokens: int = 2048
    max_prefill_tokens: int | None = None
    max_num_seqs: int = 64
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    native_kernels: bool = True
    cuda_graphs: bool = True
    skip_tokenizer_init: bool = False
    mixed_batches: bool = True
    stream_interval: int = 1
    enable_lora: bool = False
    lora_modules: tuple[tuple[str, str], ...] = ()
    max_loras: int | None = None
    max_lora_rank: int = 16
    seed: int | None = None
    tokenizer: str | None = None
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.max_num_batched_tokens <= 0 or self.max_num_seqs <= 0:
            raise ValueError("block_size, max_num_batched_tokens and max_num_seqs must be positive")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if isinstance(self.lora_modules, dict):  # NOTE: {name: path} is accepted too
            object.__setattr__(self, "lora_modules", tuple(self.lora_modules.items()))
        if self.lora_modules and not self.enable_lora:
            raise ValueError("lora_modules needs enable_lora (--enable-lora)")
        if self.max_lora_rank < 1 or (self.max_loras is not None and self.max_loras < 1):
            raise ValueError("max_loras and max_lora_rank must be >= 1")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
