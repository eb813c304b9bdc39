"""Paged KV cache: one preallocated pool of fixed-size blocks, handed out per sequence."""

from __future__ import annotations

import torch

from inference_svc.model_config import ModelConfig


class KVCache:
    """Keys and values of every layer in `num_blocks` blocks of `block_size` token positions.

    Storage is allocated once; sequences own lists of block ids (their block table) and the
    allocator only moves ids between the free list and those tables.
    """

    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks ({num_blocks}) must be >= 1: the KV-cache budget is too small")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (model.num_layers, num_blocks * block_size, model.num_kv_heads, model.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [L, slots, kv_heads, head_dim]
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, table: list[int], num_tokens: int) -> bool:
        """Grow `table` to hold `num_tokens` positions; False (and no change) if blocks run out."""
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra <= 0:
            return True
        if extra > len(self._free):
            return False
        for _ in range(extra):
            table.append(self._free.pop())
        return True

    def free(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()

    def slot_index(self, table: list[int], positions: range) -> list[int]:
        """Flat slot of each position in the pool, for a sequence with block table `table`."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in positions]
