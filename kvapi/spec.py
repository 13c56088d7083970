"""`KVSpec`: the shape of one engine's paged KV cache.

Two engines can exchange KV pages only when their specs agree field by field;
`KVSpec.check_compatible` says which field differs when they do not.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:  # NOTE: torch is imported lazily so router/gateway processes never load it
    import torch

_ELEMENT_SIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


class KVSpecMismatch(ValueError):
    """Raised when two KV specs cannot exchange pages."""


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical string name of a torch dtype ('float32', 'bfloat16', ...)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _ELEMENT_SIZE:
        raise ValueError(f"unsupported KV dtype {dtype!r}; supported: {sorted(_ELEMENT_SIZE)}")
    return name


class KVSpec(msgspec.Struct, frozen=True, array_like=True):
    """Layout of a paged KV cache: `[layers, 2 (k|v), blocks, block_size, kv_heads, head_dim]`.

    One block of one layer holds `block_size` tokens of K (or V) for all KV heads, and
    is contiguous in memory: that is the unit the transfer layer moves.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    block_size: int = 16
    # what one page is: "nhd" = K (or V) of one block of one layer, [block_size, kv_heads, head_dim]
    # (the built-in engine); "vllm-cpu-block" = a whole block of one layer, K and V together
    layout: str = "nhd"

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, field) <= 0:
                raise ValueError(f"KVSpec.{field} must be positive, got {getattr(self, field)}")
        dtype_name(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def element_size(self) -> int:
        return _ELEMENT_SIZE[self.dtype]

    @property
    def page_bytes(self) -> int:
        """Bytes of K (or of V) of one block in one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_compatible(self, other: KVSpec) -> None:
        """Raise `KVSpecMismatch` naming the first field where `other` differs (the layout first:
        pages of different layouts cannot be exchanged whatever the sizes)."""
        for field in ("layout", *self.__struct_fields__):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                raise KVSpecMismatch(f"KV spec mismatch on {field}: {mine!r} here vs {theirs!r} at the peer")

    def allocate(self, num_blocks: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """A zeroed cache tensor `[layers, 2, num_blocks, block_size, kv_heads, head_dim]`.

        On CPU the memory comes zeroed from the OS, mapped on first touch (calloc: `numpy.zeros`), not
        written by `torch.zeros`: an engine's 1 GB pool cost 0.8 s of CPU at every start (and every
        `LLM`), and now costs what its used blocks touch. 64-byte aligned, as torch's own allocator."""
        import torch

        shape = self.cache_shape(num_blocks)
        if torch.device(device).type != "cpu":
            return torch.zeros(shape, dtype=self.torch_dtype, device=device)
        import numpy as np

        nbytes = math.prod(shape) * torch.empty((), dtype=self.torch_dtype).element_size()
        raw = np.zeros(nbytes + 64, dtype=np.uint8)
        start = -raw.ctypes.data % 64
        return torch.from_numpy(raw[start:start + nbytes]).view(self.torch_dtype).view(shape)

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
