"""CUDA graphs of the decode step (the kernels they replay are in `triton_ops.py`).

A decode step of a small batch is launch-bound in eager PyTorch (hundreds of small kernels,
each waiting on Python). `DecodeGraphs` captures the decode forward (embedding, every layer,
the final norm) once per batch-size bucket and replays it: the host work of a step becomes
a few copies into static buffers and one graph launch. The lm_head runs after the replay,
on the real rows only (as vLLM does): one GEMM, and no `[bucket, vocab]` logits buffer kept
alive per bucket (with 35 buckets and a 128k vocabulary those would hold gigabytes).

What a graph can hold: shapes fixed at capture, inputs read from static buffers. So the
decode attention reads K/V through the block table with each sequence's length read from
device memory (`triton_ops.paged_decode`), the table buffer is as wide as the longest context,
and a batch is padded up to its bucket with rows that write their K/V into one scratch
block that the pool never hands out (the runner allocates the cache one block larger).
Steps with prefill chunks, KV-streaming layer hooks or more sequences than the largest
bucket run eagerly.
"""

from __future__ import annotations

import logging

import torch

from microserve.engine.model.triton_ops import TritonOps

log = logging.getLogger("microserve.engine")


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 8 up to `max_batch` (vLLM's ladder)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch + 8, 8))
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphs:
    """The decode forward captured once per batch bucket; `run` pads, copies, replays.

    Args:
        model: the model (its forward; `compute_logits` runs outside the graphs).
        kv_cache: [L, 2, NB + 1, bs, Hkv, D]; block NB (the last) is the scratch block.
        max_batch: the largest bucket (the engine's `max_num_seqs`).
        max_blocks: block-table width (blocks of the longest context).
    """

    def __init__(self, model, kv_cache: torch.Tensor, max_batch: int, max_blocks: int) -> None:
        from microserve.engine.model.attention import AttentionMetadata

        self.model, self.kv_cache = model, kv_cache
        dev = kv_cache.device
        self.block_size = kv_cache.shape[3]
        self.scratch = kv_cache.shape[2] - 1
        self.buckets = batch_buckets(max_batch)
        n = self.buckets[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), self.scratch * self.block_size, dtype=torch.long, device=dev)
        self.tables = torch.full((n, max_blocks), self.scratch, dtype=torch.int32, device=dev)
        self.lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0  # decode steps served by a graph (tests, stats)
        self.hidden: dict[int, torch.Tensor] = {}  # each graph's output: final hidden states [b, H]
        self._meta = AttentionMetadata
        self._capture()

    def _forward(self, b: int) -> torch.Tensor:
        meta = self._meta(slot_mapping=self.slots[:b], num_decodes=b, decode_block_tables=self.tables[:b],
                          decode_lens=self.lens[:b], native_decode=TritonOps.paged_decode)
        return self.model(self.ids[:b], self.pos[:b], self.kv_cache, meta)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (Triton compiles, cuBLAS picks kernels) off the capture
            for b in self.buckets:
                self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        for b in reversed(self.buckets):  # largest first: the smaller ones reuse its memory pool
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.hidden[b] = self._forward(b)
            pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.buckets[-1] and max_blocks <= self.tables.shape[1]

    def run(self, ids: list[int], pos: list[int], slots: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits [B, V] float32 of one decode step."""
        n = len(ids)
        b = next(s for s in self.buckets if s >= n)
        pad, scratch = b - n, self.scratch
        # NOTE: only the table columns in use are copied; a row never reads past its own length, and
        # pad rows (length 1, table column 0 = the scratch block) write and read the scratch block alone
        width = max(len(t) for t in tables)
        rows = [t + [scratch] * (width - len(t)) for t in tables] + [[scratch] * width] * pad
        self.tables[:b, :width].copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)
        self.ids[:b].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.pos[:b].copy_(torch.tensor(pos + [0] * pad), non_blocking=True)
        self.slots[:b].copy_(torch.tensor(slots + [scratch * self.block_size] * pad), non_blocking=True)
        self.lens[:b].copy_(torch.tensor([p + 1 for p in pos] + [1] * pad, dtype=torch.int32), non_blocking=True)
        self.graphs[b].replay()
        self.replays += 1
        return self.model.compute_logits(self.hidden[b][:n])
