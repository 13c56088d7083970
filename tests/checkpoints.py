"""Tiny random Hugging Face checkpoints for tests (built with `transformers`, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

from microserve.demo import write_tokenizer

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, initializer_range=0.2)

# name -> (config class name, overrides): covers GQA ratios, bias, q/k-norm, tying, llama3 rope
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "llama-mha-bias": ("LlamaConfig", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "llama3-rope-tied": ("LlamaConfig", dict(
        num_key_value_heads=1, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "mistral": ("MistralConfig", dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
}


def make_checkpoint(path: Path, variant: str = "llama", seed: int = 0, **overrides) -> tuple[Path, torch.nn.Module]:
    """Write a random checkpoint of `variant` to `path`; returns (path, the transformers model)."""
    import transformers

    cls_name, extra = VARIANTS[variant]
    config = getattr(transformers, cls_name)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model_cls = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).__class__
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)
    return path, model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with the transformers model and its own KV cache (no EOS handling)."""
    dev = next(model.parameters()).device
    out, past, ids = [], None, torch.tensor([prompt], device=dev)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]], device=dev)
    return out


def assert_follows_reference(hf, prompts: list[list[int]], outs, label: str) -> None:
    """Greedy in half precision cannot be token-identical to another implementation (near-ties
    flip), so each token we picked is scored by transformers (`hf`: same dtype and device,
    teacher-forced on our own output): it must be the reference's argmax up to half-precision
    rounding, and its exact argmax for >= 90% of the tokens."""
    dev = next(hf.parameters()).device
    exact = total = 0
    for prompt, out in zip(prompts, outs):
        seq = torch.tensor([prompt + out.token_ids], device=dev)
        with torch.inference_mode():
            logits = hf(input_ids=seq).logits[0, len(prompt) - 1:-1].float()  # predicts each of our tokens
        picked = torch.tensor(out.token_ids, device=dev)
        ours = logits.gather(1, picked[:, None])[:, 0]
        best = logits.max(dim=1).values
        spread = logits.std(dim=1)
        assert bool((best - ours <= 0.1 * spread).all()), f"{label}: picked a token far from the reference's best"
        exact += int((logits.argmax(dim=1) == picked).sum())
        total += len(out.token_ids)
    assert exact >= 0.9 * total, f"{label}: only {exact} of {total} tokens are the reference's argmax"
