"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

One module covers the family; the differences are flags in `ModelConfig`:
attention bias (Qwen2: q/k/v only), per-head q/k RMSNorm (Qwen3), tied embeddings,
llama3 / linear RoPE scaling. Projections are fused (`qkv_proj`, `gate_up_proj`);
the loader maps Hugging Face names onto them. One cohesive unit, a little over 300 lines: the model's
layers read top to bottom, as transformers' modeling file does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from microserve.engine.config import ModelConfig, RopeConfig
from microserve.engine.model.attention import AttentionMetadata, paged_attention, write_kv

DNN_BATCH_HINT = 32  # oneDNN picks its weight layout for this many rows; it serves any batch
# weight dtypes the native GEMM reads (half precision widened to float32 in registers)
PACKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dnn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


class Linear(nn.Linear):
    """`nn.Linear` that can keep its weight transposed (`[in, out]`, contiguous), packed, or in
    oneDNN's layout; exactly one of these copies is kept.

    `transpose_weight_()`: on CPU (MKL), `x @ W_t` with a pre-transposed weight is ~2x faster
    than `F.linear` for decode-sized inputs and on par for prefill.
    `pack_weight_()` (on CPU with the native AVX2 kernels: every projection and the lm_head,
    float32, bfloat16 or float16) replaces `W_t` by 16-column tiles `[ceil(N / 16), in, 16]`,
    which the native GEMM (`skinny_linear`) reads front to back: float32 1.3-2.4x faster than
    oneDNN at 1-8 rows (decode: the weights stream at ~35 GB/s), 1.0-1.2x at 32, on par on
    2048-row prefill chunks; half precision accumulates in float32 and makes a bf16 / fp16
    model 14-77x faster than on torch's own CPU GEMMs without AVX512-BF16 (docs/engine.md,
    CPU notes).
    `prepack_dnn_()` (float32, native kernels built without AVX2, e.g. on ARM) replaces `W_t` by
    oneDNN's blocked layout, run by torch's own `mkldnn._linear_pointwise`.
    """

    weight_t: torch.Tensor | None = None
    weight_packed: torch.Tensor | None = None
    weight_dnn: torch.Tensor | None = None
    kernels = None  # native CPU kernels, set by `LlamaForCausalLM.use_native`
    lora = None  # this projection's LoRA adapters (`engine.model.lora`), added when a step's rows use one

    def transpose_weight_(self) -> None:
        self.weight_t = self.weight.detach().t().contiguous()
        self.weight = None  # the [out, in] copy is no longer needed

    def pack_weight_(self) -> None:
        assert self.weight_t is not None, "pack_weight_ needs transpose_weight_ first"
        w = self.weight_t  # [K, N]
        w = F.pad(w, (0, -w.shape[1] % 16))  # NOTE: zero columns up to a whole tile, sliced off after
        self.weight_packed = w.view(w.shape[0], -1, 16).transpose(0, 1).contiguous()  # [T, K, 16]
        self.weight_t = None

    def prepack_dnn_(self) -> bool:
        """Switch `W_t` to oneDNN's blocked layout (CPU, float32); False (and nothing changed) where
        this torch build lacks the ops or they disagree with `x @ W_t` on a probe."""
        w_t = self.weight_t
        if w_t is None or w_t.dtype != torch.float32 or w_t.device.type != "cpu":
            return False
        probe = torch.linspace(-1, 1, 3 * self.in_features).view(3, -1)
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w_t.t().contiguous(), DNN_BATCH_HINT)
            got = _dnn_linear(probe, packed, self.bias)
        except (AttributeError, RuntimeError):  # no oneDNN in this build, or an unsupported CPU
            return False
        want = probe @ w_t if self.bias is None else torch.addmm(self.bias, probe, w_t)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            return False
        self.weight_dnn, self.weight_t = packed, None
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)
        if self.lora is not None and self.lora.owner.mask is not None:
            return self.lora.apply(x, y)
        return y

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_packed is not None:
            return self._packed(x)
        if self.weight_dnn is not None:
            return _dnn_linear(x, self.weight_dnn, self.bias)
        if self.weight_t is None:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        m, n = x.shape[0], self.out_features
        bias = self.bias
        if self.kernels is not None and x.dtype == self.weight_packed.dtype:
            fused = bias is not None and n % 16 == 0  # no padding columns: the kernel adds the bias
            y = self.kernels.skinny_linear(x, self.weight_packed, bias if fused else None)
            if fused:
                return y
        else:  # [T, m, 16] -> [m, T * 16]
            y = torch.matmul(x, self.weight_packed).transpose(0, 1).reshape(m, -1)
        if y.shape[1] != n:
            y = y[:, :n]
        return y if bias is None else y + bias


