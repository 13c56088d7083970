"""Roofline cost model for `microserve sim`: how long an engine step and a KV transfer take.

One engine step runs every scheduled token through the model once:

    step = max(FLOPs / (peak x efficiency), bytes / (HBM bandwidth x efficiency)) / tp
           + all-reduce (tensor parallel) + per-step overhead + per-sequence overhead x sequences

    FLOPs  = 2 x linear params x tokens            (projections + MLP, every layer)
           + 2 x lm_head params x sampled rows     (only rows that yield a token)
           + 4 x heads x head_dim x layers x attended (query, key) pairs
    bytes  = weights (read once per step) + KV read by attention + KV written

A prefill chunk of n tokens starting at position s attends n*s + n(n+1)/2 pairs and reads
the KV of s + n tokens once (flash-attention style); a decode with context c attends c
pairs and reads c tokens of KV. Tensor parallelism splits FLOPs and bytes over `tp` GPUs
and adds two ring all-reduces per layer of tokens x hidden activations over the TP link.

A KV transfer of t tokens between engines: link latency + t x KV bytes per token /
(link bandwidth x efficiency x tp): with TP, each GPU sends its own KV heads over its own
link, in parallel (the smaller TP of the two engines when they differ).

Precision (`with_precision`, `microserve sim --dtype fp8 --kv-dtype fp8`): weights take
`bytes_per_param` bytes, KV `kv_bytes` per element, activations 2 bytes (4 in float32); the
compute peak is the GPU's for the weights' precision (`peak_tflops_fp8` for fp8; a GPU
without FP8 tensor cores, such as the A100, is refused).

Profiles (`profiles/*.json`) hold the hardware and model numbers with their sources.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROFILES = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float
    hbm_tb_s: float
    memory_gb: float
    compute_efficiency: float = 0.6
    memory_efficiency: float = 0.8
    step_overhead_ms: float = 2.0
    seq_overhead_us: float = 0.0  # host work per scheduled sequence (batch building, sampling)
    frontend_ms: float = 0.0  # per request, outside the engines: client, gateway, router, RPCs
    peak_tflops_fp8: float | None = None  # dense FP8 tensor-core peak (None: no FP8 tensor cores)
    compute_efficiency_fp8: float | None = None  # default: compute_efficiency
    boot_s: float = 60.0  # a new engine's start before its weights load (process, CUDA, compile, graphs)
    load_gb_s: float = 2.0  # weights loaded per second per GPU (safetensors from local NVMe)

    def peak(self, dtype: str) -> tuple[float, float]:
        """(peak TFLOPS, compute efficiency) for matrix math in `dtype`."""
        if dtype != "fp8":
            return self.peak_tflops, self.compute_efficiency
        if self.peak_tflops_fp8 is None:
            raise ValueError(f"{self.name} has no FP8 tensor cores: simulate it with --dtype bfloat16 (or give its "
                             "profile a peak_tflops_fp8)")
        return self.peak_tflops_fp8, self.compute_efficiency_fp8 or self.compute_efficiency


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth_gb_s: float
    latency_us: float
    efficiency: float = 0.8

    def seconds(self, nbytes: float, parallel: int = 1) -> float:
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth_gb_s * 1e9 * self.efficiency * parallel)


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    bytes_per_param: float = 2.0
    max_position_embeddings: int = 131072
    kv_bytes: float | None = None  # bytes per KV element (None: as the weights, 2 when they are fp8)

    @property
    def dtype(self) -> str:
        """The weights' precision: float32, bfloat16 or fp8."""
        return {4: "float32", 2: "bfloat16", 1: "fp8"}.get(int(self.bytes_per_param), "bfloat16")

    @property
    def kv_element_bytes(self) -> float:
        return self.kv_bytes or (2.0 if self.bytes_per_param < 2 else self.bytes_per_param)

    @property
    def kv_dtype(self) -> str:
        """The KV cache's dtype as a `KVSpec` names it."""
        return {4: "float32", 2: "bfloat16", 1: "float8_e4m3fn"}.get(int(self.kv_element_bytes), "bfloat16")

    @property
    def activation_bytes(self) -> float:
        return 4.0 if self.bytes_per_param >= 4 else 2.0

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        return attn + 3 * self.hidden * self.intermediate

    @property
    def linear_params(self) -> int:
        return self.layers * self.layer_params

    @property
    def lm_head_params(self) -> int:
        return self.hidden * self.vocab

    @property
    def total_params(self) -> int:  # + input embedding (untied)
        return self.linear_params + 2 * self.lm_head_params

    @property
    def weight_bytes(self) -> float:
        """Bytes read per step: every layer and the lm_head (the embedding is a lookup)."""
        return (self.linear_params + self.lm_head_params) * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_element_bytes


