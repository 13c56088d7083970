"""Load a Hugging Face checkpoint folder (`config.json` + `*.safetensors`) into our model.

The model is built on the `meta` device and filled with `assign=True`, so no memory is
spent on a random init. Hugging Face's separate q/k/v and gate/up projections are
concatenated into our fused ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from microserve.engine.config import ModelConfig
from microserve.engine.model.models.llama import LlamaForCausalLM

_FUSED = {  # our name -> the Hugging Face names concatenated (dim 0) into it
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


class CheckpointError(ValueError):
    """The checkpoint folder is missing files or tensors, or has tensors of the wrong shape."""


def resolve_dtype(requested: str | torch.dtype | None, cfg: ModelConfig, device: str) -> torch.dtype:
    """`None` (or "auto") takes the checkpoint's dtype; float16 on CPU becomes float32 (docs/engine.md,
    Checkpoints). "float" and "half" are vLLM's names of float32 and float16."""
    requested = None if requested == "auto" else requested
    name = requested if requested is not None else cfg.torch_dtype
    if isinstance(name, torch.dtype):
        return name
    name = str(name).removeprefix("torch.")
    table = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "half": torch.float16, "auto": None}
    if name not in table:
        raise ValueError(f"unsupported dtype {name!r}; use float32, bfloat16 or float16")
    dtype = table[name] or resolve_dtype(None, cfg, device)
    if requested is None and dtype == torch.float16 and not str(device).startswith("cuda"):
        dtype = torch.float32
    return dtype


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint folder, by name (sharded or single file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {path} has no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name} (listed in its index)")
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensors[key] = f.get_tensor(key)
    return tensors


def _to_our_names(raw: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in raw.items() if "rotary_emb" not in k}
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in _FUSED.items():
            for suffix in ("weight", "bias"):
                names = [f"{prefix}{t}.{suffix}" for t in theirs]
                present = [n for n in names if n in state]
                if not present:
                    continue
                if len(present) != len(names):
                    missing = sorted(set(names) - set(present))
                    raise CheckpointError(f"checkpoint is missing tensors {missing}")
                state[f"{prefix}{ours}.{suffix}"] = torch.cat([state.pop(n) for n in names], dim=0)
    if "lm_head.weight" not in state:
        if not cfg.tie_word_embeddings:
            raise CheckpointError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None) -> LlamaForCausalLM:
    """Build the model of `path/config.json` and load its safetensors weights."""
    path = Path(path)
    cfg = ModelConfig.from_pretrained(path)
    torch_dtype = resolve_dtype(dtype, cfg, device)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    state = _to_our_names(read_safetensors(path), cfg)
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(state))
    if missing:
        more = " ..." if len(missing) > 8 else ""
        raise CheckpointError(f"checkpoint {path} is missing tensors: {missing[:8]}{more}")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            got = tuple(state[name].shape)
            raise CheckpointError(f"tensor {name} has shape {got}, config implies {tuple(ref.shape)}")
    state = {n: state[n].to(device=device, dtype=torch_dtype) for n in expected}
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.to(device)
    if torch.device(device).type == "cpu":
        model.transpose_weights_()
    return model.eval()


def checkpoint_fingerprint(path: str | Path) -> str:
    """A name for a checkpoint's weights that is the same on every host that has a copy of it
    (not its path): config.json, and per safetensors file its size, header and 16 spread-out
    64 KiB samples of its bytes. KV store entries are namespaced by it (kvapi.store)."""
    import hashlib

    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    h.update((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        h.update(f"|{file.name}|{size}|".encode())
        with open(file, "rb") as f:
            for k in range(16):
                f.seek(size * k // 16)
                h.update(f.read(1 << 16))
    return h.hexdigest()
