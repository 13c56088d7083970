"""`LLMEngine`: a Hugging Face checkpoint served with continuous batching (`EngineCore`
plus the model runner)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from kvapi import KVSpec
from kvapi.radix import EventHook
from kvapi.spec import dtype_name
from microserve.engine.config import EngineConfig, ModelConfig
from microserve.engine.core.engine_core import EngineCore, EngineStats, InvalidRequestError, StepOutput
from microserve.engine.core.scheduler import ScheduledBatch
from microserve.engine.core.sequence import Sequence
from microserve.engine.model.loader import load_model
from microserve.engine.model.lora import LoraAdapter, LoraError, LoraSlots, load_peft
from microserve.engine.model.runner import ModelRunner
from microserve.engine.model.structured import Grammars
from microserve.engine.model.tokenizer import Tokenizer
from microserve.text import NoTokenizer

__all__ = ["EngineStats", "InvalidRequestError", "LLMEngine", "StepOutput"]


class LLMEngine(EngineCore):
    """One model, one KV pool, continuous batching.

    Args:
        model: checkpoint folder (Hugging Face layout).
        device: "cpu" or "cuda[:N]".
        dtype: None takes the checkpoint's (float16 becomes float32 on CPU).
        config: engine knobs (block size, KV pool size, token budget...).
        on_kv_event: hook called with ("stored"|"evicted", prefix hashes).
        kv_cache_factory: builds the KV cache tensor from (spec, num_blocks), e.g. in
            shared memory; default: a plain zeroed tensor on `device`.
    """

    def __init__(self, model: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None,
                 config: EngineConfig | None = None, on_kv_event: EventHook | None = None,
                 kv_cache_factory: Callable[[KVSpec, int], torch.Tensor] | None = None) -> None:
        self.config = config or EngineConfig()
        self.model_path = Path(model)
        self.model_config = ModelConfig.from_pretrained(self.model_path)
        if self.config.tensor_parallel_size != 1:
            raise ValueError(f"the built-in engine runs on one device (tensor_parallel_size "
                             f"{self.config.tensor_parallel_size}): run more engines, or --backend vllm")
        self.tokenizer = NoTokenizer() if self.config.skip_tokenizer_init else \
            Tokenizer(self.config.tokenizer or self.model_path)
        model_obj = load_model(self.model_path, device=device, dtype=dtype)
        mc = self.model_config
        self.kv_spec = KVSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim,
                              dtype_name(model_obj.model.embed_tokens.weight.dtype), self.config.block_size)
        num_blocks = self.config.num_kv_blocks or max(
            1, int(self.config.kv_cache_memory_gb * 2**30) // (self.kv_spec.bytes_per_token * self.config.block_size))
        eos = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        max_model_len = min(self.config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self._init_books(self.config, num_blocks, max_model_len, mc.vocab_size, frozenset(eos), on_kv_event)
        self._grammars: Grammars | None = None  # built on the first structured-output request
        kv_cache = kv_cache_factory(self.kv_spec, num_blocks) if kv_cache_factory else None
        self.runner = ModelRunner(model_obj, self.kv_spec, num_blocks, device, kv_cache, self.config.native_kernels,
                                  cuda_graphs=self.config.cuda_graphs, max_num_seqs=self.config.max_num_seqs,
                                  max_model_len=max_model_len)
        self.kv.copy_block = self.runner.copy_block
        if self.config.seed is not None:
            self.runner.generator.manual_seed(self.config.seed)
        self.lora: LoraSlots | None = None  # LoRA adapters (engine/model/lora.py), with enable_lora
        if self.config.enable_lora:
            slots = self.config.max_loras or max(1, len(self.config.lora_modules))
            self.lora = self.runner.lora = LoraSlots(model_obj, slots, self.config.max_lora_rank)
            self.scheduler.admit = self._admit  # NOTE: a request under an adapter runs once it has a slot
            for name, path in self.config.lora_modules:
                self.load_lora(name, path)

    def load_lora(self, name: str, path: str) -> None:
        """Register a PEFT adapter (into a free slot now, if there is one); raises LoraError (bad folder,
        rank, a name in use)."""
        self.lora_slots().add(self.read_lora(name, path))

    def read_lora(self, name: str, path: str) -> LoraAdapter:
        """Read a PEFT adapter for this model (file reads only: callers may run it off the step)."""
        self.lora_slots()
        return load_peft(name, path, self.model_config.num_layers)

    def lora_slots(self) -> LoraSlots:
        """The engine's adapters; raises LoraError when they are off."""
        if self.lora is None:
            raise LoraError("LoRA adapters are off: start the engine with --enable-lora")
        return self.lora

    def unload_lora(self, name: str) -> None:
        """Free an adapter's slot; raises LoraError when requests still run under it or it is unknown."""
        self.lora_slots().check(name)
        if any(s.sampling.lora == name for s in self._seqs.values()):
            raise LoraError(f"LoRA adapter {name!r} still has requests; unload it when they end")
        self.lora.remove(name)

    def _admit(self, seq: Sequence) -> bool:
        """The scheduler's admission check: a request under an adapter needs its slot."""
        if seq.sampling.lora is None:
            return True
        slot = self.lora.acquire(seq.sampling.lora, {s.lora_slot for s in self.scheduler.running})
        seq.lora_slot = -1 if slot is None else slot
        return slot is not None

    def _attach(self, seq: Sequence) -> None:
        if seq.sampling.lora is not None:
            if self.lora is None:
                raise InvalidRequestError(f"LoRA adapter {seq.sampling.lora!r} asked for, but adapters are off "
                                          "(start the engine with --enable-lora)")
            try:
                self.lora.check(seq.sampling.lora)
            except LoraError as exc:
                raise InvalidRequestError(str(exc)) from None
        if seq.sampling.structured is not None and not seq.prefill_only:
            if isinstance(self.tokenizer, NoTokenizer):
                raise InvalidRequestError("structured outputs need the tokenizer (the engine runs without one)")
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer.to_json(), self.vocab_size, self.eos_token_ids)
            seq.matcher = self._grammars.matcher(seq.sampling.structured)

    def _execute(self, batch: ScheduledBatch) -> dict[Sequence, int]:
        return self.runner.execute(batch)

    def stats(self) -> EngineStats:
        return replace(super().stats(), kernels=self.runner.kernels,
                       loras=tuple(sorted(self.lora.adapters)) if self.lora is not None else (),
                       lora_loads=self.lora.loads if self.lora is not None else 0)

