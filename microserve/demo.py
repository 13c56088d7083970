"""`demo_model(path)`: a tiny random-weight Llama with a byte-level tokenizer, written locally.

Everything runs offline with it (`--model demo`). Weights come from a fixed seed, so
every process that writes or loads the demo model gets the same one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

if TYPE_CHECKING:
    import torch

DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "float32",
}
SPECIAL_TOKENS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_alphabet() -> list[str]:
    """The 256 byte-level characters in byte order: entry `b` stands for the byte `b`
    (GPT-2's `bytes_to_unicode`: printable Latin-1 bytes map to themselves, the rest to 256+)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def byte_level_tokenizer() -> Tokenizer:
    """A tokenizer with one token per byte after the special tokens (0..4): byte `b` is id 5 + b.
    NOTE: not `ByteLevel.alphabet()`, which comes in hash-set order, a different vocabulary per process."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in byte_alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def write_tokenizer(path: str | Path, chat_template: str = CHAT_TEMPLATE) -> None:
    """Write the byte-level tokenizer (tokenizer.json + tokenizer_config.json) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    byte_level_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "chat_template": chat_template,
    }, indent=2))


def demo_model(path: str | Path, seed: int = 0, **config: int) -> Path:
    """Write the demo checkpoint into `path` (created if needed); returns the path.
    `config` overrides fields of `DEMO_CONFIG` (e.g. `hidden_size=512` for a heavier model)."""
    import torch  # NOTE: lazy, so resolving "demo" in a router process does not load torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**DEMO_CONFIG, **config}
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.25

    tensors = {"model.embed_tokens.weight": rand(cfg["vocab_size"], h), "model.norm.weight": torch.ones(h),
               "lm_head.weight": rand(cfg["vocab_size"], h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
            p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
        }
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    write_tokenizer(path)
    return path


def resolve_model(model: str | Path) -> Path:
    """`"demo"` -> the demo checkpoint (written once under $MICROSERVE_CACHE or ~/.cache); else the path."""
    if str(model) != "demo":
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"model {str(model)!r}: no such checkpoint folder (give a Hugging Face "
                                    "checkpoint folder, or 'demo')")
        return path
    root = Path(os.environ.get("MICROSERVE_CACHE", Path.home() / ".cache" / "microserve"))
    target = root / "demo"
    if not (target / "tokenizer_config.json").is_file():
        tmp = root / f"demo.tmp{os.getpid()}"
        demo_model(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return target
