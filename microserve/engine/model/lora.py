"""LoRA adapters in the built-in engine: PEFT folders loaded into slots, rows of one batch each
under their own adapter (or none).

    adapter_config.json + adapter_model.safetensors ──> LoraAdapter (A, B per layer and projection,
        scale alpha / r, or alpha / sqrt(r) with rslora) ──> a slot of `LoraSlots`
    each step: one slot per token (-1: base) ──> a [tokens, slots x rank] mask
    each projection: y = x W + ((x A_all) * mask) B        (A_all: every slot's A side by side)

Every projection of the attention and the MLP may carry an adapter (`q_proj`, `k_proj`, `v_proj`,
`o_proj`, `gate_proj`, `up_proj`, `down_proj`); the fused `qkv_proj` / `gate_up_proj` hold one
rank block per part. A batch pays two small GEMMs per projection whatever mix of adapters its rows
use, and nothing when no row uses one. Slots hold up to `max_loras` adapters of rank up to
`max_lora_rank` (smaller ranks are zero-padded); the scale is folded into B.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from microserve.engine.model.models.llama import Linear, LlamaForCausalLM

# PEFT's module names -> (our fused module, part index)
TARGETS = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
           "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
           "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1), "down_proj": ("mlp.down_proj", 0)}
_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class LoraError(ValueError):
    """An adapter that cannot be served (bad folder, unsupported config, too large, unknown name)."""


@dataclass
class LoraAdapter:
    name: str
    path: str
    rank: int
    scale: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, PEFT module) -> (A [r, in], B [out, r])


def load_peft(name: str, path: str | Path, num_layers: int) -> LoraAdapter:
    """Read a PEFT LoRA folder (`adapter_config.json`, `adapter_model.safetensors`)."""
    from safetensors.torch import load_file

    folder = Path(path)
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LoraError(f"LoRA adapter {name!r}: cannot read {folder / 'adapter_config.json'}: {exc}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"LoRA adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, off in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("modules_to_save", None)):
        if cfg.get(key, off) not in (off, [], {}):
            raise LoraError(f"LoRA adapter {name!r}: {key}={cfg[key]!r} is not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise LoraError(f"LoRA adapter {name!r}: per-module ranks (rank_pattern / alpha_pattern) are not supported")
    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / rank ** 0.5 if cfg.get("use_rslora") else alpha / rank
    file = folder / "adapter_model.safetensors"
    if not file.exists():
        raise LoraError(f"LoRA adapter {name!r}: {file} is missing (only safetensors adapters are read)")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(file)).items():
        m = _KEY.search(key)
        if m is None or m.group(3) not in TARGETS or int(m.group(1)) >= num_layers:
            raise LoraError(f"LoRA adapter {name!r}: unsupported weight {key!r} (adapters on the attention and MLP "
                            "projections only)")
        pairs.setdefault((int(m.group(1)), m.group(3)), {})[m.group(4)] = tensor
    weights = {}
    for where, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != rank or ab["B"].shape[1] != rank:
            raise LoraError(f"LoRA adapter {name!r}: layer {where[0]} {where[1]} needs lora_A [r, in] and lora_B "
                            f"[out, r] with r={rank}")
        weights[where] = (ab["A"], ab["B"])
    if not weights:
        raise LoraError(f"LoRA adapter {name!r}: no LoRA weights in {file}")
    return LoraAdapter(name, str(folder), rank, scale, weights)


class _Weights:
    """One projection's adapters: A of every slot and part side by side, B per part."""

    def __init__(self, owner: LoraSlots, module: Linear, parts: list[int], dtype, device) -> None:
        self.owner, self.parts = owner, parts  # output size of each fused part
        s, r = owner.max_loras, owner.max_rank
        self.a = torch.zeros(module.in_features, len(parts) * s * r, dtype=dtype, device=device)
        self.b_all = torch.zeros(s * r, sum(parts), dtype=dtype, device=device)  # every part's columns side by side
        self.b = _columns(self.b_all, parts)
        self._key, self._ops = None, (self.a, self.b)  # the active slots' A and B (`operands`)

    def set(self, slot: int, part: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        s, r = self.owner.max_loras, self.owner.max_rank
        col = (part * s + slot) * r
        self.a[:, col:col + r] = 0
        self.b[part][slot * r:(slot + 1) * r] = 0
        if a is not None:
            k = a.shape[0]
            self.a[:, col:col + k] = a.t().to(self.a.dtype)
            self.b[part][slot * r:slot * r + k] = (b.t() * scale).to(self.a.dtype)

    def operands(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A and B of the slots this step uses, side by side (copied once per change of that set)."""
        owner = self.owner
        if self._key != owner.active_key:
            act = owner.active
            if len(act) == owner.max_loras:
                self._ops = (self.a, self.b)
            else:
                s, r, idx = owner.max_loras, owner.max_rank, owner.active_index
                a = self.a.view(self.a.shape[0], len(self.parts), s, r)[:, :, idx].reshape(self.a.shape[0], -1)
                self._ops = (a, _columns(self.b_all.view(s, r, -1)[idx].reshape(len(act) * r, -1), self.parts))
            self._key = owner.active_key
        return self._ops

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or self.owner.use_triton:  # NOTE: CUDA: two Triton launches (triton_lora.py)
            from microserve.engine.model.triton_lora import lora_apply

            return lora_apply(x, self.a, self.b_all, self.owner.token_slots, y, self.parts, self.owner.max_loras,
                              self.owner.max_rank)
        mask = self.owner.mask
        a, b = self.operands()
        xa = (x @ a).view(x.shape[0], len(self.parts), mask.shape[1]) * mask.unsqueeze(1)
        off = 0
        for p, n in enumerate(self.parts):
            y[:, off:off + n] += xa[:, p] @ b[p]
            off += n
        return y


def _columns(b: torch.Tensor, parts: list[int]) -> list[torch.Tensor]:
    """Each fused part's columns of `b` (views)."""
    offsets = [sum(parts[:i]) for i in range(len(parts))]
    return [b[:, o:o + n] for o, n in zip(offsets, parts)]


class LoraSlots:
    """The adapters a model serves: every registered adapter's weights in host memory, and
    `max_loras` slots of rank up to `max_rank` that the model computes with.

    `add` registers an adapter (and fills a free slot with it at once); `acquire` gives a request
    its adapter's slot when the scheduler admits it, filling a free slot or the least recently used
    one no running request needs (None: all are in use, the request waits); `remove` forgets an
    adapter; `begin_step(slots)` sets which slot each token of the next forward runs under (-1: none).
    """

    def __init__(self, model: LlamaForCausalLM, max_loras: int, max_rank: int) -> None:
        if max_loras < 1 or max_rank < 1:
            raise LoraError("max_loras and max_lora_rank must be >= 1")
        self.model, self.max_loras, self.max_rank = model, max_loras, max_rank
        self.adapters: dict[str, LoraAdapter] = {}  # registered, by name
        self.slots: dict[str, int] = {}  # adapters in a slot -> the slot
        self.loads = 0  # adapters written into a slot so far (a slot miss costs one)
        self._used: dict[str, int] = {}  # when each slotted adapter was last acquired (LRU)
        self._clock = 0
        self.mask: torch.Tensor | None = None
        self.token_slots: torch.Tensor | None = None
        self.use_triton = False  # the Triton kernels on CPU tensors too (their tests, under TRITON_INTERPRET=1)
        self.active: tuple[int, ...] = ()  # the slots the next forward uses, ascending
        self.active_index: torch.Tensor | None = None
        self.active_key: tuple = ()  # (weights version, active): what `_Weights.operands` caches
        self._version = 0
        cfg = model.config
        dtype, device = model.model.embed_tokens.weight.dtype, model.model.embed_tokens.weight.device
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        self.layers = []
        for layer in model.model.layers:
            mods = {"self_attn.qkv_proj": (layer.self_attn.qkv_proj, [q, kv, kv]),
                    "self_attn.o_proj": (layer.self_attn.o_proj, [cfg.hidden_size]),
                    "mlp.gate_up_proj": (layer.mlp.gate_up_proj, [inter, inter]),
                    "mlp.down_proj": (layer.mlp.down_proj, [cfg.hidden_size])}
            weights = {}
            for key, (module, parts) in mods.items():
                module.lora = weights[key] = _Weights(self, module, parts, dtype, device)
            self.layers.append(weights)
        self._device, self._dtype = device, dtype

    def check(self, name: str) -> None:
        """Raise LoraError unless `name` is registered."""
        if name not in self.adapters:
            raise LoraError(f"unknown LoRA adapter {name!r}; loaded: {', '.join(sorted(self.adapters)) or 'none'}")

    def add(self, adapter: LoraAdapter) -> None:
        if adapter.name in self.adapters:
            raise LoraError(f"LoRA adapter {adapter.name!r} is already loaded")
        if adapter.rank > self.max_rank:
            raise LoraError(f"LoRA adapter {adapter.name!r} has rank {adapter.rank} > --max-lora-rank {self.max_rank}")
        self.adapters[adapter.name] = adapter
        if len(self.slots) < self.max_loras:
            self.acquire(adapter.name, set())

    def acquire(self, name: str, busy: set[int]) -> int | None:
        """The slot of adapter `name`, filled now if needed; `busy`: slots running requests use."""
        self.check(name)
        self._clock += 1
        if name in self.slots:
            self._used[name] = self._clock
            return self.slots[name]
        free = sorted(set(range(self.max_loras)) - set(self.slots.values()))
        if not free:
            idle = [n for n, slot in self.slots.items() if slot not in busy]
            if not idle:
                return None
            victim = min(idle, key=self._used.__getitem__)
            free = [self.slots.pop(victim)]
            del self._used[victim]
        slot = free[0]
        self._write(slot, self.adapters[name])
        self.slots[name], self._used[name] = slot, self._clock
        self.loads += 1
        return slot

    def remove(self, name: str) -> None:
        self.check(name)
        if name in self.slots:
            self._write(self.slots.pop(name), None)
            del self._used[name]
        del self.adapters[name]

    def _write(self, slot: int, adapter: LoraAdapter | None) -> None:
        for i, weights in enumerate(self.layers):
            for peft, (key, part) in TARGETS.items():
                a, b = adapter.weights.get((i, peft), (None, None)) if adapter is not None else (None, None)
                weights[key].set(slot, part, a, b, adapter.scale if adapter is not None else 0.0)
        self._version += 1

    def begin_step(self, token_slots: list[int]) -> None:
        """Which slot each token of the next forward runs under (-1: the base model alone)."""
        if not token_slots or max(token_slots) < 0:
            self.mask = None
            return
        active = tuple(sorted(set(token_slots) - {-1}))
        if (self._version, active) != self.active_key:
            self.active, self.active_key = active, (self._version, active)
            self.active_index = torch.tensor(active, device=self._device)
        if self.use_triton or self._device.type == "cuda":  # NOTE: only the Triton path reads it
            self.token_slots = torch.tensor(token_slots, dtype=torch.int32, device=self._device)
        where = {slot: i for i, slot in enumerate(active)}
        rows = torch.tensor([where.get(s, -1) for s in token_slots], device=self._device)
        cols = torch.arange(len(active) * self.max_rank, device=self._device) // self.max_rank
        self.mask = (rows.unsqueeze(1) == cols.unsqueeze(0)).to(self._dtype)