def _load(kind: str, spec: str) -> tuple[str, dict]:
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        return path.stem, json.loads(path.read_text())
    table = json.loads((PROFILES / f"{kind}.json").read_text())
    if spec not in table or spec.startswith("_"):
        names = ", ".join(k for k in table if not k.startswith("_"))
        raise ValueError(f"unknown {kind[:-1]} {spec!r}: choose one of {names}, or a JSON file")
    return spec, table[spec]


def load_gpu(spec: str) -> GPU:
    name, d = _load("gpus", spec)
    return GPU(name, d["peak_tflops"], d["hbm_tb_s"], d["memory_gb"], d.get("compute_efficiency", 0.6),
               d.get("memory_efficiency", 0.8), d.get("step_overhead_ms", 2.0), d.get("seq_overhead_us", 0.0),
               d.get("frontend_ms", 0.0), d.get("peak_tflops_fp8"), d.get("compute_efficiency_fp8"),
               d.get("boot_s", 60.0), d.get("load_gb_s", 2.0))


def load_link(spec: str) -> Link:
    name, d = _load("links", spec)
    return Link(name, d["bandwidth_gb_s"], d["latency_us"], d.get("efficiency", 0.8))


_DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "fp8": 1.0}


def with_precision(model: ModelShape, dtype: str | None = None, kv_dtype: str | None = None) -> ModelShape:
    """The model with weights in `dtype` (fp8 | bfloat16 | float16 | float32; None: as it is) and KV
    in `kv_dtype` (fp8 | bfloat16 | float16 | float32; None or auto: 2 bytes for fp8 weights, else as
    the weights), as vLLM's `--quantization fp8 --kv-cache-dtype fp8` would serve it."""
    from dataclasses import replace

    for what, value in (("--dtype", dtype), ("--kv-dtype", kv_dtype)):
        if value not in (None, "auto") and value not in _DTYPE_BYTES:
            raise ValueError(f"{what} {value!r}: choose one of {', '.join(_DTYPE_BYTES)}")
    if dtype == "auto":
        dtype = None
    weights = _DTYPE_BYTES[dtype] if dtype else model.bytes_per_param
    kv = _DTYPE_BYTES[kv_dtype] if kv_dtype not in (None, "auto") else (None if dtype else model.kv_bytes)
    return replace(model, bytes_per_param=weights, kv_bytes=kv)


