"""Triton kernels of LoRA on CUDA: each row of a batch under its own adapter slot, in two launches per
projection (punica's batched gather: shrink, then expand).

    shrink   h[t, p, :]  = x[t] @ A[:, (p, slot[t])]              one program per (row, fused part)
    expand   y[t, n]    += h[t, part(n), :] @ B[slot[t], n]        one program per (row, BLOCK_N columns)

`A` holds every slot's A side by side (`[in, parts x slots x rank]`, lora.py's layout) and `B` every
slot's scaled B, the parts' columns side by side (`[slots x rank, out]`); a row reads its own slot's
columns and rows only, and rows under no adapter (slot -1) read and write nothing. Against the torch
path (`((x A_all) * mask) B` over the slots a step uses: four to six kernels per projection, every
active slot's columns multiplied for every row) this is two kernels and each row's own rank. Correct
under Triton's interpreter (`TRITON_INTERPRET=1`) on CPU tensors, which is how the tests check it
without a GPU (tests/test_lora.py); `.ci/gpu-check` runs it on CUDA against the CPU engine.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CUDA builds of torch ship Triton
    triton = None


if triton is not None:

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, K, stride_x, stride_a, SLOTS: tl.constexpr,
                       RANK: tl.constexpr, PARTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        t = tl.program_id(0)
        p = tl.program_id(1)
        slot = tl.load(slots_ptr + t)
        k_end = tl.where(slot >= 0, K, 0)  # NOTE: a row under no adapter reads nothing
        r = tl.arange(0, BLOCK_R)
        rmask = r < tl.where(slot >= 0, RANK, 0)
        col = (p * SLOTS + slot) * RANK + r
        acc = tl.zeros((BLOCK_R,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < k_end
            xv = tl.load(x_ptr + t * stride_x + k, mask=kmask, other=0.0).to(tl.float32)
            av = tl.load(a_ptr + k[:, None] * stride_a + col[None, :], mask=kmask[:, None] & rmask[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(xv[:, None] * av, axis=0)
        tl.store(h_ptr + (t * PARTS + p) * RANK + r, acc, mask=rmask)

    @triton.jit
    def _expand_kernel(h_ptr, b_ptr, slots_ptr, y_ptr, N, stride_b, stride_y, END0, END1, RANK: tl.constexpr,
                       PARTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        t = tl.program_id(0)
        nb = tl.program_id(1)
        slot = tl.load(slots_ptr + t)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < tl.where(slot >= 0, N, 0)  # NOTE: a row under no adapter writes nothing
        part = (n >= END0).to(tl.int32) + (n >= END1).to(tl.int32)  # the fused part each column belongs to
        r = tl.arange(0, BLOCK_R)
        m = (r < RANK)[:, None] & nmask[None, :]
        hv = tl.load(h_ptr + (t * PARTS + part[None, :]) * RANK + r[:, None], mask=m, other=0.0)
        bv = tl.load(b_ptr + (slot * RANK + r[:, None]) * stride_b + n[None, :], mask=m, other=0.0).to(tl.float32)
        delta = tl.sum(hv * bv, axis=0)
        yv = tl.load(y_ptr + t * stride_y + n, mask=nmask, other=0.0)
        tl.store(y_ptr + t * stride_y + n, (yv.to(tl.float32) + delta).to(yv.dtype), mask=nmask)


def lora_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, y: torch.Tensor,
               parts: list[int], num_slots: int, rank: int) -> torch.Tensor:
    """`y[t] += x[t] A[slot[t]] B[slot[t]]` per fused part, in place (rows with slot -1 untouched).

    x: `[T, in]`; a: `[in, parts x slots x rank]`; b: `[slots x rank, sum(parts)]`; slots: `[T]` int32;
    y: `[T, sum(parts)]`."""
    if triton is None:
        raise RuntimeError("LoRA on CUDA needs Triton (CUDA builds of torch ship it)")
    x, slots = x.contiguous(), slots.to(torch.int32)
    rows, k = x.shape
    n = sum(parts)
    h = torch.empty(rows, len(parts), rank, dtype=torch.float32, device=x.device)
    block_r = triton.next_power_of_2(rank)
    _shrink_kernel[(rows, len(parts))](x, a, slots, h, k, x.stride(0), a.stride(0), SLOTS=num_slots, RANK=rank,
                                       PARTS=len(parts), BLOCK_R=block_r, BLOCK_K=128)
    ends = [sum(parts[:i + 1]) for i in range(len(parts) - 1)] + [n] * (3 - len(parts))
    block_n = 128
    _expand_kernel[(rows, triton.cdiv(n, block_n))](h, b, slots, y, n, b.stride(0), y.stride(0), ends[0], ends[1],
                                                    RANK=rank, PARTS=len(parts), BLOCK_R=block_r, BLOCK_N=block_n)
    return y