class RMSNorm(nn.Module):
    kernels = None  # set by `use_native`; used when they have `add_rms_norm` (CUDA: `triton_ops`)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # half precision: normalise in float32, scale in the model dtype (as transformers does)
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual), in one kernel where there is one; no residual:
        (RMSNorm(x), x)."""
        fused = getattr(self.kernels, "add_rms_norm", None)
        if fused is not None:
            return fused(x, residual, self.weight, self.eps)
        if residual is not None:
            x = residual + x
        return self(x), x


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type != "llama3":
        return inv_freq
    old_len = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / rope.low_freq_factor, old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) RoPE with a precomputed cos/sin table."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        with torch.device("cpu"):  # NOTE: computed even inside the loader's `meta` context; moved with the model
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(rope, head_dim))
            emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of `positions`, [T, D] float32: looked up once per step, used by every layer."""
        return self.cos[positions], self.sin[positions]


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    # q: [T, Hq, D], k: [T, Hkv, D], cos/sin: [T, D] float32
    cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    kernels = None  # native CPU kernels (`microserve.engine.model.native`), set by `use_native`

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        fused_rope = self.kernels is not None and not self.qk_norm
        if fused_rope:  # one in-place pass over the q and k heads of each row
            self.kernels.rope_(qkv, self.num_heads + self.num_kv_heads, self.head_dim, *rope)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if not fused_rope:
            q, k = apply_rope(q, k, *rope)
        write_kv(cache, k, v, meta.slot_mapping)
        return self.o_proj(paged_attention(q, k, v, cache, meta, self.scale))


class MLP(nn.Module):
    kernels = None  # native CPU kernels, set by `use_native`

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.down_proj(self.kernels.silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, rope, cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next layer's
        input norm adds the two (pre-norm residual, as vLLM lays it out, so add + norm fuse)."""
        h, residual = self.input_layernorm.add_forward(x, residual)
        h, residual = self.post_attention_layernorm.add_forward(self.self_attn(h, rope, cache, meta), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # NOTE: weights given, so no random init: the model is built on `meta` (the loader), where
        # `normal_` runs torch's Python reference and imports torch._dynamo (~1 s of CPU per engine start)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Causal LM over a flat token batch.  `kv_cache`: [L, 2, NB, bs, Hkv, D]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions: [T]; returns final hidden states [T, hidden]."""
        x, residual = self.model.embed_tokens(input_ids), None
        rope = self.rotary.lookup(positions)
        for i, (layer, cache) in enumerate(zip(self.model.layers, kv_cache)):
            meta.layer = i
            x, residual = layer(x, residual, rope, cache, meta)
            for hook in meta.layer_hooks:
                hook(i)
        return self.model.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def use_native(self, kernels) -> None:
        """Route RoPE, the MLP's SiLU product, residual add + RMSNorm and, on CPU, the
        projections through native kernels: `csrc/` on CPU, `triton_ops.TritonOps` on CUDA
        (None: torch ops). With the AVX2 CPU kernels every projection (lm_head included; float32,
        bfloat16 or float16) is packed into 16-column tiles for the native GEMM; with kernels
        built without AVX2 the float32 projections go to oneDNN's layout instead (the scalar
        GEMM would be slower) and half precision ones stay on torch's GEMM."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP, Linear, RMSNorm)):
                module.kernels = kernels
        if getattr(kernels, "skinny_linear", None) is None:
            return
        simd = kernels.simd()
        for module in self.modules():
            if isinstance(module, Linear) and module.weight_t is not None and module.weight_t.device.type == "cpu":
                if simd and module.weight_t.dtype in PACKED_DTYPES:
                    module.pack_weight_()
                else:
                    module.prepack_dnn_()  # float32 only; half precision stays on torch's GEMM

    def transpose_weights_(self) -> None:
        """Keep every projection's weight as `[in, out]` (faster GEMMs on CPU)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.transpose_weight_()