def load_model(spec: str) -> ModelShape:
    """A profile name, a Hugging Face config.json or a checkpoint folder holding one (its
    `torch_dtype`, bfloat16 when absent, unless `bytes_per_param` says otherwise)."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{spec} has no config.json")
        spec = str(path / "config.json")
        name = path.name
    else:
        name = None
    name_, d = _load("models", spec)
    heads = d["num_attention_heads"]
    nbytes = d.get("bytes_per_param") or _DTYPE_BYTES.get(d.get("torch_dtype") or d.get("dtype") or "", 2.0)
    return ModelShape(name or name_, d["num_hidden_layers"], d["hidden_size"], heads,
                      d.get("num_key_value_heads") or heads, d.get("head_dim") or d["hidden_size"] // heads,
                      d["intermediate_size"], d["vocab_size"], nbytes, d.get("max_position_embeddings", 131072))


@dataclass(frozen=True)
class CostModel:
    model: ModelShape
    gpu: GPU
    tp: int = 1
    tp_link: Link | None = None  # all-reduce link (None: NVLink-class, from the profiles)

    def start_seconds(self) -> float:
        """How long a new engine takes to serve (a planner's scale up): boot, then the weights, each GPU
        of the tensor-parallel group loading its shard."""
        return self.gpu.boot_s + self.model.weight_bytes / (self.gpu.load_gb_s * 1e9 * self.tp)

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError("tp must be >= 1")
        peak, efficiency = self.gpu.peak(self.model.dtype)  # NOTE: refuses fp8 without FP8 tensor cores, up front
        if self.tp > 1 and self.tp_link is None:
            object.__setattr__(self, "tp_link", load_link("nvlink"))
        m = self.model  # NOTE: the per-step constants, once (the simulator evaluates millions of steps)
        object.__setattr__(self, "_k", (2 * m.linear_params, 2 * m.lm_head_params, 4 * m.heads * m.head_dim * m.layers,
                                        m.weight_bytes, m.kv_bytes_per_token, peak * 1e12 * efficiency,
                                        self.gpu.hbm_tb_s * 1e12 * self.gpu.memory_efficiency))

    def step_seconds(self, prefill: list[tuple[int, int]] = (), decode_contexts: list[int] = (),
                     sampled: int | None = None, num_seqs: int | None = None) -> float:
        """Time of one step: `prefill` chunks (start position, tokens), decodes by context
        length (including the new token); `sampled` rows reach the lm_head (default: one
        per decode and per chunk); `num_seqs` sequences in the batch (default: chunks + decodes)."""
        tokens = sum(n for _, n in prefill) + len(decode_contexts)
        if tokens == 0:
            return 0.0
        sampled = len(decode_contexts) + len(prefill) if sampled is None else sampled
        num_seqs = len(decode_contexts) + len(prefill) if num_seqs is None else num_seqs
        flops, nbytes = self.work(prefill, decode_contexts, sampled)
        compute, memory = flops / self._k[5], nbytes / self._k[6]
        return max(compute, memory) / self.tp + self.allreduce_seconds(tokens) + self.gpu.step_overhead_ms * 1e-3 \
            + self.gpu.seq_overhead_us * 1e-6 * num_seqs

    def work(self, prefill: list[tuple[int, int]], decode_contexts: list[int], sampled: int) -> tuple[float, float]:
        """(FLOPs, bytes moved) of one step over all `tp` GPUs."""
        linear2, head2, attn4, weight_bytes, kv_bytes, _, _ = self._k
        decoded = sum(decode_contexts)
        tokens = sum(n for _, n in prefill) + len(decode_contexts)
        pairs = sum(n * s + n * (n + 1) // 2 for s, n in prefill) + decoded
        flops = linear2 * tokens + head2 * sampled + attn4 * pairs
        kv_read = sum(s + n for s, n in prefill) + decoded
        return flops, weight_bytes + kv_bytes * (kv_read + tokens)

    def allreduce_seconds(self, tokens: int) -> float:
        """Two ring all-reduces per layer of [tokens, hidden] activations."""
        if self.tp == 1:
            return 0.0
        assert self.tp_link is not None
        per = 2 * (self.tp - 1) / self.tp * tokens * self.model.hidden * self.model.activation_bytes
        return 2 * self.model.layers * self.tp_link.seconds(per)

    def transfer_seconds(self, tokens: int, link: Link, peer_tp: int | None = None) -> float:
        """KV of `tokens` tokens from one engine to another (TP shards move in parallel: as many as the
        smaller TP of the two)."""
        return link.seconds(tokens * self.model.kv_bytes_per_token, parallel=min(self.tp, peer_tp or self.tp))

    def kv_capacity_tokens(self, memory_fraction: float = 0.9) -> int:
        """Tokens of KV that fit beside the weights on the engine's `tp` GPUs."""
        free = self.gpu.memory_gb * 1e9 * self.tp * memory_fraction - self.model.total_params * \
            self.model.bytes_per_param
        if free <= 0:
            raise ValueError(f"{self.model.name} does not fit on {self.tp} x {self.gpu.name}")
        return int(free // self.model.kv_bytes_per_token)
