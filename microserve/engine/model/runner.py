"""`ModelRunner`: turns a `ScheduledBatch` into tensors, runs the model, samples.

It owns the KV cache tensor `[layers, 2, blocks, block_size, kv_heads, head_dim]`.
"""

from __future__ import annotations

import logging

import torch

from kvapi import KVSpec
from microserve.engine.core.scheduler import ScheduledBatch
from microserve.engine.core.sequence import REMOTE, Sequence
from microserve.engine.model import cuda_graphs as cuda_graphs_mod
from microserve.engine.model import native, triton_ops
from microserve.engine.model.attention import AttentionMetadata, BorrowedRows, PrefillChunk
from microserve.engine.model.models.llama import LlamaForCausalLM
from microserve.engine.model.sampler import prompt_logprobs, sample

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, spec: KVSpec, num_blocks: int, device: str | torch.device,
                 kv_cache: torch.Tensor | None = None, native_kernels: bool = True, *, cuda_graphs: bool = False,
                 max_num_seqs: int = 64, max_model_len: int = 0) -> None:
        self.model = model
        self.spec = spec
        self.block_size = spec.block_size
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda" and triton_ops.triton_available()
        graphs = on_cuda and cuda_graphs and kv_cache is None and max_model_len > 0
        # NOTE: a caller-provided cache (e.g. a pool in shared memory) must have `spec`'s shape. With CUDA
        # graphs the cache has one more block than the pool hands out: padding rows write there
        self.kv_cache = spec.allocate(num_blocks + graphs, self.device) if kv_cache is None else kv_cache
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()
        # NOTE: built (or found in torch's extension cache) here, not in the middle of serving
        kernels = None
        if native_kernels:
            kernels = native.load() if self.device.type == "cpu" else triton_ops.TritonOps if on_cuda else None
        self.native_decode = kernels.paged_decode if kernels is not None else None
        # which kernels run (stats().kernels, /metrics microserve_engine_info{kernels})
        self.kernels = "triton" if on_cuda and kernels is not None else \
            native.path(kernels) if self.device.type == "cpu" else "torch"
        model.use_native(kernels)
        half = self.kv_cache.dtype in (torch.bfloat16, torch.float16)
        if half and self.device.type == "cpu" and not (kernels is not None and kernels.simd()):
            log.warning("%s on CPU without the native AVX2 kernels runs torch's own half-precision GEMMs, which are "
                        "10-80x slower than float32 on CPUs without AVX512-BF16 or AMX; consider dtype='float32'",
                        self.kv_cache.dtype)
        self.lora = None  # the engine's LoraSlots (engine/model/lora.py), when it serves adapters
        self.graphs = None
        if graphs:
            width = -(-max_model_len // self.block_size)  # blocks of the longest context
            self.graphs = cuda_graphs_mod.DecodeGraphs(model, self.kv_cache, max_num_seqs, width)

    @torch.inference_mode()
    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src`'s KV, every layer, into block `dst` (a kept tail the prefix cache shares)."""
        self.kv_cache[:, :, dst].copy_(self.kv_cache[:, :, src])

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> dict[Sequence, int]:
        """Compute the scheduled tokens; returns the sampled token of each sequence that
        caught up to its known tokens this step."""
        scheduled = list(zip(batch.seqs, batch.num_new_tokens))
        decodes = [(s, n) for s, n in scheduled if n == 1 and not s.lent]
        prefills = [(s, n) for s, n in scheduled if n > 1 and not s.lent]
        borrowed = [(s, n) for s, n in scheduled if s.lent]  # DistAttention: attention in parts, rows last
        if self.graphs is not None and decodes and not prefills and not borrowed and self._graph_step(decodes):
            return self._replay(decodes)
        input_ids, positions, meta = self._prepare(decodes, prefills, borrowed)
        if self.lora is not None:
            self.lora.begin_step([s.lora_slot for s, n in decodes + prefills + borrowed for _ in range(n)])
        completing = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == s.num_tokens]
        meta.layer_hooks = [s.layer_hook for s in completing if s.layer_hook is not None]
        if meta.layer_hooks and self.device.type == "cuda":
            meta.layer_hooks.insert(0, lambda _: torch.cuda.current_stream().synchronize())
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        prompt_logprobs(self.model, hidden, decodes + prefills + borrowed)

        sampled, rows, offset = [], [], 0
        for seq, n in decodes + prefills + borrowed:
            offset += n
            if seq.num_computed_tokens + n == seq.num_tokens and not seq.prefill_only:
                sampled.append(seq)
                rows.append(offset - 1)
        if not sampled:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        return dict(zip(sampled, sample(logits, sampled, self.generator)))

    def _graph_step(self, decodes) -> bool:
        """Can this decode-only step replay a CUDA graph? (every row decodes to a sample, no layer hooks)"""
        seqs = [s for s, _ in decodes]
        return (all(s.num_computed_tokens + 1 == s.num_tokens and not s.prefill_only and s.layer_hook is None
                    and s.lora_slot < 0 for s in seqs)
                and self.graphs.fits(len(seqs), max(s.num_computed_tokens for s in seqs) // self.block_size + 1))

    def _replay(self, decodes) -> dict[Sequence, int]:
        bs = self.block_size
        seqs = [s for s, _ in decodes]
        pos = [s.num_computed_tokens for s in seqs]
        logits = self.graphs.run([s.token_ids[p] for s, p in zip(seqs, pos)], pos,
                                 [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)],
                                 [s.block_table[:p // bs + 1] for s, p in zip(seqs, pos)])
        return dict(zip(seqs, sample(logits, seqs, self.generator)))

    def _prepare(self, decodes, prefills, borrowed=()) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        meta = AttentionMetadata(slot_mapping=None, num_decodes=len(decodes),  # type: ignore[arg-type]
                                 native_decode=self.native_decode)
        if decodes:
            max_blocks = max(s.num_computed_tokens // bs + 1 for s, _ in decodes)
            tables, ctx = [], []
            for seq, _ in decodes:
                p = seq.num_computed_tokens
                ids.append(seq.token_ids[p])
                pos.append(p)
                slots.append(seq.block_table[p // bs] * bs + p % bs)
                table = seq.block_table[:max_blocks]
                tables.append(table + [0] * (max_blocks - len(table)))
                ctx.append(p + 1)
            meta.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=dev)
            meta.decode_lens = torch.tensor(ctx, dtype=torch.long, device=dev)
            if self.native_decode is None:
                span = torch.arange(max_blocks * bs, device=dev)
                meta.decode_mask = (span < meta.decode_lens.unsqueeze(1))[:, None, None, :]
        for seq, n in prefills:
            start = seq.num_computed_tokens
            table = seq.block_table[:-(-(start + n) // bs)]
            meta.prefills.append(PrefillChunk(len(ids), n, start, torch.tensor(table, dtype=torch.long, device=dev)))
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        for seq, n in borrowed:
            start, table = seq.num_computed_tokens, seq.block_table
            meta.borrowed.append(BorrowedRows(len(ids), n, torch.arange(start, start + n, device=dev), start,
                                              self._local_runs(table, start + n),
                                              _by_lender(seq), seq))
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        meta.slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev), meta)

    def _local_runs(self, table: list[int], end: int) -> list[tuple[int, int, torch.Tensor]]:
        """(begin, end, blocks) of each run of positions in `[0, end)` whose blocks are here (not REMOTE)."""
        bs, runs, first = self.block_size, [], None
        count = -(-end // bs)
        for i in range(count + 1):
            here = i < count and table[i] != REMOTE
            if here and first is None:
                first = i
            elif not here and first is not None:
                runs.append((first * bs, min(i * bs, end),
                             torch.tensor(table[first:i], dtype=torch.long, device=self.device)))
                first = None
        return runs


def _by_lender(seq: Sequence) -> list[list]:
    """The peers of a sequence's moved lent ranges, grouped by lender (each group: one `attend` per layer)."""
    groups: dict = {}
    for r in seq.lent:
        if r.pushed:
            groups.setdefault(r.peer.lender, []).append(r.peer)
    return list(groups.values())
